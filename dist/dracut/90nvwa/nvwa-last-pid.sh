#!/bin/sh
# dracut cmdline hook (sourced by dracut-cmdline): the same as initramfs-tools'
# scripts/init-top/nvwa. `nvwa update` puts nvwa.last_pid=N on this kernel's command line (N:
# above every pid the saved processes had); moving the pid counter past N before anything else
# starts keeps those pids free for the restore. Never fails the boot: a missing or malformed
# value changes nothing. A subshell, so that nothing leaks into dracut's shell.
nvwa_last_pid() (
	# The last nvwa.last_pid= on the command line wins, as for `nvwa pre`; only digits count.
	want=
	set -f
	# cat, not read: dash's read takes a byte at a time, and a /proc/sys file reads empty past
	# its first byte.
	cmdline=$(cat /proc/cmdline 2>/dev/null)
	for w in $cmdline; do
		case "$w" in
		nvwa.last_pid=*) want=${w#nvwa.last_pid=} ;;
		esac
	done
	case "$want" in
	'' | *[!0-9]*) exit 0 ;;
	esac
	# The kernel would read a leading 0 as octal; pid_max is at most 2^22, 7 digits.
	while [ "${want#0}" != "$want" ]; do want=${want#0}; done
	[ -n "$want" ] && [ ${#want} -le 7 ] || exit 0
	cur=$(cat /proc/sys/kernel/ns_last_pid 2>/dev/null)
	case "$cur" in
	'' | *[!0-9]*) exit 0 ;;
	esac
	[ "$want" -gt "$cur" ] || exit 0
	# The last boot handed out pids above N, but systemd raises pid_max to 2^22 (sysctl.d's
	# 50-pid-max.conf) only later: with the kernel's default (32768 up to 32 CPUs) the counter
	# would refuse N, or wrap to low pids soon after it. Raise it now when fewer than nvwa's
	# margin of 2011 pids would be left above N.
	max=$(cat /proc/sys/kernel/pid_max 2>/dev/null)
	case "$max" in
	'' | *[!0-9]*) max=4194304 ;;
	esac
	if [ $((want + 2011)) -ge "$max" ] && [ "$max" -lt 4194304 ] &&
		echo 4194304 >/proc/sys/kernel/pid_max 2>/dev/null; then
		echo "<6>nvwa: pid_max raised from $max to 4194304 (nvwa.last_pid)" >>/dev/kmsg 2>/dev/null
	fi
	if echo "$want" >/proc/sys/kernel/ns_last_pid 2>/dev/null; then
		echo "<6>nvwa: next pid after $want (nvwa.last_pid)" >>/dev/kmsg 2>/dev/null
	else
		echo "<4>nvwa: cannot move the next pid after $want (nvwa.last_pid)" >>/dev/kmsg 2>/dev/null
	fi
	exit 0
)
nvwa_last_pid
unset -f nvwa_last_pid
