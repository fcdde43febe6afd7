#!/bin/sh
# The lab guest's init script (busybox sh, run by nvwa-lab-init as pid 1). The same script runs
# on the old kernel, where it sets the scenario up and runs `nvwa update`, and on the new kernel
# (after the kexec), where the nvwa server restores the saved processes and the checks run.
#
# It talks to the host in lines on the console:
#   NVWA-LAB {json}          a structured event
#   NVWA-LAB-OUT tag: text   output of a scenario step, kept for the report
# Persistent state (criu images, the journal, scenario variables) lives on /dev/pmem0: memory
# reserved with memmap=, which the next kernel leaves alone. A scenario with power_cut = true
# runs on RAM backed by a file on the host: after `lab_power_cut` the lab boots the same machine
# again, cold, with nvwa_lab.boot=cold on the command line, and this script takes the "after
# restart" path with what the persistent memory kept.

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
umask 022
# The kernel unpacks the initramfs into a rootfs whose / is 1777; nvwa (rightly) trusts no
# configuration or image directory below a world-writable directory, as on any real root file system.
chmod 0755 /

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /run /tmp
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /dev/shm
exec </dev/console >/dev/console 2>&1
# nvwa-pre.service's job, before anything else can take a pid: honour the reservation an
# update left on the kernel command line.
nvwa pre >/dev/null

read -r K </proc/sys/kernel/osrelease
. /lab/lib.sh
finish() {
    sync
    ev "{\"event\":\"finish\",\"kernel\":\"$K\",\"failed\":$1}"
    poweroff -f
}

# The uptime lets the host place this kernel's clock zero on its own clock: the kexec handoff
# ends there, and the boot to /init is the uptime (see nvwa-lab's bench).
lab_now
ev "{\"event\":\"init\",\"kernel\":\"$K\",\"uptime\":$LAB_NOW}"
# From here until the server restores, every process this script starts is counted in the
# bench's "nvwa start" and takes the one emulated CPU from the boot: shell builtins wherever
# they do (under TCG a busybox applet's fork and exec takes about 10 ms).
read -r LAB_CMDLINE </proc/cmdline
# lab_cmdline_has WORD: the kernel command line has WORD (nvwa_lab.boot=cold, say).
lab_cmdline_has() { case " $LAB_CMDLINE " in *" $1 "*) return 0 ;; esac; return 1; }
# The boot of the bench's bare kexec (below): reaching /init is all it measures.
if lab_cmdline_has nvwa_lab.boot=floor; then
    ev "{\"event\":\"boot\",\"stage\":\"floor\",\"kernel\":\"$K\"}"
    # Where the kernel spent its boot, for comparison with the update's (the serial log).
    dmesg | out dmesg-floor
    finish 0
fi

# The bench's bare kexec (crates/nvwa-lab/src/bench.rs): a fresh boot of the old kernel jumps at
# once into the update's kernel and initramfs, with nothing to save.
if lab_cmdline_has nvwa_lab.boot=bare; then
    . /lab/scenario.sh
    if kexec -s -l "/boot/vmlinuz-$LAB_NEW_KERNEL" --initrd="/boot/initramfs-$LAB_NEW_KERNEL.img" \
        --reuse-cmdline --append=nvwa_lab.boot=floor >/tmp/kexec.out 2>&1; then
        sync
        ev '{"event":"bench","step":"kexec"}'
        kexec -e >>/tmp/kexec.out 2>&1
    fi
    out bench </tmp/kexec.out
    finish 1
fi

# Where the boot goes between /init and the server (the serial log; the bench's "nvwa start"):
# each step's end on this kernel's clock.
step() { lab_now; ev "{\"event\":\"init-step\",\"step\":\"$1\",\"uptime\":$LAB_NOW}"; }

# Kernel modules criu and the persistent memory need, in dependency order, staged without their
# signatures (nvwa-lab's modules::strip_signature: checking them is slow under TCG), loaded by one
# process, which also names any module that was slow to load.
nvwa-lab-workload load-modules "/lib/modules/$K/nvwa-lab/load-order" 2>&1 | out modules
ip link set lo up
step modules

i=0
while [ ! -b /dev/pmem0 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
if [ ! -b /dev/pmem0 ]; then
    echo "no /dev/pmem0: is memmap= on the kernel command line?" | out init
    { cat /proc/cmdline; grep -i persistent /proc/iomem; dmesg | grep -iE 'pmem|nvdimm|e820|memmap' | tail -20; } 2>&1 | out init
    finish 1
fi
step pmem
[ -d /var/nvwa ] || mkdir -p /var/nvwa
COLD_BOOT=0
lab_cmdline_has nvwa_lab.boot=cold && COLD_BOOT=1
if [ $COLD_BOOT = 1 ]; then
    # After a power cut the persistent memory must come back as it was: formatting it here would
    # hide exactly what this boot is meant to show.
    if ! mount -t ext4 -o dax /dev/pmem0 /var/nvwa 2>/dev/null && ! mount -t ext4 /dev/pmem0 /var/nvwa 2>/tmp/mount.err; then
        ev "{\"event\":\"cold-boot-error\",\"error\":\"/dev/pmem0 holds no file system after the power cut: the persistent memory lost its contents ($(tr -d '"\\' </tmp/mount.err | head -c 200))\"}"
        finish 1
    fi
    if [ ! -f /var/nvwa/lab/setup-done ]; then
        ev '{"event":"cold-boot-error","error":"/var/nvwa/lab/setup-done, made durable before the update, is missing after the power cut: the persistent memory did not keep its files"}'
        finish 1
    fi
# Busybox prefers its own applets to $PATH: e2fsprogs' mke2fs is called by its full path. It
# zeroes the inode tables and the journal itself: left to the kernel (lazy_itable_init), each
# mount would start ext4lazyinit, which was still zeroing on the new kernel while it restored.
elif ! mount -t ext4 -o dax /dev/pmem0 /var/nvwa 2>/dev/null && ! mount -t ext4 /dev/pmem0 /var/nvwa 2>/dev/null; then
    /usr/sbin/mke2fs -q -F -t ext4 -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 /dev/pmem0 2>&1 | out init
    mount -t ext4 -o dax /dev/pmem0 /var/nvwa 2>/dev/null || mount -t ext4 /dev/pmem0 /var/nvwa 2>&1 | out init
fi
mounted=
while IFS= read -r line; do
    case $line in *' /var/nvwa '*) mounted=$line ;; esac
done </proc/mounts
if [ -z "$mounted" ]; then
    echo "cannot mount /dev/pmem0 on /var/nvwa: nothing would survive the kexec" | out init
    finish 1
fi
echo "$mounted" | out init
step mount
# nvwa-pre.service's other job, now that the images are mounted and before the network is up:
# put back the lock of the saved TCP connections (the pids were reserved above already).
nvwa pre 2>&1 | while IFS= read -r line; do
    case $line in 'pids up to'* | 'no pid reservation'*) ;; *) echo "$line" ;; esac
done | out pre
step pre
# QEMU's user-mode network: the host reaches the guest through the scenario's port forwards.
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2
fi
export LAB_STATE=/var/nvwa/lab
# Made on the old kernel's first boot; the persistent memory keeps them.
[ -d "$LAB_STATE" ] && [ -d /var/nvwa/log ] || mkdir -p "$LAB_STATE" /var/nvwa/log
: >>"$LAB_STATE/vars"

. /lab/scenario.sh

# launch_server: start the nvwa server in the background; LAB_SERVER_PID is its pid.
launch_server() {
    nvwa server >>"/var/nvwa/log/server-$K.log" 2>&1 &
    LAB_SERVER_PID=$!
}

# server_started: end the run, with the server's log, unless the server runs and listens.
server_started() {
    lab_server_alive && [ -S /run/nvwa/nvwa.socket ] && return 0
    echo "the nvwa server is not running: it exited, or never listened on /run/nvwa/nvwa.socket" | out server
    cat "/var/nvwa/log/server-$K.log" | out server
    finish 1
}

start_server() {
    launch_server
    i=0
    while [ ! -S /run/nvwa/nvwa.socket ] && lab_server_alive && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
    server_started
}

# lab_power_cut [WHY]: cut the power now, as a power failure would: no sync, no unmount. The
# lab cold-boots the same machine afterwards if the scenario asked for it (power_cut = true).
# Also /usr/sbin/lab-power-cut, for wrappers that the nvwa server runs.
lab_power_cut() { /usr/sbin/lab-power-cut "$@"; }

# lab_as_user CMD...: run CMD as the unprivileged user `lab` (uid and gid 1000, no other groups),
# in its home, made on first use (the initramfs makes everything root's).
lab_as_user() {
    [ -d /home/lab ] || { mkdir -p /home/lab && chown lab:lab /home/lab && chmod 0700 /home/lab; }
    nvwa-lab-workload as-user lab "$@"
}

lab_restart_server() {
    nvwa exit >/dev/null
    i=0
    while [ -S /run/nvwa/nvwa.socket ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    start_server
}

if lab_cmdline_has nvwa_lab.shell=1; then
    start_server
    echo "nvwa lab shell on $K (nvwa server running, state on /var/nvwa); 'poweroff -f' to leave"
    setsid cttyhack sh -l
    poweroff -f
fi

failed=0

settle_and_check() {
    # The scenario's nvwa-restore.yaml, as a disk would have kept it.
    [ ! -e "$LAB_STATE/nvwa-restore.yaml" ] || cp "$LAB_STATE/nvwa-restore.yaml" /etc/nvwa/
    ( set -e; . "$LAB_STATE/vars"; lab_before_restore ) >/tmp/before.out 2>&1
    rc=$?
    out before_restore </tmp/before.out
    ev "{\"event\":\"before-restore\",\"rc\":$rc}"
    # Not start_server: its wait for the socket would run `sleep` while the server starts and
    # restores. The journal says when the restore is done; the socket is looked at afterwards.
    launch_server
    phase=$(lab_wait_restore)
    server_started
    ev "{\"event\":\"restored\",\"phase\":\"$phase\"}"
    echo "NVWA-LAB {\"event\":\"journal\",\"journal\":$(nvwa status --json | tr -d '\n')}"
    run_checks
    cat "/var/nvwa/log/server-$K.log" | out server
    # The bench compares where this boot spent its time with its bare kexec (the serial log).
    if [ -f /lab/bench ]; then dmesg | out dmesg-new; fi
    finish $failed
}

if [ $COLD_BOOT = 1 ]; then
    # --- the same machine, powered on again after lab_power_cut: old kernel, no kexec ---
    ev "{\"event\":\"boot\",\"stage\":\"cold\",\"kernel\":\"$K\"}"
    # ns_last_pid is left alone: this boot's own processes stay far below the saved pids (above
    # 1000, see the old kernel's path), as after a real power-on.
    settle_and_check
elif [ ! -f "$LAB_STATE/update-started" ]; then
    # --- old kernel ---
    ev "{\"event\":\"boot\",\"stage\":\"old\",\"kernel\":\"$K\"}"
    # A server that has been up for a while runs its services far above the pids that the next
    # boot's kernel threads take (a few hundred at most), which no reservation can move.
    echo 1000 > /proc/sys/kernel/ns_last_pid
    start_server
    run_setup || finish 1
    # What ran before the update is on the persistent memory for good, as on a server that has
    # been up for a while: a power cut during the update tests only what nvwa made durable.
    touch "$LAB_STATE/setup-done"
    sync
    run_updates
    run_checks
    cat "/var/nvwa/log/server-$K.log" | out server
    finish $failed
else
    # --- new kernel: the server restores what the old one saved ---
    ev "{\"event\":\"boot\",\"stage\":\"new\",\"kernel\":\"$K\"}"
    settle_and_check
fi
