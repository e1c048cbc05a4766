//! The layers and zTOCs that upstream SOCI built (`tests/fixtures/upstream-ztoc`): we read
//! upstream's zTOCs correctly, and the zTOCs we build for the same layers match them.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::Value;
use sha2::{Digest, Sha256};
use soci_store::ztoc::{self, format, BuildOptions, Compression, LayerReader, Ztoc};

fn fixtures() -> PathBuf {
    let dir = std::env::var_os("SOCI_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upstream-ztoc")
        });
    assert!(
        dir.join("edge/layer.tar.gz").exists(),
        "upstream fixtures not found at {} (set SOCI_FIXTURES)",
        dir.display()
    );
    dir
}

fn json(path: PathBuf) -> Value {
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

const CASES: [(&str, &str, u64); 4] = [
    ("edge", "span-4MiB", 4 << 20),
    ("edge", "span-1MiB", 1 << 20),
    ("nonutf8", "span-4MiB", 4 << 20),
    ("nonutf8", "span-1MiB", 1 << 20),
];

fn hex_of(v: &Value, key: &str, hex_key: &str) -> Vec<u8> {
    match v.get(hex_key).and_then(Value::as_str) {
        Some(h) => hex::decode(h).unwrap(),
        None => v[key].as_str().unwrap().as_bytes().to_vec(),
    }
}

fn upstream(fixture: &str, name: &str) -> (Vec<u8>, Ztoc) {
    let bytes = std::fs::read(fixtures().join(fixture).join(format!("{name}.ztoc"))).unwrap();
    let z = format::decode(&bytes).unwrap_or_else(|e| panic!("{fixture}/{name}: {e}"));
    (bytes, z)
}

#[test]
fn reads_upstream_ztoc_metadata() {
    for (fixture, name, span_size) in CASES {
        let (bytes, z) = upstream(fixture, name);
        let info = json(fixtures().join(fixture).join(format!("{name}.info.json")));
        assert_eq!(
            Ztoc::digest_of(&bytes),
            info["ztoc_digest"].as_str().unwrap()
        );
        assert_eq!(z.version, b"0.9");
        assert_eq!(z.span_size, span_size);
        assert_eq!(
            z.compressed_size,
            info["compressed_archive_size"].as_u64().unwrap()
        );
        assert_eq!(
            z.uncompressed_size,
            info["uncompressed_archive_size"].as_u64().unwrap()
        );
        let entries = info["entries"].as_array().unwrap();
        assert_eq!(z.entries.len(), entries.len());
        for (e, want) in z.entries.iter().zip(entries) {
            assert_eq!(e.name, hex_of(want, "name", "name_hex"));
            assert_eq!(e.kind.as_str(), want["type"].as_str().unwrap());
            assert_eq!(e.offset, want["uncompressed_offset"].as_u64().unwrap());
            assert_eq!(e.size, want["uncompressed_size"].as_u64().unwrap());
            assert_eq!(e.linkname, hex_of(want, "linkname", "linkname_hex"));
            assert_eq!(e.mode, want["mode"].as_i64().unwrap());
            assert_eq!(e.uid, want["uid"].as_u64().unwrap() as u32);
            assert_eq!(e.mod_time, want["mod_time"].as_str().unwrap().as_bytes());
            assert_eq!(e.devmajor, want["devmajor"].as_i64().unwrap());
            assert_eq!(e.devminor, want["devminor"].as_i64().unwrap());
            assert_eq!(e.pax.len(), want["pax_headers"].as_object().unwrap().len());
        }
        let spans = info["spans"].as_array().unwrap();
        assert_eq!(z.span_count(), spans.len());
        for (i, s) in spans.iter().enumerate() {
            let span = z.span(i);
            assert_eq!(
                span.compressed.start,
                s["start_compressed_offset"].as_u64().unwrap()
            );
            assert_eq!(
                span.compressed.end,
                s["end_compressed_offset"].as_u64().unwrap()
            );
            assert_eq!(
                span.uncompressed.start,
                s["start_uncompressed_offset"].as_u64().unwrap()
            );
            assert_eq!(
                format!("sha256:{}", hex::encode(span.digest)),
                s["digest"].as_str().unwrap()
            );
        }
        let Compression::Gzip { checkpoints } = &z.compression else {
            panic!("gzip expected")
        };
        for (c, want) in checkpoints
            .iter()
            .zip(info["gzip_checkpoints"].as_array().unwrap())
        {
            assert_eq!(c.input, want["in"].as_u64().unwrap());
            assert_eq!(c.output, want["out"].as_u64().unwrap());
            assert_eq!(u64::from(c.bits), want["bits"].as_u64().unwrap());
            assert_eq!(
                hex::encode(Sha256::digest(c.window.inline().unwrap())),
                want["window_sha256"].as_str().unwrap()
            );
        }
    }
}

#[test]
fn every_file_read_through_upstream_ztoc_matches() {
    for (fixture, name, _) in CASES {
        let (_, z) = upstream(fixture, name);
        let manifest = json(fixtures().join(fixture).join("manifest.json"));
        let layer = std::fs::File::open(fixtures().join(fixture).join("layer.tar.gz")).unwrap();
        let reader = LayerReader::new(Arc::new(z), layer).verify_headers(true);
        let mut checked = 0;
        for f in manifest["files"].as_array().unwrap() {
            let Some(want) = f.get("sha256").and_then(Value::as_str) else {
                continue;
            };
            let fname = hex_of(f, "name", "name_hex");
            let idx = reader.ztoc().find(&fname).unwrap_or_else(|| panic!("{f}"));
            let data = reader.read_file(idx).unwrap();
            assert_eq!(
                hex::encode(Sha256::digest(&data)),
                want,
                "{fixture}/{name}: {f}"
            );
            checked += 1;
        }
        assert!(checked > 0);
    }
}

#[test]
fn our_ztoc_matches_upstreams() {
    for (fixture, name, span_size) in CASES {
        let (_, theirs) = upstream(fixture, name);
        let layer = std::fs::File::open(fixtures().join(fixture).join("layer.tar.gz")).unwrap();
        let opts = BuildOptions {
            span_size,
            min_layer_size: 0,
            ..Default::default()
        };
        let ours = ztoc::build(std::io::BufReader::new(layer), &opts, &mut |_| {}).unwrap();
        assert_eq!(ours.compressed_size, theirs.compressed_size);
        assert_eq!(
            ours.uncompressed_size, theirs.uncompressed_size,
            "{fixture}/{name}"
        );
        assert_eq!(ours.entries.len(), theirs.entries.len());
        for (a, b) in ours.entries.iter().zip(&theirs.entries) {
            assert_eq!(a, b, "{fixture}/{name}");
        }
        assert_eq!(ours.span_digests, theirs.span_digests, "{fixture}/{name}");
        assert_eq!(ours.compression, theirs.compression, "{fixture}/{name}");

        // And what we write reads back identically.
        let bytes = format::encode(&ours).unwrap();
        assert_eq!(format::decode(&bytes).unwrap(), ours);
    }
}

#[test]
fn upstream_ztoc_round_trips_through_our_writer() {
    for (fixture, name, _) in CASES {
        let (_, z) = upstream(fixture, name);
        assert_eq!(format::decode(&format::encode(&z).unwrap()).unwrap(), z);
    }
}
