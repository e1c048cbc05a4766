//! Bad input gets a clear error: never a panic, a hang, an allocation sized by the input, or a
//! wrong byte.

mod common;

use std::sync::Arc;

use common::*;
use soci_store::ztoc::{self, format, BuildOptions, Compression, LayerReader, Ztoc, ZtocError};

fn opts(span_size: u64) -> BuildOptions {
    BuildOptions {
        span_size,
        min_layer_size: 0,
        ..Default::default()
    }
}

fn build(blob: &[u8]) -> Result<Ztoc, ZtocError> {
    ztoc::build(blob, &opts(32 << 10), &mut |_| {})
}

fn sample() -> (Vec<u8>, Vec<u8>, Ztoc) {
    let (tar, _) = edge_layer(200_000);
    let blob = gzip(&tar, 6, 1);
    let z = build(&blob).unwrap();
    (tar, blob, z)
}

#[test]
fn truncated_gzip_is_an_error() {
    let (_, blob, _) = sample();
    for cut in [
        1,
        5,
        10,
        11,
        100,
        blob.len() / 3,
        blob.len() / 2,
        blob.len() - 9,
        blob.len() - 1,
    ] {
        let err = build(&blob[..cut]).unwrap_err();
        assert!(
            matches!(err, ZtocError::CorruptLayer(_) | ZtocError::InvalidTar(_)),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn corrupt_deflate_data_is_an_error() {
    let (_, blob, _) = sample();
    // Past the 10-byte header (whose mtime/OS bytes no checksum covers).
    for at in [
        12,
        500,
        blob.len() / 4,
        blob.len() / 2,
        blob.len() - 20,
        blob.len() - 3,
    ] {
        let mut bad = blob.clone();
        bad[at] ^= 0xa5;
        let err = build(&bad).unwrap_err();
        assert!(
            matches!(err, ZtocError::CorruptLayer(_) | ZtocError::InvalidTar(_)),
            "byte {at}: {err}"
        );
    }
}

#[test]
fn trailing_garbage_is_an_error() {
    let (_, mut blob, _) = sample();
    blob.extend_from_slice(b"not gzip");
    let err = build(&blob).unwrap_err();
    assert!(err.to_string().contains("trailing data"), "{err}");
}

#[test]
fn other_compressions_are_unsupported() {
    for (name, magic) in [
        ("zstd", &[0x28, 0xb5, 0x2f, 0xfd, 0, 0][..]),
        ("xz", &[0xfd, b'7', b'z', b'X', b'Z', 0][..]),
        ("bzip2", &b"BZh91AY&SY"[..]),
    ] {
        let err = build(magic).unwrap_err();
        assert!(matches!(err, ZtocError::UnsupportedCompression(_)), "{err}");
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn not_a_tar_is_an_error() {
    let err = build(&random_bytes(4096, 3)).unwrap_err();
    assert!(matches!(err, ZtocError::InvalidTar(_)), "{err}");
    let err = build(&gzip(&random_bytes(4096, 3), 6, 1)).unwrap_err();
    assert!(matches!(err, ZtocError::InvalidTar(_)), "{err}");
    let err = build(b"").unwrap_err();
    assert!(matches!(err, ZtocError::InvalidTar(_)), "{err}");
}

/// A one-entry tar whose header name is written raw, bypassing the tar crate's own checks.
fn tar_named(name: &[u8], kind: tar::EntryType, link: &[u8]) -> Vec<u8> {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(0);
    h.set_mode(0o644);
    h.as_mut_bytes()[..name.len()].copy_from_slice(name);
    h.as_mut_bytes()[157..157 + link.len()].copy_from_slice(link);
    h.set_cksum();
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(&[0u8; 1024]);
    out
}

#[test]
fn hostile_tar_names_are_rejected() {
    for (name, link, kind) in [
        (&b"../escape"[..], &b""[..], tar::EntryType::Regular),
        (b"a/../../escape", b"", tar::EntryType::Regular),
        (b"/etc/passwd", b"", tar::EntryType::Regular),
        (b"ok", b"../../etc/shadow", tar::EntryType::Link),
    ] {
        let err = build(&tar_named(name, kind, link)).unwrap_err();
        assert!(matches!(err, ZtocError::InvalidTar(_)), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("..") || msg.contains("absolute"), "{msg}");
    }
    // Symlink targets may point anywhere: the kernel resolves them inside the container.
    build(&tar_named(b"ok", tar::EntryType::Symlink, b"../../etc")).unwrap();
}

#[test]
fn truncated_ztoc_is_an_error() {
    let (_, _, z) = sample();
    let bytes = format::encode(&z).unwrap();
    for len in (0..bytes.len()).step_by(97).chain([bytes.len() - 1]) {
        assert!(format::decode(&bytes[..len]).is_err(), "len {len}");
    }
}

type Mutation<'a> = Box<dyn Fn(&mut Ztoc) + 'a>;

fn reencoded(z: &Ztoc) -> Result<Ztoc, ZtocError> {
    format::decode(&format::encode(z).unwrap())
}

#[test]
fn inconsistent_ztocs_are_rejected() {
    let (_, _, z) = sample();
    let n = z.entries.len();
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "offset past the end",
            Box::new(|z| z.entries[n - 1].offset = z.uncompressed_size + 1),
        ),
        (
            "size past the end",
            Box::new(|z| {
                let i = z.entries.iter().position(|e| e.size > 0).unwrap();
                z.entries[i].size = i64::MAX as u64;
            }),
        ),
        (
            "overlapping entries",
            Box::new(|z| z.entries[3].offset = z.entries[2].offset),
        ),
        (
            "dot-dot name",
            Box::new(|z| z.entries[2].name = b"./../x".to_vec()),
        ),
        (
            "absolute name",
            Box::new(|z| z.entries[2].name = b"/x".to_vec()),
        ),
        ("no spans", Box::new(|z| z.span_digests.clear())),
        ("digest count", Box::new(|z| z.span_digests.push([0; 32]))),
        (
            "huge blob",
            Box::new(|z| z.compressed_size = i64::MAX as u64),
        ),
        (
            "checkpoint order",
            Box::new(|z| {
                if let Compression::Gzip { checkpoints } = &mut z.compression {
                    checkpoints.swap(1, 2);
                }
            }),
        ),
        (
            "checkpoint bits",
            Box::new(|z| {
                if let Compression::Gzip { checkpoints } = &mut z.compression {
                    checkpoints[1].bits = 9;
                }
            }),
        ),
        (
            "checkpoint past blob",
            Box::new(|z| {
                if let Compression::Gzip { checkpoints } = &mut z.compression {
                    checkpoints.last_mut().unwrap().input = z.compressed_size + 10;
                }
            }),
        ),
    ];
    for (what, mutate) in cases {
        let mut bad = z.clone();
        mutate(&mut bad);
        let err = reencoded(&bad).expect_err(what);
        assert!(
            matches!(err, ZtocError::Invalid(_) | ZtocError::Malformed(_)),
            "{what}: {err}"
        );
    }
}

#[test]
fn absurd_counts_in_checkpoint_blob() {
    let mut blob = Vec::new();
    blob.extend_from_slice(&i32::MAX.to_le_bytes());
    blob.extend_from_slice(&(4i64 << 20).to_le_bytes());
    assert!(format::decode_checkpoints(&blob).is_err());
    blob[..4].copy_from_slice(&(-5i32).to_le_bytes());
    assert!(format::decode_checkpoints(&blob).is_err());
    assert!(format::decode_checkpoints(&[1, 2, 3]).is_err());
}

#[test]
fn older_checkpoint_layout_is_accepted() {
    let (_, _, z) = sample();
    let Compression::Gzip { checkpoints } = &z.compression else {
        unreachable!()
    };
    let current = format::encode_checkpoints(z.span_size, checkpoints).unwrap();
    // The old layout leaves out checkpoint 0 (implied: in 10, out 0, no bits, zero window).
    let mut old = current[..12].to_vec();
    old.extend_from_slice(&current[12 + 32_785..]);
    let (span_size, decoded) = format::decode_checkpoints(&old).unwrap();
    assert_eq!(span_size, z.span_size);
    assert_eq!(&decoded, checkpoints);
}

#[test]
fn span_digest_mismatch_is_an_error_never_data() {
    let (_, blob, z) = sample();
    let z = Arc::new(z);
    for span in [0, z.span_count() / 2, z.span_count() - 1] {
        let s = z.span(span);
        let mut bad = blob.clone();
        bad[((s.compressed.start + s.compressed.end) / 2) as usize] ^= 1;
        let reader = LayerReader::new(z.clone(), bad);
        let mut buf = vec![0u8; 100];
        let err = reader.read_at(s.uncompressed.start, &mut buf).unwrap_err();
        assert!(
            matches!(err, ZtocError::SpanDigestMismatch { span: got, .. } if got == span),
            "{err}"
        );
    }
}

#[test]
fn a_short_source_is_an_error() {
    let (_, blob, z) = sample();
    let reader = LayerReader::new(Arc::new(z), blob[..blob.len() / 2].to_vec());
    let mut buf = vec![0u8; 100];
    let end = reader.ztoc().uncompressed_size - 100;
    assert!(reader.read_at(end, &mut buf).is_err());
}

#[test]
fn broken_hardlinks_are_errors() {
    let (_, blob, mut z) = sample();
    let i = z.find(b"etc/hello-hardlink").unwrap();
    z.entries[i].linkname = b"./etc/missing".to_vec();
    let reader = LayerReader::new(Arc::new(z.clone()), blob.clone());
    assert!(matches!(reader.read_file(i), Err(ZtocError::NotFound(_))));
    // A cycle: the link points at itself.
    z.entries[i].linkname = z.entries[i].name.clone();
    let reader = LayerReader::new(Arc::new(z), blob);
    assert!(matches!(reader.read_file(i), Err(ZtocError::Invalid(_))));
}

#[test]
fn header_verification_catches_a_wrong_entry() {
    let (_, blob, mut z) = sample();
    let i = z.find(b"etc/hello.txt").unwrap();
    // The zTOC names the file differently from its tar header: valid offsets, wrong file.
    z.entries[i].name = b"./etc/hullo.txt".to_vec();
    let z = Arc::new(z);
    let plain = LayerReader::new(z.clone(), blob.clone());
    assert_eq!(plain.read_file(i).unwrap(), b"hello world\n");
    let checked = LayerReader::new(z, blob).verify_headers(true);
    let err = checked.read_file(i).unwrap_err();
    assert!(matches!(err, ZtocError::HeaderMismatch { .. }), "{err}");
    assert!(err.to_string().contains("name"), "{err}");
}

#[test]
fn a_name_listed_twice_reads_as_its_last_copy() {
    // As extraction (and the store's tree) leaves it: the last copy wins; `ztoc get-file`
    // finds entries with `Ztoc::find`.
    let mut t = TarWriter::new();
    t.file("./etc/twice", b"first\n");
    t.file("./etc/other", b"other\n");
    t.file("etc/twice", b"second\n");
    let blob = gzip(&t.finish().0, 6, 1);
    let z = Arc::new(build(&blob).unwrap());
    let i = z.find(b"/etc/twice").unwrap();
    assert_eq!(i, 2);
    let reader = LayerReader::new(z, blob);
    assert_eq!(reader.read_file(i).unwrap(), b"second\n");
}
