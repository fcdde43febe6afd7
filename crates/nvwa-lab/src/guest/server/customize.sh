#!/bin/sh
# mmdebstrap --customize-hook of the server guest ($1: its root directory): what a machine's
# installer would leave, plus the lab's own wiring (a serial console for the lab, the lab disk).
set -eu
root=$1
echo nvwa-lab >"$root/etc/hostname"
# The lab disk (nvwa and this run's scenario, made at each run) is mounted read-only on /lab.
cat >"$root/etc/fstab" <<EOT
/dev/vda / ext4 rw,errors=remount-ro 0 1
LABEL=nvwa-lab /lab ext4 ro 0 0
EOT
mkdir -p "$root/lab"
# A persistent journal, so that `journalctl -b -1` shows the boot before the kexec.
mkdir -p "$root/var/log/journal"
# QEMU's user network, configured statically: the host reaches the guest through port forwards.
mkdir -p "$root/etc/systemd/network"
cat >"$root/etc/systemd/network/10-lab.network" <<EOT
[Match]
Name=en* eth*

[Network]
Address=10.0.2.15/24
Gateway=10.0.2.2
EOT
chroot "$root" systemctl enable systemd-networkd.service
# Debian's redis-server.service (a sandboxed Type=notify unit) is installed for the scenarios that
# preserve a service; disabled, so that the other scenarios do not run it.
chroot "$root" systemctl disable redis-server.service
# sshd is there for the scenarios that drive the guest from the host (Ansible); they enable it.
chroot "$root" systemctl disable ssh.service
# The serial console carries the lab's events: no getty on it (its vhangup would cut the lab's
# output). Timers that would compete for the two emulated CPUs during a run are masked.
for u in serial-getty@ttyS0.service apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer \
    e2scrub_all.timer e2scrub_reap.service fstrim.timer; do
    ln -sf /dev/null "$root/etc/systemd/system/$u"
done
# Modules criu needs (socket diagnostics, nftables for locking the network, tun, veth).
cat >"$root/etc/modules-load.d/nvwa-lab.conf" <<EOT
unix_diag
inet_diag
tcp_diag
udp_diag
netlink_diag
af_packet_diag
nf_tables
tun
veth
EOT
