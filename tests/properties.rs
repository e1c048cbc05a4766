//! Property tests: random layers, span sizes and read ranges read exactly what a full
//! decompression gives; arbitrary and mutated bytes never make the parsers panic.

mod common;

use std::sync::Arc;

use common::*;
use proptest::prelude::*;
use soci_store::ztoc::{self, format, BuildOptions, LayerReader};

#[derive(Debug, Clone)]
struct FileGen {
    size: usize,
    kind: u8,
    seed: u64,
}

fn file_gen() -> impl Strategy<Value = FileGen> {
    (0usize..120_000, 0u8..3, any::<u64>()).prop_map(|(size, kind, seed)| FileGen {
        size,
        kind,
        seed,
    })
}

fn make_tar(files: &[FileGen]) -> Vec<u8> {
    let mut t = TarWriter::new();
    for (i, f) in files.iter().enumerate() {
        let data = match f.kind {
            0 => random_bytes(f.size, f.seed),
            1 => text_bytes(f.size, f.seed),
            _ => vec![0u8; f.size],
        };
        t.file(&format!("./f{i}"), &data);
    }
    t.finish().0
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_reads_equal_full_decompression(
        files in prop::collection::vec(file_gen(), 1..12),
        level in 0u32..10,
        members in 1usize..4,
        plain in any::<bool>(),
        span_size in prop::sample::select(vec![4096u64, 20_000, 65_536, 1 << 20]),
        ranges in prop::collection::vec((any::<prop::sample::Index>(), 0usize..300_000), 1..16),
    ) {
        let tar = make_tar(&files);
        let blob = if plain { tar.clone() } else { gzip(&tar, level, members) };
        let opts = BuildOptions { span_size, min_layer_size: 0, ..Default::default() };
        let z = ztoc::build(&blob[..], &opts, &mut |_| {}).unwrap();
        let size = z.uncompressed_size as usize;
        prop_assert!(size <= tar.len());
        let cached = LayerReader::new(Arc::new(z.clone()), blob.clone()).with_span_cache(2);
        let reader = LayerReader::new(Arc::new(z), blob);
        for (start, len) in ranges {
            let start = start.index(size);
            let end = (start + len).min(size);
            let mut buf = vec![0u8; end - start];
            prop_assert_eq!(reader.read_at(start as u64, &mut buf).unwrap(), end - start);
            prop_assert!(buf == tar[start..end], "range {}..{}", start, end);
            let mut buf2 = vec![0u8; end - start];
            cached.read_at(start as u64, &mut buf2).unwrap();
            prop_assert!(buf2 == buf);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_ztoc_parser(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = format::decode(&bytes);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_checkpoint_parser(bytes in prop::collection::vec(any::<u8>(), 0..70_000)) {
        let _ = format::decode_checkpoints(&bytes);
    }

    #[test]
    fn arbitrary_bytes_never_panic_the_builder(bytes in prop::collection::vec(any::<u8>(), 0..8192), gz in any::<bool>()) {
        let blob = if gz { gzip(&bytes, 6, 1) } else { bytes };
        let opts = BuildOptions { span_size: 1024, min_layer_size: 0, ..Default::default() };
        let _ = ztoc::build(&blob[..], &opts, &mut |_| {});
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Flipped bytes in a real zTOC: decoding fails cleanly or yields a zTOC whose reads fail
    /// cleanly or return bytes that the verified spans really hold.
    #[test]
    fn mutated_ztocs_never_panic(
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255, any::<bool>()), 1..6),
    ) {
        let (tar, blob, bytes) = mutation_base();
        let mut bad = bytes.clone();
        let len = bad.len();
        // The writer puts the file table last; aim half of the flips there.
        let table = len.min(24 * 1024);
        for (at, x, in_table) in flips {
            let pos = if in_table { len - table + at.index(table) } else { at.index(len) };
            bad[pos] ^= x;
        }
        if let Ok(z) = format::decode(&bad) {
            let reader = LayerReader::new(Arc::new(z), blob.clone());
            for i in 0..reader.ztoc().entries.len() {
                let _ = reader.read_file(i);
            }
            let size = reader.ztoc().uncompressed_size.min(tar.len() as u64);
            let mut buf = vec![0u8; 4096];
            let _ = reader.read_at(size / 2, &mut buf);
        }
    }
}

fn mutation_base() -> &'static (Vec<u8>, Vec<u8>, Vec<u8>) {
    static BASE: std::sync::OnceLock<(Vec<u8>, Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
    BASE.get_or_init(|| {
        let (tar, _) = edge_layer(20_000);
        let blob = gzip(&tar, 6, 2);
        let opts = BuildOptions {
            span_size: 16 << 10,
            min_layer_size: 0,
            ..Default::default()
        };
        let z = ztoc::build(&blob[..], &opts, &mut |_| {}).unwrap();
        // Keep the buffer small so that flips land in the table, not only in the windows.
        (tar, blob, format::encode(&z).unwrap())
    })
}
