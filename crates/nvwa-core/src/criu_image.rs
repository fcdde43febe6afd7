//! The one edit nvwa makes to criu's images: restoring a service that ran in a user namespace of
//! its own (`PrivateUsers=`) in the host's user namespace instead.
//!
//! criu 4.1.1 cannot restore a multi-threaded process into a user namespace that does not own
//! its pid namespace (creating threads with given tids needs CAP_CHECKPOINT_RESTORE in the
//! host's user namespace; lab/experiments/REDIS-RECIPE.md, failures 4 and 5). When the
//! inventory's root user namespace id is the task's own, criu restores no user namespace at
//! all. Images are a magic number (one for inventory.img, two for the others), then entries of a
//! little-endian u32 size and a protobuf message; only the few fields touched here are decoded,
//! with a minimal protobuf reader and writer (no protobuf dependency for two integers).

use std::path::{Path, PathBuf};

/// `InventoryEntry.root_ids` (a `TaskKobjIdsEntry`).
const INVENTORY_ROOT_IDS: u64 = 3;
/// `TaskKobjIdsEntry.user_ns_id`.
const IDS_USER_NS: u64 = 10;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a criu image nvwa understands: {why}")]
    Malformed { path: PathBuf, why: &'static str },
}

/// One protobuf field: number and value (varints decoded; other wire types kept as bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(Vec<u8>),
    Fixed32([u8; 4]),
}

fn read_varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

fn write_varint(mut v: u64, out: &mut Vec<u8>) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

pub(crate) fn decode(b: &[u8]) -> Option<Vec<(u64, Value)>> {
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < b.len() {
        let tag = read_varint(b, &mut pos)?;
        let value = match tag & 7 {
            0 => Value::Varint(read_varint(b, &mut pos)?),
            1 => {
                let v = b.get(pos..pos + 8)?.try_into().ok()?;
                pos += 8;
                Value::Fixed64(v)
            }
            2 => {
                let len = usize::try_from(read_varint(b, &mut pos)?).ok()?;
                let v = b.get(pos..pos.checked_add(len)?)?.to_vec();
                pos += len;
                Value::Bytes(v)
            }
            5 => {
                let v = b.get(pos..pos + 4)?.try_into().ok()?;
                pos += 4;
                Value::Fixed32(v)
            }
            _ => return None,
        };
        out.push((tag >> 3, value));
    }
    Some(out)
}

pub(crate) fn encode(fields: &[(u64, Value)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (n, v) in fields {
        let wire = match v {
            Value::Varint(_) => 0,
            Value::Fixed64(_) => 1,
            Value::Bytes(_) => 2,
            Value::Fixed32(_) => 5,
        };
        write_varint(n << 3 | wire, &mut out);
        match v {
            Value::Varint(x) => write_varint(*x, &mut out),
            Value::Fixed64(x) => out.extend_from_slice(x),
            Value::Bytes(x) => {
                write_varint(x.len() as u64, &mut out);
                out.extend_from_slice(x);
            }
            Value::Fixed32(x) => out.extend_from_slice(x),
        }
    }
    out
}

/// The first entry of an image whose header is `magics` u32s: `(offset, message)`.
pub(crate) fn first_entry(img: &[u8], magics: usize) -> Option<(usize, &[u8])> {
    let at = magics * 4;
    let len = u32::from_le_bytes(img.get(at..at + 4)?.try_into().ok()?) as usize;
    Some((at, img.get(at + 4..(at + 4).checked_add(len)?)?))
}

/// Every entry of an image whose header is `magics` u32s, in order; `None` if one is cut short.
pub(crate) fn entries(img: &[u8], magics: usize) -> Option<Vec<&[u8]>> {
    let mut at = magics * 4;
    let mut out = Vec::new();
    while at < img.len() {
        let (_, msg) = first_entry(&img[at..], 0)?;
        out.push(msg);
        at += 4 + msg.len();
    }
    Some(out)
}

/// Appends one entry (its size, then the message) to an image being written.
pub(crate) fn put_entry(out: &mut Vec<u8>, msg: &[u8]) {
    out.extend_from_slice(&(msg.len() as u32).to_le_bytes());
    out.extend_from_slice(msg);
}

pub(crate) fn varint_field(fields: &[(u64, Value)], n: u64) -> Option<u64> {
    fields.iter().find_map(|(f, v)| match v {
        Value::Varint(x) if *f == n => Some(*x),
        _ => None,
    })
}

/// `inventory` with root_ids.user_ns_id set to `user_ns`, and the id it had.
fn with_root_user_ns(inventory: &[u8], user_ns: u64) -> Result<(Vec<u8>, u64), &'static str> {
    let (at, msg) = first_entry(inventory, 1).ok_or("no inventory entry")?;
    let rest = &inventory[at + 4 + msg.len()..];
    let mut fields = decode(msg).ok_or("undecodable inventory entry")?;
    let mut old = None;
    for (n, v) in fields.iter_mut() {
        if let (INVENTORY_ROOT_IDS, Value::Bytes(ids)) = (*n, &mut *v) {
            let mut inner = decode(ids).ok_or("undecodable root_ids")?;
            for (m, w) in inner.iter_mut() {
                if let (IDS_USER_NS, Value::Varint(x)) = (*m, &mut *w) {
                    old = Some(*x);
                    *x = user_ns;
                }
            }
            *ids = encode(&inner);
        }
    }
    let old = old.ok_or("no root_ids.user_ns_id")?;
    let msg = encode(&fields);
    let mut out = inventory[..at].to_vec();
    put_entry(&mut out, &msg);
    out.extend_from_slice(rest);
    Ok((out, old))
}

/// Makes criu restore task `pid` of the images in `dir` in criu's own user namespace: the
/// inventory's root user namespace id becomes the task's (`ids-<pid>.img`). Returns
/// `(old id, new id)`; equal when the task was in the dumping criu's user namespace already.
pub fn restore_in_own_user_ns(dir: &Path, pid: i32) -> Result<(u64, u64), ImageError> {
    let read = |path: PathBuf| {
        std::fs::read(&path)
            .map(|b| (path.clone(), b))
            .map_err(|source| ImageError::Io { path, source })
    };
    let (ids_path, ids) = read(dir.join(format!("ids-{pid}.img")))?;
    let user_ns = first_entry(&ids, 2)
        .and_then(|(_, m)| decode(m))
        .and_then(|f| varint_field(&f, IDS_USER_NS))
        .ok_or(ImageError::Malformed {
            path: ids_path,
            why: "no user_ns_id",
        })?;
    let (inv_path, inventory) = read(dir.join("inventory.img"))?;
    let (new, old) =
        with_root_user_ns(&inventory, user_ns).map_err(|why| ImageError::Malformed {
            path: inv_path.clone(),
            why,
        })?;
    if old != user_ns {
        let tmp = dir.join("inventory.img.nvwa");
        let io = |source| ImageError::Io {
            path: inv_path.clone(),
            source,
        };
        std::fs::write(&tmp, new).map_err(io)?;
        std::fs::rename(&tmp, &inv_path).map_err(io)?;
    }
    Ok((old, user_ns))
}

/// `InventoryEntry.dump_criu_run_id` (criu 4.1 and newer).
const INVENTORY_RUN_ID: u64 = 13;
/// `TcpStreamEntry.opt_mask`: the TCPI_OPT_ bits the connection negotiated.
const TCP_STREAM_OPT_MASK: u64 = 5;
/// `TCPI_OPT_WSCALE`.
const TCPI_OPT_WSCALE: u64 = 4;

fn read_image(path: PathBuf) -> Result<(PathBuf, Vec<u8>), ImageError> {
    std::fs::read(&path)
        .map(|b| (path.clone(), b))
        .map_err(|source| ImageError::Io { path, source })
}

/// The id under which criu 4.1 and newer ran the dump in `dir` (it names the dump's nftables
/// lock table); `None` for older criu, which names the table after the root pid.
pub fn dump_run_id(dir: &Path) -> Result<Option<String>, ImageError> {
    let (path, inventory) = read_image(dir.join("inventory.img"))?;
    let fields = first_entry(&inventory, 1)
        .and_then(|(_, m)| decode(m))
        .ok_or(ImageError::Malformed {
            path,
            why: "undecodable inventory entry",
        })?;
    Ok(fields.into_iter().find_map(|(n, v)| match v {
        Value::Bytes(b) if n == INVENTORY_RUN_ID => String::from_utf8(b).ok(),
        _ => None,
    }))
}

/// The established TCP connections saved in `dir` (`tcp-stream-<inode>.img`), each with whether
/// it negotiated window scaling.
pub fn tcp_streams(dir: &Path) -> Result<Vec<(String, bool)>, ImageError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ImageError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(ino) = name
            .strip_prefix("tcp-stream-")
            .and_then(|n| n.strip_suffix(".img"))
        else {
            continue;
        };
        let (path, img) = read_image(e.path())?;
        let mask = first_entry(&img, 2)
            .and_then(|(_, m)| decode(m))
            .and_then(|f| varint_field(&f, TCP_STREAM_OPT_MASK))
            .ok_or(ImageError::Malformed {
                path,
                why: "no opt_mask in the tcp stream entry",
            })?;
        out.push((ino.to_string(), mask & TCPI_OPT_WSCALE != 0));
    }
    out.sort();
    Ok(out)
}

/// `FileEntry.type` of an inet socket (`fd_types.INETSK`).
const FD_TYPE_INETSK: u64 = 4;

/// How many inet sockets (TCP or UDP, listening, bound or connected, IPv4 or IPv6) the images
/// in `dir` hold: `files.img`, one `FileEntry` per open file of the tree.
pub fn inet_sockets(dir: &Path) -> Result<usize, ImageError> {
    let path = dir.join("files.img");
    let img = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(ImageError::Io { path, source }),
    };
    let msgs = entries(&img, 2).ok_or(ImageError::Malformed {
        path: path.clone(),
        why: "truncated file entry",
    })?;
    let mut n = 0;
    for msg in msgs {
        let fields = decode(msg).ok_or(ImageError::Malformed {
            path: path.clone(),
            why: "undecodable file entry",
        })?;
        if varint_field(&fields, 1) == Some(FD_TYPE_INETSK) {
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(magics: &[u32], msg: &[u8]) -> Vec<u8> {
        let mut out: Vec<u8> = magics.iter().flat_map(|m| m.to_le_bytes()).collect();
        put_entry(&mut out, msg);
        out
    }

    #[test]
    fn inet_sockets_are_counted_among_the_files() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            inet_sockets(dir.path()).unwrap(),
            0,
            "no files.img: no sockets"
        );
        let entry = |ty: u64| encode(&[(1, Value::Varint(ty)), (2, Value::Varint(9))]);
        let mut img = image(&[1, 2], &entry(1));
        for ty in [FD_TYPE_INETSK, 5, FD_TYPE_INETSK] {
            let e = entry(ty);
            put_entry(&mut img, &e);
        }
        std::fs::write(dir.path().join("files.img"), &img).unwrap();
        assert_eq!(inet_sockets(dir.path()).unwrap(), 2);
        img.truncate(img.len() - 1);
        std::fs::write(dir.path().join("files.img"), &img).unwrap();
        assert!(
            inet_sockets(dir.path()).is_err(),
            "a truncated image is no answer"
        );
    }

    #[test]
    fn varints_round_trip() {
        for v in [0, 1, 127, 128, 300, 4026531837, u64::MAX] {
            let mut b = Vec::new();
            write_varint(v, &mut b);
            let mut pos = 0;
            assert_eq!(read_varint(&b, &mut pos), Some(v));
            assert_eq!(pos, b.len());
        }
        assert_eq!(read_varint(&[0x80], &mut 0), None);
    }

    #[test]
    fn messages_round_trip_with_every_wire_type() {
        let f = vec![
            (1, Value::Varint(5)),
            (2, Value::Fixed64([1; 8])),
            (3, Value::Bytes(vec![9, 9])),
            (4, Value::Fixed32([2; 4])),
        ];
        assert_eq!(decode(&encode(&f)), Some(f));
        assert_eq!(decode(&[0x0b]), None, "wire type 3 is refused");
        assert_eq!(decode(&[0x1a, 5, 1]), None, "truncated bytes");
    }

    #[test]
    fn the_inventory_takes_the_tasks_user_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let ids = encode(&[
            (1, Value::Varint(2)),
            (IDS_USER_NS, Value::Varint(4026532401)),
        ]);
        std::fs::write(dir.path().join("ids-77.img"), image(&[1, 2], &ids)).unwrap();
        let root = encode(&[(IDS_USER_NS, Value::Varint(7)), (11, Value::Varint(8))]);
        let inv = encode(&[
            (1, Value::Varint(2)),
            (INVENTORY_ROOT_IDS, Value::Bytes(root)),
            (5, Value::Bytes(b"x".to_vec())),
        ]);
        let mut img = image(&[0x5831_3116], &inv);
        img.extend_from_slice(b"tail");
        std::fs::write(dir.path().join("inventory.img"), &img).unwrap();

        assert_eq!(
            restore_in_own_user_ns(dir.path(), 77).unwrap(),
            (7, 4026532401)
        );
        let new = std::fs::read(dir.path().join("inventory.img")).unwrap();
        assert_eq!(&new[..4], &0x5831_3116u32.to_le_bytes());
        assert!(new.ends_with(b"tail"));
        let (_, msg) = first_entry(&new, 1).unwrap();
        let fields = decode(msg).unwrap();
        let Value::Bytes(root) = &fields[1].1 else {
            panic!("root_ids moved: {fields:?}")
        };
        let root = decode(root).unwrap();
        assert_eq!(varint_field(&root, IDS_USER_NS), Some(4026532401));
        assert_eq!(varint_field(&root, 11), Some(8));
        assert_eq!(fields[2], (5, Value::Bytes(b"x".to_vec())));
        // A second pass changes nothing.
        assert_eq!(
            restore_in_own_user_ns(dir.path(), 77).unwrap(),
            (4026532401, 4026532401)
        );
    }

    #[test]
    fn the_run_id_and_the_tcp_streams_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let inv = encode(&[
            (1, Value::Varint(2)),
            (INVENTORY_RUN_ID, Value::Bytes(b"5b1c7a7e-0d2f".to_vec())),
        ]);
        std::fs::write(dir.path().join("inventory.img"), image(&[1], &inv)).unwrap();
        assert_eq!(
            dump_run_id(dir.path()).unwrap().as_deref(),
            Some("5b1c7a7e-0d2f")
        );
        // criu 3.17: no run id.
        let old = encode(&[(1, Value::Varint(2))]);
        std::fs::write(dir.path().join("inventory.img"), image(&[1], &old)).unwrap();
        assert_eq!(dump_run_id(dir.path()).unwrap(), None);

        let stream = |mask| {
            encode(&[
                (1, Value::Varint(0)),
                (TCP_STREAM_OPT_MASK, Value::Varint(mask)),
            ])
        };
        std::fs::write(
            dir.path().join("tcp-stream-1a.img"),
            image(&[1, 2], &stream(0x7)),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("tcp-stream-2b.img"),
            image(&[1, 2], &stream(0x2)),
        )
        .unwrap();
        std::fs::write(dir.path().join("tcp-stream-3c.img"), image(&[1, 2], &[])).unwrap();
        let err = tcp_streams(dir.path()).unwrap_err();
        assert!(err.to_string().contains("opt_mask"), "{err}");
        std::fs::remove_file(dir.path().join("tcp-stream-3c.img")).unwrap();
        assert_eq!(
            tcp_streams(dir.path()).unwrap(),
            [("1a".to_string(), true), ("2b".to_string(), false)]
        );
    }

    #[test]
    fn missing_or_malformed_images_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            restore_in_own_user_ns(dir.path(), 1),
            Err(ImageError::Io { .. })
        ));
        std::fs::write(dir.path().join("ids-1.img"), image(&[1, 2], &[])).unwrap();
        let err = restore_in_own_user_ns(dir.path(), 1).unwrap_err();
        assert!(err.to_string().contains("no user_ns_id"), "{err}");
    }
}
