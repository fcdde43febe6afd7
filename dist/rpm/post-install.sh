# RPM %post ($1: 1 on install, 2 on upgrade). Like the .deb: enabled and started on install; an
# upgrade never restarts the server, which may be in the middle of an update.
systemd-tmpfiles --create /usr/lib/tmpfiles.d/nvwa.conf >/dev/null 2>&1 || :
systemctl daemon-reload >/dev/null 2>&1 || :
if [ "$1" -eq 1 ]; then
    systemctl enable nvwa-pre.service nvwa.service >/dev/null 2>&1 || :
    systemctl start nvwa.service >/dev/null 2>&1 || :
fi
# The initramfs carries the dracut module that keeps saved pids free on the next boot.
if command -v dracut >/dev/null 2>&1; then
    dracut --regenerate-all --force >/dev/null 2>&1 || :
fi
