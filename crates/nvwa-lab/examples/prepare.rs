//! Manual check: runs a real `prepare` (network on the first run) and builds
//! one guest image per kernel from it.
//!
//! `cargo run -p nvwa-lab --example prepare [extra-package…]`

use std::path::PathBuf;
use std::time::Instant;

use nvwa_lab::guest::MODULES;
use nvwa_lab::image::GuestImage;
use nvwa_lab::modules::resolve_modules;
use nvwa_lab::prepare::{cache_dir, prepare};

fn main() -> anyhow::Result<()> {
    let extra: Vec<String> = std::env::args().skip(1).collect();
    let cache = cache_dir();
    let t = Instant::now();
    let ing = prepare(&cache, &extra)?;
    println!("prepare: {:.2}s", t.elapsed().as_secs_f64());
    println!("{}", serde_json::to_string_pretty(&ing)?);
    let roots = vec![ing.sysroot.clone(), PathBuf::from("/")];
    let out_dir = cache.join("images");
    std::fs::create_dir_all(&out_dir)?;
    for k in [&ing.old, &ing.new] {
        let res = resolve_modules(&k.modules_dir, MODULES)?;
        let names: Vec<String> = res
            .load_order
            .iter()
            .map(|p| nvwa_lab::modules::module_name(&p.to_string_lossy()))
            .collect();
        println!("{}: load order {}", k.version, names.join(" "));
        println!("{}: built in {}", k.version, res.builtin.join(" "));
        println!("{}: missing optional {:?}", k.version, res.missing_optional);
        let t = Instant::now();
        let mut img = GuestImage::new();
        img.add_busybox(&ing.sysroot)?;
        for (guest, host) in [
            ("usr/sbin/criu", "usr/sbin/criu"),
            ("sbin/kexec", "sbin/kexec"),
            ("sbin/mke2fs", "sbin/mke2fs"),
            ("sbin/ip", "bin/ip"),
        ] {
            img.add_binary(guest, &ing.sysroot.join(host), &roots)?;
        }
        img.add_file("boot/vmlinuz", &ing.new.vmlinuz, 0o644)?;
        let order = img.add_kernel_modules(k, MODULES)?;
        let out = out_dir.join(format!("{}.cpio", k.version));
        let size = img.write_cpio(&out)?;
        println!(
            "{}: {} entries, {} modules, {} bytes ({:.1} MB) in {:.2}s -> {}",
            k.version,
            img.paths().count(),
            order.len(),
            size,
            size as f64 / 1e6,
            t.elapsed().as_secs_f64(),
            out.display()
        );
    }
    Ok(())
}
