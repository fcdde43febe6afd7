//! `restore_net: true`: the machine's addresses, routes, policy rules and firewall, saved before
//! the targets are frozen and restored on the new boot before any target.
//!
//! What is saved is the operator's part only: what the kernel makes by itself (link-local IPv6
//! addresses, `proto kernel` routes, the local table, the three default rules), what a DHCP or
//! router-advertisement client will make again (dynamic addresses, `proto dhcp`/`ra` routes) and
//! criu's network locks (`CRIU-*` nftables tables, the `CRIU` iptables chain) are left out.
//! The new boot's interfaces are matched by name (their indexes change across boots).
//!
//! Restoring compares each saved entry with the new boot's: one it already has is skipped (so a
//! second run, or a run after a partial one, changes nothing); a real conflict (the address on
//! another interface, the same route elsewhere, an interface that is gone) is a [`NetProblem`],
//! and the new boot's entry is kept. An nftables table is restored as a whole: the saved table
//! replaces the new boot's table of the same name in one transaction (the saved one is what ran).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::exec::{self, ExecError};

/// Deadline of one `ip`, `nft` or `iptables-*` run (they answer in milliseconds; a hung one
/// must not hold the update or the restore).
pub const NET_DEADLINE: Duration = Duration::from_secs(30);
/// The directory under criu_dir that holds the saved network state (never a pid or a unit name).
pub const NET_DIR: &str = "net";
/// The saved state, in [`NET_DIR`].
pub const STATE_FILE: &str = "state.json";
/// Serialises restores of the network on one boot (the server and a service's unit may both
/// start one).
const LOCK_FILE: &str = "lock";

/// Where the tools are looked for (Debian's usrmerge moved them; busybox may shadow `ip` in
/// /sbin on small systems, so its applets are skipped).
const TOOL_DIRS: &[&str] = &["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{tool} is not installed, and restore_net: true needs it to {why}; install the {package} package or set restore_net: false")]
    Missing {
        tool: &'static str,
        package: &'static str,
        why: &'static str,
    },
    #[error("cannot run `{command}`: {source}")]
    Run { command: String, source: ExecError },
    #[error("`{command}` failed (exit {code}): {output}")]
    Failed {
        command: String,
        code: i32,
        output: String,
    },
    #[error("cannot understand the output of `{command}`: {why}")]
    Parse { command: String, why: String },
    #[error("cannot {action} the saved network state {}: {source}", .path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("nftables table {family} {name} cannot be restored as nft prints it ({output}); nvwa would lose it at the kernel switch: rewrite it in nft's own syntax (iptables-nft rules with matches nft cannot translate are not carried over) or set restore_net: false")]
    NotRestorable {
        family: String,
        name: String,
        output: String,
    },
}

/// One saved entry that could not be put back on the new boot. The new boot's configuration is
/// kept in every case; the message says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetProblem {
    #[error("{what}: interface {ifname} does not exist on this boot; create it, then restart the nvwa server (`systemctl restart nvwa`) to restore the rest of the network")]
    MissingInterface { what: String, ifname: String },
    #[error("{what}: this boot already has {local} on {other}; kept it. If the saved address is the right one, remove that one (`ip addr del {local} dev {other}`) and restart the nvwa server")]
    AddressElsewhere {
        what: String,
        local: String,
        other: String,
    },
    #[error("{what}: this boot routes {dst} {theirs}; kept it. If the saved route is the right one, `ip route replace` it by hand")]
    RouteConflict {
        what: String,
        dst: String,
        theirs: String,
    },
    #[error("{what}: nvwa cannot restore its attributes {attrs}; add it again by hand")]
    Unsupported { what: String, attrs: String },
    #[error("{what}: {error}")]
    Command { what: String, error: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Inet,
    Inet6,
}

impl Family {
    fn flag(self) -> &'static str {
        match self {
            Family::Inet => "-4",
            Family::Inet6 => "-6",
        }
    }
}

/// An address as `ip -j addr show` describes it, with its interface's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Addr {
    pub ifname: String,
    pub family: Family,
    pub local: String,
    pub prefixlen: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broadcast: Option<String>,
    pub scope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Boolean flags `ip` shows (`dynamic`, `nodad`, `noprefixroute`…).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
}

impl Addr {
    fn describe(&self) -> String {
        format!(
            "address {}/{} on {}",
            self.local, self.prefixlen, self.ifname
        )
    }
}

/// A route as `ip -j route show table all` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub family: Family,
    /// `unicast` unless `ip` says otherwise (`blackhole`, `unreachable`, `local`…).
    pub rtype: String,
    pub dst: String,
    pub table: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
    /// `boot` (what `ip route add` makes) unless `ip` says otherwise.
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefsrc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metric: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tos: Option<String>,
    #[serde(default)]
    pub onlink: bool,
    /// Attributes nvwa does not restore (multipath, encapsulation, metrics…).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unsupported: Vec<String>,
    /// Whether the kernel or a DHCP/RA client will make it again by itself (`expires`).
    #[serde(default)]
    pub expires: bool,
}

impl Route {
    fn describe(&self) -> String {
        let mut s = format!("route {}", self.dst);
        if self.rtype != "unicast" {
            s = format!("route {} {}", self.rtype, self.dst);
        }
        if let Some(m) = self.metric {
            s.push_str(&format!(" metric {m}"));
        }
        format!("{s} (table {})", self.table)
    }
    /// What identifies a route in the kernel: two routes with the same key cannot coexist.
    fn key(&self) -> (Family, &str, &str, Option<u64>, &Option<String>) {
        (self.family, &self.table, &self.dst, self.metric, &self.tos)
    }
    fn how(&self) -> String {
        let mut s = String::new();
        if self.rtype != "unicast" {
            s.push_str(&self.rtype);
        }
        if let Some(g) = &self.gateway {
            s.push_str(&format!(" via {g}"));
        }
        if let Some(d) = &self.dev {
            s.push_str(&format!(" dev {d}"));
        }
        s.trim().to_string()
    }
}

/// A policy rule: `ip -j rule show`'s object, compared and restored as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub family: Family,
    pub rule: Value,
}

impl Rule {
    fn describe(&self) -> String {
        let args = self.args().unwrap_or_default();
        format!("rule {}", args.join(" "))
    }
    /// The arguments of `ip rule add` that make this rule again, or the keys nvwa does not know.
    fn args(&self) -> Result<Vec<String>, Vec<String>> {
        let Some(obj) = self.rule.as_object() else {
            return Err(vec!["(not an object)".into()]);
        };
        let mut a = Vec::new();
        let mut unknown = Vec::new();
        let text = |v: &Value| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let sel = |addr: &str, len: Option<&Value>| match len {
            Some(l) => format!("{addr}/{}", text(l)),
            None => addr.to_string(),
        };
        if let Some(p) = obj.get("priority") {
            a.extend(["priority".into(), text(p)]);
        }
        if obj.contains_key("not") {
            a.push("not".into());
        }
        for (k, v) in obj {
            match k.as_str() {
                "priority" | "not" | "srclen" | "dstlen" | "fwmask" | "table" | "action" => {}
                "src" => {
                    let s = text(v);
                    if s != "all" {
                        a.extend(["from".into(), sel(&s, obj.get("srclen"))]);
                    }
                }
                "dst" => a.extend(["to".into(), sel(&text(v), obj.get("dstlen"))]),
                "iif" => a.extend(["iif".into(), text(v)]),
                "oif" => a.extend(["oif".into(), text(v)]),
                "tos" => a.extend(["tos".into(), text(v)]),
                "fwmark" => {
                    let m = match obj.get("fwmask") {
                        Some(mask) => format!("{}/{}", text(v), text(mask)),
                        None => text(v),
                    };
                    a.extend(["fwmark".into(), m]);
                }
                "suppress_prefixlen" => a.extend(["suppress_prefixlength".into(), text(v)]),
                // Shown by newer ip: the rule's maker; restored rules are nvwa's (`proto boot`).
                "protocol" => {}
                other => unknown.push(other.to_string()),
            }
        }
        match (obj.get("table"), obj.get("action")) {
            (Some(t), _) => a.extend(["lookup".into(), text(t)]),
            (None, Some(act)) => a.push(text(act)),
            (None, None) => unknown.push("(no table or action)".into()),
        }
        if unknown.is_empty() {
            Ok(a)
        } else {
            Err(unknown)
        }
    }
}

/// One nftables table, as `nft list table` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NftTable {
    pub family: String,
    pub name: String,
    pub text: String,
}

/// `iptables-legacy-save` or `ip6tables-legacy-save` output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LegacyTables {
    pub family: Family,
    pub text: String,
}

/// The network configuration of a machine, as nvwa reads and saves it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    pub addrs: Vec<Addr>,
    pub routes: Vec<Route>,
    pub rules: Vec<Rule>,
    /// None: nft is not installed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nft: Option<Vec<NftTable>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub iptables_legacy: Vec<LegacyTables>,
}

impl NetState {
    /// "2 addresses, 3 routes, 1 rule, nftables tables inet filter" for messages.
    pub fn summary(&self) -> String {
        let n =
            |k: usize, one: &str, many: &str| format!("{k} {}", if k == 1 { one } else { many });
        let mut s = vec![
            n(self.addrs.len(), "address", "addresses"),
            n(self.routes.len(), "route", "routes"),
            n(self.rules.len(), "policy rule", "policy rules"),
        ];
        match &self.nft {
            Some(t) if t.is_empty() => s.push("no nftables table".into()),
            Some(t) => s.push(format!(
                "nftables {} {}",
                if t.len() == 1 { "table" } else { "tables" },
                t.iter()
                    .map(|t| format!("{} {}", t.family, t.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            None => {}
        }
        for l in &self.iptables_legacy {
            let tables: Vec<&str> = l.text.lines().filter_map(|l| l.strip_prefix('*')).collect();
            let tool = match l.family {
                Family::Inet => "iptables-legacy",
                Family::Inet6 => "ip6tables-legacy",
            };
            s.push(format!("{tool} tables {}", tables.join(", ")));
        }
        s.join(", ")
    }
}

/// One step of a restore, run by [`crate::machine::Machine::net_apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetCmd {
    /// `ip ARGS`.
    Ip(Vec<String>),
    /// `nft -f SCRIPT` (or `nft -c -f`: only checked, nothing changes).
    Nft { script: String, check_only: bool },
    /// `iptables-legacy-restore` / `ip6tables-legacy-restore` of this text (replaces the tables
    /// it names).
    IptablesLegacy { family: Family, text: String },
}

impl NetCmd {
    pub fn describe(&self) -> String {
        match self {
            NetCmd::Ip(args) => format!("ip {}", args.join(" ")),
            NetCmd::Nft { check_only, .. } => {
                format!("nft {}-f <script>", if *check_only { "-c " } else { "" })
            }
            NetCmd::IptablesLegacy { family, .. } => {
                format!("{} <saved tables>", legacy_tool(*family, true))
            }
        }
    }
}

fn legacy_tool(f: Family, restore: bool) -> &'static str {
    match (f, restore) {
        (Family::Inet, false) => "iptables-legacy-save",
        (Family::Inet, true) => "iptables-legacy-restore",
        (Family::Inet6, false) => "ip6tables-legacy-save",
        (Family::Inet6, true) => "ip6tables-legacy-restore",
    }
}

// ---- reading (ip -j, nft) ----

/// Where `name` is installed, if it is (and is not a busybox applet).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    TOOL_DIRS.iter().map(|d| Path::new(d).join(name)).find(|p| {
        p.is_file()
            && std::fs::canonicalize(p)
                .ok()
                .and_then(|c| {
                    c.file_name()
                        .map(|n| !n.to_string_lossy().starts_with("busybox"))
                })
                .unwrap_or(false)
    })
}

fn run_tool(program: &Path, args: &[&str]) -> Result<String, NetError> {
    let command = format!("{} {}", program.display(), args.join(" "));
    let out = exec::run(std::process::Command::new(program).args(args), NET_DEADLINE).map_err(
        |source| NetError::Run {
            command: command.clone(),
            source,
        },
    )?;
    if !out.status.success() {
        return Err(NetError::Failed {
            command,
            code: out.code(),
            output: out.output_text(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip_tool() -> Result<PathBuf, NetError> {
    find_tool("ip").ok_or(NetError::Missing {
        tool: "ip (iproute2, with -j)",
        package: "iproute2",
        why: "read and restore addresses, routes and rules",
    })
}

fn parse_json(command: &str, text: &str) -> Result<Value, NetError> {
    // `ip -j` prints nothing at all for an empty list.
    if text.trim().is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_str(text).map_err(|e| NetError::Parse {
        command: command.into(),
        why: e.to_string(),
    })
}

/// Reads the machine's whole network configuration.
pub fn read_real() -> Result<NetState, NetError> {
    let ip = ip_tool()?;
    let mut outputs = Vec::new();
    for args in [
        &["-j", "addr", "show"][..],
        &["-j", "-4", "route", "show", "table", "all"],
        &["-j", "-6", "route", "show", "table", "all"],
        &["-j", "-4", "rule", "show"],
        &["-j", "-6", "rule", "show"],
    ] {
        let command = format!("ip {}", args.join(" "));
        let text = run_tool(&ip, args)?;
        outputs.push((command.clone(), parse_json(&command, &text)?));
    }
    let mut state = NetState {
        addrs: parse_addrs(&outputs[0].1).map_err(|why| NetError::Parse {
            command: outputs[0].0.clone(),
            why,
        })?,
        ..Default::default()
    };
    for (i, fam) in [(1, Family::Inet), (2, Family::Inet6)] {
        state.routes.extend(
            parse_routes(fam, &outputs[i].1).map_err(|why| NetError::Parse {
                command: outputs[i].0.clone(),
                why,
            })?,
        );
    }
    for (i, fam) in [(3, Family::Inet), (4, Family::Inet6)] {
        state.rules.extend(
            parse_rules(fam, &outputs[i].1).map_err(|why| NetError::Parse {
                command: outputs[i].0.clone(),
                why,
            })?,
        );
    }
    state.nft = match find_tool("nft") {
        None => None,
        Some(nft) => Some(read_nft(&nft)?),
    };
    for fam in [Family::Inet, Family::Inet6] {
        if let Some(tool) = find_tool(legacy_tool(fam, false)) {
            let text = run_tool(&tool, &[])?;
            state
                .iptables_legacy
                .push(LegacyTables { family: fam, text });
        }
    }
    Ok(state)
}

fn read_nft(nft: &Path) -> Result<Vec<NftTable>, NetError> {
    let command = "nft -j list tables";
    let v = parse_json(command, &run_tool(nft, &["-j", "list", "tables"])?)?;
    let mut tables = Vec::new();
    for (family, name) in parse_nft_tables(&v).map_err(|why| NetError::Parse {
        command: command.into(),
        why,
    })? {
        let text = run_tool(nft, &["list", "table", &family, &name])?;
        tables.push(NftTable { family, name, text });
    }
    Ok(tables)
}

/// The (family, name) of every table in `nft -j list tables`.
pub fn parse_nft_tables(v: &Value) -> Result<Vec<(String, String)>, String> {
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("no \"nftables\" array")?;
    Ok(items
        .iter()
        .filter_map(|i| i.get("table"))
        .filter_map(|t| {
            Some((
                t.get("family")?.as_str()?.to_string(),
                t.get("name")?.as_str()?.to_string(),
            ))
        })
        .collect())
}

fn str_of(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(|x| match x {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    })
}

/// `ip -j addr show`: one entry per address, with its interface's name.
pub fn parse_addrs(v: &Value) -> Result<Vec<Addr>, String> {
    let links = v.as_array().ok_or("not a list of interfaces")?;
    let mut out = Vec::new();
    for link in links {
        let ifname = str_of(link, "ifname").ok_or("an interface without ifname")?;
        let infos = link
            .get("addr_info")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for a in infos {
            let family = match a.get("family").and_then(Value::as_str) {
                Some("inet") => Family::Inet,
                Some("inet6") => Family::Inet6,
                _ => continue,
            };
            let local = str_of(&a, "local")
                .ok_or_else(|| format!("an address on {ifname} without local"))?;
            let prefixlen = a
                .get("prefixlen")
                .and_then(Value::as_u64)
                .ok_or_else(|| format!("{local} on {ifname} without prefixlen"))?
                as u8;
            let flags = a
                .as_object()
                .map(|o| {
                    o.iter()
                        .filter(|(_, v)| v.as_bool() == Some(true))
                        .map(|(k, _)| k.clone())
                        .collect()
                })
                .unwrap_or_default();
            out.push(Addr {
                ifname: ifname.clone(),
                family,
                peer: str_of(&a, "address").filter(|p| *p != local),
                local,
                prefixlen,
                broadcast: str_of(&a, "broadcast"),
                scope: str_of(&a, "scope").unwrap_or_else(|| "global".into()),
                label: str_of(&a, "label").filter(|l| *l != ifname),
                flags,
            });
        }
    }
    Ok(out)
}

/// Route attributes nvwa restores (or knows to ignore: `flags` is read for `onlink`, `pref` and
/// `cache` are the kernel's).
const ROUTE_KEYS: &[&str] = &[
    "type", "dst", "table", "gateway", "dev", "protocol", "scope", "prefsrc", "metric", "tos",
    "flags", "pref", "expires", "cache",
];

/// `ip -j -4|-6 route show table all`.
pub fn parse_routes(family: Family, v: &Value) -> Result<Vec<Route>, String> {
    let items = v.as_array().ok_or("not a list of routes")?;
    let mut out = Vec::new();
    for r in items {
        let obj = r.as_object().ok_or("a route that is not an object")?;
        let dst = str_of(r, "dst").ok_or("a route without dst")?;
        let flags: Vec<String> = r
            .get("flags")
            .and_then(Value::as_array)
            .map(|f| {
                f.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        out.push(Route {
            family,
            rtype: str_of(r, "type").unwrap_or_else(|| "unicast".into()),
            dst,
            table: str_of(r, "table").unwrap_or_else(|| "main".into()),
            gateway: str_of(r, "gateway"),
            dev: str_of(r, "dev"),
            protocol: str_of(r, "protocol").unwrap_or_else(|| "boot".into()),
            scope: str_of(r, "scope"),
            prefsrc: str_of(r, "prefsrc"),
            metric: r.get("metric").and_then(Value::as_u64),
            tos: str_of(r, "tos"),
            onlink: flags.iter().any(|f| f == "onlink"),
            unsupported: obj
                .keys()
                .filter(|k| !ROUTE_KEYS.contains(&k.as_str()))
                .cloned()
                .collect(),
            expires: obj.contains_key("expires") || obj.contains_key("cache"),
        });
    }
    Ok(out)
}

/// `ip -j -4|-6 rule show`.
pub fn parse_rules(family: Family, v: &Value) -> Result<Vec<Rule>, String> {
    let items = v.as_array().ok_or("not a list of rules")?;
    Ok(items
        .iter()
        .map(|r| Rule {
            family,
            rule: r.clone(),
        })
        .collect())
}

// ---- what is the operator's ----

/// Whether an address is one the operator (or the boot configuration) made, not the kernel or a
/// DHCP/SLAAC client.
fn operator_addr(a: &Addr) -> bool {
    let kernel_made = a.family == Family::Inet6 && a.scope == "link";
    let dynamic = a.flags.iter().any(|f| f == "dynamic");
    let loopback = a.ifname == "lo"
        && ((a.local == "127.0.0.1" && a.prefixlen == 8)
            || (a.local == "::1" && a.prefixlen == 128));
    !(kernel_made || dynamic || loopback)
}

fn operator_route(r: &Route) -> bool {
    !(r.table == "local"
        || r.expires
        || matches!(r.protocol.as_str(), "kernel" | "dhcp" | "ra" | "redirect")
        || r.rtype == "multicast")
}

fn operator_rule(r: &Rule) -> bool {
    let o = &r.rule;
    if str_of(o, "protocol").as_deref() == Some("kernel") {
        return false;
    }
    // The kernel's default rules (older ip does not show their `proto kernel`).
    let keys: BTreeSet<&str> = o
        .as_object()
        .map(|m| m.keys().map(String::as_str).collect())
        .unwrap_or_default();
    let bare = keys
        .iter()
        .all(|k| ["priority", "src", "table", "protocol"].contains(k))
        && str_of(o, "src").as_deref() == Some("all");
    let default = matches!(
        (
            str_of(o, "priority").as_deref(),
            str_of(o, "table").as_deref()
        ),
        (Some("0"), Some("local"))
            | (Some("32766"), Some("main"))
            | (Some("32767"), Some("default"))
    );
    !(bare && default)
}

fn operator_legacy(text: &str) -> Option<String> {
    // criu's lock (criu 3.x with the iptables lock: a chain CRIU jumped to from INPUT/OUTPUT).
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            !(l.starts_with(":CRIU ") || l.starts_with("-A CRIU ") || l.ends_with("-j CRIU"))
        })
        .collect();
    let has_rules = lines.iter().any(|l| l.starts_with("-A "));
    let has_policy = lines
        .iter()
        .any(|l| l.starts_with(':') && !l.contains(" ACCEPT ") && !l.contains(" - "));
    (has_rules || has_policy).then(|| lines.join("\n") + "\n")
}

/// The part of `all` that is the operator's: what the update saves.
pub fn operator_state(all: &NetState) -> NetState {
    NetState {
        addrs: all
            .addrs
            .iter()
            .filter(|a| operator_addr(a))
            .cloned()
            .collect(),
        routes: all
            .routes
            .iter()
            .filter(|r| operator_route(r))
            .cloned()
            .collect(),
        rules: all
            .rules
            .iter()
            .filter(|r| operator_rule(r))
            .cloned()
            .collect(),
        nft: all.nft.as_ref().map(|t| {
            t.iter()
                .filter(|t| !t.name.starts_with("CRIU-"))
                .cloned()
                .collect()
        }),
        iptables_legacy: all
            .iptables_legacy
            .iter()
            .filter_map(|l| {
                operator_legacy(&l.text).map(|text| LegacyTables {
                    family: l.family,
                    text,
                })
            })
            .collect(),
    }
}

/// The nft script that replaces each of `tables` (its namesake on the machine, if any, goes in
/// the same transaction).
pub fn nft_script(tables: &[&NftTable]) -> String {
    let mut s = String::new();
    for t in tables {
        // `add` first: `delete` of a table that does not exist would fail the transaction.
        s.push_str(&format!(
            "add table {f} {n}\ndelete table {f} {n}\n{text}\n",
            f = t.family,
            n = t.name,
            text = t.text.trim_end()
        ));
    }
    s
}

// ---- saving and restoring ----

fn net_dir(criu_dir: &Path) -> PathBuf {
    criu_dir.join(NET_DIR)
}

pub fn state_path(criu_dir: &Path) -> PathBuf {
    net_dir(criu_dir).join(STATE_FILE)
}

/// Whether an update saved the network into `criu_dir`.
pub fn saved(criu_dir: &Path) -> bool {
    state_path(criu_dir).exists()
}

/// Writes `state` into `<criu_dir>/net/` (a private directory carrying nvwa's marker).
pub fn write_state(criu_dir: &Path, state: &NetState) -> Result<(), NetError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = net_dir(criu_dir);
    let io = |action, path: &Path| {
        let path = path.to_path_buf();
        move |source| NetError::Io {
            action,
            path,
            source,
        }
    };
    match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io("replace", &dir)(e)),
        _ => {}
    }
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(io("create", &dir))?;
    std::fs::write(dir.join(crate::update::IMAGE_MARKER), NET_DIR).map_err(io("mark", &dir))?;
    let path = state_path(criu_dir);
    let text = serde_json::to_vec_pretty(state).map_err(|e| io("write", &path)(e.into()))?;
    std::fs::write(&path, text).map_err(io("write", &path))
}

pub fn read_state(criu_dir: &Path) -> Result<NetState, NetError> {
    let path = state_path(criu_dir);
    let bytes = std::fs::read(&path).map_err(|source| NetError::Io {
        action: "read",
        path: path.clone(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| NetError::Io {
        action: "parse",
        path,
        source: e.into(),
    })
}

/// Removes the saved state (after a successful restore, a rollback or `nvwa init`).
pub fn remove_state(criu_dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(net_dir(criu_dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// On the old boot: reads the configuration, keeps the operator's part, makes sure nft can read
/// back every table as it printed it, and saves it. Returns the saved state.
pub fn save(m: &dyn crate::machine::Machine, criu_dir: &Path) -> Result<NetState, NetError> {
    let state = operator_state(&m.net_read()?);
    // Written first: the directory is also where nft reads its script from.
    write_state(criu_dir, &state)?;
    if let Some(tables) = &state.nft {
        // Checked one by one, so that the error names the table.
        for t in tables {
            let script = nft_script(&[t]);
            let checked = m.net_apply(
                &NetCmd::Nft {
                    script,
                    check_only: true,
                },
                &net_dir(criu_dir),
            );
            match checked {
                Err(NetError::Failed { output, .. }) => {
                    return Err(NetError::NotRestorable {
                        family: t.family.clone(),
                        name: t.name.clone(),
                        output,
                    })
                }
                other => other?,
            }
        }
    }
    Ok(state)
}

/// What a restore did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Restored {
    /// Entries added (or tables replaced).
    pub applied: Vec<String>,
    /// Entries the new boot already had.
    pub present: usize,
    pub problems: Vec<NetProblem>,
}

impl Restored {
    pub fn summary(&self) -> String {
        format!(
            "network: {} entries restored, {} already there{}",
            self.applied.len(),
            self.present,
            if self.problems.is_empty() {
                String::new()
            } else {
                format!(", {} not restored", self.problems.len())
            }
        )
    }
}

/// On the new boot: puts `saved` back, comparing with what the machine has now. Firewall first
/// (nothing the firewall blocked is reachable while the addresses come up), then addresses, routes
/// (those without a gateway first: a gateway needs its connected route) and rules.
pub fn restore(
    m: &dyn crate::machine::Machine,
    saved: &NetState,
    scratch: &Path,
) -> Result<Restored, NetError> {
    let now = m.net_read()?;
    let mut out = Restored::default();
    let apply = |out: &mut Restored, what: String, cmd: NetCmd| match m.net_apply(&cmd, scratch) {
        Ok(()) => out.applied.push(what),
        Err(e) => out.problems.push(NetProblem::Command {
            what,
            error: e.to_string(),
        }),
    };

    // Firewall.
    if let Some(tables) = &saved.nft {
        let have = now.nft.as_deref().unwrap_or_default();
        let changed: Vec<&NftTable> = tables
            .iter()
            .filter(|t| {
                let same = have.iter().any(|h| h == *t);
                out.present += usize::from(same);
                !same
            })
            .collect();
        if !changed.is_empty() && now.nft.is_none() {
            for t in changed {
                out.problems.push(NetProblem::Command {
                    what: format!("nftables table {} {}", t.family, t.name),
                    error: NetError::Missing {
                        tool: "nft",
                        package: "nftables",
                        why: "restore the firewall",
                    }
                    .to_string(),
                });
            }
        } else if !changed.is_empty() {
            let what = format!(
                "nftables {}",
                changed
                    .iter()
                    .map(|t| format!("table {} {}", t.family, t.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            apply(
                &mut out,
                what,
                NetCmd::Nft {
                    script: nft_script(&changed),
                    check_only: false,
                },
            );
        }
    }
    for l in &saved.iptables_legacy {
        let same = now
            .iptables_legacy
            .iter()
            .any(|h| h.family == l.family && operator_legacy(&h.text).as_deref() == Some(&l.text));
        if same {
            out.present += 1;
        } else {
            apply(
                &mut out,
                format!(
                    "{} tables",
                    legacy_tool(l.family, false).trim_end_matches("-save")
                ),
                NetCmd::IptablesLegacy {
                    family: l.family,
                    text: l.text.clone(),
                },
            );
        }
    }

    // Addresses.
    let links_now = m.net_links()?;
    for a in &saved.addrs {
        let what = a.describe();
        let same = now
            .addrs
            .iter()
            .find(|h| h.family == a.family && h.local == a.local);
        match same {
            Some(h) if h.ifname == a.ifname && h.prefixlen == a.prefixlen => out.present += 1,
            Some(h) => out.problems.push(NetProblem::AddressElsewhere {
                what,
                local: format!("{}/{}", h.local, h.prefixlen),
                other: h.ifname.clone(),
            }),
            None if !links_now.contains(&a.ifname) => {
                out.problems.push(NetProblem::MissingInterface {
                    what,
                    ifname: a.ifname.clone(),
                })
            }
            None => apply(&mut out, what, NetCmd::Ip(addr_args(a))),
        }
    }

    // Routes: device routes before gateway routes.
    let mut routes: Vec<&Route> = saved.routes.iter().collect();
    routes.sort_by_key(|r| r.gateway.is_some());
    for r in routes {
        let what = r.describe();
        if !r.unsupported.is_empty() {
            out.problems.push(NetProblem::Unsupported {
                what,
                attrs: r.unsupported.join(", "),
            });
            continue;
        }
        if let Some(h) = now.routes.iter().find(|h| h.key() == r.key()) {
            if h.gateway == r.gateway && h.dev == r.dev && h.rtype == r.rtype {
                out.present += 1;
            } else {
                out.problems.push(NetProblem::RouteConflict {
                    what,
                    dst: r.dst.clone(),
                    theirs: h.how(),
                });
            }
            continue;
        }
        if let Some(dev) = &r.dev {
            if !links_now.contains(dev) {
                out.problems.push(NetProblem::MissingInterface {
                    what,
                    ifname: dev.clone(),
                });
                continue;
            }
        }
        apply(&mut out, what, NetCmd::Ip(route_args(r)));
    }

    // Rules.
    for r in &saved.rules {
        if now.rules.iter().any(|h| h == r) {
            out.present += 1;
            continue;
        }
        match r.args() {
            Ok(args) => {
                let mut cmd = vec![r.family.flag().to_string(), "rule".into(), "add".into()];
                cmd.extend(args);
                apply(&mut out, r.describe(), NetCmd::Ip(cmd));
            }
            Err(unknown) => out.problems.push(NetProblem::Unsupported {
                what: format!("rule {}", r.rule),
                attrs: unknown.join(", "),
            }),
        }
    }
    Ok(out)
}

fn addr_args(a: &Addr) -> Vec<String> {
    let mut c: Vec<String> = vec![
        a.family.flag().into(),
        "addr".into(),
        "add".into(),
        format!("{}/{}", a.local, a.prefixlen),
    ];
    if let Some(p) = &a.peer {
        c.extend(["peer".into(), p.clone()]);
    }
    if let Some(b) = &a.broadcast {
        c.extend(["broadcast".into(), b.clone()]);
    }
    c.extend([
        "dev".into(),
        a.ifname.clone(),
        "scope".into(),
        a.scope.clone(),
    ]);
    if let Some(l) = &a.label {
        c.extend(["label".into(), l.clone()]);
    }
    for f in &a.flags {
        if matches!(
            f.as_str(),
            "nodad" | "noprefixroute" | "home" | "mngtmpaddr"
        ) {
            c.push(f.clone());
        }
    }
    c
}

fn route_args(r: &Route) -> Vec<String> {
    let mut c: Vec<String> = vec![r.family.flag().into(), "route".into(), "add".into()];
    if r.rtype != "unicast" {
        c.push(r.rtype.clone());
    }
    c.push(r.dst.clone());
    if let Some(t) = &r.tos {
        c.extend(["tos".into(), t.clone()]);
    }
    if let Some(g) = &r.gateway {
        c.extend(["via".into(), g.clone()]);
    }
    if let Some(d) = &r.dev {
        c.extend(["dev".into(), d.clone()]);
    }
    c.extend([
        "table".into(),
        r.table.clone(),
        "proto".into(),
        r.protocol.clone(),
    ]);
    if let Some(s) = &r.scope {
        c.extend(["scope".into(), s.clone()]);
    }
    if let Some(s) = &r.prefsrc {
        c.extend(["src".into(), s.clone()]);
    }
    if let Some(m) = r.metric {
        c.extend(["metric".into(), m.to_string()]);
    }
    if r.onlink {
        c.push("onlink".into());
    }
    c
}

/// Runs one step for real. Scripts go through a file in `scratch` (nft and iptables-restore read
/// files; exec gives programs /dev/null as standard input).
pub fn apply_real(cmd: &NetCmd, scratch: &Path) -> Result<(), NetError> {
    let write = |name: &str, text: &str| -> Result<PathBuf, NetError> {
        let path = scratch.join(name);
        std::fs::write(&path, text).map_err(|source| NetError::Io {
            action: "write",
            path: path.clone(),
            source,
        })?;
        Ok(path)
    };
    match cmd {
        NetCmd::Ip(args) => {
            let ip = ip_tool()?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_tool(&ip, &args).map(drop)
        }
        NetCmd::Nft { script, check_only } => {
            let nft = find_tool("nft").ok_or(NetError::Missing {
                tool: "nft",
                package: "nftables",
                why: "save and restore the firewall",
            })?;
            let path = write("nft-script", script)?;
            let p = path.to_string_lossy();
            let args: Vec<&str> = if *check_only {
                vec!["-c", "-f", &p]
            } else {
                vec!["-f", &p]
            };
            let res = run_tool(&nft, &args).map(drop);
            let _ = std::fs::remove_file(&path);
            res
        }
        NetCmd::IptablesLegacy { family, text } => {
            let name = legacy_tool(*family, true);
            let tool = find_tool(name).ok_or(NetError::Missing {
                tool: name,
                package: "iptables",
                why: "restore the iptables-legacy rules",
            })?;
            let path = write("iptables", text)?;
            let res = run_tool(&tool, &[&path.to_string_lossy()]).map(drop);
            let _ = std::fs::remove_file(&path);
            res
        }
    }
}

/// The names of the machine's interfaces (from `ip`, not /sys/class/net: sysfs shows the
/// network namespace of whoever mounted it).
pub fn links_real() -> Result<BTreeSet<String>, NetError> {
    let command = "ip -j link show";
    let v = parse_json(command, &run_tool(&ip_tool()?, &["-j", "link", "show"])?)?;
    let links = v.as_array().ok_or_else(|| NetError::Parse {
        command: command.into(),
        why: "not a list of interfaces".into(),
    })?;
    Ok(links.iter().filter_map(|l| str_of(l, "ifname")).collect())
}

/// Restores the network saved in `criu_dir`, once at a time on this machine (the server and a
/// service's unit may both ask; a second run finds everything present).
pub fn restore_saved(
    m: &dyn crate::machine::Machine,
    criu_dir: &Path,
) -> Result<Restored, NetError> {
    let dir = net_dir(criu_dir);
    let lock_path = dir.join(LOCK_FILE);
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| NetError::Io {
            action: "lock",
            path: lock_path.clone(),
            source,
        })?;
    let _held =
        nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
            NetError::Io {
                action: "lock",
                path: lock_path,
                source: e.into(),
            }
        })?;
    let saved = read_state(criu_dir)?;
    restore(m, &saved, &dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from iproute2 6.1 in a network namespace (veth d0 with runtime configuration).
    const ADDRS: &str = r#"[{"ifindex":3,"link":"d1","ifname":"d0","flags":["UP"],"addr_info":[{"family":"inet","local":"10.9.0.5","prefixlen":24,"scope":"global","label":"d0","valid_life_time":4294967295,"preferred_life_time":4294967295},{"family":"inet","local":"10.9.1.5","prefixlen":24,"broadcast":"10.9.1.255","scope":"global","label":"d0:x","valid_life_time":4294967295,"preferred_life_time":4294967295},{"family":"inet6","local":"2001:db8::5","prefixlen":64,"scope":"global","nodad":true,"valid_life_time":4294967295,"preferred_life_time":4294967295},{"family":"inet6","local":"fe80::f00c:88ff:fe18:71c","prefixlen":64,"scope":"link","tentative":true,"valid_life_time":4294967295,"preferred_life_time":4294967295}]}]"#;
    const ROUTES: &str = r#"[{"dst":"10.50.0.0/16","gateway":"10.9.0.1","dev":"d0","table":"100","flags":[]},{"dst":"10.60.0.0/16","dev":"d0","table":"100","scope":"link","flags":[]},{"dst":"default","gateway":"10.9.0.1","dev":"d0","metric":50,"flags":[]},{"dst":"10.9.0.0/24","dev":"d0","protocol":"kernel","scope":"link","prefsrc":"10.9.0.5","flags":[]},{"type":"blackhole","dst":"10.70.0.0/16","flags":[]},{"type":"local","dst":"10.9.0.5","dev":"d0","table":"local","protocol":"kernel","scope":"host","prefsrc":"10.9.0.5","flags":[]},{"dst":"10.80.0.0/16","nexthops":[{"gateway":"10.9.0.1","dev":"d0"}],"flags":[]}]"#;
    const RULES: &str = r#"[{"priority":0,"src":"all","table":"local"},{"priority":999,"not":null,"src":"all","fwmark":"0x10","fwmask":"0xff","iif":"lo","table":"100"},{"priority":1000,"src":"10.9.0.0","srclen":24,"table":"100"},{"priority":2000,"src":"all","dst":"10.1.0.0","dstlen":16,"action":"unreachable"},{"priority":32766,"src":"all","table":"main"},{"priority":32767,"src":"all","table":"default"}]"#;

    fn parsed() -> NetState {
        NetState {
            addrs: parse_addrs(&serde_json::from_str(ADDRS).unwrap()).unwrap(),
            routes: parse_routes(Family::Inet, &serde_json::from_str(ROUTES).unwrap()).unwrap(),
            rules: parse_rules(Family::Inet, &serde_json::from_str(RULES).unwrap()).unwrap(),
            nft: None,
            iptables_legacy: Vec::new(),
        }
    }

    #[test]
    fn addresses_come_back_with_their_label_broadcast_and_flags() {
        let s = operator_state(&parsed());
        let cmds: Vec<String> = s.addrs.iter().map(|a| addr_args(a).join(" ")).collect();
        assert_eq!(
            cmds,
            [
                "-4 addr add 10.9.0.5/24 dev d0 scope global",
                "-4 addr add 10.9.1.5/24 broadcast 10.9.1.255 dev d0 scope global label d0:x",
                "-6 addr add 2001:db8::5/64 dev d0 scope global nodad",
            ],
            "the link-local address is the kernel's"
        );
    }

    #[test]
    fn routes_of_every_table_but_not_the_kernels() {
        let s = operator_state(&parsed());
        let cmds: Vec<String> = s.routes.iter().map(|r| route_args(r).join(" ")).collect();
        assert_eq!(
            cmds,
            [
                "-4 route add 10.50.0.0/16 via 10.9.0.1 dev d0 table 100 proto boot",
                "-4 route add 10.60.0.0/16 dev d0 table 100 proto boot scope link",
                "-4 route add default via 10.9.0.1 dev d0 table main proto boot metric 50",
                "-4 route add blackhole 10.70.0.0/16 table main proto boot",
                "-4 route add 10.80.0.0/16 table main proto boot",
            ]
        );
        assert_eq!(
            s.routes[4].unsupported,
            ["nexthops"],
            "multipath is named, not half-restored"
        );
    }

    #[test]
    fn rules_but_not_the_kernels_defaults() {
        let s = operator_state(&parsed());
        let cmds: Vec<String> = s
            .rules
            .iter()
            .map(|r| r.args().unwrap().join(" "))
            .collect();
        assert_eq!(
            cmds,
            [
                "priority 999 not fwmark 0x10/0xff iif lo lookup 100",
                "priority 1000 from 10.9.0.0/24 lookup 100",
                "priority 2000 to 10.1.0.0/16 unreachable",
            ]
        );
        let odd = Rule {
            family: Family::Inet,
            rule: serde_json::json!({"priority": 5, "src": "all", "uidrange": "1-2", "table": "7"}),
        };
        assert_eq!(odd.args(), Err(vec!["uidrange".to_string()]));
    }

    #[test]
    fn criu_locks_are_not_the_operators() {
        let legacy = "*filter\n:INPUT ACCEPT [0:0]\n:CRIU - [0:0]\n-A INPUT -j CRIU\n-A CRIU -j DROP\nCOMMIT\n";
        assert_eq!(operator_legacy(legacy), None);
        let mine = "*filter\n:INPUT DROP [0:0]\n-A INPUT -p tcp --dport 22 -j ACCEPT\nCOMMIT\n";
        assert_eq!(operator_legacy(mine).as_deref(), Some(mine));
        let tables = serde_json::json!({"nftables": [{"metainfo": {"version": "1.1.3"}},
            {"table": {"family": "inet", "name": "filter", "handle": 1}},
            {"table": {"family": "inet", "name": "CRIU-77", "handle": 2}}]});
        assert_eq!(
            parse_nft_tables(&tables).unwrap(),
            [
                ("inet".to_string(), "filter".to_string()),
                ("inet".into(), "CRIU-77".into())
            ]
        );
    }

    #[test]
    fn empty_output_is_an_empty_list() {
        assert_eq!(
            parse_json("ip -j -6 rule show", "\n").unwrap(),
            serde_json::json!([])
        );
        assert!(parse_json("ip -j addr show", "garbage")
            .unwrap_err()
            .to_string()
            .starts_with("cannot understand the output of `ip -j addr show`"));
    }
}
