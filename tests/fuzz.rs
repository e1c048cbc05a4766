//! Bounded, deterministic mutation testing of what reads untrusted input: the zTOC decoder (and
//! its table form), the tar scanner and the zTOC builder, and manifest/index/reference parsing.
//!
//! Each target starts from valid inputs and mutates them with a seeded generator (bit flips,
//! overwritten bytes, "interesting" integers, cut, repeated and moved ranges). Properties: no
//! panic, no hang; a zTOC that decodes is valid; a mutated layer that indexes reads back exactly
//! its sequential decompression; the tar scanner finds the same entries however its input is cut.
//!
//! Defaults run in seconds (`cargo test --release --test fuzz`). Longer runs:
//! `scripts/fuzz-long.sh` (`SOCI_FUZZ_ITERS`, `SOCI_FUZZ_SEED`, `SOCI_FUZZ_SECS`). A failure
//! names its target, seed and iteration, and leaves the input in the temporary directory.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use soci_store::index::{self, discover, Descriptor, Manifest};
use soci_store::reference::Reference;
use soci_store::ztoc::tar::TarScanner;
use soci_store::ztoc::{self, format, table, BuildOptions, LayerReader, Ztoc};

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: [u64; 10] = [
    0,
    1,
    0x7f,
    0xff,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    0x7fff_ffff_ffff_ffff,
    u64::MAX,
];

/// One to four random edits of `input`.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        if out.is_empty() {
            out.push(rng.next() as u8);
            continue;
        }
        let at = rng.below(out.len());
        match rng.below(8) {
            0 => out[at] ^= 1 << rng.below(8),
            1 => out[at] = rng.next() as u8,
            2 | 3 => {
                // An interesting little-endian integer of 1, 2, 4 or 8 bytes.
                let width = [1, 2, 4, 8][rng.below(4)];
                let v = INTERESTING[rng.below(INTERESTING.len())].wrapping_add(rng.below(3) as u64);
                let v = v.wrapping_sub(1).to_le_bytes();
                for (i, b) in v.iter().take(width).enumerate() {
                    if let Some(slot) = out.get_mut(at + i) {
                        *slot = *b;
                    }
                }
            }
            4 => out.truncate(at),
            5 => {
                // Repeat a range.
                let len = rng.below(64.min(out.len() - at)) + 1;
                let piece = out[at..at + len].to_vec();
                let to = rng.below(out.len());
                out.splice(to..to, piece);
            }
            6 => {
                // Remove a range.
                let len = rng.below(64.min(out.len() - at)) + 1;
                out.drain(at..at + len);
            }
            _ => {
                // Copy a range over another.
                let len = rng.below(32.min(out.len() - at)) + 1;
                let piece = out[at..at + len].to_vec();
                let to = rng.below(out.len());
                for (i, b) in piece.into_iter().enumerate() {
                    if let Some(slot) = out.get_mut(to + i) {
                        *slot = b;
                    }
                }
            }
        }
    }
    out
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `check` on `iters` mutations of the `seeds` inputs (or until the time budget is spent).
/// A panic names the target, seed and iteration and saves the input.
fn run(target: &str, default_iters: u64, seeds: &[Vec<u8>], check: impl Fn(&[u8])) {
    let iters = env_u64("SOCI_FUZZ_ITERS", default_iters);
    let seed = env_u64("SOCI_FUZZ_SEED", 1);
    let budget = Duration::from_secs(env_u64("SOCI_FUZZ_SECS", 20));
    let mut rng = Rng::new(seed ^ target.len() as u64);
    let start = Instant::now();
    let mut done = 0;
    for i in 0..iters {
        if start.elapsed() > budget {
            break;
        }
        let base = &seeds[rng.below(seeds.len())];
        let input = mutate(&mut rng, base);
        let case = Instant::now();
        if catch_unwind(AssertUnwindSafe(|| check(&input))).is_err() {
            let path = std::env::temp_dir().join(format!("soci-fuzz-{target}-{seed}-{i}.bin"));
            let _ = std::fs::write(&path, &input);
            panic!(
                "{target}: failed at iteration {i} of seed {seed}; input in {}",
                path.display()
            );
        }
        assert!(
            case.elapsed() < Duration::from_secs(10),
            "{target}: iteration {i} of seed {seed} took {:?}",
            case.elapsed()
        );
        done += 1;
    }
    eprintln!("{target}: {done} mutations in {:?}", start.elapsed());
}

fn opts(span_size: u64) -> BuildOptions {
    BuildOptions {
        span_size,
        min_layer_size: 0,
        ..Default::default()
    }
}

/// A small layer with every kind of entry (PAX, GNU long names, links, whiteouts).
fn small_tar() -> Vec<u8> {
    edge_layer(20_000).0
}

/// Reads everything a zTOC lists through it; errors are fine, panics and hangs are not.
fn read_all(z: Ztoc, blob: &[u8]) {
    let n = z.entries.len();
    let size = z.uncompressed_size;
    let reader = LayerReader::new(Arc::new(z), blob.to_vec()).verify_headers(true);
    for i in 0..n {
        let _ = reader.read_file(i);
    }
    let _ = reader.read_range(0..size.min(1 << 20));
}

#[test]
fn mutated_ztocs_are_errors_or_valid() {
    let tar = small_tar();
    let blob = gzip(&tar, 6, 2);
    let z = ztoc::build(&blob[..], &opts(4096), &mut |_| {}).unwrap();
    let plain = ztoc::build(&tar[..], &opts(8192), &mut |_| {}).unwrap();
    let seeds = vec![format::encode(&z).unwrap(), format::encode(&plain).unwrap()];
    run("ztoc", 4000, &seeds, |bytes| {
        if let Ok(z) = format::decode(bytes) {
            z.validate().expect("a decoded zTOC is valid");
            let source = if matches!(z.compression, ztoc::Compression::Uncompressed { .. }) {
                &tar
            } else {
                &blob
            };
            read_all(z, source);
        }
    });
}

#[test]
fn mutated_ztoc_tables_are_errors_or_valid() {
    let tar = small_tar();
    let blob = gzip(&tar, 6, 1);
    let z = ztoc::build(&blob[..], &opts(4096), &mut |_| {}).unwrap();
    let raw = gunzip(&table::split(&z).unwrap().table);
    run("table", 2000, &[raw], |bytes| {
        if let Ok(z) = table::decode_table(&gzip(bytes, 1, 1)) {
            z.validate().expect("a decoded table is valid");
        }
    });
}

/// Entries (name, offset, size) the scanner finds in `data` fed in pieces cut by `rng`.
fn scan(data: &[u8], cuts: &mut Rng) -> Result<Vec<(Vec<u8>, u64, u64)>, String> {
    let mut s = TarScanner::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = (cuts.below(1500) + 1).min(rest.len());
        s.feed(&rest[..n]).map_err(|e| e.to_string())?;
        rest = &rest[n..];
    }
    let (entries, _) = s.finish().map_err(|e| e.to_string())?;
    Ok(entries
        .into_iter()
        .map(|e| (e.name, e.offset, e.size))
        .collect())
}

#[test]
fn mutated_tars_scan_the_same_however_cut() {
    let seeds = vec![small_tar()];
    run("tar", 5000, &seeds, |tar| {
        let whole = {
            let mut s = TarScanner::new();
            s.feed(tar)
                .and_then(|()| s.finish())
                .map(|(e, _)| {
                    e.into_iter()
                        .map(|e| (e.name, e.offset, e.size))
                        .collect::<Vec<_>>()
                })
                .map_err(|e| e.to_string())
        };
        let mut cuts = Rng::new(tar.len() as u64);
        let pieces = scan(tar, &mut cuts);
        assert_eq!(whole.is_ok(), pieces.is_ok(), "{whole:?} vs {pieces:?}");
        if let (Ok(a), Ok(b)) = (whole, pieces) {
            assert_eq!(a, b);
        }
    });
}

#[test]
fn mutated_layers_index_and_read_back_exactly() {
    let tar = small_tar();
    let seeds = vec![tar.clone()];
    // Mutated tars, compressed correctly: indexed or refused, never read back wrong.
    run("layer", 600, &seeds, |tar| {
        let blob = gzip(tar, 1, 1 + tar.len() % 2);
        if let Ok(z) = ztoc::build(&blob[..], &opts(4096), &mut |_| {}) {
            let size = z.uncompressed_size as usize;
            assert!(size <= tar.len());
            let reader = LayerReader::new(Arc::new(z), blob);
            assert!(reader.read_range(0..size as u64).unwrap() == tar[..size]);
        }
    });
    // Mutated gzip blobs: refused, or (when the damage is where no check reaches, such as
    // the header's time) read back as a plain decompression reads them.
    let blob = gzip(&tar, 6, 2);
    run("gzip", 2500, &[blob], |blob| {
        if let Ok(z) = ztoc::build(blob, &opts(4096), &mut |_| {}) {
            let size = z.uncompressed_size;
            let reader = LayerReader::new(Arc::new(z), blob.to_vec());
            let got = reader.read_range(0..size).unwrap();
            let mut plain = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::MultiGzDecoder::new(blob), &mut plain)
                .expect("indexed, so a plain decompression reads it");
            assert!(got == plain[..size as usize]);
        }
    });
}

fn image_manifest() -> Manifest {
    let mut layer = Descriptor::new(
        index::MT_OCI_LAYER_GZIP,
        dg(&format!("sha256:{}", "a".repeat(64))),
        1234,
    );
    layer.annotations.insert(
        index::ANN_STARGZ_TOC.into(),
        format!("sha256:{}", "b".repeat(64)),
    );
    Manifest {
        schema_version: 2,
        media_type: Some(index::MT_OCI_MANIFEST.into()),
        artifact_type: None,
        config: Descriptor::new(
            index::MT_OCI_CONFIG,
            dg(&format!("sha256:{}", "c".repeat(64))),
            99,
        ),
        layers: vec![layer],
        subject: None,
        annotations: Default::default(),
    }
}

#[test]
fn mutated_manifests_indexes_and_references_parse_or_fail() {
    let image = image_manifest();
    let image_bytes = index::to_json(&image);
    let image_digest = index::sha256_digest(&image_bytes);
    let mut ztoc = Descriptor::new(
        index::MT_ZTOC,
        dg(&format!("sha256:{}", "d".repeat(64))),
        10,
    );
    ztoc.annotations.insert(
        index::ANN_LAYER_DIGEST.into(),
        image.layers[0].digest.to_string(),
    );
    let soci = Manifest {
        schema_version: 2,
        media_type: Some(index::MT_OCI_MANIFEST.into()),
        artifact_type: None,
        config: Descriptor::new(index::MT_SOCI_INDEX_V2, index::empty_json_digest(), 2),
        layers: vec![ztoc],
        subject: None,
        annotations: Default::default(),
    };
    let list = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": index::MT_OCI_INDEX,
        "manifests": [{
            "mediaType": index::MT_OCI_MANIFEST, "digest": image_digest, "size": image_bytes.len(),
            "platform": {"architecture": "amd64", "os": "linux"},
        }],
    });
    let seeds = vec![
        image_bytes.clone(),
        index::to_json(&soci),
        serde_json::to_vec(&list).unwrap(),
    ];
    run("manifest", 10000, &seeds, |doc| {
        let _ = index::declared_media_type(doc, "");
        let _ = index::parse_index(doc);
        if let Ok(m) = index::parse_manifest(doc) {
            let _ = index::to_json(&m);
        }
        let digest = index::sha256_digest(doc);
        for kind in [discover::IndexKind::V1, discover::IndexKind::V2] {
            let _ = discover::validate_index(doc, &digest, kind, &image_digest, &image);
        }
    });
    let refs: Vec<Vec<u8>> = [
        "registry.example.com:5000/a/b/c:tag",
        "docker.io/library/alpine@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "localhost/app:v1",
        "oci:/tmp/layout:tag",
        "linux/arm64/v8",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    run("reference", 10000, &refs, |s| {
        let s = String::from_utf8_lossy(s);
        if let Ok(r) = Reference::parse(&s) {
            let _ = (r.to_string(), r.api_host(), r.target(), r.name());
        }
        let _ = index::image::ImageRef::parse(&s);
        let _ = index::Platform::parse(&s);
    });
}

#[test]
fn the_mutator_is_deterministic() {
    let input = small_tar();
    let (mut a, mut b) = (Rng::new(7), Rng::new(7));
    for _ in 0..50 {
        assert!(mutate(&mut a, &input) == mutate(&mut b, &input));
    }
}

fn dg(s: &str) -> soci_store::digest::Digest {
    soci_store::digest::Digest::parse(s).unwrap()
}
