#!/bin/sh
# lab-power-cut [WHY]: cut the guest's power now, as a power failure would: no sync, no unmount,
# nothing flushed. Scenarios call it as lab_power_cut; a criu_exe wrapper run by the nvwa server
# can run it directly.
#
# The lab must know the cut was deliberate: the event goes through /dev/kmsg at a level the
# console prints (loglevel=3), because the kernel writes it to the serial port before this write
# returns, whereas a line on a tty could still sit in its buffer when the power goes.
why=$(echo "${1:-lab_power_cut}" | tr -d '"\\')
echo "<2>NVWA-LAB {\"event\":\"power-cut\",\"by\":\"$why\"}" > /dev/kmsg
# sysrq o: power off from a kernel work item, without syncing file systems.
echo o > /proc/sysrq-trigger
# The power goes any moment now; nothing after this line may run.
while :; do sleep 1; done
