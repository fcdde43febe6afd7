//! Property tests of the two config parsers: no input makes them panic, every error names the
//! file, and configurations written the way operators write them read back as written.

use std::path::{Path, PathBuf};

use nvwa_core::config::{
    parse_restore, parse_server, KexecMode, RestoreConfig, ServerConfig, MAX_TIMEOUT_S,
};
use proptest::prelude::*;

const PATH: &str = "/etc/nvwa/prop-test.yaml";

/// Lines that look like config lines: real and misspelled keys, odd values, YAML punctuation.
fn yamlish_line() -> impl Strategy<Value = String> {
    let mut keys: Vec<&'static str> = nvwa_core::config::SERVER_KEYS
        .iter()
        .chain(nvwa_core::config::RESTORE_KEYS)
        .copied()
        .collect();
    keys.extend(["enbale_debug_mode", "pid", "", "- ", "  - ", "? "]);
    let key = prop::sample::select(keys);
    let value = prop_oneof![
        Just(String::new()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        Just("~".to_string()),
        Just("/".to_string()),
        Just("/tmp/../etc/".to_string()),
        Just("true".to_string()),
        Just("'".to_string()),
        Just("\"\\u202e\"".to_string()),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>().prop_map(|n| n.to_string()),
        "[ -~]{0,12}",
        "\\PC{0,12}",
        "\\[[0-9, '\"a-z-]{0,16}\\]?",
    ];
    (key, prop::sample::select(vec![": ", ":", " ", ""]), value).prop_map(|(k, sep, v)| {
        if k.ends_with(' ') {
            format!("{k}{v}")
        } else {
            format!("{k}{sep}{v}")
        }
    })
}

fn yamlish_text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::collection::vec(yamlish_line(), 0..8).prop_map(|l| l.join("\n")),
        any::<String>(),
        "[\\x00-\\x7f]{0,64}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parsing_anything_never_panics_and_errors_name_the_file(text in yamlish_text()) {
        let path = Path::new(PATH);
        if let Err(e) = parse_server(&text, path) {
            prop_assert!(e.to_string().contains(PATH), "{}", e);
        }
        if let Err(e) = parse_restore(&text, path) {
            prop_assert!(e.to_string().contains(PATH), "{}", e);
        }
    }
}

/// An absolute path with plain segments, as `normalised_absolute` accepts it.
fn plain_path() -> impl Strategy<Value = PathBuf> {
    (
        prop::collection::vec("[a-z0-9_][a-z0-9_.-]{0,7}", 1..5),
        any::<bool>(),
    )
        .prop_map(|(segments, trailing)| {
            let mut p = format!("/{}", segments.join("/"));
            if trailing {
                p.push('/');
            }
            PathBuf::from(p)
        })
}

fn timeout() -> impl Strategy<Value = Option<u64>> {
    prop::option::of(1..=MAX_TIMEOUT_S)
}

fn server_config() -> impl Strategy<Value = ServerConfig> {
    (
        [
            plain_path(),
            plain_path(),
            plain_path(),
            plain_path(),
            plain_path(),
            plain_path(),
        ],
        timeout(),
        timeout(),
        prop::option::of(plain_path()),
        prop::bool::ANY,
    )
        .prop_map(
            |([a, b, c, d, e, f], dump, restore, metrics, orderly)| ServerConfig {
                criu_dir: a,
                criu_exe: b,
                kexec_exe: c,
                systemd_etc: d,
                log_dir: e,
                socket: f,
                dump_timeout_s: dump,
                restore_timeout_s: restore,
                metrics_file: metrics,
                kexec_mode: if orderly {
                    KexecMode::Orderly
                } else {
                    KexecMode::Immediate
                },
            },
        )
}

fn render_server(c: &ServerConfig) -> String {
    let mut text = format!(
        "criu_dir: {}\ncriu_exe: {}\nkexec_exe: {}\nsystemd_etc: {}\nlog_dir: {}\nsocket: {}\n",
        c.criu_dir.display(),
        c.criu_exe.display(),
        c.kexec_exe.display(),
        c.systemd_etc.display(),
        c.log_dir.display(),
        c.socket.display()
    );
    // An absent key and an empty value both mean "the default", which is None here.
    match c.dump_timeout_s {
        Some(s) => text.push_str(&format!("dump_timeout: {s}\n")),
        None => text.push_str("dump_timeout:\n"),
    }
    if let Some(s) = c.restore_timeout_s {
        text.push_str(&format!("restore_timeout: {s}   # seconds\n"));
    }
    if let Some(p) = &c.metrics_file {
        text.push_str(&format!("metrics_file: {}\n", p.display()));
    }
    if c.kexec_mode == KexecMode::Orderly {
        text.push_str("kexec_mode: orderly\n");
    }
    text
}

/// A restore config with the way each item is written (quoting, `.service` suffix, list style).
fn restore_config() -> impl Strategy<Value = (RestoreConfig, Vec<u8>, bool, bool)> {
    (
        prop::collection::hash_set(1..=i32::MAX, 0..12),
        prop::collection::btree_set("svc-[a-z0-9_@-]{0,10}", 0..6),
        any::<[bool; 6]>(),
        prop::collection::vec(0u8..3, 18),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(pids, services, flags, styles, flow, misspelled)| {
            let cfg = RestoreConfig {
                pids: pids.into_iter().collect(),
                services: services.into_iter().collect(),
                restore_net: flags[0],
                enable_quick_kexec: flags[1],
                enable_pin_memory: flags[2],
                enable_debug_mode: flags[3],
                pre_dump: flags[4],
                lazy_restore: flags[5],
            };
            (cfg, styles, flow, misspelled)
        })
}

fn quoted(item: &str, style: u8) -> String {
    match style {
        0 => item.to_string(),
        1 => format!("\"{item}\""),
        _ => format!("'{item}'"),
    }
}

fn render_restore(c: &RestoreConfig, styles: &[u8], flow: bool, misspelled: bool) -> String {
    let pids: Vec<String> = c
        .pids
        .iter()
        .zip(styles.iter().cycle())
        .map(|(p, s)| quoted(&p.to_string(), *s))
        .collect();
    let services: Vec<String> = c
        .services
        .iter()
        .zip(styles.iter().rev().cycle())
        .map(|(name, s)| {
            // The `.service` suffix is optional and dropped when read.
            let name = if *s == 1 {
                format!("{name}.service")
            } else {
                name.clone()
            };
            quoted(&name, *s)
        })
        .collect();
    let list = |key: &str, items: &[String]| {
        if flow {
            format!("{key}: [{}]\n", items.join(", "))
        } else if items.is_empty() {
            format!("{key}:\n")
        } else {
            let lines: Vec<String> = items.iter().map(|i| format!("  - {i}\n")).collect();
            format!("{key}:\n{}", lines.concat())
        }
    };
    let debug_key = if misspelled {
        "enbale_debug_mode"
    } else {
        "enable_debug_mode"
    };
    format!(
        "{}{}restore_net: {}\nenable_quick_kexec: {}\nenable_pin_memory: {}\npre_dump: {}\nlazy_restore: {}\n{debug_key}: {}\n",
        list("pids", &pids),
        list("services", &services),
        c.restore_net,
        c.enable_quick_kexec,
        c.enable_pin_memory,
        c.pre_dump,
        c.lazy_restore,
        c.enable_debug_mode
    )
}

proptest! {
    #[test]
    fn server_configs_round_trip(cfg in server_config()) {
        let text = render_server(&cfg);
        let back = parse_server(&text, Path::new(PATH));
        prop_assert!(back.is_ok(), "{}\n{}", text, back.unwrap_err());
        prop_assert_eq!(back.unwrap(), cfg);
    }

    #[test]
    fn restore_configs_round_trip((cfg, styles, flow, misspelled) in restore_config()) {
        let text = render_restore(&cfg, &styles, flow, misspelled);
        let back = parse_restore(&text, Path::new(PATH));
        prop_assert!(back.is_ok(), "{}\n{}", text, back.unwrap_err());
        prop_assert_eq!(back.unwrap(), cfg);
    }
}
