#!/bin/bash
# dracut module nvwa: moves the pid counter past nvwa.last_pid= (left on the command line by
# `nvwa update`) in the initramfs, before udev or the real root's services take low pids that
# processes saved for restore may need (see nvwa-last-pid.sh).

# Always included: a live update may kexec into any installed kernel, with its own initramfs.
check() {
    return 0
}

depends() {
    return 0
}

install() {
    # cmdline hooks run in dracut-cmdline, before udev starts in the initramfs.
    inst_multiple cat
    inst_hook cmdline 01 "$moddir/nvwa-last-pid.sh"
}
