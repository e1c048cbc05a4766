//! zstd:chunked layers (podman >= 5.1 pushes them with `--compression-format zstd:chunked`):
//! the blob is a zstd stream whose file data sit in frames of their own, followed by skippable
//! frames holding a table of contents (zstd-compressed JSON), tar-split data and a footer. The
//! layer's annotations give the TOC's digest and position, so a layer can be read file by file
//! with ranged requests. This module is the format alone (no I/O): the annotations, the TOC
//! (verified against its digest, size-bounded), the files and chunks it lists (checked for
//! consistency), and decoding one chunk (verified against its digest).
//!
//! [`table`] turns a layer's files, placed in the tar by its tar-split data ([`tar_layout`]),
//! into the file table the store serves layers from, with one span per chunk; [`write`] writes
//! a tar as zstd:chunked (`convert --zstd-chunked`).
//!
//! Limits, so that a hostile layer costs a bounded amount: [`MAX_TOC_COMPRESSED`] and
//! [`MAX_TOC_BYTES`] for the TOC and the tar-split data, [`MAX_ENTRIES`] entries,
//! [`MAX_CHUNK_BYTES`] per chunk.

use std::collections::BTreeMap;
use std::io::Read;
use std::ops::Range;

use serde::Deserialize;

use crate::digest::Digest;

/// The TOC's digest (sha256 of its compressed bytes).
pub const ANN_TOC_DIGEST: &str = "io.github.containers.zstd-chunked.manifest-checksum";
/// `offset:compressed length:uncompressed length:type` of the TOC in the blob.
pub const ANN_TOC_POSITION: &str = "io.github.containers.zstd-chunked.manifest-position";
/// `offset:compressed length:uncompressed length` of the tar-split data.
pub const ANN_TARSPLIT_POSITION: &str = "io.github.containers.zstd-chunked.tarsplit-position";
/// The only TOC type there is (a CRFS-style JSON manifest).
const TOC_TYPE_CRFS: u64 = 1;

/// Largest compressed TOC fetched.
pub const MAX_TOC_COMPRESSED: u64 = 32 << 20;
/// Largest TOC (JSON) decoded.
pub const MAX_TOC_BYTES: u64 = 256 << 20;
/// Most entries a TOC may list.
pub const MAX_ENTRIES: usize = 4 << 20;
/// Largest chunk decoded (a chunk is decoded whole to be verified); as a zTOC span.
pub mod table;
pub mod write;

pub use table::{tar_layout, to_ztoc, TarLayout};

pub const MAX_CHUNK_BYTES: u64 = crate::ztoc::MAX_SPAN_UNCOMPRESSED;

/// Why a zstd:chunked layer cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ChunkedError {
    #[error("annotation {key}: {why}")]
    Annotation { key: &'static str, why: String },
    #[error("the TOC does not match its digest {expected} (got {got})")]
    TocDigest { expected: Digest, got: Digest },
    #[error("the TOC: {0}")]
    Toc(String),
    #[error("{name}: {why}")]
    Entry { name: String, why: String },
    #[error("chunk at {offset} of {name}: {why}")]
    Chunk {
        name: String,
        offset: u64,
        why: String,
    },
}

type Result<T> = std::result::Result<T, ChunkedError>;

/// Where something lies in the blob.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    pub offset: u64,
    pub compressed: u64,
    pub uncompressed: u64,
}

impl Position {
    /// Its compressed bytes' range in the blob.
    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset + self.compressed
    }
}

/// What a layer's annotations say of its zstd:chunked TOC.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkedLayer {
    pub toc_digest: Digest,
    pub toc: Position,
    pub tar_split: Option<Position>,
}

fn parse_position(key: &'static str, value: &str, fields: usize) -> Result<Vec<u64>> {
    let bad = |why: String| ChunkedError::Annotation { key, why };
    let parts: Vec<&str> = value.split(':').collect();
    if parts.len() != fields {
        return Err(bad(format!("{value:?} has not {fields} fields")));
    }
    parts
        .iter()
        .map(|p| p.parse::<u64>().map_err(|e| bad(format!("{value:?}: {e}"))))
        .collect()
}

impl ChunkedLayer {
    /// The zstd:chunked description of a layer of `blob_size` bytes, from its annotations;
    /// None when it has none (not zstd:chunked).
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
        blob_size: u64,
    ) -> Result<Option<ChunkedLayer>> {
        let (Some(digest), Some(position)) = (
            annotations.get(ANN_TOC_DIGEST),
            annotations.get(ANN_TOC_POSITION),
        ) else {
            return Ok(None);
        };
        let toc_digest = Digest::parse(digest).map_err(|e| ChunkedError::Annotation {
            key: ANN_TOC_DIGEST,
            why: e.to_string(),
        })?;
        let p = parse_position(ANN_TOC_POSITION, position, 4)?;
        if p[3] != TOC_TYPE_CRFS {
            return Err(ChunkedError::Annotation {
                key: ANN_TOC_POSITION,
                why: format!("TOC type {} (only {TOC_TYPE_CRFS} exists)", p[3]),
            });
        }
        let toc = Position {
            offset: p[0],
            compressed: p[1],
            uncompressed: p[2],
        };
        check_within(ANN_TOC_POSITION, &toc, blob_size)?;
        if toc.compressed > MAX_TOC_COMPRESSED || toc.uncompressed > MAX_TOC_BYTES {
            return Err(ChunkedError::Annotation {
                key: ANN_TOC_POSITION,
                why: format!(
                    "a TOC of {} bytes ({} compressed) is above the limits ({MAX_TOC_BYTES}, {MAX_TOC_COMPRESSED})",
                    toc.uncompressed, toc.compressed
                ),
            });
        }
        let tar_split = match annotations.get(ANN_TARSPLIT_POSITION) {
            None => None,
            Some(v) => {
                let p = parse_position(ANN_TARSPLIT_POSITION, v, 3)?;
                let pos = Position {
                    offset: p[0],
                    compressed: p[1],
                    uncompressed: p[2],
                };
                check_within(ANN_TARSPLIT_POSITION, &pos, blob_size)?;
                Some(pos)
            }
        };
        Ok(Some(ChunkedLayer {
            toc_digest,
            toc,
            tar_split,
        }))
    }

    /// The TOC from its compressed bytes (the blob's [`Position::range`] of `self.toc`):
    /// checked against its digest before it is decompressed.
    pub fn decode_toc(&self, compressed: &[u8]) -> Result<Toc> {
        let got = Digest::of(compressed);
        if got != self.toc_digest {
            return Err(ChunkedError::TocDigest {
                expected: self.toc_digest.clone(),
                got,
            });
        }
        let json = decompress(compressed, self.toc.uncompressed)
            .map_err(|why| ChunkedError::Toc(format!("decompressing: {why}")))?;
        let toc: Toc = serde_json::from_slice(&json)
            .map_err(|e| ChunkedError::Toc(format!("not the JSON podman writes: {e}")))?;
        if toc.version != 1 {
            return Err(ChunkedError::Toc(format!("version {}", toc.version)));
        }
        if toc.entries.len() > MAX_ENTRIES {
            return Err(ChunkedError::Toc(format!(
                "{} entries (at most {MAX_ENTRIES})",
                toc.entries.len()
            )));
        }
        Ok(toc)
    }
}

fn check_within(key: &'static str, p: &Position, blob_size: u64) -> Result<()> {
    if p.offset
        .checked_add(p.compressed)
        .is_none_or(|end| end > blob_size)
    {
        return Err(ChunkedError::Annotation {
            key,
            why: format!(
                "{}+{} lies outside the {blob_size}-byte blob",
                p.offset, p.compressed
            ),
        });
    }
    Ok(())
}

/// Decompresses a zstd stream that must give exactly `size` bytes.
pub(crate) fn decompress(compressed: &[u8], size: u64) -> std::result::Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(size.min(64 << 20) as usize);
    let decoder = zstd::stream::read::Decoder::new(compressed).map_err(|e| e.to_string())?;
    decoder
        .take(size + 1)
        .read_to_end(&mut out)
        .map_err(|e| e.to_string())?;
    if out.len() as u64 != size {
        return Err(format!("{} bytes where {size} were announced", out.len()));
    }
    Ok(out)
}

/// The TOC as podman writes it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Toc {
    pub version: u64,
    #[serde(default)]
    pub entries: Vec<TocEntry>,
    #[serde(default)]
    pub tar_split_digest: Option<String>,
}

/// One TOC entry: a file, directory, link, device, or a further chunk of the file before it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TocEntry {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub link_name: String,
    #[serde(default)]
    pub mode: i64,
    #[serde(default)]
    pub size: i64,
    #[serde(default)]
    pub uid: i64,
    #[serde(default)]
    pub gid: i64,
    #[serde(default)]
    pub modtime: Option<String>,
    #[serde(default)]
    pub dev_major: i64,
    #[serde(default)]
    pub dev_minor: i64,
    /// Values base64-encoded.
    #[serde(default)]
    pub xattrs: BTreeMap<String, String>,
    #[serde(default)]
    pub digest: String,
    #[serde(default)]
    pub offset: i64,
    #[serde(default)]
    pub end_offset: i64,
    #[serde(default)]
    pub chunk_size: i64,
    #[serde(default)]
    pub chunk_offset: i64,
    #[serde(default)]
    pub chunk_digest: String,
    #[serde(default)]
    pub chunk_type: String,
}

/// A file's kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileKind {
    Reg,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

/// One zstd frame (or a run of them) holding `size` bytes of a file from `file_offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub file_offset: u64,
    pub size: u64,
    /// Its compressed bytes in the blob.
    pub compressed: Range<u64>,
    /// sha256 of its uncompressed bytes.
    pub digest: Digest,
    /// Only zeros (podman may make a hole of it).
    pub zeros: bool,
}

/// A file of the layer, with its chunks (regular files).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct File {
    pub name: String,
    pub kind: FileKind,
    pub link_name: String,
    /// Permission bits with setuid, setgid and sticky (podman writes them in `mode`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub modtime: Option<String>,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Names and decoded values.
    pub xattrs: Vec<(String, Vec<u8>)>,
    /// sha256 of the whole file (regular files with data).
    pub digest: Option<Digest>,
    pub chunks: Vec<Chunk>,
}

fn entry_err(name: &str, why: impl Into<String>) -> ChunkedError {
    ChunkedError::Entry {
        name: name.to_string(),
        why: why.into(),
    }
}

fn non_negative(name: &str, what: &str, v: i64) -> Result<u64> {
    u64::try_from(v).map_err(|_| entry_err(name, format!("negative {what} {v}")))
}

fn id(name: &str, what: &str, v: i64) -> Result<u32> {
    u32::try_from(v).map_err(|_| entry_err(name, format!("{what} {v} is not a 32-bit id")))
}

impl Toc {
    /// The layer's files in TOC order, each regular file with its chunks; checks that the
    /// chunks of each file cover it exactly, in order, and lie before `data_end` (where the
    /// TOC's own frame starts) without overlapping each other.
    pub fn files(&self, data_end: u64) -> Result<Vec<File>> {
        use base64::Engine;
        let mut files: Vec<File> = Vec::new();
        let mut last_end = 0u64;
        let mut i = 0;
        while i < self.entries.len() {
            let e = &self.entries[i];
            let name = &e.name;
            crate::ztoc::path::check_entry_name(name.as_bytes()).map_err(|w| entry_err(name, w))?;
            let kind = match e.kind.as_str() {
                "reg" => FileKind::Reg,
                "dir" => FileKind::Dir,
                "symlink" => FileKind::Symlink,
                "hardlink" => FileKind::Hardlink,
                "char" => FileKind::Char,
                "block" => FileKind::Block,
                "fifo" => FileKind::Fifo,
                "chunk" => return Err(entry_err(name, "a chunk that follows no regular file")),
                other => return Err(entry_err(name, format!("unknown type {other:?}"))),
            };
            let mode = non_negative(name, "mode", e.mode)?;
            if mode > 0o7777 {
                return Err(entry_err(name, format!("mode {mode:o}")));
            }
            let mut xattrs = Vec::with_capacity(e.xattrs.len());
            for (k, v) in &e.xattrs {
                let value = base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map_err(|err| entry_err(name, format!("xattr {k}: {err}")))?;
                xattrs.push((k.clone(), value));
            }
            let size = if kind == FileKind::Reg {
                non_negative(name, "size", e.size)?
            } else {
                0
            };
            let mut f = File {
                name: name.clone(),
                kind,
                link_name: e.link_name.clone(),
                mode: mode as u32,
                uid: id(name, "uid", e.uid)?,
                gid: id(name, "gid", e.gid)?,
                size,
                modtime: e.modtime.clone(),
                dev_major: id(name, "device major", e.dev_major)?,
                dev_minor: id(name, "device minor", e.dev_minor)?,
                xattrs,
                digest: None,
                chunks: Vec::new(),
            };
            i += 1;
            if f.kind == FileKind::Reg && f.size > 0 {
                f.digest = Some(
                    Digest::parse(&e.digest)
                        .map_err(|err| entry_err(name, format!("file digest: {err}")))?,
                );
                // The chunks: this entry's own, then the "chunk" entries that follow it.
                let mut parts = vec![e];
                while i < self.entries.len() && self.entries[i].kind == "chunk" {
                    if self.entries[i].name != *name {
                        return Err(entry_err(
                            &self.entries[i].name,
                            format!("a chunk of {name} under another name"),
                        ));
                    }
                    parts.push(&self.entries[i]);
                    i += 1;
                }
                f.chunks = chunks_of(name, e, &parts, f.size)?;
                for c in &f.chunks {
                    if c.compressed.start < last_end || c.compressed.end > data_end {
                        return Err(ChunkedError::Chunk {
                            name: name.clone(),
                            offset: c.file_offset,
                            why: format!(
                                "compressed range {:?} overlaps another or lies past the data ({data_end})",
                                c.compressed
                            ),
                        });
                    }
                    last_end = c.compressed.end;
                }
            }
            files.push(f);
        }
        Ok(files)
    }
}

/// The chunks of the regular file `name` from its entry `e` and the chunk entries `parts`
/// (`e` first).
fn chunks_of(name: &str, e: &TocEntry, parts: &[&TocEntry], size: u64) -> Result<Vec<Chunk>> {
    let end = non_negative(name, "endOffset", e.end_offset)?;
    let unchunked = parts.len() == 1 && e.chunk_size == 0;
    let mut chunks = Vec::with_capacity(parts.len());
    let mut file_offset = 0u64;
    for (k, p) in parts.iter().enumerate() {
        let start = non_negative(name, "offset", p.offset)?;
        let stop = match parts.get(k + 1) {
            Some(next) => non_negative(name, "offset", next.offset)?,
            None => end,
        };
        let (size_here, digest) = if unchunked {
            (size, &e.digest)
        } else {
            (
                non_negative(name, "chunkSize", p.chunk_size)?,
                &p.chunk_digest,
            )
        };
        let offset_here = if k == 0 {
            0
        } else {
            non_negative(name, "chunkOffset", p.chunk_offset)?
        };
        let bad = |why: String| ChunkedError::Chunk {
            name: name.to_string(),
            offset: offset_here,
            why,
        };
        if offset_here != file_offset {
            return Err(bad(format!("starts at {offset_here}, not {file_offset}")));
        }
        if stop <= start {
            return Err(bad(format!("empty compressed range {start}..{stop}")));
        }
        if size_here == 0 || size_here > MAX_CHUNK_BYTES {
            return Err(bad(format!(
                "{size_here} bytes (1 to {MAX_CHUNK_BYTES} allowed)"
            )));
        }
        chunks.push(Chunk {
            file_offset,
            size: size_here,
            compressed: start..stop,
            digest: Digest::parse(digest).map_err(|err| bad(format!("digest: {err}")))?,
            zeros: p.chunk_type == "zeros",
        });
        file_offset += size_here;
    }
    if file_offset != size {
        return Err(entry_err(
            name,
            format!("its chunks hold {file_offset} bytes of {size}"),
        ));
    }
    Ok(chunks)
}

/// Decodes `chunk` of `file` from its compressed bytes and checks it against its digest.
pub fn read_chunk(file: &File, chunk: &Chunk, compressed: &[u8]) -> Result<Vec<u8>> {
    let bad = |why: String| ChunkedError::Chunk {
        name: file.name.clone(),
        offset: chunk.file_offset,
        why,
    };
    if compressed.len() as u64 != chunk.compressed.end - chunk.compressed.start {
        return Err(bad(format!(
            "{} compressed bytes where {} were expected",
            compressed.len(),
            chunk.compressed.end - chunk.compressed.start
        )));
    }
    let data = decompress(compressed, chunk.size).map_err(bad)?;
    let got = Digest::of(&data);
    if got != chunk.digest {
        return Err(bad(format!(
            "content {got} does not match {}",
            chunk.digest
        )));
    }
    Ok(data)
}
