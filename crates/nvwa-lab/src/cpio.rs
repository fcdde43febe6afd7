//! A writer for the cpio "newc" (SVR4, no CRC) format — the format the Linux
//! kernel unpacks as an initramfs.
//!
//! Paths are written without a leading '/'. Ownership is always root:root.

use std::io::{self, Read, Write};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;

/// Streams cpio "newc" entries into `W`.
pub struct CpioWriter<W: Write> {
    out: W,
    written: u64,
    next_ino: u32,
    default_mtime: u32,
}

impl<W: Write> CpioWriter<W> {
    /// A writer whose directories and symlinks get mtime 0.
    pub fn new(out: W) -> Self {
        Self::with_mtime(out, 0)
    }

    /// A writer whose directories and symlinks get `mtime`.
    pub fn with_mtime(out: W, default_mtime: u32) -> Self {
        Self {
            out,
            written: 0,
            next_ino: 1,
            default_mtime,
        }
    }

    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Adds a directory; `mode` holds the permission bits (type bits are ignored).
    pub fn add_dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        let mtime = self.default_mtime;
        self.header(path, S_IFDIR | (mode & 0o7777), 2, mtime, 0)?;
        Ok(())
    }

    /// Adds a regular file with in-memory contents.
    pub fn add_file(&mut self, path: &str, mode: u32, data: &[u8], mtime: u32) -> io::Result<()> {
        self.header(path, S_IFREG | (mode & 0o7777), 1, mtime, data.len())?;
        self.raw(data)?;
        self.pad4()
    }

    /// Adds a regular file whose `len` bytes of contents come from `reader`.
    pub fn add_file_from_reader(
        &mut self,
        path: &str,
        mode: u32,
        reader: &mut dyn Read,
        len: u64,
        mtime: u32,
    ) -> io::Result<()> {
        let size = usize::try_from(len)
            .ok()
            .filter(|&l| l <= u32::MAX as usize)
            .ok_or_else(|| io::Error::other(format!("{path}: too large for cpio newc")))?;
        self.header(path, S_IFREG | (mode & 0o7777), 1, mtime, size)?;
        let copied = io::copy(&mut reader.take(len), &mut self.out)?;
        if copied != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{path}: expected {len} bytes, got {copied}"),
            ));
        }
        self.written += copied;
        self.pad4()
    }

    /// Adds a symbolic link pointing at `target`.
    pub fn add_symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let mtime = self.default_mtime;
        self.header(path, S_IFLNK | 0o777, 1, mtime, target.len())?;
        self.raw(target.as_bytes())?;
        self.pad4()
    }

    /// Writes the `TRAILER!!!` entry, pads the archive to a multiple of 512
    /// bytes, flushes, and returns the inner writer and the total size.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.header_raw("TRAILER!!!", 0, 0, 1, 0, 0)?;
        let rem = (self.written % 512) as usize;
        if rem != 0 {
            let zeros = [0u8; 512];
            self.raw(&zeros[..512 - rem])?;
        }
        self.out.flush()?;
        Ok((self.out, self.written))
    }

    fn header(
        &mut self,
        path: &str,
        mode: u32,
        nlink: u32,
        mtime: u32,
        size: usize,
    ) -> io::Result<()> {
        let path = path.trim_start_matches('/');
        if path.is_empty() || path.as_bytes().contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid cpio path {path:?}"),
            ));
        }
        let size = u32::try_from(size)
            .map_err(|_| io::Error::other(format!("{path}: too large for cpio newc")))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header_raw(path, ino, mode, nlink, mtime, size)
    }

    fn header_raw(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        mtime: u32,
        size: u32,
    ) -> io::Result<()> {
        let namesize = name.len() as u32 + 1;
        let hdr = format!(
            "070701{ino:08X}{mode:08X}{uid:08X}{gid:08X}{nlink:08X}{mtime:08X}{size:08X}\
             {maj:08X}{min:08X}{rmaj:08X}{rmin:08X}{namesize:08X}{check:08X}",
            uid = 0,
            gid = 0,
            maj = 0,
            min = 0,
            rmaj = 0,
            rmin = 0,
            check = 0,
        );
        self.raw(hdr.as_bytes())?;
        self.raw(name.as_bytes())?;
        self.raw(&[0])?;
        self.pad4()
    }

    fn raw(&mut self, data: &[u8]) -> io::Result<()> {
        self.out.write_all(data)?;
        self.written += data.len() as u64;
        Ok(())
    }

    fn pad4(&mut self) -> io::Result<()> {
        let rem = (self.written % 4) as usize;
        if rem != 0 {
            self.raw(&[0u8; 4][..4 - rem])?;
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One parsed cpio entry.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Entry {
        pub name: String,
        pub ino: u32,
        pub mode: u32,
        pub nlink: u32,
        pub mtime: u32,
        pub data: Vec<u8>,
    }

    /// A minimal newc reader; returns the entries before the trailer.
    pub fn parse(buf: &[u8]) -> Vec<Entry> {
        let mut pos = 0usize;
        let mut out = Vec::new();
        let field = |hdr: &[u8], i: usize| -> u32 {
            let s = std::str::from_utf8(&hdr[6 + i * 8..6 + (i + 1) * 8]).unwrap();
            u32::from_str_radix(s, 16).unwrap()
        };
        loop {
            let hdr = &buf[pos..pos + 110];
            assert_eq!(&hdr[..6], b"070701", "bad magic at {pos}");
            let ino = field(hdr, 0);
            let mode = field(hdr, 1);
            let nlink = field(hdr, 4);
            let mtime = field(hdr, 5);
            let size = field(hdr, 6) as usize;
            let namesize = field(hdr, 11) as usize;
            assert_eq!(field(hdr, 12), 0);
            let name_start = pos + 110;
            let name = &buf[name_start..name_start + namesize];
            assert_eq!(*name.last().unwrap(), 0);
            let name = String::from_utf8(name[..namesize - 1].to_vec()).unwrap();
            let data_start = (name_start + namesize).next_multiple_of(4);
            let data = buf[data_start..data_start + size].to_vec();
            pos = (data_start + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                assert_eq!(buf.len() % 512, 0);
                assert!(buf[pos..].iter().all(|&b| b == 0));
                return out;
            }
            out.push(Entry {
                name,
                ino,
                mode,
                nlink,
                mtime,
                data,
            });
        }
    }

    #[test]
    fn round_trip() {
        let mut w = CpioWriter::with_mtime(Vec::new(), 42);
        w.add_dir("bin", 0o755).unwrap();
        w.add_file("bin/hello", 0o100_755, b"hello world", 1234)
            .unwrap();
        w.add_symlink("bin/sh", "busybox").unwrap();
        w.add_file("empty", 0o644, b"", 7).unwrap();
        let mut r: &[u8] = b"abcdefg-and-more";
        w.add_file_from_reader("/etc/x", 0o600, &mut r, 7, 9)
            .unwrap();
        let (buf, size) = w.finish().unwrap();
        assert_eq!(size as usize, buf.len());
        let e = parse(&buf);
        let names: Vec<_> = e.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["bin", "bin/hello", "bin/sh", "empty", "etc/x"]);
        assert_eq!(e[0].mode, 0o040_755);
        assert_eq!(e[0].nlink, 2);
        assert_eq!(e[0].mtime, 42);
        assert_eq!(e[1].mode, 0o100_755);
        assert_eq!(e[1].data, b"hello world");
        assert_eq!(e[1].mtime, 1234);
        assert_eq!(e[2].mode, 0o120_777);
        assert_eq!(e[2].data, b"busybox");
        assert_eq!(e[3].data, b"");
        assert_eq!(e[4].data, b"abcdefg");
        assert_eq!(e[4].mode, 0o100_600);
        let inos: std::collections::BTreeSet<_> = e.iter().map(|e| e.ino).collect();
        assert_eq!(inos.len(), e.len(), "inode numbers must be unique");
    }

    #[test]
    fn short_reader_is_an_error() {
        let mut w = CpioWriter::new(Vec::new());
        let mut r: &[u8] = b"abc";
        assert!(w.add_file_from_reader("x", 0o644, &mut r, 10, 0).is_err());
    }

    #[test]
    fn empty_path_is_rejected() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.add_dir("/", 0o755).is_err());
    }

    #[test]
    fn empty_archive_is_just_a_trailer() {
        let (buf, size) = CpioWriter::new(Vec::new()).finish().unwrap();
        assert_eq!(size, 512);
        assert!(parse(&buf).is_empty());
    }
}
