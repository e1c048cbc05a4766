//! Layer generators shared by the integration tests.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;

use flate2::write::GzEncoder;
use flate2::Compression as Level;
use tar::{EntryType, Header};

/// Runs `soci-store --config CFG ARGS...`; panics with its output unless it succeeds; returns
/// its stdout.
pub fn soci_store_ok(cfg: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_soci-store"))
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "soci-store {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A file whose contents a test knows.
pub struct Expected {
    pub name: Vec<u8>,
    pub data: Vec<u8>,
}

/// Deterministic pseudo-random bytes (xorshift), incompressible.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}

/// Compressible text.
pub fn text_bytes(len: usize, seed: u64) -> Vec<u8> {
    let words = [
        "layer ",
        "span ",
        "checkpoint ",
        "podman ",
        "zTOC ",
        "gzip\n",
        "tar ",
    ];
    let mut out = Vec::with_capacity(len + 16);
    let mut i = seed as usize;
    while out.len() < len {
        out.extend_from_slice(words[i % words.len()].as_bytes());
        out.extend_from_slice(format!("{} ", i % 1000).as_bytes());
        i = i.wrapping_mul(31).wrapping_add(7);
    }
    out.truncate(len);
    out
}

/// PAX extended header records.
pub fn pax_data(records: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in records {
        let body = k.len() + v.len() + 3;
        let mut len = body + 1;
        while len != body + len.to_string().len() {
            len = body + len.to_string().len();
        }
        out.extend_from_slice(format!("{len} {k}=").as_bytes());
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

pub struct TarWriter {
    b: tar::Builder<Vec<u8>>,
    pub expected: Vec<Expected>,
}

fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut h = Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(1_700_000_000);
    h.set_uid(0);
    h.set_gid(0);
    h.set_username("root").unwrap();
    h.set_groupname("root").unwrap();
    h
}

impl Default for TarWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl TarWriter {
    pub fn new() -> Self {
        TarWriter {
            b: tar::Builder::new(Vec::new()),
            expected: Vec::new(),
        }
    }

    pub fn dir(&mut self, name: &str) {
        let mut h = header(EntryType::Directory, 0o755, 0);
        self.b.append_data(&mut h, name, &[][..]).unwrap();
    }

    pub fn file(&mut self, name: &str, data: &[u8]) {
        let mut h = header(EntryType::Regular, 0o644, data.len() as u64);
        self.b.append_data(&mut h, name, data).unwrap();
        self.expected.push(Expected {
            name: name.as_bytes().to_vec(),
            data: data.to_vec(),
        });
    }

    /// A regular file preceded by a PAX header with these records (e.g. path, xattrs, mtime).
    pub fn pax_file(
        &mut self,
        name: &[u8],
        short_name: &str,
        records: &[(&str, &[u8])],
        data: &[u8],
    ) {
        let pax = pax_data(records);
        let mut ph = header(EntryType::XHeader, 0o644, pax.len() as u64);
        ph.set_path("PaxHeaders/x").unwrap();
        ph.set_cksum();
        self.b.append(&ph, &pax[..]).unwrap();
        let mut h = header(EntryType::Regular, 0o644, data.len() as u64);
        h.set_path(short_name).unwrap();
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self.expected.push(Expected {
            name: name.to_vec(),
            data: data.to_vec(),
        });
    }

    /// A file with a name longer than 100 bytes, written with GNU long-name records.
    pub fn gnu_long_file(&mut self, name: &str, data: &[u8]) {
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o600);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        self.b.append_data(&mut h, name, data).unwrap();
        self.expected.push(Expected {
            name: name.as_bytes().to_vec(),
            data: data.to_vec(),
        });
    }

    pub fn symlink(&mut self, name: &str, target: &str) {
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Symlink);
        h.set_mode(0o777);
        h.set_size(0);
        self.b.append_link(&mut h, name, target).unwrap();
    }

    pub fn hardlink(&mut self, name: &str, target: &str) {
        let mut h = header(EntryType::Link, 0o644, 0);
        self.b.append_link(&mut h, name, target).unwrap();
        let data = self
            .expected
            .iter()
            .find(|e| e.name == target.as_bytes())
            .map(|e| e.data.clone())
            .expect("hardlink target added first");
        self.expected.push(Expected {
            name: name.as_bytes().to_vec(),
            data,
        });
    }

    /// Appends a prepared header (mode, type) under `name` with data.
    pub fn raw(&mut self, h: &mut Header, name: &str, data: &[u8]) {
        self.b.append_data(h, name, data).unwrap();
        self.expected.push(Expected {
            name: name.as_bytes().to_vec(),
            data: data.to_vec(),
        });
    }

    pub fn device(&mut self, name: &str, kind: EntryType, major: u32, minor: u32) {
        let mut h = header(kind, 0o644, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.b.append_data(&mut h, name, &[][..]).unwrap();
    }

    pub fn finish(self) -> (Vec<u8>, Vec<Expected>) {
        (self.b.into_inner().unwrap(), self.expected)
    }
}

/// A layer with every entry kind and oddity the engine must handle; `big` sets the size of the
/// large files (several spans at small span sizes).
pub fn edge_layer(big: usize) -> (Vec<u8>, Vec<Expected>) {
    let mut t = TarWriter::new();
    t.dir("./");
    t.dir("./etc/");
    t.file("./etc/hello.txt", b"hello world\n");
    t.file("./etc/empty", b"");
    t.file("./etc/b511", &text_bytes(511, 1));
    t.file("./etc/b512", &text_bytes(512, 2));
    t.file("./etc/b513", &text_bytes(513, 3));
    t.pax_file(
        b"./etc/xattrs.txt",
        "./etc/xattrs.txt",
        &[
            ("SCHILY.xattr.user.foo", b"bar"),
            (
                "SCHILY.xattr.security.capability",
                &[1, 0, 0, 2, 0, 0x20, 0, 0],
            ),
            ("SCHILY.xattr.user.empty", b""),
            ("mtime", b"1700000000.123456789"),
        ],
        b"has xattrs\n",
    );
    let long = format!("./deep/{}/{}.txt", "d".repeat(120), "f".repeat(90));
    t.pax_file(
        long.as_bytes(),
        "./deep/short",
        &[("path", long.as_bytes())],
        b"pax long name\n",
    );
    let gnu_long = format!("./gnu/{}/file.bin", "g".repeat(150));
    t.gnu_long_file(&gnu_long, &random_bytes(3000, 9));
    t.file(
        &format!("./ustar/{}/{}", "p".repeat(120), "n".repeat(90)),
        b"ustar prefix\n",
    );
    t.file("./data/text.txt", &text_bytes(big, 4));
    t.file("./data/random.bin", &random_bytes(big / 2, 5));
    t.hardlink("./data/text-link.txt", "./data/text.txt");
    t.hardlink("./etc/hello-hardlink", "./etc/hello.txt");
    t.symlink("./etc/rel-link", "hello.txt");
    t.symlink("./etc/abs-link", "/etc/hello.txt");
    t.symlink("./etc/long-link", &format!("../{}", "t".repeat(140)));
    t.device("./dev/null", EntryType::Char, 1, 3);
    t.device("./dev/loop0", EntryType::Block, 7, 0);
    t.device("./dev/fifo", EntryType::Fifo, 0, 0);
    t.dir("./whiteout/");
    t.file("./whiteout/.wh.gone", b"");
    t.dir("./whiteout/opaque/");
    t.file("./whiteout/opaque/.wh..wh..opq", b"");
    t.file("./whiteout/opaque/kept", b"kept\n");
    t.file("./ünïcødé/文件-🦀.txt", b"unicode\n");
    t.file("./etc/tail.txt", &text_bytes(70_000, 8));
    t.finish()
}

/// Gzip `data` at `level` as `members` concatenated gzip members split at uneven points.
pub fn gzip(data: &[u8], level: u32, members: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut start = 0;
    for m in 0..members {
        let end = if m + 1 == members {
            data.len()
        } else {
            (data.len() * (m + 1) / members + 777).min(data.len())
        };
        let mut enc = GzEncoder::new(Vec::new(), Level::new(level));
        enc.write_all(&data[start..end]).unwrap();
        out.extend(enc.finish().unwrap());
        start = end;
    }
    out
}

/// Fully decompresses (all members).
pub fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(data), &mut out).unwrap();
    out
}

pub fn fixtures() -> PathBuf {
    std::env::var_os("SOCI_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upstream-ztoc")
        })
}

pub mod chroot;
pub mod daemon;
pub mod servers;

/// A gzip layer of a few MB with its zTOC (256 KiB spans) and the files it holds.
pub fn test_layer() -> (Vec<u8>, Vec<u8>, soci_store::ztoc::Ztoc, Vec<Expected>) {
    let (tar, expected) = edge_layer(2_500_000);
    let gz = gzip(&tar, 6, 1);
    let opts = soci_store::ztoc::BuildOptions {
        span_size: 256 << 10,
        min_layer_size: 0,
        ..Default::default()
    };
    let z = soci_store::ztoc::build(&gz[..], &opts, &mut |_| {}).unwrap();
    (tar, gz, z, expected)
}

/// A three-layer image for index and store tests: two layers above 10 MiB compressed (random
/// data), with whiteouts, an opaque directory, xattrs, hardlinks, symlinks, a setuid file and a
/// file spanning many spans, and one small layer holding busybox. Returns (tar, gzip) per layer.
pub fn soci_test_image() -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut base = TarWriter::new();
    base.dir("./");
    base.dir("./etc/");
    base.file("./etc/hello.txt", b"hello from the base layer\n");
    base.file("./etc/gone.txt", b"deleted by the top layer\n");
    base.dir("./data/");
    base.file("./data/big-random.bin", &random_bytes(12 << 20, 11));
    base.file("./data/text.txt", &text_bytes(3 << 20, 12));
    base.hardlink("./data/text-hardlink.txt", "./data/text.txt");
    base.symlink("./etc/hello-link", "hello.txt");
    base.pax_file(
        b"./etc/xattr.txt",
        "./etc/xattr.txt",
        &[("SCHILY.xattr.user.soci", b"yes")],
        b"has an xattr\n",
    );
    base.dir("./opaque/");
    base.file("./opaque/old.txt", b"hidden by the opaque dir above\n");
    {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o4755);
        h.set_size(7);
        h.set_mtime(1_700_000_000);
        base.raw(&mut h, "./bin/suid", b"#suid!\n");
    }
    let (base_tar, _) = base.finish();

    let mut top = TarWriter::new();
    top.dir("./");
    top.dir("./etc/");
    top.file("./etc/.wh.gone.txt", b"");
    top.dir("./opaque/");
    top.file("./opaque/.wh..wh..opq", b"");
    top.file("./opaque/new.txt", b"the only file in the opaque dir\n");
    top.dir("./more/");
    top.file("./more/random2.bin", &random_bytes(11 << 20, 13));
    let (top_tar, _) = top.finish();

    let mut small = TarWriter::new();
    small.dir("./");
    small.dir("./bin/");
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static (installed by .ci/run)");
    {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o755);
        h.set_size(busybox.len() as u64);
        h.set_mtime(1_700_000_000);
        small.raw(&mut h, "./bin/busybox", &busybox);
    }
    small.symlink("./bin/sh", "busybox");
    let (small_tar, _) = small.finish();

    [base_tar, top_tar, small_tar]
        .into_iter()
        .map(|t| {
            let gz = gzip(&t, 6, 1);
            (t, gz)
        })
        .collect()
}
pub mod podman;

/// A digest string a test made (from [`servers::sha256_digest`] or a registry) as the library's
/// [`soci_store::digest::Digest`].
#[allow(dead_code)]
pub fn digest(s: &str) -> soci_store::digest::Digest {
    soci_store::digest::Digest::parse(s).unwrap()
}
