#!/bin/sh
# lab-server-pid: the pid of the running `nvwa server`, if any (the client is an `nvwa` process
# too, so pidof alone cannot tell them apart). For scenarios and for criu_exe wrappers.
for p in $(pidof nvwa); do
    [ "$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null)" = "nvwa server " ] && echo "$p"
done
true
