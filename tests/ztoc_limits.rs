//! The resource budget of one zTOC (docs/architecture.md, "Limits"): a small hostile zTOC is
//! refused before it is expanded, spans are bounded in uncompressed size, and a permitted span is
//! inflated once however it is read.

mod common;

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use common::*;
use flatbuffers::{FlatBufferBuilder, WIPOffset};
use soci_store::ztoc::reader::BlobSource;
use soci_store::ztoc::{self, format, BuildOptions, Compression, LayerReader, Ztoc, ZtocError};

fn opts(span_size: u64) -> BuildOptions {
    BuildOptions {
        span_size,
        min_layer_size: 0,
        ..Default::default()
    }
}

fn sample() -> (Vec<u8>, Ztoc) {
    let (tar, _) = edge_layer(200_000);
    let blob = gzip(&tar, 6, 1);
    let z = ztoc::build(&blob[..], &opts(1 << 20), &mut |_| {}).unwrap();
    (blob, z)
}

/// The vtable offset of field `id`.
const fn slot(id: u16) -> u16 {
    4 + 2 * id
}

/// How the hostile entries of [`hostile_ztoc`] are laid out.
enum Entries {
    /// One table listed `n` times.
    OneTable(usize),
    /// `n` tables at increasing offsets, all pointing at the one name.
    SharedName(usize),
}

/// A zTOC with `base`'s spans whose entries all carry the same `name_len`-byte name, stored once.
fn hostile_ztoc(base: &Ztoc, entries: Entries, name_len: usize) -> Vec<u8> {
    let Compression::Gzip { checkpoints } = &base.compression else {
        unreachable!()
    };
    let mut b = FlatBufferBuilder::new();
    let name = b.create_vector(&vec![b'a'; name_len]);
    let kind = b.create_string("reg");
    let entry = |b: &mut FlatBufferBuilder, offset: i64| {
        let t = b.start_table();
        b.push_slot::<i64>(slot(2), offset, 0);
        b.push_slot_always(slot(0), name);
        b.push_slot_always(slot(1), kind);
        b.end_table(t)
    };
    let (list, n): (Vec<WIPOffset<_>>, usize) = match entries {
        Entries::OneTable(n) => (vec![entry(&mut b, 512); n], n),
        Entries::SharedName(n) => ((1..=n as i64).map(|i| entry(&mut b, 512 * i)).collect(), n),
    };
    let list = b.create_vector(&list);
    let toc = {
        let t = b.start_table();
        b.push_slot_always(slot(0), list);
        b.end_table(t)
    };
    let digests: Vec<_> = base
        .span_digests
        .iter()
        .map(|d| b.create_string(&format!("sha256:{}", hex::encode(d))))
        .collect();
    let digests = b.create_vector(&digests);
    let blob = format::encode_checkpoints(base.span_size, checkpoints).unwrap();
    let blob = b.create_vector(&blob);
    let ci = {
        let t = b.start_table();
        b.push_slot_always(slot(3), blob);
        b.push_slot_always(slot(2), digests);
        b.push_slot::<i32>(slot(1), base.span_digests.len() as i32 - 1, 0);
        b.end_table(t)
    };
    let uncompressed = base.uncompressed_size.max(512 * (n as u64 + 2));
    let root = {
        let t = b.start_table();
        b.push_slot::<i64>(slot(3), uncompressed as i64, 0);
        b.push_slot::<i64>(slot(2), base.compressed_size as i64, 0);
        b.push_slot_always(slot(5), ci);
        b.push_slot_always(slot(4), toc);
        b.end_table(t)
    };
    b.finish_minimal(root);
    b.finished_data().to_vec()
}

#[test]
fn a_name_shared_by_many_entries_is_refused_before_it_is_copied() {
    let (_, base) = sample();
    // ~150 KB of zTOC naming 2,000 x 60 KiB = 120 MB of names.
    let bytes = hostile_ztoc(&base, Entries::SharedName(2000), 60 << 10);
    assert!(bytes.len() < 200_000, "{}", bytes.len());
    let err = format::decode(&bytes).unwrap_err();
    assert!(
        matches!(err, ZtocError::Malformed(_)) && err.to_string().contains("twice its size"),
        "{err}"
    );
    // The same with few enough entries is a valid zTOC: the budget is what refused it.
    let ok = hostile_ztoc(&base, Entries::SharedName(3), 60 << 10);
    assert_eq!(format::decode(&ok).unwrap().entries.len(), 3);
}

#[test]
fn the_issues_five_megabyte_ztoc_is_refused_at_once() {
    let (_, base) = sample();
    // One 60 KiB-named table listed 1.2 million times: 72 GB if expanded.
    let bytes = hostile_ztoc(&base, Entries::OneTable(1_200_000), 60 << 10);
    assert!(bytes.len() < 6 << 20, "{}", bytes.len());
    let t = Instant::now();
    let err = format::decode(&bytes).unwrap_err();
    assert!(err.to_string().contains("overlaps"), "{err}");
    assert!(t.elapsed().as_secs() < 5, "{:?}", t.elapsed());
}

#[test]
fn long_names_and_too_many_entries_are_refused() {
    let (_, base) = sample();
    let err = format::decode(&hostile_ztoc(&base, Entries::SharedName(1), 100 << 10)).unwrap_err();
    assert!(err.to_string().contains("name of 102400 bytes"), "{err}");

    let err = format::decode(&hostile_ztoc(
        &base,
        Entries::OneTable(ztoc::MAX_ENTRIES + 1),
        1,
    ))
    .unwrap_err();
    assert!(err.to_string().contains("entries, more than"), "{err}");

    // The same bounds hold for a zTOC made in memory (as the builder makes them).
    let mut z = base.clone();
    z.entries[1].linkname = vec![b'l'; ztoc::MAX_NAME_BYTES + 1];
    let err = z.validate().unwrap_err();
    assert!(err.to_string().contains("link target of"), "{err}");
    let mut z = base;
    z.entries[1].pax = vec![(b"SCHILY.xattr.user.big".to_vec(), vec![0; 2 << 20])];
    let err = z.validate().unwrap_err();
    assert!(err.to_string().contains("PAX"), "{err}");
}

#[test]
fn a_span_that_inflates_past_the_bound_is_refused() {
    let (_, mut z) = sample();
    // The last span now claims to run to 100 MiB: reading it would inflate that much.
    z.uncompressed_size = 100 << 20;
    let err = format::decode(&format::encode(&z).unwrap()).unwrap_err();
    assert!(err.to_string().contains("inflates to"), "{err}");
}

#[test]
fn the_builder_refuses_span_sizes_it_could_not_read_back() {
    let (blob, _) = sample();
    let err = ztoc::build(&blob[..], &opts(1 << 30), &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("span size 1073741824"), "{err}");
    ztoc::build(&blob[..], &opts(ztoc::MAX_BUILD_SPAN_SIZE), &mut |_| {}).unwrap();
}

/// A blob that counts the ranges read from it.
struct Counting {
    blob: Vec<u8>,
    reads: AtomicUsize,
}

impl BlobSource for Counting {
    fn read_range(&self, range: Range<u64>) -> std::io::Result<Vec<u8>> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.blob.read_range(range)
    }
}

#[test]
fn a_span_read_in_many_pieces_is_inflated_once() {
    let mut t = TarWriter::new();
    let data = text_bytes(24 << 20, 3);
    t.file("./big", &data);
    let blob = gzip(&t.finish().0, 1, 1);
    let z = ztoc::build(&blob[..], &opts(ztoc::MAX_BUILD_SPAN_SIZE), &mut |_| {}).unwrap();
    assert_eq!(z.span_count(), 1);
    let i = z.find(b"big").unwrap();
    let source = Arc::new(Counting {
        blob,
        reads: AtomicUsize::new(0),
    });
    // No inflated-span cache: each read inflates what it needs, continuing the last read.
    let reader = LayerReader::new(Arc::new(z), source.clone());
    let mut got = Vec::with_capacity(data.len());
    let mut chunk = vec![0u8; 64 << 10];
    let t = Instant::now();
    loop {
        let n = reader.read_entry(i, got.len() as u64, &mut chunk).unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
    }
    assert!(got == data, "wrong bytes");
    assert_eq!(source.reads.load(Ordering::Relaxed), 1);
    assert!(t.elapsed().as_secs() < 10, "{:?}", t.elapsed());

    // Reading backwards starts again from the checkpoint, and is still right.
    let mut back = vec![0u8; 1000];
    reader.read_entry(i, 5000, &mut back).unwrap();
    assert_eq!(back, data[5000..6000]);
    assert_eq!(source.reads.load(Ordering::Relaxed), 2);
}
