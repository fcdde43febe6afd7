# RPM %preun ($1: 0 on removal, 1 on upgrade): on removal, stop and disable the units (`nvwa
# exit` refuses while an update runs; systemd then sends SIGTERM, which rolls it back).
if [ "$1" -eq 0 ]; then
    systemctl disable --now nvwa.service nvwa-pre.service >/dev/null 2>&1 || :
fi
