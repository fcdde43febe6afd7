#!/bin/sh
# Runs chrooted in a copy of the server guest's root file system, on the host, when the lab puts
# nvwa's Debian package into the guest ($1: the .deb built by scripts/package). It installs the
# package as an operator would, with dpkg, its maintainer scripts and its initramfs trigger, and
# checks what the package promises about the initrds.
set -eu
deb=$1
kernels=$(cd /boot && ls vmlinuz-* | sed 's/^vmlinuz-//' | sort -V)
newest=$(echo "$kernels" | tail -n 1)
has_hook() { lsinitramfs "/boot/initrd.img-$1" | grep -qx scripts/init-top/nvwa; }
# Without the package no initrd has nvwa's script: finding it afterwards proves the trigger ran.
for k in $kernels; do
    if has_hook "$k"; then
        echo "the initrd of $k carries nvwa's init-top script before the package is installed" >&2
        exit 1
    fi
done
dpkg -i "$deb"
has_hook "$newest" || {
    echo "installing the package did not rebuild the initrd of $newest (its update-initramfs trigger)" >&2
    exit 1
}
echo "the package's trigger rebuilt the initrd of $newest"
# The other kernels' initrds, as the README tells an operator to do before updating to another
# installed kernel than the newest.
for k in $kernels; do
    [ "$k" = "$newest" ] || update-initramfs -u -k "$k"
done
# Every initrd carries the script and runs it before udev's.
for k in $kernels; do
    i=/boot/initrd.img-$k
    has_hook "$k" || {
        echo "$i lacks scripts/init-top/nvwa" >&2
        exit 1
    }
    # shellcheck disable=SC2016
    order=$(sh -c 'd=$(mktemp -d) && unmkinitramfs "$1" "$d" &&
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
# Both units are enabled by the package's postinst.
for l in multi-user.target.wants/nvwa.service sysinit.target.wants/nvwa-pre.service; do
    [ -L "/etc/systemd/system/$l" ] || {
        echo "the package did not enable $l" >&2
        exit 1
    }
done
