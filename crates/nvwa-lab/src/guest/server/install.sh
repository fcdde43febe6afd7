#!/bin/sh
# lab-install.service: installs this checkout's nvwa (and the lab's workload) from the lab disk,
# as an operator's package would, before nvwa-pre.service and nvwa.service start. A file that is
# already identical is left alone: a process restored on the new boot must find the very
# executable it was dumped with.
set -eu
inst() { cmp -s "$1" "$2" || install -m 0755 "$1" "$2"; }
inst /lab/bin/nvwa /usr/bin/nvwa
inst /lab/bin/nvwa-lab-workload /usr/bin/nvwa-lab-workload
mkdir -p /usr/lib/systemd/system-generators
inst /lab/nvwa-generator /usr/lib/systemd/system-generators/nvwa-generator
# The scenario's files, once (the second boot keeps what the first one installed).
if [ -d /lab/files ] && [ ! -e /var/lib/nvwa-lab/files-installed ]; then
    cp -a /lab/files/. /
    mkdir -p /var/lib/nvwa-lab
    touch /var/lib/nvwa-lab/files-installed
fi
