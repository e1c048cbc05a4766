//! The zstd:chunked format (`soci_store::chunked`) on a layer podman itself pushed
//! (tests/fixtures/zstd-chunked): its TOC found from the annotations and verified, every file
//! rebuilt from its chunks equal to the tar the blob decompresses to, and tampering refused.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;

use soci_store::chunked::{read_chunk, ChunkedError, ChunkedLayer, FileKind};

fn fixture() -> (Vec<u8>, BTreeMap<String, String>, u64) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/zstd-chunked");
    let blob = std::fs::read(dir.join("layer.tar.zst")).unwrap();
    let desc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("descriptor.json")).unwrap()).unwrap();
    let annotations = desc["annotations"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let size = desc["size"].as_u64().unwrap();
    assert_eq!(size, blob.len() as u64);
    (blob, annotations, size)
}

/// The tar the blob decompresses to, as (name, kind, mode, link name, content).
fn tar_entries(blob: &[u8]) -> Vec<(String, tar::EntryType, u32, String, Vec<u8>)> {
    let mut tar_bytes = Vec::new();
    zstd::stream::read::Decoder::new(blob)
        .unwrap()
        .read_to_end(&mut tar_bytes)
        .unwrap();
    let mut a = tar::Archive::new(&tar_bytes[..]);
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().to_string_lossy().into_owned();
            let h = e.header().clone();
            let link = e
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            (name, h.entry_type(), h.mode().unwrap(), link, data)
        })
        .collect()
}

#[test]
fn zstd_chunked_toc_lists_every_file_of_the_layer() {
    let (blob, annotations, size) = fixture();
    let layer = ChunkedLayer::from_annotations(&annotations, size)
        .unwrap()
        .expect("a zstd:chunked layer");
    let r = layer.toc.range();
    let toc = layer
        .decode_toc(&blob[r.start as usize..r.end as usize])
        .unwrap();
    let files = toc.files(layer.toc.offset).unwrap();
    let tar = tar_entries(&blob);
    let norm = |n: &str| n.trim_start_matches("./").trim_end_matches('/').to_string();
    assert_eq!(
        files.iter().map(|f| norm(&f.name)).collect::<Vec<_>>(),
        tar.iter().map(|t| norm(&t.0)).collect::<Vec<_>>(),
        "the TOC lists the tar's entries, in order"
    );
    let mut chunked_files = 0;
    for (f, (name, kind, mode, link, data)) in files.iter().zip(&tar) {
        let want = match kind {
            tar::EntryType::Regular => FileKind::Reg,
            tar::EntryType::Directory => FileKind::Dir,
            tar::EntryType::Symlink => FileKind::Symlink,
            tar::EntryType::Link => FileKind::Hardlink,
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(f.kind, want, "{name}");
        assert_eq!(f.mode, *mode & 0o7777, "{name}");
        if want == FileKind::Symlink || want == FileKind::Hardlink {
            assert_eq!(norm(&f.link_name), norm(link), "{name}");
        }
        if want != FileKind::Reg {
            continue;
        }
        assert_eq!(f.size, data.len() as u64, "{name}");
        // Rebuilt chunk by chunk, each verified: the tar's content.
        let mut rebuilt = Vec::new();
        for c in &f.chunks {
            let bytes = &blob[c.compressed.start as usize..c.compressed.end as usize];
            rebuilt.extend(read_chunk(f, c, bytes).unwrap());
        }
        assert!(rebuilt == *data, "{name} rebuilt from its chunks");
        if f.chunks.len() > 1 {
            chunked_files += 1;
        }
    }
    assert!(
        chunked_files >= 2,
        "random.bin and zeros.bin come in several chunks"
    );
    let zeros = files
        .iter()
        .find(|f| f.name.ends_with("zeros.bin"))
        .unwrap();
    assert!(zeros.chunks.iter().any(|c| c.zeros), "{zeros:?}");
    let hello = files
        .iter()
        .find(|f| f.name.ends_with("hello.txt"))
        .unwrap();
    assert_eq!(hello.mode, 0o4755);
}

#[test]
fn zstd_chunked_tampered_toc_is_refused() {
    let (mut blob, annotations, size) = fixture();
    let layer = ChunkedLayer::from_annotations(&annotations, size)
        .unwrap()
        .unwrap();
    let r = layer.toc.range();
    blob[r.start as usize + 100] ^= 1;
    let err = layer
        .decode_toc(&blob[r.start as usize..r.end as usize])
        .unwrap_err();
    assert!(matches!(err, ChunkedError::TocDigest { .. }), "{err}");
}

#[test]
fn zstd_chunked_tampered_chunk_is_refused() {
    let (blob, annotations, size) = fixture();
    let layer = ChunkedLayer::from_annotations(&annotations, size)
        .unwrap()
        .unwrap();
    let r = layer.toc.range();
    let files = layer
        .decode_toc(&blob[r.start as usize..r.end as usize])
        .unwrap()
        .files(layer.toc.offset)
        .unwrap();
    let f = files.iter().find(|f| f.name.ends_with("text.txt")).unwrap();
    let c = &f.chunks[0];
    let good = &blob[c.compressed.start as usize..c.compressed.end as usize];
    // Every single-byte change is refused (a decoding error or a digest mismatch), never
    // served; so is a short read.
    for at in (0..good.len()).step_by(good.len() / 50 + 1) {
        let mut bad = good.to_vec();
        bad[at] ^= 0x40;
        assert!(read_chunk(f, c, &bad).is_err(), "byte {at} changed");
    }
    assert!(read_chunk(f, c, &good[..good.len() - 1]).is_err());
    assert!(read_chunk(f, c, good).is_ok());
}

#[test]
fn zstd_chunked_hostile_annotations_are_refused() {
    let (blob, annotations, size) = fixture();
    let with = |key: &str, value: &str| {
        let mut a = annotations.clone();
        a.insert(key.to_string(), value.to_string());
        ChunkedLayer::from_annotations(&a, size)
    };
    let pos = soci_store::chunked::ANN_TOC_POSITION;
    for bad in [
        format!("{}:100:100:1", size - 10),  // past the end of the blob
        "18446744073709551615:2:3:1".into(), // offset + length overflows
        "0:100:100:2".into(),                // no such TOC type
        "0:100:1".into(),                    // a field missing
        "a:b:c:d".into(),
        format!("0:{size}:{}:1", 1u64 << 40), // a TOC far above the limit
    ] {
        assert!(with(pos, &bad).is_err(), "{bad}");
    }
    assert!(with(soci_store::chunked::ANN_TOC_DIGEST, "sha256:xyz").is_err());
    // Not zstd:chunked at all: no TOC annotations.
    assert_eq!(
        ChunkedLayer::from_annotations(&BTreeMap::new(), size).unwrap(),
        None
    );
    // A TOC that decompresses to more than announced is refused.
    let mut a = annotations.clone();
    let p: Vec<&str> = annotations[pos].split(':').collect();
    a.insert(pos.into(), format!("{}:{}:{}:1", p[0], p[1], 10));
    let layer = ChunkedLayer::from_annotations(&a, size).unwrap().unwrap();
    let r = layer.toc.range();
    assert!(matches!(
        layer.decode_toc(&blob[r.start as usize..r.end as usize]),
        Err(ChunkedError::Toc(_))
    ));
}

/// The layer as a file table with one span per chunk (what the store serves it from): its
/// entries sit where the tar puts them (from the tar-split data), and every file read through
/// it, chunk by chunk from the blob, is the tar's.
#[test]
fn zstd_chunked_layer_reads_through_its_file_table() {
    let (blob, annotations, size) = fixture();
    let layer = ChunkedLayer::from_annotations(&annotations, size)
        .unwrap()
        .unwrap();
    let slice = |r: std::ops::Range<u64>| &blob[r.start as usize..r.end as usize];
    let toc = layer.decode_toc(slice(layer.toc.range())).unwrap();
    let files = toc.files(layer.toc.offset).unwrap();
    let split = layer.tar_split.as_ref().unwrap().range();
    let layout = soci_store::chunked::tar_layout(&layer, &toc, slice(split.clone())).unwrap();
    let z = soci_store::chunked::to_ztoc(&files, &layout, size).unwrap();

    let mut tar_bytes = Vec::new();
    zstd::stream::read::Decoder::new(&blob[..])
        .unwrap()
        .read_to_end(&mut tar_bytes)
        .unwrap();
    assert_eq!(
        z.uncompressed_size,
        tar_bytes.len() as u64,
        "the tar's size"
    );
    let mut a = tar::Archive::new(&tar_bytes[..]);
    let offsets: Vec<u64> = a
        .entries()
        .unwrap()
        .map(|e| e.unwrap().raw_file_position())
        .collect();
    assert_eq!(
        z.entries.iter().map(|e| e.offset).collect::<Vec<_>>(),
        offsets
    );

    let reader = soci_store::ztoc::LayerReader::new(std::sync::Arc::new(z.clone()), blob.clone());
    for (i, e) in z.entries.iter().enumerate() {
        if e.kind != soci_store::ztoc::EntryType::Reg {
            continue;
        }
        let data = reader.read_file(i).unwrap();
        let at = e.offset as usize;
        assert!(
            data == tar_bytes[at..at + e.size as usize],
            "{}",
            e.display_name()
        );
    }
    // A tar header lies in no chunk: not readable through the table.
    assert!(reader.read_range(0..10).is_err());

    // The tar-split data is checked against the TOC's digest.
    let mut tampered = slice(split).to_vec();
    tampered[10] ^= 1;
    assert!(soci_store::chunked::tar_layout(&layer, &toc, &tampered).is_err());
    // A chunk tampered in the blob fails its digest when read.
    let mut bad_blob = blob.clone();
    let c = &files
        .iter()
        .find(|f| f.name.ends_with("random.bin"))
        .unwrap()
        .chunks[2];
    bad_blob[c.compressed.start as usize + 20] ^= 0x10;
    let reader = soci_store::ztoc::LayerReader::new(std::sync::Arc::new(z.clone()), bad_blob);
    let idx = z.find(b"data/random.bin").unwrap();
    assert!(reader.read_file(idx).is_err());
}

/// A tar written as zstd:chunked by `chunked::write` (what `convert --zstd-chunked` does) reads
/// back through the same path as podman's: the TOC and tar-split data found from the
/// annotations, every file equal to the tar's, and the whole blob decompressing to the tar.
#[test]
fn zstd_chunked_written_by_us_reads_back() {
    let (blob, _, _) = fixture();
    let mut tar_bytes = Vec::new();
    zstd::stream::read::Decoder::new(&blob[..])
        .unwrap()
        .read_to_end(&mut tar_bytes)
        .unwrap();
    // A file of several chunks too.
    let big: Vec<u8> = (0..1_500_000u32).map(|i| (i % 251) as u8).collect();
    let mut extra = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(big.len() as u64);
    h.set_mode(0o640);
    h.set_uid(1000);
    h.set_gid(1000);
    h.set_mtime(1_700_000_000);
    extra.append_data(&mut h, "big.bin", &big[..]).unwrap();
    let extra = extra.into_inner().unwrap();
    for tar in [tar_bytes.clone(), extra] {
        let mut src = std::io::Cursor::new(tar.clone());
        let mut out = Vec::new();
        let w = soci_store::chunked::write::write(&mut src, &mut out, 3).unwrap();
        assert_eq!(w.size, out.len() as u64);
        assert_eq!(w.digest, soci_store::digest::Digest::of(&out));
        let mut whole = Vec::new();
        zstd::stream::read::Decoder::new(&out[..])
            .unwrap()
            .read_to_end(&mut whole)
            .unwrap();
        assert!(whole == tar, "the blob decompresses to the tar");

        let layer = ChunkedLayer::from_annotations(&w.annotations, w.size)
            .unwrap()
            .unwrap();
        let slice = |r: std::ops::Range<u64>| &out[r.start as usize..r.end as usize];
        let toc = layer.decode_toc(slice(layer.toc.range())).unwrap();
        let files = toc.files(layer.toc.offset).unwrap();
        let layout = soci_store::chunked::tar_layout(
            &layer,
            &toc,
            slice(layer.tar_split.as_ref().unwrap().range()),
        )
        .unwrap();
        let z = soci_store::chunked::to_ztoc(&files, &layout, w.size).unwrap();
        assert_eq!(z.uncompressed_size, tar.len() as u64);
        let reader =
            soci_store::ztoc::LayerReader::new(std::sync::Arc::new(z.clone()), out.clone());
        let mut read_files = 0;
        for (i, e) in z.entries.iter().enumerate() {
            if e.kind == soci_store::ztoc::EntryType::Reg && e.size > 0 {
                let at = e.offset as usize;
                assert!(reader.read_file(i).unwrap() == tar[at..at + e.size as usize]);
                read_files += 1;
            }
        }
        assert!(read_files > 0);
    }
}
