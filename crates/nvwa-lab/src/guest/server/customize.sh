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
# Every kernel's initrd (made by initramfs-tools when its package was configured) carries nvwa's
# init-top script, put in place by the essential hook, and runs it before udev's.
for i in "$root"/boot/initrd.img-*; do
    i=/boot/${i##*/}
    chroot "$root" lsinitramfs "$i" | grep -x scripts/init-top/nvwa >/dev/null || {
        echo "$i lacks scripts/init-top/nvwa" >&2
        exit 1
    }
    # shellcheck disable=SC2016
    order=$(chroot "$root" sh -c 'd=$(mktemp -d) && unmkinitramfs "$1" "$d" &&
        cat "$d/main/scripts/init-top/ORDER" 2>/dev/null || cat "$d/scripts/init-top/ORDER"
        s=$?; rm -rf "$d"; exit $s' sh "$i" | sed -n 's|^/scripts/init-top/\([^ ]*\) .*|\1|p' | tr '\n' ' ')
    echo "$i: init-top runs $order"
    case " $order" in
    *" nvwa udev "* | *" nvwa "*" udev "*) ;;
    *)
        echo "$i: nvwa does not run before udev in init-top" >&2
        exit 1
        ;;
    esac
done
