//! The split form of a zTOC, which `convert` writes beside the zTOC itself so that a lazy start
//! fetches only what it reads: a compact **table** (the zTOC with each 32 KiB checkpoint window
//! replaced by a reference; gzip-compressed; fetched at lookup) and a **windows** blob (every
//! window, raw-deflated, back to back; each fetched by range when its span is first read).
//!
//! Trust: the table is named by digest in the SOCI index, like the zTOC; it carries the sha256
//! of every compressed window and of every span, so a window or span fetched alone is verified
//! before it is used. The zTOC stays the authority for upstream tools; a table holds the same
//! entries as the zTOC it was made with, and its checkpoints include the zTOC's.
//!
//! A table may have **more checkpoints than its zTOC** (`convert --table-span-size`; by default
//! [`TABLE_SPAN_SIZE`], the zTOC's): a start then fetches smaller spans, and the upstream-form zTOC does
//! not grow with them (its windows are inline; the table's are fetched only when needed, and a
//! span's window is derived from the span before it when that one is at hand). Each checkpoint
//! says whether it also starts a span of the zTOC, so that SOCI prefetch artifacts, which name
//! zTOC spans, map onto the table's ([`ztoc_span_starts`]).
//!
//! Table checkpoints layout (little-endian, in the zTOC's `checkpoints` field):
//! `"SSTBLWR2"`, `i32 count`, `i64 span_size`, then per checkpoint
//! `i64 in, i64 out, u8 bits, u64 window offset, u32 window length, [32] window sha256,
//! u8 flags` (bit 0: the checkpoint starts a zTOC span). Version 1 (`"SSTBLWR1"`, no flags byte,
//! every checkpoint a zTOC one) is still read.

use std::io::{Read, Write};

use sha2::{Digest, Sha256};

use super::format::{decode_with, encode_with};
use super::{Checkpoint, Compression, Window, WindowRef, Ztoc, ZtocError, WINDOW_SIZE};

type Result<T> = std::result::Result<T, ZtocError>;

const MAGIC_V1: &[u8; 8] = b"SSTBLWR1";
const MAGIC: &[u8; 8] = b"SSTBLWR2";
const HEADER_LEN: usize = 8 + 4 + 8;
const RECORD_LEN_V1: usize = 8 + 8 + 1 + 8 + 4 + 32;
const RECORD_LEN: usize = RECORD_LEN_V1 + 1;
/// `convert`'s default span size for tables: the zTOC's. Finer tables (128 KiB) fetch ~13% less
/// for a start but take ~50% more requests, which made starts slower in docs/benchmarks.md.
pub const TABLE_SPAN_SIZE: u64 = super::DEFAULT_SPAN_SIZE;
/// Largest compressed window accepted (deflate never grows 32 KiB by more than a few bytes).
pub const MAX_WINDOW_BYTES: usize = WINDOW_SIZE + 1024;
/// Largest uncompressed table accepted: bounds what a hostile table costs to load.
pub const MAX_TABLE_BYTES: u64 = 256 << 20;

/// A zTOC in split form: the two blobs `convert` pushes.
#[derive(Debug, Clone)]
pub struct Split {
    pub table: Vec<u8>,
    /// Empty for plain tar layers (they have no windows).
    pub windows: Vec<u8>,
}

fn malformed(m: impl Into<String>) -> ZtocError {
    ZtocError::Malformed(format!("zTOC table: {}", m.into()))
}

/// Deflates `window` onto the end of `windows` and returns its reference.
pub fn pack_window(
    window: &[u8],
    windows: &mut Vec<u8>,
    starts_ztoc_span: bool,
) -> Result<WindowRef> {
    let mut enc = flate2::write::DeflateEncoder::new(
        Vec::with_capacity(WINDOW_SIZE / 2),
        flate2::Compression::default(),
    );
    enc.write_all(window)?;
    let packed = enc.finish()?;
    let r = WindowRef {
        offset: windows.len() as u64,
        len: packed.len() as u32,
        digest: Sha256::digest(&packed).into(),
        starts_ztoc_span,
    };
    windows.extend_from_slice(&packed);
    Ok(r)
}

/// Splits a zTOC whose windows are inline (as built or decoded): a table with the zTOC's own
/// spans.
pub fn split(z: &Ztoc) -> Result<Split> {
    let mut windows = Vec::new();
    let mut t = z.clone();
    match &mut t.compression {
        Compression::Uncompressed { .. } => {}
        Compression::ZstdChunked { .. } => {
            return Err(ZtocError::Invalid(
                "a zstd:chunked layer's file table has no table form".into(),
            ))
        }
        Compression::Gzip { checkpoints } => {
            for c in checkpoints {
                let w = c
                    .window
                    .inline()
                    .ok_or_else(|| ZtocError::Invalid("windows are already stored apart".into()))?;
                c.window = Window::Remote(pack_window(w, &mut windows, true)?);
            }
        }
    }
    Ok(Split {
        table: encode(&t)?,
        windows,
    })
}

/// Encodes a table: a zTOC whose windows are references (gzip layers) or a plain tar zTOC.
pub fn encode(z: &Ztoc) -> Result<Vec<u8>> {
    let raw = match &z.compression {
        Compression::Uncompressed { .. } => super::format::encode(z)?,
        Compression::ZstdChunked { .. } => {
            return Err(ZtocError::Invalid(
                "a zstd:chunked layer's file table has no table form".into(),
            ))
        }
        Compression::Gzip { checkpoints } => {
            let mut blob = Vec::with_capacity(HEADER_LEN + checkpoints.len() * RECORD_LEN);
            blob.extend_from_slice(MAGIC);
            blob.extend_from_slice(&(checkpoints.len() as i32).to_le_bytes());
            blob.extend_from_slice(&(z.span_size as i64).to_le_bytes());
            for c in checkpoints {
                let Window::Remote(r) = &c.window else {
                    return Err(ZtocError::Invalid(
                        "a table's windows must be stored apart".into(),
                    ));
                };
                blob.extend_from_slice(&(c.input as i64).to_le_bytes());
                blob.extend_from_slice(&(c.output as i64).to_le_bytes());
                blob.push(c.bits);
                blob.extend_from_slice(&r.offset.to_le_bytes());
                blob.extend_from_slice(&r.len.to_le_bytes());
                blob.extend_from_slice(&r.digest);
                blob.push(u8::from(r.starts_ztoc_span));
            }
            encode_with(z, &blob)
        }
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw)?;
    Ok(gz.finish()?)
}

/// For each span of the zTOC a table was made with, the first of the table's spans that hold
/// it (tables may split zTOC spans further; see the module docs). Plain tar tables and version
/// 1 tables have the zTOC's spans.
pub fn ztoc_span_starts(t: &Ztoc) -> Vec<usize> {
    match &t.compression {
        Compression::Gzip { checkpoints } => checkpoints
            .iter()
            .enumerate()
            .filter(|(_, c)| match &c.window {
                Window::Remote(r) => r.starts_ztoc_span,
                Window::Inline(_) => true,
            })
            .map(|(i, _)| i)
            .collect(),
        _ => (0..t.span_count()).collect(),
    }
}

/// Loads a table (the gzip-compressed blob): a validated zTOC whose windows are references.
pub fn decode_table(table: &[u8]) -> Result<Ztoc> {
    let mut raw = Vec::new();
    flate2::read::GzDecoder::new(table)
        .take(MAX_TABLE_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(|e| malformed(format!("not gzip: {e}")))?;
    if raw.len() as u64 > MAX_TABLE_BYTES {
        return Err(malformed(format!(
            "more than {MAX_TABLE_BYTES} bytes uncompressed"
        )));
    }
    decode_with(&raw, decode_refs)
}

fn decode_refs(blob: &[u8]) -> Result<(u64, Vec<Checkpoint>)> {
    let record_len = match blob.get(..8) {
        Some(m) if m == MAGIC => RECORD_LEN,
        Some(m) if m == MAGIC_V1 => RECORD_LEN_V1,
        _ => return Err(malformed("no window references")),
    };
    if blob.len() < HEADER_LEN {
        return Err(malformed("no window references"));
    }
    let count = i32::from_le_bytes(blob[8..12].try_into().expect("4 bytes"));
    let span_size = i64::from_le_bytes(blob[12..20].try_into().expect("8 bytes"));
    let body = &blob[HEADER_LEN..];
    if count < 1 || body.len() != count as usize * record_len {
        return Err(malformed(format!(
            "{} bytes of window references for {count} checkpoints",
            body.len()
        )));
    }
    let span_size =
        u64::try_from(span_size).map_err(|_| malformed(format!("span size {span_size}")))?;
    let i64_at = |r: &[u8], at: usize| i64::from_le_bytes(r[at..at + 8].try_into().expect("8"));
    let mut out = Vec::with_capacity(count as usize);
    for (i, r) in body.chunks_exact(record_len).enumerate() {
        let (input, output) = (i64_at(r, 0), i64_at(r, 8));
        let offset = u64::from_le_bytes(r[17..25].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(r[25..29].try_into().expect("4 bytes"));
        if input < 0 || output < 0 || offset.checked_add(u64::from(len)).is_none() {
            return Err(malformed(format!("checkpoint {i} is out of range")));
        }
        out.push(Checkpoint {
            input: input as u64,
            output: output as u64,
            bits: r[16],
            window: Window::Remote(WindowRef {
                offset,
                len,
                digest: r[29..61].try_into().expect("32 bytes"),
                starts_ztoc_span: record_len == RECORD_LEN_V1 || r[61] & 1 != 0,
            }),
        });
    }
    Ok((span_size, out))
}

/// Checks a fetched window against its reference and inflates it: exactly 32 KiB or an error.
pub fn open_window(r: &WindowRef, compressed: &[u8]) -> Result<Box<[u8]>> {
    let actual: [u8; 32] = Sha256::digest(compressed).into();
    if compressed.len() != r.len as usize || actual != r.digest {
        return Err(ZtocError::CorruptLayer(format!(
            "window at {} failed verification: expected sha256:{}, got sha256:{}",
            r.offset,
            hex::encode(r.digest),
            hex::encode(actual)
        )));
    }
    let mut w = Vec::with_capacity(WINDOW_SIZE);
    flate2::read::DeflateDecoder::new(compressed)
        .take(WINDOW_SIZE as u64 + 1)
        .read_to_end(&mut w)
        .map_err(|e| ZtocError::CorruptLayer(format!("window at {}: {e}", r.offset)))?;
    if w.len() != WINDOW_SIZE {
        return Err(ZtocError::CorruptLayer(format!(
            "window at {} inflates to {} bytes",
            r.offset,
            w.len()
        )));
    }
    Ok(w.into_boxed_slice())
}
