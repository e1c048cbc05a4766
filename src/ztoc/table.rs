//! The split form of a zTOC, which `convert` writes beside the zTOC itself so that a lazy start
//! fetches only what it reads: a compact **table** (the zTOC with each 32 KiB checkpoint window
//! replaced by a reference; gzip-compressed; fetched at lookup) and a **windows** blob (every
//! window, raw-deflated, back to back; each fetched by range when its span is first read).
//!
//! Trust: the table is named by digest in the SOCI index, like the zTOC; it carries the sha256
//! of every compressed window, so a window fetched alone is verified before it is used. The
//! zTOC stays the authority for upstream tools; a table holds the same entries, span digests
//! and checkpoints (in, out, bits) as the zTOC it was made from.
//!
//! Table checkpoints layout (little-endian, in the zTOC's `checkpoints` field):
//! `"SSTBLWR1"`, `i32 count`, `i64 span_size`, then per checkpoint
//! `i64 in, i64 out, u8 bits, u64 window offset, u32 window length, [32] window sha256`.

use std::io::{Read, Write};

use sha2::{Digest, Sha256};

use super::format::{decode_with, encode_with};
use super::{Checkpoint, Compression, Window, WindowRef, Ztoc, ZtocError, WINDOW_SIZE};

type Result<T> = std::result::Result<T, ZtocError>;

const MAGIC: &[u8; 8] = b"SSTBLWR1";
const HEADER_LEN: usize = 8 + 4 + 8;
const RECORD_LEN: usize = 8 + 8 + 1 + 8 + 4 + 32;
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

/// Splits a zTOC whose windows are inline (as built or decoded).
pub fn split(z: &Ztoc) -> Result<Split> {
    let mut windows = Vec::new();
    let blob = match &z.compression {
        Compression::Uncompressed { .. } => None,
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
                let w = c
                    .window
                    .inline()
                    .ok_or_else(|| ZtocError::Invalid("windows are already stored apart".into()))?;
                let mut enc = flate2::write::DeflateEncoder::new(
                    Vec::with_capacity(WINDOW_SIZE / 2),
                    flate2::Compression::default(),
                );
                enc.write_all(w)?;
                let packed = enc.finish()?;
                blob.extend_from_slice(&(c.input as i64).to_le_bytes());
                blob.extend_from_slice(&(c.output as i64).to_le_bytes());
                blob.push(c.bits);
                blob.extend_from_slice(&(windows.len() as u64).to_le_bytes());
                blob.extend_from_slice(&(packed.len() as u32).to_le_bytes());
                blob.extend_from_slice(&Sha256::digest(&packed));
                windows.extend_from_slice(&packed);
            }
            Some(blob)
        }
    };
    let raw = match blob {
        Some(b) => encode_with(z, &b),
        None => super::format::encode(z)?,
    };
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw)?;
    Ok(Split {
        table: gz.finish()?,
        windows,
    })
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
    if blob.len() < HEADER_LEN || &blob[..8] != MAGIC {
        return Err(malformed("no window references"));
    }
    let count = i32::from_le_bytes(blob[8..12].try_into().expect("4 bytes"));
    let span_size = i64::from_le_bytes(blob[12..20].try_into().expect("8 bytes"));
    let body = &blob[HEADER_LEN..];
    if count < 1 || body.len() != count as usize * RECORD_LEN {
        return Err(malformed(format!(
            "{} bytes of window references for {count} checkpoints",
            body.len()
        )));
    }
    let span_size =
        u64::try_from(span_size).map_err(|_| malformed(format!("span size {span_size}")))?;
    let i64_at = |r: &[u8], at: usize| i64::from_le_bytes(r[at..at + 8].try_into().expect("8"));
    let mut out = Vec::with_capacity(count as usize);
    for (i, r) in body.chunks_exact(RECORD_LEN).enumerate() {
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
