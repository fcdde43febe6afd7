#!/bin/sh
# lab-install.service: installs the lab's workload and the scenario's files from the lab disk
# before nvwa's units start (nvwa itself is installed from its package when the guest is built).
# A file that is already identical is left alone: a process restored on the new boot must find
# the very executable it was dumped with.
set -eu
inst() { cmp -s "$1" "$2" || install -m 0755 "$1" "$2"; }
inst /lab/bin/nvwa-lab-workload /usr/bin/nvwa-lab-workload
# The scenario's files, once (the second boot keeps what the first one installed).
if [ -d /lab/files ] && [ ! -e /var/lib/nvwa-lab/files-installed ]; then
    cp -a /lab/files/. /
    mkdir -p /var/lib/nvwa-lab
    touch /var/lib/nvwa-lab/files-installed
fi
