//! Pre-dump and lazy restore together (`pre_dump: true` with `lazy_restore: true`).
//!
//! A dump that builds on pre-dump passes records the pages unchanged since a pass as "in
//! parent" (PE_PARENT) and writes only the dirty ones. criu restores lazily only the entries
//! flagged PE_LAZY (criu/mem.c, restore_priv_vma_content), and a dump never flags a hole lazy
//! (page-xfer.c, get_hole_flags). Flagging the holes lazy is not enough either: the
//! `criu lazy-pages` daemon reads a page in parent through the parent's page_read, whose
//! io_complete is NULL (pagemap.c, open_page_read_at and maybe_read_page_local), so the page is
//! read but never copied into the process (uffd.c attaches uffd_io_complete to the top
//! page_read only); the process would wait forever on its fault. That is so in criu 3.17.1
//! and 4.1.1 alike.
//!
//! What works without copying a page: two views of the same images.
//! - criu restore reads the dump's directory, whose pagemaps are rewritten so that the holes
//!   whose pages are in the first pass (the bottom of the chain, which has no parent of its
//!   own) are flagged lazy: restore leaves them to userfaultfd. The dump's own (dirty) pages
//!   and the holes resolved in a later pass are read before the process runs: they are the
//!   pages dirtied while passes ran, which shrink with the passes, not with memory.
//! - the daemon reads [`VIEW`], a directory of links to the dump's images except its
//!   pagemaps: there each process's pagemap is the first pass's, flagged lazy exactly where the
//!   restore left pages out, with the first pass's pages file. One pagemap, one pages file, no
//!   parent: what the daemon serves. Its socket, log and pid file stay in the dump's
//!   directory (`-W`), where restore and nvwa look for them.
//!
//! Only pages the first pass itself flagged lazy (criu found their mapping fit for
//! userfaultfd: private, anonymous, not locked) and whose mapping in the dump (`mm-<pid>.img`)
//! still is fit become lazy: a mapping locked after the first pass would not be registered with
//! userfaultfd, and the process would read zeros there. The judge in [`crate::lazy_pages`]
//! still requires every lazy page copied.

use std::path::{Path, PathBuf};

use crate::criu_image::{
    decode, encode, entries, first_entry, put_entry, varint_field as varint, ImageError, Value,
};

/// The daemon's directory, inside the dump's.
pub const VIEW: &str = "lazy-view";

/// `PE_PARENT`, `PE_LAZY`, `PE_PRESENT` (criu/include/pagemap.h, unchanged from 3.17 to 4.1).
pub const PE_PARENT: u32 = 1;
pub const PE_LAZY: u32 = 2;
pub const PE_PRESENT: u32 = 4;
const PAGE: u64 = 4096;
/// Pages files of processes the passes did not see are linked under ids from here, away from
/// criu's own (which count from 1 in each directory).
const OWN_IDS: u32 = 0x4000_0000;

/// One `pagemap_entry`: `nr_pages` pages from `vaddr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub vaddr: u64,
    pub nr_pages: u64,
    pub flags: u32,
}

impl Entry {
    fn end(&self) -> u64 {
        self.vaddr + self.nr_pages * PAGE
    }
}

/// A `pagemap-<pid>.img`: its two magic numbers, the `pagemap_head` and the entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pagemap {
    pub magic: [u8; 8],
    pub pages_id: u32,
    pub entries: Vec<Entry>,
}

/// Reads a pagemap image; entries must be page-aligned, sorted and apart, as criu writes them
/// and as its readers (seek_pagemap) need them.
pub fn parse(img: &[u8]) -> Result<Pagemap, &'static str> {
    let magic: [u8; 8] = img
        .get(..8)
        .and_then(|m| m.try_into().ok())
        .ok_or("shorter than its magic")?;
    let mut msgs = entries(img, 2)
        .ok_or("truncated entry")?
        .into_iter()
        .map(|m| decode(m).ok_or("undecodable entry"))
        .collect::<Result<Vec<_>, _>>()?
        .into_iter();
    let head = msgs.next().ok_or("no pagemap head")?;
    let pages_id = varint(&head, 1)
        .and_then(|id| u32::try_from(id).ok())
        .ok_or("no pages_id in the pagemap head")?;
    let mut entries: Vec<Entry> = Vec::new();
    for f in msgs {
        let vaddr = varint(&f, 1).ok_or("an entry without vaddr")?;
        let nr_pages = varint(&f, 2).ok_or("an entry without nr_pages")?;
        let field = varint(&f, 4);
        // criu's init_compat_pagemap_entry: images older than the flags field say in_parent.
        let mut flags = u32::try_from(field.unwrap_or(0)).map_err(|_| "flags out of range")?;
        if varint(&f, 3).is_some_and(|p| p != 0) {
            flags |= PE_PARENT;
        } else if field.is_none() {
            flags = PE_PRESENT;
        }
        if vaddr % PAGE != 0 || nr_pages == 0 || vaddr.checked_add(nr_pages * PAGE).is_none() {
            return Err("an entry that is not whole pages");
        }
        if entries.last().is_some_and(|l| l.end() > vaddr) {
            return Err("entries out of order or overlapping");
        }
        entries.push(Entry {
            vaddr,
            nr_pages,
            flags,
        });
    }
    Ok(Pagemap {
        magic,
        pages_id,
        entries,
    })
}

/// Writes a pagemap image as criu does (flags always given, so no `in_parent`).
pub fn render(p: &Pagemap) -> Vec<u8> {
    let mut out = p.magic.to_vec();
    put_entry(&mut out, &encode(&[(1, Value::Varint(p.pages_id.into()))]));
    for e in &p.entries {
        let msg = encode(&[
            (1, Value::Varint(e.vaddr)),
            (2, Value::Varint(e.nr_pages)),
            (4, Value::Varint(e.flags.into())),
        ]);
        put_entry(&mut out, &msg);
    }
    out
}

/// The address ranges of an `mm-<pid>.img` whose mappings criu's restore registers with
/// userfaultfd (vma_entry_can_be_lazy, criu/include/vma.h): private anonymous, not locked, not
/// huge pages, not the vdso, vvar or vsyscall. A page outside them must not be left lazy: no
/// fault would reach the daemon, the process would read zeros.
pub fn lazy_vmas(mm: &[u8]) -> Result<Vec<(u64, u64)>, &'static str> {
    const MAP_PRIVATE: u64 = 0x2;
    const MAP_ANONYMOUS: u64 = 0x20;
    const MAP_LOCKED: u64 = 0x2000;
    const MAP_HUGETLB: u64 = 0x40000;
    const SPECIAL: u64 = (1 << 2) | (1 << 3) | (1 << 12);
    let (_, msg) = first_entry(mm, 2).ok_or("no mm entry, or a truncated one")?;
    let mut out = Vec::new();
    for (n, v) in decode(msg).ok_or("undecodable mm entry")? {
        let (14, Value::Bytes(vma)) = (n, v) else {
            continue;
        };
        let f = decode(&vma).ok_or("undecodable vma entry")?;
        let get = |n| varint(&f, n).ok_or("a vma entry without start, end, flags or status");
        let (start, end, flags, status) = (get(1)?, get(2)?, get(6)?, get(7)?);
        if flags & (MAP_PRIVATE | MAP_ANONYMOUS) == MAP_PRIVATE | MAP_ANONYMOUS
            && flags & (MAP_LOCKED | MAP_HUGETLB) == 0
            && status & SPECIAL == 0
        {
            out.push((start, end));
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// `[start, end)` cut where `ranges` (sorted, apart) begin and end: (from, to, inside).
fn cut(ranges: &[(u64, u64)], start: u64, end: u64) -> Vec<(u64, u64, bool)> {
    let mut out = Vec::new();
    let mut at = start;
    let mut j = ranges.partition_point(|r| r.1 <= at);
    while at < end {
        let (to, inside) = match ranges.get(j) {
            Some(&(s, e)) if s <= at => (e.min(end), true),
            Some(&(s, _)) => (s.min(end), false),
            None => (end, false),
        };
        out.push((at, to, inside));
        at = to;
        if inside {
            j += 1;
        }
    }
    out
}

/// The two pagemaps of one process and what they leave to the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The dump's pagemap as restore is to read it.
    pub restore: Vec<Entry>,
    /// The first pass's pagemap as the daemon is to read it.
    pub daemon: Vec<Entry>,
    /// Pages the daemon copies in.
    pub lazy: u64,
    /// Pages restore reads before the process runs.
    pub eager: u64,
}

/// The pieces of `[start, end)`, in parent at `levels[i]`, with the level that has them and
/// that level's flags for them.
fn resolve(
    levels: &[&[Entry]],
    i: usize,
    start: u64,
    end: u64,
    out: &mut Vec<(Entry, usize)>,
) -> Result<(), &'static str> {
    let parent = levels
        .get(i + 1)
        .ok_or("a page is in parent, but there is no parent pagemap")?;
    let mut at = start;
    let mut k = parent.partition_point(|e| e.end() <= at);
    while at < end {
        let e = parent
            .get(k)
            .filter(|e| e.vaddr <= at)
            .ok_or("a page in parent is missing from the parent's pagemap")?;
        let to = e.end().min(end);
        if e.flags & PE_PARENT != 0 {
            resolve(levels, i + 1, at, to, out)?;
        } else {
            let piece = Entry {
                vaddr: at,
                nr_pages: (to - at) / PAGE,
                flags: e.flags,
            };
            out.push((piece, i + 1));
        }
        at = to;
        k += 1;
    }
    Ok(())
}

/// `levels[0]` is the dump's pagemap, each next one the parent of the one before; the last is
/// the first pass (no parent). `vmas`: where pages may be left lazy ([`lazy_vmas`]).
pub fn plan(levels: &[&[Entry]], vmas: &[(u64, u64)]) -> Result<Plan, &'static str> {
    let bottom = levels.len().checked_sub(1).ok_or("no pagemap")?;
    let mut restore = Vec::new();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let (mut lazy, mut eager) = (0, 0);
    for e in levels[0] {
        if e.flags & PE_PARENT == 0 {
            // Its pages are in the dump's own pages file, which the daemon does not read.
            restore.push(Entry {
                flags: e.flags & !PE_LAZY,
                ..*e
            });
            if e.flags & PE_PRESENT != 0 {
                eager += e.nr_pages;
            }
            continue;
        }
        let mut pieces = Vec::new();
        resolve(levels, 0, e.vaddr, e.end(), &mut pieces)?;
        for (p, level) in pieces {
            let held = level == bottom && p.flags & (PE_PRESENT | PE_LAZY) == PE_PRESENT | PE_LAZY;
            for (from, to, inside) in cut(vmas, p.vaddr, p.end()) {
                let fit = held && inside;
                let nr_pages = (to - from) / PAGE;
                restore.push(Entry {
                    vaddr: from,
                    nr_pages,
                    flags: (e.flags & !PE_LAZY) | if fit { PE_LAZY } else { 0 },
                });
                if fit {
                    lazy += nr_pages;
                    match ranges.last_mut() {
                        Some(r) if r.1 == from => r.1 = to,
                        _ => ranges.push((from, to)),
                    }
                } else {
                    eager += nr_pages;
                }
            }
        }
    }
    let mut daemon = Vec::new();
    for b in levels[bottom] {
        for (from, to, in_range) in cut(&ranges, b.vaddr, b.end()) {
            daemon.push(Entry {
                vaddr: from,
                nr_pages: (to - from) / PAGE,
                flags: if in_range {
                    b.flags | PE_LAZY
                } else {
                    b.flags & !PE_LAZY
                },
            });
        }
    }
    let served: u64 = daemon
        .iter()
        .filter(|e| e.flags & PE_LAZY != 0)
        .map(|e| e.nr_pages)
        .sum();
    if served != lazy {
        return Err("the lazy pages are not all in the first pass's pagemap");
    }
    Ok(Plan {
        restore,
        daemon,
        lazy,
        eager,
    })
}

/// What [`prepare`] left to the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// The daemon's image directory.
    pub view: PathBuf,
    pub lazy_pages: u64,
    pub eager_pages: u64,
}

/// For a lazy restore of the dump in `dir`: when it builds on pre-dump passes, rewrites its
/// pagemaps and builds [`VIEW`] (see the module's text); `None` when it has no parent (the
/// dump's own pagemaps serve both). Nothing is written unless every pagemap could be planned.
/// Running it again gives the same result.
pub fn prepare(dir: &Path) -> Result<Option<Prepared>, ImageError> {
    let view = dir.join(VIEW);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Io { path, source }
    };
    match std::fs::remove_dir_all(&view) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&view)(e)),
        _ => {}
    }
    let mut chain = vec![dir.to_path_buf()];
    while let Some(parent) = chain
        .last()
        .map(|d| d.join("parent"))
        .filter(|p| p.is_dir())
    {
        if chain.len() > 64 {
            return Err(ImageError::Malformed {
                path: parent,
                why: "a chain of parent images that does not end",
            });
        }
        chain.push(parent);
    }
    if chain.len() == 1 {
        return Ok(None);
    }
    let read = |path: PathBuf| -> Result<Option<Pagemap>, ImageError> {
        match std::fs::read(&path) {
            Ok(b) => parse(&b)
                .map(Some)
                .map_err(|why| ImageError::Malformed { path, why }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(ImageError::Io { path, source }),
        }
    };
    let mut names: Vec<(String, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if e.file_type().map_err(io(&e.path()))?.is_file() && name.ends_with(".img") {
            names.push((name, e.path()));
        }
    }
    names.sort();
    let pid_of = |name: &str| {
        name.strip_prefix("pagemap-")
            .and_then(|n| n.strip_suffix(".img"))
            .filter(|n| !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()))
            .map(str::to_string)
    };
    // (pid, the dump's pagemap rewritten if it builds on the passes, the daemon's pagemap,
    // the pages file that one reads)
    let mut work: Vec<(String, Option<Pagemap>, Pagemap, PathBuf)> = Vec::new();
    let (mut lazy_pages, mut eager_pages) = (0, 0);
    for (n, (name, path)) in names.iter().enumerate() {
        let Some(pid) = pid_of(name) else { continue };
        let top = read(path.clone())?.ok_or_else(|| ImageError::Malformed {
            path: path.clone(),
            why: "vanished while read",
        })?;
        let mut levels = vec![top];
        for d in &chain[1..] {
            match read(d.join(name))? {
                Some(p) => levels.push(p),
                None => break,
            }
        }
        if levels.len() == 1 {
            // A process the passes did not see: its pages are all in the dump's pages file,
            // which the daemon reads under an id of its own.
            let top = levels.pop().unwrap();
            let pages = dir.join(format!("pages-{}.img", top.pages_id));
            lazy_pages += top
                .entries
                .iter()
                .filter(|e| e.flags & PE_LAZY != 0)
                .map(|e| e.nr_pages)
                .sum::<u64>();
            let own = Pagemap {
                pages_id: OWN_IDS + n as u32,
                ..top
            };
            work.push((pid, None, own, pages));
            continue;
        }
        let mm = dir.join(format!("mm-{pid}.img"));
        let vmas = std::fs::read(&mm)
            .map_err(io(&mm))
            .and_then(|b| lazy_vmas(&b).map_err(|why| ImageError::Malformed { path: mm, why }))?;
        let entries: Vec<&[Entry]> = levels.iter().map(|p| p.entries.as_slice()).collect();
        let plan = plan(&entries, &vmas).map_err(|why| ImageError::Malformed {
            path: path.clone(),
            why,
        })?;
        lazy_pages += plan.lazy;
        eager_pages += plan.eager;
        let bottom = levels.pop().unwrap();
        let pages = chain[levels.len()].join(format!("pages-{}.img", bottom.pages_id));
        let restore = Pagemap {
            entries: plan.restore,
            ..levels.swap_remove(0)
        };
        let daemon = Pagemap {
            entries: plan.daemon,
            ..bottom
        };
        work.push((pid, Some(restore), daemon, pages));
    }
    std::fs::create_dir(&view).map_err(io(&view))?;
    let link = |target: &Path, at: PathBuf| -> Result<(), ImageError> {
        let target = std::fs::canonicalize(target).map_err(io(target))?;
        std::os::unix::fs::symlink(target, &at).map_err(io(&at))
    };
    for (name, path) in &names {
        if pid_of(name).is_none() && !name.starts_with("pages-") {
            link(path, view.join(name))?;
        }
    }
    for (pid, restore, daemon, pages) in work {
        let name = format!("pagemap-{pid}.img");
        let at = view.join(format!("pages-{}.img", daemon.pages_id));
        if !at.exists() {
            link(&pages, at)?;
        }
        let d = view.join(&name);
        std::fs::write(&d, render(&daemon)).map_err(io(&d))?;
        if let Some(r) = restore {
            let path = dir.join(&name);
            let tmp = dir.join(format!("{name}.nvwa"));
            std::fs::write(&tmp, render(&r)).map_err(io(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io(&path))?;
        }
    }
    Ok(Some(Prepared {
        view,
        lazy_pages,
        eager_pages,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAGIC: [u8; 8] = [0x54, 0x56, 0x05, 0x56, 0x12, 0x32, 0x56, 0x56];
    const P: u64 = PAGE;

    fn e(page: u64, nr_pages: u64, flags: u32) -> Entry {
        Entry {
            vaddr: 0x7f00_0000_0000 + page * P,
            nr_pages,
            flags,
        }
    }

    fn pagemap(pages_id: u32, entries: Vec<Entry>) -> Pagemap {
        Pagemap {
            magic: MAGIC,
            pages_id,
            entries,
        }
    }

    const LAZY: u32 = PE_PRESENT | PE_LAZY;
    const ALL: &[(u64, u64)] = &[(0, u64::MAX)];

    #[test]
    fn an_image_as_criu_writes_it_is_read() {
        // As criu 3.17/4.1 write them: magics, head {pages_id}, entries {vaddr, nr_pages, flags}.
        let mut img = MAGIC.to_vec();
        for msg in [
            vec![0x08, 0x01],
            vec![0x08, 0x80, 0x80, 0x04, 0x10, 0x02, 0x20, 0x06],
            vec![0x08, 0x80, 0xc0, 0x04, 0x10, 0x01, 0x20, 0x01],
            // An older image: in_parent and no flags; another with neither.
            vec![0x08, 0x80, 0x80, 0x05, 0x10, 0x01, 0x18, 0x01],
            vec![0x08, 0x80, 0xc0, 0x05, 0x10, 0x01],
        ] {
            put_entry(&mut img, &msg);
        }
        let p = parse(&img).unwrap();
        assert_eq!(p.pages_id, 1);
        let flags: Vec<u32> = p.entries.iter().map(|e| e.flags).collect();
        assert_eq!(flags, [LAZY, PE_PARENT, PE_PARENT, PE_PRESENT]);
        assert_eq!(p.entries[0].vaddr, 0x10000);
        assert_eq!(p.entries[0].nr_pages, 2);
        assert_eq!(parse(&render(&p)).unwrap(), p);
        // What criu writes itself, flags given, comes back byte for byte.
        let modern = pagemap(1, p.entries[..2].to_vec());
        assert_eq!(render(&modern), img[..8 + 6 + 12 + 12]);
    }

    #[test]
    fn malformed_images_are_refused() {
        assert!(parse(&MAGIC[..4]).is_err());
        assert_eq!(parse(&MAGIC), Err("no pagemap head"));
        let bad = pagemap(1, vec![e(4, 2, LAZY), e(5, 1, LAZY)]);
        assert_eq!(
            parse(&render(&bad)),
            Err("entries out of order or overlapping")
        );
        let mut cut = render(&pagemap(1, vec![e(4, 2, LAZY)]));
        cut.pop();
        assert_eq!(parse(&cut), Err("truncated entry"));
    }

    fn arb_pagemap() -> impl Strategy<Value = Pagemap> {
        (
            any::<u32>(),
            prop::collection::vec((0u64..64, 1u64..64, 0u32..8), 0..20),
        )
            .prop_map(|(id, gaps)| {
                let mut at = 0x1000u64;
                let entries = gaps
                    .into_iter()
                    .map(|(gap, n, flags)| {
                        at += gap * P;
                        let entry = Entry {
                            vaddr: at,
                            nr_pages: n,
                            flags,
                        };
                        at += n * P;
                        entry
                    })
                    .collect();
                pagemap(id, entries)
            })
    }

    proptest! {
        #[test]
        fn pagemaps_round_trip(p in arb_pagemap()) {
            prop_assert_eq!(parse(&render(&p)).unwrap(), p);
        }

        /// Whatever the chain, every page of the dump is either read by restore or served by
        /// the daemon, never both, and the daemon's pages file offsets are the first pass's.
        #[test]
        fn every_page_is_restored_once(
            bottom in prop::collection::vec(prop::bool::ANY, 1..48),
            middle in prop::collection::vec(0u8..3, 48),
            top in prop::collection::vec(0u8..3, 48),
        ) {
            // Page i: in the first pass (lazy-fit or not); the middle pass has it (0), says
            // parent (1) or lacks it (2, only where the first pass lacks it); the dump likewise.
            let n = bottom.len();
            let run = |f: &dyn Fn(usize) -> Option<u32>| -> Vec<Entry> {
                (0..n).filter_map(|i| f(i).map(|fl| e(i as u64, 1, fl))).collect()
            };
            let b = run(&|i| Some(if bottom[i] { LAZY } else { PE_PRESENT }));
            let m = run(&|i| Some(if middle[i] == 0 { LAZY } else { PE_PARENT }));
            let t = run(&|i| if top[i] == 2 { None } else if top[i] == 0 { Some(LAZY) } else { Some(PE_PARENT) });
            let plan = plan(&[&t, &m, &b], ALL).unwrap();
            let restored: u64 = plan.restore.iter().map(|e| e.nr_pages).sum();
            prop_assert_eq!(restored, t.len() as u64);
            prop_assert_eq!(plan.lazy + plan.eager, t.len() as u64);
            for p in &t {
                let i = ((p.vaddr - e(0, 1, 0).vaddr) / P) as usize;
                let in_bottom = p.flags & PE_PARENT != 0 && middle[i] != 0 && bottom[i];
                let r = plan.restore.iter().find(|r| r.vaddr == p.vaddr).unwrap();
                prop_assert_eq!(r.flags & PE_LAZY != 0, in_bottom);
                prop_assert_eq!(r.flags & PE_PARENT, p.flags & PE_PARENT);
            }
            let served: Vec<u64> = plan.daemon.iter().filter(|e| e.flags & PE_LAZY != 0).map(|e| e.vaddr).collect();
            let left: Vec<u64> = plan.restore.iter().filter(|e| e.flags & PE_LAZY != 0).map(|e| e.vaddr).collect();
            prop_assert_eq!(served, left);
            // The daemon's pagemap covers the first pass's pages, in order, each once.
            let covered: Vec<u64> = plan.daemon.iter().flat_map(|e| (0..e.nr_pages).map(move |k| e.vaddr + k * P)).collect();
            let first: Vec<u64> = b.iter().map(|e| e.vaddr).collect();
            prop_assert_eq!(covered, first);
            prop_assert!(plan.daemon.iter().all(|e| e.flags & PE_PRESENT != 0 && e.flags & PE_PARENT == 0));
        }
    }

    #[test]
    fn a_dump_on_passes_leaves_the_first_pass_pages_to_the_daemon() {
        // First pass: 8 lazy pages then a stack page (not lazy). Second: page 2 dirtied.
        // Dump: page 5 dirtied, the rest in parent, and 2 new pages.
        let b = vec![e(0, 8, LAZY), e(8, 1, PE_PRESENT)];
        let m = vec![e(0, 2, PE_PARENT), e(2, 1, LAZY), e(3, 6, PE_PARENT)];
        let t = vec![
            e(0, 5, PE_PARENT),
            e(5, 1, LAZY),
            e(6, 3, PE_PARENT),
            e(20, 2, LAZY),
        ];
        let plan = plan(&[&t, &m, &b], ALL).unwrap();
        assert_eq!(
            plan.restore,
            [
                e(0, 2, PE_PARENT | PE_LAZY),
                e(2, 1, PE_PARENT),
                e(3, 2, PE_PARENT | PE_LAZY),
                e(5, 1, PE_PRESENT),
                e(6, 2, PE_PARENT | PE_LAZY),
                e(8, 1, PE_PARENT),
                e(20, 2, PE_PRESENT),
            ]
        );
        assert_eq!(
            plan.daemon,
            [
                e(0, 2, LAZY),
                e(2, 1, PE_PRESENT),
                e(3, 2, LAZY),
                e(5, 1, PE_PRESENT),
                e(6, 2, LAZY),
                e(8, 1, PE_PRESENT),
            ]
        );
        assert_eq!((plan.lazy, plan.eager), (6, 5));
        // Restore's pagemap read again plans the same.
        let again = plan_again(&plan.restore, &m, &b);
        assert_eq!(again, plan);
    }

    fn plan_again(t: &[Entry], m: &[Entry], b: &[Entry]) -> Plan {
        plan(&[t, m, b], ALL).unwrap()
    }

    /// The 256 MiB process of the lab's `pids` scenario (criu 3.17.1, two pre-dump passes), its
    /// pagemaps as criu wrote them, printed by the new boot before the restore.
    #[test]
    fn a_real_chain_leaves_the_pre_dumped_buffer_to_the_daemon() {
        let dump = include_bytes!("testdata/pagemap-dump.bin");
        let pre2 = include_bytes!("testdata/pagemap-pre-2.bin");
        let pre1 = include_bytes!("testdata/pagemap-pre-1.bin");
        let [t, m, b] = [&dump[..], &pre2[..], &pre1[..]].map(|i| parse(i).unwrap());
        for (img, p) in [(&dump[..], &t), (&pre2[..], &m), (&pre1[..], &b)] {
            assert_eq!(render(p), img, "criu's own bytes come back");
        }
        assert!(t.entries.iter().any(|e| e.flags == PE_PARENT));
        let plan = plan(&[&t.entries, &m.entries, &b.entries], ALL).unwrap();
        let pages = |es: &[Entry]| es.iter().map(|e| e.nr_pages).sum::<u64>();
        assert_eq!(pages(&plan.restore), pages(&t.entries));
        assert_eq!(plan.lazy + plan.eager, pages(&t.entries));
        assert!(plan.lazy >= 65536, "the 256 MiB buffer: {plan:?}");
        assert!(plan.eager < 64, "{} pages read before it runs", plan.eager);
        assert_eq!(pages(&plan.daemon), pages(&b.entries));
    }

    /// An mm image with these (start, end, flags, status) mappings.
    fn mm_image(vmas: &[(u64, u64, u64, u64)]) -> Vec<u8> {
        let mut fields = vec![(1, Value::Varint(0x400000))];
        for &(start, end, flags, status) in vmas {
            let vma = encode(&[
                (1, Value::Varint(start)),
                (2, Value::Varint(end)),
                (3, Value::Varint(0)),
                (5, Value::Varint(3)),
                (6, Value::Varint(flags)),
                (7, Value::Varint(status)),
            ]);
            fields.push((14, Value::Bytes(vma)));
        }
        let msg = encode(&fields);
        let mut out = MAGIC.to_vec();
        put_entry(&mut out, &msg);
        out
    }

    #[test]
    fn only_mappings_userfaultfd_can_serve_are_left_lazy() {
        let a = |page| e(page, 0, 0).vaddr;
        // Private anonymous (0x22) at 0..4 and 8..12; locked (0x2022) at 4..6; a file's private
        // mapping (0x2) at 6..8; the vdso (status bit 3) at 12..13.
        let mm = mm_image(&[
            (a(8), a(12), 0x22, 1),
            (a(0), a(4), 0x22, 1),
            (a(4), a(6), 0x2022, 1),
            (a(6), a(8), 0x2, 1),
            (a(12), a(13), 0x22, 1 | 8),
        ]);
        let vmas = lazy_vmas(&mm).unwrap();
        assert_eq!(vmas, [(a(0), a(4)), (a(8), a(12))]);
        let b = vec![e(0, 13, LAZY)];
        let t = vec![e(0, 13, PE_PARENT)];
        let plan = plan(&[&t, &b], &vmas).unwrap();
        assert_eq!(
            plan.restore,
            [
                e(0, 4, PE_PARENT | PE_LAZY),
                e(4, 4, PE_PARENT),
                e(8, 4, PE_PARENT | PE_LAZY),
                e(12, 1, PE_PARENT),
            ]
        );
        assert_eq!(
            plan.daemon,
            [
                e(0, 4, LAZY),
                e(4, 4, PE_PRESENT),
                e(8, 4, LAZY),
                e(12, 1, PE_PRESENT),
            ]
        );
        assert_eq!((plan.lazy, plan.eager), (8, 5));
        assert!(lazy_vmas(&MAGIC).is_err());
    }

    #[test]
    fn a_hole_the_parent_lacks_is_an_error() {
        let b = vec![e(0, 2, LAZY)];
        let t = vec![e(0, 4, PE_PARENT)];
        assert_eq!(
            plan(&[&t, &b], ALL),
            Err("a page in parent is missing from the parent's pagemap")
        );
        assert_eq!(
            plan(&[&t], ALL),
            Err("a page is in parent, but there is no parent pagemap")
        );
    }

    #[test]
    fn the_view_links_the_first_pass_and_the_dump_is_rewritten() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        let pre = dir.join("pre-1");
        std::fs::create_dir(&pre).unwrap();
        std::os::unix::fs::symlink("pre-1", dir.join("parent")).unwrap();
        std::fs::write(
            pre.join("pagemap-7.img"),
            render(&pagemap(1, vec![e(0, 4, LAZY)])),
        )
        .unwrap();
        std::fs::write(pre.join("pages-1.img"), vec![1u8; 4 * P as usize]).unwrap();
        std::fs::write(
            dir.join("pagemap-7.img"),
            render(&pagemap(1, vec![e(0, 3, PE_PARENT), e(3, 1, LAZY)])),
        )
        .unwrap();
        std::fs::write(dir.join("pages-1.img"), vec![2u8; P as usize]).unwrap();
        // A process forked after the pass: all its pages in the dump.
        std::fs::write(
            dir.join("pagemap-9.img"),
            render(&pagemap(2, vec![e(0, 1, LAZY)])),
        )
        .unwrap();
        std::fs::write(dir.join("pages-2.img"), vec![3u8; P as usize]).unwrap();
        let mm = mm_image(&[(e(0, 4, 0).vaddr, e(4, 0, 0).vaddr, 0x22, 1)]);
        std::fs::write(dir.join("mm-7.img"), &mm).unwrap();
        std::fs::write(dir.join("restore.log"), b"log").unwrap();

        let done = prepare(dir).unwrap().unwrap();
        assert_eq!((done.lazy_pages, done.eager_pages), (3 + 1, 1));
        let view = dir.join(VIEW);
        assert_eq!(done.view, view);
        let read = |p: PathBuf| parse(&std::fs::read(p).unwrap()).unwrap();
        assert_eq!(
            read(dir.join("pagemap-7.img")).entries,
            [e(0, 3, PE_PARENT | PE_LAZY), e(3, 1, PE_PRESENT)]
        );
        let daemon = read(view.join("pagemap-7.img"));
        assert_eq!(daemon.entries, [e(0, 3, LAZY), e(3, 1, PE_PRESENT)]);
        assert_eq!(
            std::fs::read(view.join("pages-1.img")).unwrap(),
            vec![1u8; 4 * P as usize]
        );
        let own = read(view.join("pagemap-9.img"));
        assert_eq!(own.entries, [e(0, 1, LAZY)]);
        assert_eq!(
            std::fs::read(view.join(format!("pages-{}.img", own.pages_id))).unwrap(),
            vec![3u8; P as usize]
        );
        assert_eq!(read(dir.join("pagemap-9.img")).entries, [e(0, 1, LAZY)]);
        assert_eq!(std::fs::read(view.join("mm-7.img")).unwrap(), mm);
        assert!(!view.join("parent").exists() && !view.join("restore.log").exists());
        // Again (a retry): the same.
        assert_eq!(prepare(dir).unwrap().unwrap(), done);
        assert_eq!(read(view.join("pagemap-7.img")), daemon);
    }

    #[test]
    fn a_dump_without_passes_needs_no_view() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("pagemap-7.img"),
            render(&pagemap(1, vec![e(0, 1, LAZY)])),
        )
        .unwrap();
        std::fs::create_dir(d.path().join(VIEW)).unwrap();
        assert_eq!(prepare(d.path()).unwrap(), None);
        assert!(!d.path().join(VIEW).exists(), "a stale view is removed");
    }
}
