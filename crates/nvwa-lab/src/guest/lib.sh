# Shell functions shared by the lab's guests: the busybox guest's init.sh and the server guest's
# server.sh source this file after setting K (the running kernel) and LAB_STATE (a directory that
# survives the kernel switch).

# The serial console the runner reads (server.sh sets /dev/ttyS0).
LAB_CONSOLE=${LAB_CONSOLE:-/dev/console}
# nvwa's journal file, in the criu_dir of the guest's nvwa-server.yaml (server.sh sets its own).
LAB_JOURNAL=${LAB_JOURNAL:-/var/nvwa/running/journal.json}

# NVWA-LAB {json}: a structured event; NVWA-LAB-OUT tag: text: output of a step, for the report.
ev() { echo "NVWA-LAB $1"; }
out() { tag=$1; while IFS= read -r line; do echo "NVWA-LAB-OUT $tag: $line"; done; }
# lab_now: LAB_NOW is this kernel's uptime in seconds, read without starting a process.
lab_now() { read -r LAB_NOW _ </proc/uptime; }

# The journal's terminal phases: the update is settled. `failed` is what older nvwa wrote for
# restore_failed.
SETTLED='restored|restore_failed|failed|rolled_back|abandoned'

# lab_wait_restore [N]: wait until the server has settled the update N times (default 1: the
# first restore, rollback or abandonment; 2 after a retry) and it is settled now; prints the
# journal's phase. Counting settles rather than `booted` stamps also covers an update abandoned by
# a new boot, which has no `booted` stamp. Scenarios use it after lab_restart_server.
lab_wait_restore() {
    want=${1:-1}
    i=0
    phase=
    # Once a second, and only once the journal file no longer says that the update is under way:
    # each poll runs nvwa and a pipeline, which under TCG takes CPU from the restore it waits for
    # (polled every 0.1 s, a 1 GiB restore took 38.7 s against 11 s for criu alone in the same
    # boot; polled every second, 20 s against 16 s: single runs, shared host).
    while [ $i -lt 300 ]; do
        lab_server_alive || break
        if lab_journal_unsettled; then
            sleep 1
            i=$((i + 1))
            continue
        fi
        j=$(nvwa status --json 2>/dev/null | tr -d ' \n')
        # The first "phase" is the journal's own (keys are sorted: timeline comes after it).
        phase=$(echo "$j" | grep -o '"phase":"[a-z_]*"' | head -n 1 | sed 's/.*:"\(.*\)"/\1/')
        # Every settle left a stamp in the timeline; the journal's own phase is one more match.
        settles=$(( $(echo "$j" | grep -oE "\"phase\":\"($SETTLED)\"" | wc -l) - 1 ))
        if echo "$phase" | grep -qxE "$SETTLED" && [ "$settles" -ge "$want" ]; then
            echo "$phase"
            return 0
        fi
        sleep 1
        i=$((i + 1))
    done
    echo "${phase:-none}"
    return 1
}

# lab_server_alive: false once the server this script started (LAB_SERVER_PID, if set) has
# exited; a zombie has exited too. Builtins only, like lab_journal_unsettled.
lab_server_alive() {
    [ -n "${LAB_SERVER_PID:-}" ] || return 0
    [ -r "/proc/$LAB_SERVER_PID/stat" ] || return 1
    read -r _ _ state _ <"/proc/$LAB_SERVER_PID/stat"
    [ "$state" != Z ]
}

# lab_journal_unsettled: true while nvwa's journal file says that an update is under way. A
# look with the shell's builtins alone, before each poll of `nvwa status` (the judge): a poll
# that starts no process takes no CPU from the restore it waits for (`nvwa status` right after
# the server started ran while criu restored). The journal's own phase is the file's first
# "phase" key (its fields come before its targets and timeline).
lab_journal_unsettled() {
    [ -f "$LAB_JOURNAL" ] || return 1
    while IFS= read -r l; do
        case $l in *'"phase":'*)
            rest=$SETTLED
            while :; do
                p=${rest%%|*}
                case $l in *"\"$p\""*) return 1 ;; esac
                [ "$rest" != "$p" ] || return 0
                rest=${rest#*|}
            done ;;
        esac
    done <"$LAB_JOURNAL"
    return 1
}

# lab_phase: the journal's phase now ("none" without a journal).
lab_phase() {
    p=$(nvwa status --json 2>/dev/null | tr -d ' \n' | grep -o '"phase":"[a-z_]*"' | head -n 1 | sed 's/.*:"\(.*\)"/\1/')
    echo "${p:-none}"
}

# lab_host WHEN: the runner starts the scenario's [[host]] steps with that `when` on the host, in
# the background (a client through a port forward, a fleet tool over SSH). The guest learns what
# they did only through what they do to it: synchronise on that (a connection in `ss`, a file).
# The event goes to the console device itself: setup's and checks' output is captured in files.
lab_host() { ev "{\"event\":\"host\",\"name\":\"$1\"}" >"$LAB_CONSOLE"; }

# lab_save NAME VALUE: keep a variable for the checks after the kernel switch.
lab_save() { echo "$1='$2'" >> "$LAB_STATE/vars"; eval "$1='$2'"; export "$1"; }

# run_setup: the scenario's setup and its nvwa-restore.yaml, with their output and an event;
# fails when the setup failed.
run_setup() {
    (
        set -e
        lab_setup
        lab_render_config >/etc/nvwa/nvwa-restore.yaml
        # /etc is on the initramfs here, not on a disk: keep the file for the next boot.
        cp /etc/nvwa/nvwa-restore.yaml "$LAB_STATE/nvwa-restore.yaml"
    ) >/tmp/setup.out 2>&1
    rc=$?
    out setup </tmp/setup.out
    out config </etc/nvwa/nvwa-restore.yaml
    ev "{\"event\":\"setup\",\"rc\":$rc}"
    [ $rc -eq 0 ]
}

# run_updates: every `nvwa update` of the scenario, in order, each reported with its output and
# exit status; marks the update as started (for the next boot) before one expected to succeed.
run_updates() {
    n=0
    while [ $n -lt "$LAB_UPDATES" ]; do
        n=$((n + 1))
        if [ "$(lab_update_expect_$n)" = success ]; then touch "$LAB_STATE/update-started"; sync; fi
        ev "{\"event\":\"update\",\"index\":$n}"
        { nvwa update "$(lab_update_version_$n)" 2>&1; echo "exit $?"; } | tee "/tmp/update$n.out" | out "update$n"
        rc=$(tail -n 1 "/tmp/update$n.out" | sed 's/^exit //')
        ev "{\"event\":\"update-returned\",\"index\":$n,\"rc\":$rc}"
    done
}

# run_checks: every check of the scenario, each in a subshell with the saved variables; sets
# failed=1 when one fails.
run_checks() {
    n=0
    while [ $n -lt "$LAB_CHECKS" ]; do
        n=$((n + 1))
        ( set -e; . "$LAB_STATE/vars"; "lab_check_$n" ) >/tmp/check.out 2>&1
        rc=$?
        out "check$n" </tmp/check.out
        ev "{\"event\":\"check\",\"index\":$n,\"rc\":$rc,\"kernel\":\"$K\"}"
        [ $rc -eq 0 ] || failed=1
    done
}
