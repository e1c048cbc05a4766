//! A zstd:chunked layer as the file table the store serves layers from: entries placed in the
//! tar by the layer's tar-split data (verified against the TOC), one span per chunk.

use serde::Deserialize;

use super::{
    decompress, ChunkedError, ChunkedLayer, File, FileKind, Result, Toc, MAX_ENTRIES, MAX_TOC_BYTES,
};
use crate::digest::Digest;

/// Where the tar the layer decompresses to puts each entry's data, and its size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TarLayout {
    /// Every entry's name and data offset, in tar order.
    pub entries: Vec<(String, u64)>,
    pub size: u64,
}

#[derive(Deserialize)]
struct TarSplitLine {
    #[serde(rename = "type")]
    kind: u8,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    size: Option<i64>,
    #[serde(default)]
    payload: Option<String>,
}

/// Lays the tar out from its tar-split data (compressed, at the layer's tar-split position):
/// checked against the TOC's `tarSplitDigest` before it is decompressed.
pub fn tar_layout(layer: &ChunkedLayer, toc: &Toc, compressed: &[u8]) -> Result<TarLayout> {
    use base64::Engine;
    let bad = |why: String| ChunkedError::Toc(format!("tar-split data: {why}"));
    let pos = layer
        .tar_split
        .as_ref()
        .ok_or_else(|| bad("the layer has no tar-split position annotation".into()))?;
    let expected = toc
        .tar_split_digest
        .as_deref()
        .ok_or_else(|| bad("the TOC names no tar-split digest".into()))?;
    let expected = Digest::parse(expected).map_err(|e| bad(e.to_string()))?;
    let got = Digest::of(compressed);
    if got != expected {
        return Err(bad(format!("{got} does not match the TOC's {expected}")));
    }
    if pos.uncompressed > MAX_TOC_BYTES {
        return Err(bad(format!(
            "{} bytes (at most {MAX_TOC_BYTES})",
            pos.uncompressed
        )));
    }
    let text = decompress(compressed, pos.uncompressed).map_err(bad)?;
    let mut layout = TarLayout {
        entries: Vec::new(),
        size: 0,
    };
    for line in text.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        let l: TarSplitLine = serde_json::from_slice(line).map_err(|e| bad(e.to_string()))?;
        match l.kind {
            // A file entry: its data comes next in the tar.
            1 => {
                let name = l
                    .name
                    .ok_or_else(|| bad("a file entry without a name".into()))?;
                let size = u64::try_from(l.size.unwrap_or(0))
                    .map_err(|_| bad(format!("{name}: negative size")))?;
                if layout.entries.len() >= MAX_ENTRIES {
                    return Err(bad(format!("more than {MAX_ENTRIES} entries")));
                }
                layout.entries.push((name, layout.size));
                layout.size = layout.size.saturating_add(size);
            }
            // Raw tar bytes (headers, padding, end blocks).
            2 => {
                let raw = base64::engine::general_purpose::STANDARD
                    .decode(l.payload.unwrap_or_default())
                    .map_err(|e| bad(e.to_string()))?;
                layout.size = layout.size.saturating_add(raw.len() as u64);
            }
            other => return Err(bad(format!("entry type {other}"))),
        }
    }
    Ok(layout)
}

/// The file table of a zstd:chunked layer of `blob_size` bytes, as a zTOC whose spans are its
/// chunks ([`crate::ztoc::Compression::ZstdChunked`]); validated.
pub fn to_ztoc(
    files: &[File],
    layout: &TarLayout,
    blob_size: u64,
) -> std::result::Result<crate::ztoc::Ztoc, crate::ztoc::ZtocError> {
    use crate::ztoc::{ChunkSpan, Compression, Entry, EntryType, Ztoc, ZtocError, XATTR_PREFIX};
    if files.len() != layout.entries.len() {
        return Err(ZtocError::Invalid(format!(
            "the TOC lists {} entries, the tar-split data {}",
            files.len(),
            layout.entries.len()
        )));
    }
    let mut entries = Vec::with_capacity(files.len());
    let mut spans = Vec::new();
    let mut digests = Vec::new();
    let mut largest = 1u64;
    for (f, (name, offset)) in files.iter().zip(&layout.entries) {
        if *name != f.name {
            return Err(ZtocError::Invalid(format!(
                "the TOC lists {:?} where the tar-split data has {name:?}",
                f.name
            )));
        }
        let kind = match f.kind {
            FileKind::Reg => EntryType::Reg,
            FileKind::Dir => EntryType::Dir,
            FileKind::Symlink => EntryType::Symlink,
            FileKind::Hardlink => EntryType::Hardlink,
            FileKind::Char => EntryType::Char,
            FileKind::Block => EntryType::Block,
            FileKind::Fifo => EntryType::Fifo,
        };
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = f
            .xattrs
            .iter()
            .map(|(k, v)| ([XATTR_PREFIX, k.as_bytes()].concat(), v.clone()))
            .collect();
        pax.sort();
        entries.push(Entry {
            name: f.name.as_bytes().to_vec(),
            kind,
            offset: *offset,
            size: f.size,
            linkname: f.link_name.as_bytes().to_vec(),
            mode: i64::from(f.mode),
            uid: f.uid,
            gid: f.gid,
            uname: Vec::new(),
            gname: Vec::new(),
            mod_time: f.modtime.clone().unwrap_or_default().into_bytes(),
            devmajor: i64::from(f.dev_major),
            devminor: i64::from(f.dev_minor),
            pax,
        });
        for c in &f.chunks {
            let start = offset + c.file_offset;
            spans.push(ChunkSpan {
                compressed: c.compressed.clone(),
                uncompressed: start..start + c.size,
            });
            let mut d = [0u8; 32];
            hex::decode_to_slice(c.digest.hex(), &mut d)
                .map_err(|e| ZtocError::Invalid(format!("chunk digest: {e}")))?;
            digests.push(d);
            largest = largest.max(c.size);
        }
    }
    let z = Ztoc {
        version: b"zstd:chunked".to_vec(),
        build_tool: b"podman".to_vec(),
        compressed_size: blob_size,
        uncompressed_size: layout.size,
        entries,
        span_size: largest,
        span_digests: digests,
        compression: Compression::ZstdChunked { spans },
    };
    z.validate()?;
    Ok(z)
}
