# RPM %postun ($1: 0 on removal, 1 on upgrade).
systemctl daemon-reload >/dev/null 2>&1 || :
if [ "$1" -eq 0 ] && command -v dracut >/dev/null 2>&1; then
    # Without the package, the initramfs must not carry its module any more.
    dracut --regenerate-all --force >/dev/null 2>&1 || :
fi
