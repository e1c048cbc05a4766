//! Writing a layer as zstd:chunked, the way podman lays it out: the tar's headers and padding in
//! frames of their own, each file's data in frames of at most [`CHUNK_BYTES`], then skippable
//! frames with the TOC, the tar-split data and the footer. The blob decompresses to the same
//! tar, so the layer's diff ID does not change (its digest does).

use std::collections::BTreeMap;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};

use base64::Engine;
use serde_json::json;

use super::{ANN_TARSPLIT_POSITION, ANN_TOC_DIGEST, ANN_TOC_POSITION, TOC_TYPE_CRFS};
use crate::digest::Digest;
use crate::ztoc::{BuildOptions, EntryType};

/// Largest chunk of a file's data in one frame.
pub const CHUNK_BYTES: u64 = 512 << 10;
/// `zstd_chunked` footer magic ("GNUlInUx").
const FOOTER_MAGIC: &[u8; 8] = b"GNUlInUx";
/// zstd's skippable frame magic (the first of the 16 such numbers), little-endian.
const SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];

/// Why a layer could not be written as zstd:chunked.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("reading the tar: {0}")]
    Tar(#[from] crate::ztoc::ZtocError),
    #[error("{0:?}: zstd:chunked names must be UTF-8")]
    Name(String),
}

/// What was written: the blob's size, digest, and the layer annotations that locate its TOC.
#[derive(Debug)]
pub struct Written {
    pub size: u64,
    pub digest: Digest,
    pub annotations: BTreeMap<String, String>,
}

/// Counts and hashes what goes to the blob.
struct Counting<W> {
    out: W,
    at: u64,
    hash: sha2::Sha256,
}

impl<W: Write> Counting<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use sha2::Digest as _;
        self.out.write_all(bytes)?;
        self.hash.update(bytes);
        self.at += bytes.len() as u64;
        Ok(())
    }

    /// One zstd frame of `bytes`; its range in the blob.
    fn frame(&mut self, bytes: &[u8], level: i32) -> std::io::Result<std::ops::Range<u64>> {
        let start = self.at;
        self.put(&zstd::bulk::compress(bytes, level)?)?;
        Ok(start..self.at)
    }

    /// A skippable frame holding `bytes`; where `bytes` start.
    fn skippable(&mut self, bytes: &[u8]) -> std::io::Result<u64> {
        let len = u32::try_from(bytes.len())
            .map_err(|_| std::io::Error::other("a skippable frame above 4 GiB"))?;
        self.put(&SKIPPABLE_MAGIC)?;
        self.put(&len.to_le_bytes())?;
        let at = self.at;
        self.put(bytes)?;
        Ok(at)
    }
}

fn utf8(b: &[u8]) -> Result<String, WriteError> {
    String::from_utf8(b.to_vec()).map_err(|_| WriteError::Name(String::from_utf8_lossy(b).into()))
}

fn sha256(data: &[u8]) -> String {
    Digest::of(data).to_string()
}

/// Writes the plain tar in `tar` as a zstd:chunked blob to `out` (zstd `level`).
pub fn write(
    tar: &mut (impl Read + Seek),
    out: impl Write,
    level: i32,
) -> Result<Written, WriteError> {
    let tar_len = tar.seek(SeekFrom::End(0))?;
    tar.seek(SeekFrom::Start(0))?;
    let opts = BuildOptions {
        min_layer_size: 0,
        ..Default::default()
    };
    let z = crate::ztoc::build(BufReader::new(&mut *tar), &opts, &mut |_| {})?;
    let mut w = Counting {
        out,
        at: 0,
        hash: Default::default(),
    };
    let mut toc = Vec::with_capacity(z.entries.len());
    let mut split = Vec::new();
    let mut pending = Vec::new();
    let mut pos = 0u64;
    let mut read = |from: u64, len: u64| -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        tar.seek(SeekFrom::Start(from))?;
        tar.read_exact(&mut buf)?;
        Ok(buf)
    };
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    for e in &z.entries {
        // The bytes before this entry's data (headers, the previous file's padding).
        let head = read(pos, e.offset - pos)?;
        split.push(json!({"type": 2, "payload": b64(&head), "position": split.len()}));
        pending.extend_from_slice(&head);
        let name = utf8(&e.name)?;
        let mut t = json!({
            "type": match e.kind {
                EntryType::Reg => "reg",
                EntryType::Dir => "dir",
                EntryType::Symlink => "symlink",
                EntryType::Hardlink => "hardlink",
                EntryType::Char => "char",
                EntryType::Block => "block",
                EntryType::Fifo => "fifo",
            },
            "name": name,
            "mode": e.mode & 0o7777,
        });
        if !e.linkname.is_empty() {
            t["linkName"] = utf8(&e.linkname)?.into();
        }
        for (k, v) in [("uid", e.uid), ("gid", e.gid)] {
            if v != 0 {
                t[k] = v.into();
            }
        }
        if !e.mod_time.is_empty() {
            t["modtime"] = utf8(&e.mod_time)?.into();
        }
        if matches!(e.kind, EntryType::Char | EntryType::Block) {
            t["devMajor"] = e.devmajor.into();
            t["devMinor"] = e.devminor.into();
        }
        let xattrs: BTreeMap<String, String> = e
            .xattrs()
            .map(|(k, v)| Ok((utf8(k)?, b64(v))))
            .collect::<Result<_, WriteError>>()?;
        if !xattrs.is_empty() {
            t["xattrs"] = json!(xattrs);
        }
        let size = e.data_len();
        let mut chunks = Vec::new();
        if e.kind == EntryType::Reg && size > 0 {
            if !pending.is_empty() {
                w.frame(&std::mem::take(&mut pending), level)?;
            }
            t["size"] = size.into();
            let data = read(e.offset, size)?;
            t["digest"] = sha256(&data).into();
            let mut first = None;
            let mut last_end = 0;
            for (k, piece) in data.chunks(CHUNK_BYTES as usize).enumerate() {
                let r = w.frame(piece, level)?;
                first.get_or_insert(r.start);
                last_end = r.end;
                if data.len() as u64 > CHUNK_BYTES {
                    chunks.push((k as u64 * CHUNK_BYTES, piece.len(), sha256(piece), r.start));
                }
            }
            t["offset"] = first.unwrap_or(0).into();
            t["endOffset"] = last_end.into();
        }
        if let Some((_, len, digest, _)) = chunks.first() {
            t["chunkSize"] = (*len).into();
            t["chunkDigest"] = digest.clone().into();
        }
        toc.push(t);
        for (offset, len, digest, at) in chunks.iter().skip(1) {
            toc.push(json!({
                "type": "chunk", "name": name, "offset": at, "chunkSize": len,
                "chunkOffset": offset, "chunkDigest": digest,
            }));
        }
        let mut file = json!({"type": 1, "name": name, "position": split.len()});
        if size > 0 {
            file["size"] = size.into();
        }
        split.push(file);
        pos = e.offset + size;
    }
    // The last padding and the end-of-archive blocks.
    let tail = read(pos, tar_len - pos)?;
    split.push(json!({"type": 2, "payload": b64(&tail), "position": split.len()}));
    pending.extend_from_slice(&tail);
    if !pending.is_empty() {
        w.frame(&pending, level)?;
    }

    let split_json: Vec<u8> = split
        .iter()
        .flat_map(|l| {
            let mut line = serde_json::to_vec(l).expect("json");
            line.push(b'\n');
            line
        })
        .collect();
    let split_z = zstd::bulk::compress(&split_json, level)?;
    let toc_json = serde_json::to_vec(&json!({
        "version": 1,
        "entries": toc,
        "tarSplitDigest": sha256(&split_z),
    }))
    .expect("json");
    let toc_z = zstd::bulk::compress(&toc_json, level)?;
    let toc_at = w.skippable(&toc_z)?;
    let split_at = w.skippable(&split_z)?;
    let mut footer = Vec::with_capacity(64);
    for v in [
        toc_at,
        toc_z.len() as u64,
        toc_json.len() as u64,
        TOC_TYPE_CRFS,
        split_at,
        split_z.len() as u64,
        split_json.len() as u64,
    ] {
        footer.extend_from_slice(&v.to_le_bytes());
    }
    footer.extend_from_slice(FOOTER_MAGIC);
    w.skippable(&footer)?;
    w.out.flush()?;
    let annotations = BTreeMap::from([
        (ANN_TOC_DIGEST.to_string(), sha256(&toc_z)),
        (
            ANN_TOC_POSITION.to_string(),
            format!(
                "{toc_at}:{}:{}:{TOC_TYPE_CRFS}",
                toc_z.len(),
                toc_json.len()
            ),
        ),
        (
            ANN_TARSPLIT_POSITION.to_string(),
            format!("{split_at}:{}:{}", split_z.len(), split_json.len()),
        ),
    ]);
    use sha2::Digest as _;
    let digest = Digest::from_sha256(w.hash.finalize().into());
    Ok(Written {
        size: w.at,
        digest,
        annotations,
    })
}
