//! zTOCs built for layers the tests generate: every entry kind, PAX and GNU long names, xattrs,
//! hardlinks, whiteouts, empty files, files across many spans, incompressible data, several gzip
//! members, gzip levels 1 and 9, the gzip tool itself, and plain tar.

mod common;

use std::process::{Command, Stdio};
use std::sync::Arc;

use common::*;
use soci_store::ztoc::{
    self, format, path, verify, BuildOptions, Compression, EntryType, LayerReader, Ztoc,
    WINDOW_SIZE,
};

fn opts(span_size: u64) -> BuildOptions {
    BuildOptions {
        span_size,
        min_layer_size: 0,
        ..Default::default()
    }
}

fn build(blob: &[u8], span_size: u64) -> Ztoc {
    ztoc::build(blob, &opts(span_size), &mut |_| {}).unwrap()
}

/// Checks a built zTOC against the tar it indexes and the files the test wrote.
fn check_layer(
    label: &str,
    blob: &[u8],
    tar: &[u8],
    expected: &[Expected],
    span_size: u64,
) -> Ztoc {
    let z = build(blob, span_size);
    assert_eq!(z.compressed_size, blob.len() as u64, "{label}");

    // Entries and data offsets agree with an independent tar reader.
    let mut archive = tar::Archive::new(tar);
    let theirs: Vec<_> = archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.path_bytes().into_owned(), e.raw_file_position())
        })
        .collect();
    assert_eq!(z.entries.len(), theirs.len(), "{label}");
    for (ours, (name, pos)) in z.entries.iter().zip(&theirs) {
        assert_eq!(
            path::normalize(&ours.name),
            path::normalize(name),
            "{label}"
        );
        assert_eq!(ours.offset, *pos, "{label}: {}", ours.display_name());
    }

    // Every file, hardlinks included, reads back exactly.
    let reader = LayerReader::new(Arc::new(z.clone()), blob.to_vec()).verify_headers(true);
    for f in expected {
        let idx = z
            .find(&f.name)
            .unwrap_or_else(|| panic!("{label}: {:?} missing", f.name));
        assert!(
            reader.read_file(idx).unwrap() == f.data,
            "{label}: {}",
            String::from_utf8_lossy(&f.name)
        );
    }
    // The whole archive through the zTOC equals the tar.
    let all = reader.read_range(0..z.uncompressed_size).unwrap();
    assert!(
        all == tar[..z.uncompressed_size as usize],
        "{label}: full read differs"
    );

    // What we write reads back as the same zTOC.
    assert_eq!(
        format::decode(&format::encode(&z).unwrap()).unwrap(),
        z,
        "{label}"
    );
    z
}

#[test]
fn gzip_levels_members_and_span_sizes() {
    let (tar, expected) = edge_layer(900_000);
    for (level, members) in [(1, 1), (9, 1), (6, 3), (6, 7)] {
        let blob = gzip(&tar, level, members);
        for span_size in [64 << 10, 256 << 10, 4 << 20] {
            let label = format!("level {level}, {members} members, span {span_size}");
            let z = check_layer(&label, &blob, &tar, &expected, span_size);
            if span_size == 64 << 10 {
                assert!(
                    z.span_count() > 10,
                    "{label}: only {} spans",
                    z.span_count()
                );
            }
        }
    }
}

#[test]
fn plain_tar_layer() {
    let (tar, expected) = edge_layer(300_000);
    for span_size in [4096u64, 100_000, 4 << 20] {
        let z = check_layer(
            &format!("plain tar, span {span_size}"),
            &tar,
            &tar,
            &expected,
            span_size,
        );
        let Compression::Uncompressed { size } = z.compression else {
            panic!("plain tar must be indexed as uncompressed")
        };
        assert_eq!(size, tar.len() as u64);
        assert_eq!(z.span_count() as u64, size.div_ceil(span_size));
    }
}

#[test]
fn entry_metadata_is_recorded() {
    let (tar, _) = edge_layer(10_000);
    let z = build(&gzip(&tar, 6, 1), 1 << 20);
    let get = |n: &str| &z.entries[z.find(n.as_bytes()).unwrap_or_else(|| panic!("{n}"))];

    let x = get("etc/xattrs.txt");
    let xattrs: Vec<_> = x.xattrs().collect();
    assert!(xattrs.contains(&(&b"user.foo"[..], &b"bar"[..])));
    assert!(xattrs.contains(&(&b"user.empty"[..], &b""[..])));
    assert_eq!(x.mod_time, b"2023-11-14T22:13:20.123456789Z");
    let keys: Vec<_> = x.pax.iter().map(|(k, _)| k.clone()).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    assert_eq!(keys, sorted, "PAX records sorted by key");

    assert_eq!(get("dev/null").kind, EntryType::Char);
    assert_eq!((get("dev/null").devmajor, get("dev/null").devminor), (1, 3));
    assert_eq!(get("dev/loop0").kind, EntryType::Block);
    assert_eq!(get("dev/fifo").kind, EntryType::Fifo);
    assert_eq!(get("etc/rel-link").kind, EntryType::Symlink);
    assert_eq!(get("etc/rel-link").linkname, b"hello.txt");
    assert_eq!(get("etc/long-link").linkname.len(), 143);
    assert_eq!(get("etc/hello-hardlink").kind, EntryType::Hardlink);
    assert_eq!(get("whiteout/.wh.gone").kind, EntryType::Reg);
    assert_eq!(get("whiteout/opaque/.wh..wh..opq").kind, EntryType::Reg);
    assert_eq!(get("etc/hello.txt").mode, 0o644);
    assert_eq!(get("etc/hello.txt").uname, b"root");
    assert_eq!(get("etc/hello.txt").mod_time, b"2023-11-14T22:13:20Z");
    assert_eq!(get("whiteout").kind, EntryType::Dir);
}

fn run(cmd: &mut Command) {
    let out = cmd.stderr(Stdio::piped()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// GNU tar and gzip, the real tools, over a real directory tree.
#[test]
fn gnu_tar_and_gzip_tools() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let deep = root.join(format!("{}/{}", "a".repeat(90), "b".repeat(90)));
    std::fs::create_dir_all(&deep).unwrap();
    std::fs::write(deep.join("deep.txt"), b"deep\n").unwrap();
    std::fs::write(root.join("big.txt"), text_bytes(2_000_000, 3)).unwrap();
    std::fs::write(root.join("rand.bin"), random_bytes(700_000, 4)).unwrap();
    std::fs::write(root.join("empty"), b"").unwrap();
    std::fs::hard_link(root.join("big.txt"), root.join("big-link.txt")).unwrap();
    std::os::unix::fs::symlink("big.txt", root.join("sym")).unwrap();
    run(Command::new("mkfifo").arg(root.join("fifo")));
    for fmt in ["gnu", "posix", "ustar"] {
        let tar_path = dir.path().join(format!("{fmt}.tar"));
        run(Command::new("tar")
            .args(["--sort=name", "--owner=0", "--group=0", "--numeric-owner"])
            .arg(format!("--format={fmt}"))
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar_path)
            .arg("."));
        let tar = std::fs::read(&tar_path).unwrap();
        run(Command::new("gzip").args(["-k", "-9", "-n"]).arg(&tar_path));
        let gz = std::fs::read(tar_path.with_extension("tar.gz")).unwrap();
        let expected = vec![
            Expected {
                name: b"big.txt".to_vec(),
                data: text_bytes(2_000_000, 3),
            },
            Expected {
                name: b"big-link.txt".to_vec(),
                data: text_bytes(2_000_000, 3),
            },
            Expected {
                name: b"rand.bin".to_vec(),
                data: random_bytes(700_000, 4),
            },
            Expected {
                name: b"empty".to_vec(),
                data: vec![],
            },
            Expected {
                name: format!("{}/{}/deep.txt", "a".repeat(90), "b".repeat(90)).into_bytes(),
                data: b"deep\n".to_vec(),
            },
        ];
        check_layer(
            &format!("gnu tar {fmt}, gzip -9"),
            &gz,
            &tar,
            &expected,
            128 << 10,
        );
        check_layer(
            &format!("gnu tar {fmt}, plain"),
            &tar,
            &tar,
            &expected,
            128 << 10,
        );

        // The file-level verifier agrees, through files on disk.
        let z = build(&gz, 128 << 10);
        let report = verify::verify_layer(Arc::new(z), &tar_path.with_extension("tar.gz")).unwrap();
        assert!(report.ok(), "{fmt}: {:?}", report.problems);
        assert_eq!(report.files, 4, "{fmt}");
        assert_eq!(report.hardlinks, 1, "{fmt}");
    }
}

#[test]
fn trailing_zero_padding_after_gzip_is_accepted() {
    let (tar, expected) = edge_layer(50_000);
    let mut blob = gzip(&tar, 6, 2);
    blob.extend_from_slice(&[0u8; 1000]);
    let z = check_layer("padded gzip", &blob, &tar, &expected, 16 << 10);
    assert_eq!(z.compressed_size, blob.len() as u64);
}

#[test]
fn minimum_layer_size_is_enforced() {
    let (tar, _) = edge_layer(1000);
    let blob = gzip(&tar, 6, 1);
    let err = ztoc::build(&blob[..], &BuildOptions::default(), &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, ztoc::ZtocError::LayerTooSmall { .. }),
        "{err}"
    );
}

#[test]
fn cli_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (tar, expected) = edge_layer(400_000);
    let layer = dir.path().join("layer.tar.gz");
    std::fs::write(&layer, gzip(&tar, 6, 1)).unwrap();
    let ztoc_path = dir.path().join("layer.ztoc");
    let bin = env!("CARGO_BIN_EXE_soci-store");
    let out = Command::new(bin)
        .args([
            "ztoc",
            "build",
            "--span-size",
            "64KiB",
            "--min-layer-size",
            "0",
        ])
        .arg(&layer)
        .arg("-o")
        .arg(&ztoc_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = Ztoc::digest_of(&std::fs::read(&ztoc_path).unwrap());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(digest.as_str()));

    let info = Command::new(bin)
        .args(["ztoc", "info", "--json"])
        .arg(&ztoc_path)
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(info["digest"], digest.as_str());
    assert_eq!(info["span_size"], 65536);
    assert!(info["spans"].as_array().unwrap().len() > 5);

    let ls = Command::new(bin)
        .args(["ztoc", "ls"])
        .arg(&ztoc_path)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&ls.stdout).contains("etc/rel-link -> hello.txt"));

    for spelling in ["./data/text.txt", "data/text.txt", "/data/text.txt"] {
        let out = Command::new(bin)
            .args(["ztoc", "get-file"])
            .arg(&ztoc_path)
            .arg(&layer)
            .arg(spelling)
            .output()
            .unwrap();
        assert!(out.status.success());
        let want = &expected
            .iter()
            .find(|e| e.name == b"./data/text.txt")
            .unwrap()
            .data;
        assert!(&out.stdout == want, "{spelling}");
    }
    let missing = Command::new(bin)
        .args(["ztoc", "get-file"])
        .arg(&ztoc_path)
        .arg(&layer)
        .arg("no/such/file")
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not in the layer"));

    let verify = Command::new(bin)
        .args(["ztoc", "verify"])
        .arg(&ztoc_path)
        .arg(&layer)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    // A layer with one altered byte fails verification.
    let mut bad = std::fs::read(&layer).unwrap();
    let mid = bad.len() / 2;
    bad[mid] ^= 0x55;
    std::fs::write(&layer, &bad).unwrap();
    let verify = Command::new(bin)
        .args(["ztoc", "verify"])
        .arg(&ztoc_path)
        .arg(&layer)
        .output()
        .unwrap();
    assert!(!verify.status.success());
}

/// Hundreds of thousands of entries encode and load (no verifier limit gets in the way).
#[test]
fn large_toc_loads() {
    let (tar, _) = edge_layer(1000);
    let mut z = build(&tar, 1 << 20);
    let template = z
        .entries
        .iter()
        .find(|e| e.kind == EntryType::Reg)
        .unwrap()
        .clone();
    let n = 400_000u64;
    z.entries = (0..n)
        .map(|i| {
            let mut e = template.clone();
            e.name = format!("./many/dir{}/file-{i}.txt", i % 1000).into_bytes();
            e.offset = i * 1024 + 512;
            e.size = 100;
            e
        })
        .collect();
    z.uncompressed_size = n * 1024 + 1024;
    z.compressed_size = z.uncompressed_size;
    z.compression = Compression::Uncompressed {
        size: z.compressed_size,
    };
    z.span_size = 64 << 20;
    z.span_digests = vec![[0; 32]; z.compressed_size.div_ceil(z.span_size) as usize];
    let bytes = format::encode(&z).unwrap();
    assert!(bytes.len() > 40 << 20, "{} bytes", bytes.len());
    let back = format::decode(&bytes).unwrap();
    assert_eq!(back.entries.len(), n as usize);
    assert_eq!(back.entries[399_999].name, b"./many/dir999/file-399999.txt");
}

/// Multi-member (pigz-style) layers get checkpoints by upstream SOCI's rule since v0.14
/// (`gzip_zinfo.c`, commit 560e2ab6): inflating continues across members with the counters and
/// the 32 KiB window carried over, no checkpoint is forced at a member's start, a checkpoint never
/// points into a gzip header or trailer (upstream's runtime resumes with raw inflate at `in`), and
/// checkpoints strictly increase (its runtime refuses others). Its runtime then reads such zTOCs;
/// single-member layers are unchanged (`upstream_fixtures` compares them byte for byte).
#[test]
fn multi_member_checkpoints_follow_upstreams_rule() {
    let (tar, expected) = edge_layer(900_000);
    // Seven members, with where each starts and ends in the blob.
    let (mut blob, mut members) = (Vec::new(), Vec::new());
    for m in 0..7 {
        let (a, b) = (tar.len() * m / 7, tar.len() * (m + 1) / 7);
        let start = blob.len() as u64;
        blob.extend(gzip(&tar[a..b], 6, 1));
        members.push(start..blob.len() as u64);
    }
    let span_size = 64 << 10;
    let z = check_layer("7 members", &blob, &tar, &expected, span_size);
    let Compression::Gzip { checkpoints } = &z.compression else {
        panic!("a gzip layer")
    };
    assert_eq!((checkpoints[0].output, checkpoints[0].bits), (0, 0));
    for pair in checkpoints.windows(2) {
        assert!(
            pair[1].input > pair[0].input,
            "compressed offsets must increase"
        );
        assert!(
            pair[1].output - pair[0].output > span_size,
            "spans follow the size rule"
        );
    }
    for (i, c) in checkpoints.iter().enumerate() {
        // Not in a member's 10-byte header (flate2 writes no name) nor its 8-byte trailer.
        for m in &members {
            let header = m.start..m.start + 10;
            let trailer = m.end - 8..m.end;
            assert!(
                !header.contains(&c.input) && !trailer.contains(&c.input),
                "checkpoint {i} at {} is inside member {m:?}'s header or trailer",
                c.input
            );
        }
        // The window is the output just before it, across member boundaries.
        let out = c.output as usize;
        let mut want = vec![0u8; WINDOW_SIZE];
        let have = out.min(WINDOW_SIZE);
        want[WINDOW_SIZE - have..].copy_from_slice(&tar[out - have..out]);
        assert!(
            c.window.inline() == Some(&want[..]),
            "checkpoint {i}'s window"
        );
    }
    let in_later_members = checkpoints
        .iter()
        .filter(|c| c.input > members[0].end)
        .count();
    assert!(
        in_later_members > 5,
        "{in_later_members} checkpoints past the first member"
    );
}
