#!/bin/sh
# The server guest's scenario runner: lab.service, started once the machine reached
# multi-user.target. On the old kernel it sets the scenario up and runs `nvwa update`; on the new
# kernel nvwa.service has already restored the saved processes by itself (no step of the lab's):
# this script waits for the restore to settle and runs the checks. It reports on the serial
# console with the same NVWA-LAB events as the busybox guest's init.sh (see lib.sh).

export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
umask 022
exec </dev/null >/dev/ttyS0 2>&1

K=$(uname -r)
export LAB_STATE=/var/lib/nvwa-lab
LAB_CONSOLE=/dev/ttyS0
# nvwa's journal, in the criu_dir of this guest's nvwa-server.yaml.
LAB_JOURNAL=/var/lib/nvwa/journal.json
. /lab/lib.sh
finish() {
    sync
    ev "{\"event\":\"finish\",\"kernel\":\"$K\",\"failed\":$1}"
    systemctl poweroff --force --force
}

ev "{\"event\":\"init\",\"kernel\":\"$K\"}"
mkdir -p "$LAB_STATE"
touch "$LAB_STATE/vars"
. /lab/scenario.sh
# systemd's own account of this boot (kernel, initrd, userspace up to now).
systemd-analyze time 2>&1 | out boot

# wait_server: nvwa.service is active and its socket is there.
wait_server() {
    i=0
    until systemctl is-active -q nvwa.service && [ -S /run/nvwa/nvwa.socket ]; do
        i=$((i + 1))
        if [ $i -gt 600 ]; then
            echo "nvwa.service is not running" | out server
            systemctl status --no-pager nvwa.service 2>&1 | out server
            return 1
        fi
        sleep 0.1
    done
}

lab_restart_server() { systemctl restart nvwa.service && wait_server; }

# wait_host_done: until the host steps of update_from_host say they are done (they create the file
# over SSH); the scenario's deadline bounds the wait.
wait_host_done() {
    until [ -e /run/nvwa-lab-host-done ]; do sleep 1; done
}

# server_log: what nvwa.service logged on this boot.
server_log() { journalctl -b 0 -u nvwa.service --no-pager -o short-monotonic 2>&1 | out server; }

failed=0
if [ ! -f "$LAB_STATE/update-started" ]; then
    # --- old kernel ---
    ev "{\"event\":\"boot\",\"stage\":\"old\",\"kernel\":\"$K\"}"
    wait_server || finish 1
    run_setup || finish 1
    if [ -n "$LAB_UPDATE_FROM_HOST" ]; then
        # The host runs the update (update_from_host): from now on the next boot is the new one.
        touch "$LAB_STATE/update-started"
        sync
        lab_host "$LAB_UPDATE_FROM_HOST"
        wait_host_done
        echo "the host steps are done, and this is still the old kernel" | out update
    fi
    run_updates
    # kexec_mode: orderly: the update returned and systemd is stopping the machine to jump;
    # powering off here would cut that short. systemd stops this script with the rest.
    if systemctl list-jobs --no-legend 2>/dev/null | grep -q 'kexec\.target'; then
        echo "systemd is stopping the machine for the kexec" | out update
        while :; do sleep 60; done
    fi
    run_checks
    server_log
    finish $failed
else
    # --- new kernel: nvwa.service restored at boot; wait for it to settle ---
    ev "{\"event\":\"boot\",\"stage\":\"new\",\"kernel\":\"$K\"}"
    phase=$(lab_wait_restore)
    ev "{\"event\":\"restored\",\"phase\":\"$phase\"}"
    echo "NVWA-LAB {\"event\":\"journal\",\"journal\":$(nvwa status --json | tr -d '\n')}"
    [ -z "$LAB_UPDATE_FROM_HOST" ] || wait_host_done
    run_checks
    server_log
    finish $failed
fi
