//! The split form of a zTOC (`ztoc::table`): a table plus a windows blob reads every file exactly
//! as the zTOC does; a window or table that was tampered with is refused, never used.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::*;
use soci_store::ztoc::reader::{BlobSource, SpanSource};
use soci_store::ztoc::{table, Compression, LayerReader, Window, Ztoc, ZtocError};

/// A layer in memory with its windows blob: what the store reads through its fetchers.
struct Split {
    blob: Vec<u8>,
    windows: Vec<u8>,
}

impl SpanSource for Split {
    fn span_bytes(&self, ztoc: &Ztoc, id: usize) -> Result<Bytes, ZtocError> {
        self.blob.span_bytes(ztoc, id)
    }

    fn window(&self, ztoc: &Ztoc, id: usize) -> Result<Bytes, ZtocError> {
        let Compression::Gzip { checkpoints } = &ztoc.compression else {
            unreachable!("gzip layer")
        };
        let Window::Remote(r) = &checkpoints[id].window else {
            panic!("window {id} is inline in a table")
        };
        let bytes = self
            .windows
            .read_range(r.offset..r.offset + u64::from(r.len))?;
        Ok(table::open_window(r, &bytes)?.into_vec().into())
    }
}

#[test]
fn a_table_and_its_windows_read_every_file_like_the_ztoc() {
    let (_tar, gz, z, expected) = test_layer();
    let split = table::split(&z).unwrap();
    let t = table::decode_table(&split.table).unwrap();
    assert_eq!(t.entries, z.entries);
    assert_eq!(t.span_digests, z.span_digests);
    let (Compression::Gzip { checkpoints: a }, Compression::Gzip { checkpoints: b }) =
        (&z.compression, &t.compression)
    else {
        panic!("gzip")
    };
    assert!(a.len() > 4, "several spans");
    for (x, y) in a.iter().zip(b) {
        assert_eq!((x.input, x.output, x.bits), (y.input, y.output, y.bits));
        assert!(y.window.inline().is_none());
    }
    // The table is a small fraction of the zTOC: windows dominate a zTOC.
    let full = soci_store::ztoc::format::encode(&z).unwrap();
    assert!(
        split.table.len() * 4 < full.len(),
        "{} vs {}",
        split.table.len(),
        full.len()
    );
    // A table cannot be written back as a zTOC: its windows are elsewhere.
    assert!(soci_store::ztoc::format::encode(&t).is_err());

    let reader = LayerReader::new(
        Arc::new(t),
        Split {
            blob: gz.clone(),
            windows: split.windows.clone(),
        },
    );
    for e in &expected {
        let idx = z.find(&e.name).unwrap();
        assert_eq!(reader.read_file(idx).unwrap(), e.data, "{:?}", e.name);
    }
}

#[test]
fn a_tampered_window_or_table_is_refused() {
    let (_tar, gz, z, expected) = test_layer();
    let split = table::split(&z).unwrap();
    let t = Arc::new(table::decode_table(&split.table).unwrap());
    let big = expected.iter().max_by_key(|e| e.data.len()).unwrap();
    let idx = z.find(&big.name).unwrap();
    // Every byte of one window altered in turn would be slow; a few positions cover header,
    // middle and end of the compressed window of span 1.
    let Compression::Gzip { checkpoints } = &t.compression else {
        panic!("gzip")
    };
    let Window::Remote(r) = &checkpoints[1].window else {
        panic!("remote")
    };
    for pos in [
        r.offset,
        r.offset + u64::from(r.len) / 2,
        r.offset + u64::from(r.len) - 1,
    ] {
        let mut windows = split.windows.clone();
        windows[pos as usize] ^= 0x40;
        let reader = LayerReader::new(
            t.clone(),
            Split {
                blob: gz.clone(),
                windows,
            },
        );
        let got = reader.read_file(idx);
        assert!(
            matches!(got, Err(ZtocError::CorruptLayer(ref m)) if m.contains("verification")),
            "{got:?}"
        );
    }
    // A corrupt or truncated table does not load.
    let mut bad = split.table.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    assert!(table::decode_table(&bad).is_err());
    assert!(table::decode_table(&split.table[..split.table.len() - 9]).is_err());
    // A zTOC is not a table.
    assert!(table::decode_table(&soci_store::ztoc::format::encode(&z).unwrap()).is_err());
}

/// `build_with_table` makes, in the same pass, a table with finer spans than the zTOC: the zTOC
/// is exactly what `build` makes (upstream tools see no difference), the table's checkpoints
/// include every zTOC checkpoint (flagged, so prefetch artifacts map onto table spans), its span
/// digests verify against the layer, and it reads every file like the zTOC.
#[test]
fn a_finer_table_is_built_beside_the_same_ztoc() {
    let (_tar, gz, z, expected) = test_layer();
    let opts = soci_store::ztoc::BuildOptions {
        span_size: z.span_size,
        min_layer_size: 0,
        ..Default::default()
    };
    let (z2, split) = soci_store::ztoc::builder::build_with_table(
        &gz[..],
        &opts,
        Some(z.span_size / 4),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(z2, z, "the zTOC does not change with a table beside it");
    let t = table::decode_table(&split.as_ref().unwrap().table).unwrap();
    let windows = split.unwrap().windows;
    assert_eq!(t.entries, z.entries);
    assert_eq!(t.span_size, z.span_size / 4);
    assert!(
        t.span_count() > 2 * z.span_count(),
        "{} table spans for {} zTOC spans",
        t.span_count(),
        z.span_count()
    );
    // Every zTOC checkpoint is a table checkpoint, and the flags say which.
    let (Compression::Gzip { checkpoints: zc }, Compression::Gzip { checkpoints: tc }) =
        (&z.compression, &t.compression)
    else {
        panic!("gzip")
    };
    let starts = table::ztoc_span_starts(&t);
    assert_eq!(starts.len(), zc.len());
    for (j, &i) in starts.iter().enumerate() {
        assert_eq!(
            (tc[i].input, tc[i].output, tc[i].bits),
            (zc[j].input, zc[j].output, zc[j].bits)
        );
    }
    for id in 0..t.span_count() {
        let c = t.span(id).compressed;
        soci_store::ztoc::reader::verify_span(&t, id, &gz[c.start as usize..c.end as usize])
            .unwrap();
    }
    let reader = LayerReader::new(
        Arc::new(t),
        Split {
            blob: gz.clone(),
            windows,
        },
    );
    for e in &expected {
        let idx = z.find(&e.name).unwrap();
        assert_eq!(reader.read_file(idx).unwrap(), e.data, "{:?}", e.name);
    }
}
