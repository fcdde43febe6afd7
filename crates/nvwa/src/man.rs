//! The manual page, nvwa(8): clap's NAME, SYNOPSIS, DESCRIPTION and OPTIONS, then the sections
//! an operator looks for: every command, every configuration key, the files, the exit status,
//! the environment, examples.

use std::io::Write;

use clap::CommandFactory;
use nvwa_core::config::{RESTORE_FILE, RESTORE_KEY_DOCS, SERVER_FILE, SERVER_KEY_DOCS};

use crate::cli::Cli;

/// Text for roff: backslashes and hyphens escaped, and no line may start with a control
/// character.
fn esc(s: &str) -> String {
    let s = s.replace('\\', "\\e").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') {
        format!("\\&{s}")
    } else {
        s
    }
}

fn section(out: &mut dyn Write, title: &str) -> std::io::Result<()> {
    writeln!(out, ".SH {title}")
}

/// A section of plain paragraphs.
fn prose(out: &mut dyn Write, title: &str, paragraphs: &[&str]) -> std::io::Result<()> {
    section(out, title)?;
    for (i, para) in paragraphs.iter().enumerate() {
        if i > 0 {
            writeln!(out, ".PP")?;
        }
        writeln!(out, "{}", esc(para))?;
    }
    Ok(())
}

/// A tagged paragraph: `tag` in bold, then `text`.
fn item(out: &mut dyn Write, tag: &str, text: &str) -> std::io::Result<()> {
    writeln!(out, ".TP\n\\fB{}\\fR\n{}", esc(tag), esc(text))
}

fn commands(out: &mut dyn Write) -> std::io::Result<()> {
    section(out, "COMMANDS")?;
    let mut cmd = Cli::command();
    cmd.build();
    for sub in cmd.get_subcommands() {
        let usage = sub
            .clone()
            .render_usage()
            .to_string()
            .trim_start_matches("Usage: ")
            .to_string();
        let text = sub
            .get_long_about()
            .or(sub.get_about())
            .map(|t| t.to_string())
            .unwrap_or_default();
        writeln!(out, ".TP\n\\fB{}\\fR", esc(&usage))?;
        for (i, para) in text.split("\n\n").enumerate() {
            if i > 0 {
                writeln!(out, ".IP")?;
            }
            writeln!(out, "{}", esc(&para.replace('\n', " ")))?;
        }
    }
    Ok(())
}

fn configuration(out: &mut dyn Write) -> std::io::Result<()> {
    section(out, "CONFIGURATION")?;
    writeln!(
        out,
        "{}",
        esc("Two YAML files, searched in ., ./config and /etc/nvwa (or only in --config-dir). As root, a directory that another user could change is skipped. A missing file means its defaults; an unknown key or a wrong type is an error naming the file, the line and the key.")
    )?;
    for (file, docs) in [
        (SERVER_FILE, SERVER_KEY_DOCS),
        (RESTORE_FILE, RESTORE_KEY_DOCS),
    ] {
        writeln!(out, ".SS {}", esc(file))?;
        for (key, doc) in docs {
            item(out, key, doc)?;
        }
    }
    Ok(())
}

const FILES: &[(&str, &str)] = &[
    ("/etc/nvwa/nvwa-server.yaml", "Where nvwa keeps things (see CONFIGURATION)."),
    ("/etc/nvwa/nvwa-restore.yaml", "What nvwa preserves."),
    ("/var/nvwa/running/journal.json", "The journal of the last update (in criu_dir): phases, targets, timeline; what `nvwa status` shows."),
    ("/var/nvwa/running/PID/", "The images of one target, private to root; removed after a successful restore or a rollback."),
    ("/run/nvwa/nvwa.socket", "The server's socket (directory 0700, socket 0600)."),
    ("/boot/vmlinuz-VERSION", "The kernel of `nvwa update VERSION`, with /boot/initrd.img-VERSION or /boot/initramfs-VERSION.img (or /usr/lib/modules/VERSION/vmlinuz)."),
    ("nvwa.service, nvwa-pre.service", "The systemd units: the server (started with the basic system, not after the network: pid targets without an inet socket in their images are restored at once, the others, and every target with restore_net, once network-online.target is reached), and the early step that keeps saved pids free and puts the saved TCP connections' network lock back on the new boot, before network-pre.target."),
    ("/usr/lib/systemd/system-generators/nvwa-generator", "The systemd generator that hands saved services to nvwa restore on the new boot (see SERVICES)."),
    ("/run/nvwa-restore/UNIT.pid", "Where nvwa restore leaves a restored service's main pid for systemd."),
];

const ENVIRONMENT: &[(&str, &str)] = &[
    ("RUST_LOG", "Log filter (e.g. debug), overriding -v and -q."),
    ("NO_COLOR", "No colour in log output."),
    (
        "NOTIFY_SOCKET",
        "Set by systemd: the server reports READY=1 to it.",
    ),
    (
        "JOURNAL_STREAM",
        "Set by systemd: the server logs to the journal instead of standard error.",
    ),
];

const EXAMPLES: &[(&str, &str)] = &[
    ("nvwa check 6.12.118-amd64", "Is this machine ready to switch to that kernel, with the targets listed in nvwa-restore.yaml?"),
    ("nvwa update --latest", "Checkpoint the targets and switch to the newest installed kernel newer than the running one."),
    ("nvwa update 6.12.118-amd64 --json", "The same for a given kernel, with the server's progress as JSON lines."),
    ("nvwa status", "After the new boot: the phases, the targets and the downtime; the exit status says how it ended."),
];

/// How services are preserved: the paragraphs of the SERVICES section.
const SERVICES: &[&str] = &[
    "A service listed under services: in nvwa-restore.yaml is checkpointed from its main process (MainPID), with its whole process tree, like a pid target: all or nothing, stopped from its dump until the kernel switch, resumed on the old kernel if anything fails. systemd never sees it exit, so it never restarts it, and its unit files are never changed.",
    "Supported: Type=simple, exec, forking, notify and notify-reload services that are running, and whose cgroup holds no process outside the main process's tree (a dump of that tree would lose them; nvwa check names them). Standard output and error that are streams to journald are carried over: the restored service writes to a fresh stream of its unit, under the same identifier, so its new lines are in journalctl -u UNIT. Not supported: Type=oneshot and dbus services; units whose main process has a network, IPC, pid or cgroup namespace of its own (PrivateNetwork=, PrivateIPC=, PrivatePIDs=, ProtectControlGroups=private); and services whose processes criu cannot checkpoint. nvwa check and the update say which, and why.",
    "Sandboxed units whose own namespaces are among mount, UTS and user (PrivateTmp=, ProtectSystem=, PrivateDevices=, ProtectHostname=, PrivateUsers= and the like, as Debian's redis-server.service) are supported. criu runs inside the main process's mount and UTS namespaces with --manage-cgroups=ignore, and files the process holds on mounts outside its namespace (stdin's /dev/null) are dumped as external. On the new boot the drop-in also runs nvwa hold as ExecStartPre= (inside the unit's fresh sandbox, under its User= and system call filter; ExecPaths= lets it run under NoExecPaths=/); nvwa restore restores the process into that holder's mount and UTS namespaces, hands it the external files opened again, and kills the holder. With PrivateUsers= the process comes back in the host's user namespace (criu cannot restore it into one of its own), with the same identity-mapped uid and gid, capabilities, no_new_privs and seccomp filters, until the unit restarts; nvwa check warns about it.",
    "On the boot after the switch, nvwa-generator (a systemd generator) reads the update journal before units are loaded. While a committed update awaits its restore, it gives each saved unit a drop-in, /run/systemd/generator/UNIT.d/50-nvwa-restore.conf, that replaces ExecStart= with +nvwa restore UNIT@PID (Type=forking, PIDFile=/run/nvwa-restore/UNIT.pid, Restart=no, ExecStartPre= and ExecStartPost= cleared). That command runs with full privileges in the unit's cgroup, restores the service with criu, hands it the unit's journal stream, writes the pid file and exits: systemd adopts the restored process as the unit's main process. The nvwa server starts each saved unit (a no-op if systemd already did), checks that its main pid is the saved one, records the result and, once every target is restored, runs systemctl daemon-reload: the generator then writes nothing, and the units are exactly as their files say, with the same main processes.",
    "Because the generator runs before other filesystems are mounted, criu_dir must be on the root filesystem when services are listed.",
];

/// The NETWORK STATE section: what the switch carries over for the targets, and what restore_net
/// carries over for the machine.
const NETWORK: &[&str] = &[
    "Established TCP connections of the targets are carried over: the peer sees a pause, never a reset. nvwa dumps with criu's nftables lock (--network-lock nftables, when criu check --feature network_lock_nftables passes), saves the table criu made (inet CRIU-...) with the images as nvwa-net-lock.nft, and nvwa pre puts it back on the new boot before the network comes up; criu's restore deletes it. A rollback deletes it and takes the sockets out of repair mode; nvwa init deletes the locks of the images it discards; an update that never committed puts nothing back. Without the nftables lock, criu locks with iptables on the old kernel only, and a peer that sends before the restore gets a reset.",
    "Connections that did not negotiate window scaling are restored with net.ipv4.tcp_window_scaling at 0 (criu would restore them advertising a window of a few bytes), put back as soon as that target's restore ends; such a restore runs alone among the restores of established connections.",
    "Listening sockets, unix sockets to outside peers and file locks are carried over. Connections of other processes are not; the machine's addresses, routes, rules and firewall only with restore_net: true.",
    "With restore_net: true, the update saves the network configuration into CRIU_DIR/net/ once the kernel is loaded and before anything is frozen, and commits it with the images. On the new boot it is restored before any target (by the server, or by a listed service's unit if that starts first): addresses (on the interface of the same name), routes of every table, policy rules, every nftables table (replacing its namesake of the new boot in one nft -f transaction; nft -c checks on the old boot that each table can be read back) and iptables-legacy tables. Left out: what the kernel, DHCP or router advertisements make by themselves, criu's CRIU-* lock tables, the interfaces themselves, neighbours, multipath routes. nvwa check lists what will be saved.",
    "What the new boot already has is skipped. A conflict (the address on another interface, another route for the same destination, table and metric) or a missing interface keeps the new boot's entry and is named with what to do; the targets are restored anyway, the update ends restore_failed, and the saved state is kept until a restart of the server restores what is still missing.",
    "systemd-networkd removes foreign addresses, routes and policy rules from the links it manages when it configures them (at its start; ManageForeignRoutes=, ManageForeignRoutingPolicyRules= in networkd.conf): with a saved network the server waits for network-online.target before it restores it and the targets, so what it restores lasts until networkd next starts or reconfigures the link, as the original configuration would have. Configuration that must outlive that belongs in .network files.",
];

/// The JUMP section: what kexec_mode chooses.
const JUMP: &[&str] = &[
    "With kexec_mode: immediate (the default), nvwa jumps into the new kernel as soon as the images are committed: sync(2), then reboot(2) with LINUX_REBOOT_CMD_KEXEC. Nothing runs between the freeze and the jump, so the downtime is freeze, dump, kexec, boot and restore. Services that are not listed are not stopped: they end with the old kernel as in a power cut, after every filesystem was synced, and start afresh on the new boot.",
    "With kexec_mode: orderly, nvwa hands the jump to systemd after the commit (systemctl kexec): systemd stops every unit, so unlisted services run their ExecStop= and save their state, unmounts the filesystems and jumps. Before that, nvwa makes sure no saved process runs again (systemd's SIGTERM and SIGCONT would wake it): each listed service gets a runtime drop-in (/run/systemd/system/UNIT.d/50-nvwa-hold.conf: ExecStop= cleared, KillSignal=SIGKILL), and the trees of the pid targets are killed with SIGKILL. If systemd refuses the job, the drop-ins are removed and the update is rolled back: the services are resumed, and the pid targets are restored from their committed images on the old kernel. The orderly shutdown adds its own time to the downtime: about 6 s on the lab's idle Debian 13 guest, and on a real server the stop time of every unit (at most their TimeoutStopSec=).",
];

pub fn man(out: &mut dyn Write) -> std::io::Result<()> {
    let page = clap_mangen::Man::new(Cli::command()).section("8");
    page.render_title(out)?;
    page.render_name_section(out)?;
    page.render_synopsis_section(out)?;
    page.render_description_section(out)?;
    page.render_options_section(out)?;
    commands(out)?;
    configuration(out)?;
    prose(out, "SERVICES", SERVICES)?;
    prose(out, "NETWORK STATE", NETWORK)?;
    prose(out, "THE JUMP", JUMP)?;
    section(out, "FILES")?;
    for (f, what) in FILES {
        item(out, f, what)?;
    }
    section(out, "EXIT STATUS")?;
    for line in crate::exit::HELP_LINES.lines().skip(1) {
        let line = line.trim();
        match line.split_once("  ") {
            Some((code, text)) if code.chars().all(|c| c.is_ascii_digit()) => {
                item(out, code, text.trim())?
            }
            _ => writeln!(out, "{}", esc(line))?,
        }
    }
    section(out, "ENVIRONMENT")?;
    for (var, what) in ENVIRONMENT {
        item(out, var, what)?;
    }
    section(out, "EXAMPLES")?;
    for (example, what) in EXAMPLES {
        item(out, example, what)?;
    }
    section(out, "SEE ALSO")?;
    writeln!(
        out,
        "\\fBcriu\\fR(8), \\fBkexec\\fR(8), \\fBsystemctl\\fR(1)"
    )?;
    page.render_version_section(out)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_section_an_operator_looks_for_is_there() {
        let mut out = Vec::new();
        man(&mut out).unwrap();
        let page = String::from_utf8(out).unwrap();
        for want in [
            ".TH nvwa 8",
            ".SH NAME",
            ".SH SYNOPSIS",
            ".SH COMMANDS",
            ".SH CONFIGURATION",
            ".SS nvwa\\-server.yaml",
            "dump_timeout",
            "enable_pin_memory",
            ".SH FILES",
            ".SH EXIT STATUS",
            "rolled back",
            ".SH ENVIRONMENT",
            ".SH EXAMPLES",
            ".SH SEE ALSO",
            "nvwa update",
        ] {
            assert!(page.contains(want), "missing {want:?}:\n{page}");
        }
        assert!(
            !page.lines().any(|l| l.starts_with("'")),
            "no line may start with a quote"
        );
    }
}
