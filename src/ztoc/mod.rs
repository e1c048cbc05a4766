//! zTOC engine: the SOCI table of contents of one layer, how to build it, and how to read any byte
//! range of the layer through it.
//!
//! - [`format`]: the FlatBuffers encoding and the checkpoint blobs (formats.md §1);
//! - [`builder`]: one streaming pass over a layer blob that produces a [`Ztoc`];
//! - [`reader`]: random reads of the uncompressed layer, span by span, each span verified;
//! - [`table`]: the split form of a zTOC (a compact table, windows fetched per span);
//! - [`tar`]: the streaming tar scanner the builder uses.
//!
//! This module does no I/O policy: bytes come from a caller-supplied [`reader::BlobSource`].

pub mod builder;
mod fb;
pub mod format;
pub mod path;
pub mod reader;
pub mod table;
pub mod tar;
pub mod time;
pub mod verify;

use std::ops::Range;

pub use builder::{build, BuildOptions};
pub use reader::{BlobSource, LayerReader, SpanSource};

/// The span size zTOCs are built with unless told: 512 KiB of uncompressed data, where upstream
/// SOCI uses [`UPSTREAM_SPAN_SIZE`]. A start fetches whole spans for every file it touches.
/// Measured on a python/numpy image with podman 4 and 5 (docs/benchmarks.md): at 100 Mbit/s
/// 512 KiB spans start 1.2x sooner than 1 MiB ones (11.3x a plain pull against 9.4x) and 2x
/// sooner than 4 MiB ones, fetching 22.6 MB before ready against 27.0 and 43.1; on loopback,
/// where each span costs a round trip, 1 MiB is ~10% faster. Windows no longer cost up front
/// (zTOC tables), so smaller spans cost little at pull.
pub const DEFAULT_SPAN_SIZE: u64 = 512 << 10;
/// Upstream SOCI's span size (4 MiB): what `ztoc build` uses by default, to make zTOCs as
/// upstream tools do.
pub const UPSTREAM_SPAN_SIZE: u64 = 4 << 20;
/// Layers smaller than this (compressed) are not indexed by default.
pub const DEFAULT_MIN_LAYER_SIZE: u64 = 10 << 20;
/// Size of the inflate window stored with every gzip checkpoint.
pub const WINDOW_SIZE: usize = 32 * 1024;
/// Largest compressed span accepted: bounds what one read may fetch and hold in memory.
pub const MAX_SPAN_BYTES: u64 = 256 << 20;
/// Largest uncompressed span accepted: bounds what one read may inflate and hold in memory.
pub const MAX_SPAN_UNCOMPRESSED: u64 = 64 << 20;
/// Largest span size the builder takes (spans end at the first deflate block boundary after
/// `span_size` bytes, so they may be a block longer; this leaves room below
/// [`MAX_SPAN_UNCOMPRESSED`]).
pub const MAX_BUILD_SPAN_SIZE: u64 = MAX_SPAN_UNCOMPRESSED / 2;
/// Largest serialized zTOC (or uncompressed zTOC table) accepted.
pub const MAX_ZTOC_BYTES: u64 = 1 << 30;
/// Most entries (files, directories, links) one zTOC may list.
pub const MAX_ENTRIES: usize = 1 << 21;
/// Longest name, link target, user or group name, or time string of one entry.
pub const MAX_NAME_BYTES: usize = 64 << 10;
/// Most bytes of PAX records (keys and values together) one entry may carry: the tar scanner's
/// bound on a metadata block.
pub const MAX_PAX_BYTES: usize = tar::MAX_META_SIZE as usize;
/// Most spans one zTOC may have.
pub const MAX_SPANS: usize = 1 << 20;
/// The zTOC format version written and understood.
pub const ZTOC_VERSION: &str = "0.9";
/// The build tool identifier written into zTOCs built here.
pub const BUILD_TOOL: &str = concat!("soci-store ", env!("CARGO_PKG_VERSION"));

/// Errors from parsing, building or reading zTOCs.
#[derive(Debug, thiserror::Error)]
pub enum ZtocError {
    #[error("malformed zTOC: {0}")]
    Malformed(String),
    #[error("invalid zTOC: {0}")]
    Invalid(String),
    #[error("unsupported compression: {0}")]
    UnsupportedCompression(String),
    #[error("corrupt layer: {0}")]
    CorruptLayer(String),
    #[error("invalid tar: {0}")]
    InvalidTar(String),
    #[error("span {span} failed verification: expected sha256:{expected}, got sha256:{actual}")]
    SpanDigestMismatch {
        span: usize,
        expected: String,
        actual: String,
    },
    #[error("layer is {size} bytes, smaller than the minimum layer size {min} to index")]
    LayerTooSmall { size: u64, min: u64 },
    #[error("read out of range: {0}")]
    OutOfRange(String),
    #[error("no such entry: {0}")]
    NotFound(String),
    #[error("tar header of {name} does not match its zTOC entry: {what}")]
    HeaderMismatch { name: String, what: String },
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The span source (fetchers, cache) failed.
    #[error("reading span {span}: {source}")]
    Source {
        span: usize,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// The kind of a tar entry, as the zTOC spells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryType {
    Reg,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
}

impl EntryType {
    /// The zTOC's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryType::Reg => "reg",
            EntryType::Dir => "dir",
            EntryType::Symlink => "symlink",
            EntryType::Hardlink => "hardlink",
            EntryType::Char => "char",
            EntryType::Block => "block",
            EntryType::Fifo => "fifo",
        }
    }

    /// Parses the zTOC's spelling.
    pub fn parse(s: &[u8]) -> Option<Self> {
        Some(match s {
            b"reg" => EntryType::Reg,
            b"dir" => EntryType::Dir,
            b"symlink" => EntryType::Symlink,
            b"hardlink" => EntryType::Hardlink,
            b"char" => EntryType::Char,
            b"block" => EntryType::Block,
            b"fifo" => EntryType::Fifo,
            _ => return None,
        })
    }

    /// Whether entries of this type carry data in the tar stream.
    pub fn has_data(self) -> bool {
        self == EntryType::Reg
    }
}

/// One file of the layer (`FileMetadata`). Strings are raw bytes as in the tar.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: Vec<u8>,
    pub kind: EntryType,
    /// Offset of the file data (not the header) in the uncompressed tar stream.
    pub offset: u64,
    pub size: u64,
    pub linkname: Vec<u8>,
    /// Permission and special bits as in the tar header.
    pub mode: i64,
    pub uid: u32,
    pub gid: u32,
    pub uname: Vec<u8>,
    pub gname: Vec<u8>,
    /// RFC 3339 modification time, as stored.
    pub mod_time: Vec<u8>,
    pub devmajor: i64,
    pub devminor: i64,
    /// Every PAX record of the entry, sorted by key.
    pub pax: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Prefix of PAX records that carry extended attributes.
pub const XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";

impl Entry {
    /// Extended attributes from `SCHILY.xattr.*` PAX records, name without the prefix.
    pub fn xattrs(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.pax.iter().filter_map(|(k, v)| {
            k.strip_prefix(XATTR_PREFIX)
                .map(|name| (name, v.as_slice()))
        })
    }

    /// Bytes of data this entry occupies in the tar stream.
    pub fn data_len(&self) -> u64 {
        if self.kind.has_data() {
            self.size
        } else {
            0
        }
    }

    /// The name for humans (lossy UTF-8).
    pub fn display_name(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// A gzip checkpoint: where a span starts and what inflate needs to resume there.
#[derive(Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Compressed offset of the first full byte after the checkpoint.
    pub input: u64,
    /// Uncompressed offset of the checkpoint.
    pub output: u64,
    /// Bits of the byte at `input - 1` that still belong to the next block (0..=7).
    pub bits: u8,
    /// The 32 KiB of uncompressed data preceding `output`, zero-filled at the start.
    pub window: Window,
}

/// A checkpoint's inflate window: in the zTOC, or stored apart and fetched when its span is read
/// (a zTOC loaded from its [`table`] form).
#[derive(Clone, PartialEq, Eq)]
pub enum Window {
    Inline(Box<[u8]>),
    Remote(WindowRef),
}

/// Where a window stored apart lives: a range of the windows blob, compressed (raw deflate),
/// and the sha256 of those compressed bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowRef {
    pub offset: u64,
    pub len: u32,
    pub digest: [u8; 32],
    /// Whether this checkpoint also starts a span of the zTOC the table was made with (a table
    /// may have finer spans than its zTOC).
    pub starts_ztoc_span: bool,
}

impl Window {
    /// The window's bytes when the zTOC holds them.
    pub fn inline(&self) -> Option<&[u8]> {
        match self {
            Window::Inline(w) => Some(w),
            Window::Remote(_) => None,
        }
    }
}

impl From<&[u8]> for Window {
    fn from(w: &[u8]) -> Self {
        Window::Inline(w.into())
    }
}

impl From<Vec<u8>> for Window {
    fn from(w: Vec<u8>) -> Self {
        Window::Inline(w.into_boxed_slice())
    }
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("input", &self.input)
            .field("output", &self.output)
            .field("bits", &self.bits)
            .finish_non_exhaustive()
    }
}

/// How the layer blob is compressed, with what a reader needs to resume inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Gzip (one or several members), with one checkpoint per span.
    Gzip { checkpoints: Vec<Checkpoint> },
    /// A plain tar: spans are fixed `span_size` chunks of `size` bytes.
    Uncompressed { size: u64 },
    /// zstd:chunked ([`crate::chunked`]): span `i` is one chunk of one file, a zstd frame at
    /// `spans[i].compressed` of the blob holding tar bytes `spans[i].uncompressed`. Spans need
    /// not touch (tar headers lie between, in frames of their own), and span digests are of the
    /// uncompressed bytes (the only digests the format has).
    ZstdChunked { spans: Vec<ChunkSpan> },
}

/// Where one chunk of a zstd:chunked layer lies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkSpan {
    pub compressed: Range<u64>,
    pub uncompressed: Range<u64>,
}

/// A zTOC: the file table and decompression checkpoints of one layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ztoc {
    pub version: Vec<u8>,
    pub build_tool: Vec<u8>,
    /// Length of the layer blob.
    pub compressed_size: u64,
    /// Tar position just after the end-of-archive blocks.
    pub uncompressed_size: u64,
    /// Entries in tar order (sorted by offset).
    pub entries: Vec<Entry>,
    pub span_size: u64,
    pub span_digests: Vec<[u8; 32]>,
    pub compression: Compression,
}

/// One span: compressed and uncompressed ranges and the digest of the compressed bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Span {
    pub id: usize,
    pub compressed: Range<u64>,
    pub uncompressed: Range<u64>,
    pub digest: [u8; 32],
}

/// Checks the lengths of an entry's strings against [`MAX_NAME_BYTES`] and [`MAX_PAX_BYTES`].
pub(crate) fn check_entry_sizes(e: &Entry) -> Result<(), String> {
    let fields: [(&str, &[u8]); 5] = [
        ("name", &e.name),
        ("link target", &e.linkname),
        ("user name", &e.uname),
        ("group name", &e.gname),
        ("modification time", &e.mod_time),
    ];
    for (what, value) in fields {
        if value.len() > MAX_NAME_BYTES {
            return Err(format!(
                "{what} of {} bytes, more than the {MAX_NAME_BYTES} accepted",
                value.len()
            ));
        }
    }
    let pax: usize = e.pax.iter().map(|(k, v)| k.len() + v.len()).sum();
    if pax > MAX_PAX_BYTES {
        return Err(format!(
            "{pax} bytes of PAX records, more than the {MAX_PAX_BYTES} accepted"
        ));
    }
    Ok(())
}

/// Checks that entry `i` starts after the previous entry's data (which ended at
/// `prev_data_end`) and its header, and that its data ends within the archive; returns where
/// its data ends.
pub(crate) fn check_entry_place(
    i: usize,
    e: &Entry,
    prev_data_end: u64,
    archive_size: u64,
) -> Result<u64, ZtocError> {
    let header_start = block_round(prev_data_end);
    let min_offset = header_start.saturating_add(512);
    if e.offset < min_offset {
        return Err(ZtocError::Invalid(format!(
            "entry {i} {:?} at offset {} overlaps the previous entry (its header starts at {header_start})",
            e.display_name(),
            e.offset
        )));
    }
    match e.offset.checked_add(e.data_len()) {
        Some(end) if end <= archive_size => Ok(end),
        _ => Err(ZtocError::Invalid(format!(
            "entry {i} {:?}: data {}+{} runs past the end of the archive ({archive_size})",
            e.display_name(),
            e.offset,
            e.size
        ))),
    }
}

/// Rounds up to the next 512-byte tar block.
pub(crate) fn block_round(n: u64) -> u64 {
    n.div_ceil(512).saturating_mul(512)
}

impl Ztoc {
    /// Number of spans.
    pub fn span_count(&self) -> usize {
        self.span_digests.len()
    }

    /// Span `id` (must be `< span_count()`; the zTOC is validated on load).
    pub fn span(&self, id: usize) -> Span {
        let n = self.span_count();
        let digest = self.span_digests[id];
        match &self.compression {
            Compression::Gzip { checkpoints } => {
                let cp = &checkpoints[id];
                let start = cp.input - u64::from(cp.bits != 0);
                let (cend, uend) = match checkpoints.get(id + 1) {
                    Some(next) => (next.input, next.output.min(self.uncompressed_size)),
                    None => (self.compressed_size, self.uncompressed_size),
                };
                Span {
                    id,
                    compressed: start..cend,
                    uncompressed: cp.output.min(uend)..uend,
                    digest,
                }
            }
            Compression::ZstdChunked { spans } => Span {
                id,
                compressed: spans[id].compressed.clone(),
                uncompressed: spans[id].uncompressed.clone(),
                digest,
            },
            Compression::Uncompressed { size } => {
                let start = id as u64 * self.span_size;
                let end = if id + 1 == n {
                    *size
                } else {
                    start + self.span_size
                };
                Span {
                    id,
                    compressed: start..end,
                    uncompressed: start..end,
                    digest,
                }
            }
        }
    }

    /// The span holding uncompressed offset `offset` (which must be below `uncompressed_size`).
    pub fn span_for_offset(&self, offset: u64) -> usize {
        match &self.compression {
            Compression::Gzip { checkpoints } => checkpoints
                .partition_point(|c| c.output <= offset)
                .saturating_sub(1),
            Compression::Uncompressed { .. } => {
                ((offset / self.span_size) as usize).min(self.span_count().saturating_sub(1))
            }
            // An offset between chunks (a tar header) gives the chunk before, which does not
            // hold it: readers check.
            Compression::ZstdChunked { spans } => spans
                .partition_point(|c| c.uncompressed.start <= offset)
                .saturating_sub(1),
        }
    }

    /// Where entry `i`'s tar header blocks start (the previous entry's data end, rounded up).
    pub fn header_offset(&self, i: usize) -> u64 {
        match i.checked_sub(1) {
            None => 0,
            Some(p) => {
                let prev = &self.entries[p];
                block_round(prev.offset + prev.data_len())
            }
        }
    }

    /// Checks every invariant a reader relies on, so that later reads cannot index out of bounds.
    pub fn validate(&self) -> Result<(), ZtocError> {
        let inv = |m: String| Err(ZtocError::Invalid(m));
        if self.span_size == 0 {
            return inv("span size is 0".into());
        }
        if self.span_digests.is_empty() {
            return inv("no spans".into());
        }
        if self.span_digests.len() > MAX_SPANS {
            return inv(format!(
                "{} spans, more than the {MAX_SPANS} accepted",
                self.span_digests.len()
            ));
        }
        if self.entries.len() > MAX_ENTRIES {
            return inv(format!(
                "{} entries, more than the {MAX_ENTRIES} accepted",
                self.entries.len()
            ));
        }
        let mut prev_data_end = 0u64;
        for (i, e) in self.entries.iter().enumerate() {
            check_entry_sizes(e).map_err(|m| ZtocError::Invalid(format!("entry {i}: {m}")))?;
            prev_data_end = check_entry_place(i, e, prev_data_end, self.uncompressed_size)?;
            let name = e.display_name();
            path::check_entry_name(&e.name)
                .map_err(|m| ZtocError::Invalid(format!("entry {i} {name:?}: {m}")))?;
            if e.kind == EntryType::Hardlink {
                path::check_entry_name(&e.linkname)
                    .map_err(|m| ZtocError::Invalid(format!("hardlink {name:?} target: {m}")))?;
            }
        }
        self.validate_compression()?;
        for id in 0..self.span_count() {
            let s = self.span(id);
            if s.compressed.end - s.compressed.start > MAX_SPAN_BYTES {
                return inv(format!(
                    "span {id} holds {} compressed bytes, more than the {MAX_SPAN_BYTES} accepted",
                    s.compressed.end - s.compressed.start
                ));
            }
            if s.uncompressed.end - s.uncompressed.start > MAX_SPAN_UNCOMPRESSED {
                return inv(format!(
                    "span {id} inflates to {} bytes, more than the {MAX_SPAN_UNCOMPRESSED} accepted",
                    s.uncompressed.end - s.uncompressed.start
                ));
            }
        }
        Ok(())
    }

    fn validate_compression(&self) -> Result<(), ZtocError> {
        let inv = |m: String| Err(ZtocError::Invalid(m));
        match &self.compression {
            Compression::Gzip { checkpoints } => {
                if checkpoints.len() != self.span_digests.len() {
                    return inv(format!(
                        "{} checkpoints for {} spans",
                        checkpoints.len(),
                        self.span_digests.len()
                    ));
                }
                if checkpoints[0].output != 0 {
                    return inv("first checkpoint is not at uncompressed offset 0".into());
                }
                for (i, c) in checkpoints.iter().enumerate() {
                    if c.bits > 7 || (c.bits != 0 && c.input == 0) {
                        return inv(format!("checkpoint {i}: bad bit count {}", c.bits));
                    }
                    if c.input > self.compressed_size {
                        return inv(format!(
                            "checkpoint {i}: compressed offset {} past the blob end {}",
                            c.input, self.compressed_size
                        ));
                    }
                    match &c.window {
                        Window::Inline(w) if w.len() != WINDOW_SIZE => {
                            return inv(format!("checkpoint {i}: window is not 32 KiB"));
                        }
                        Window::Remote(r) if r.len as usize > table::MAX_WINDOW_BYTES => {
                            return inv(format!("checkpoint {i}: window of {} bytes", r.len));
                        }
                        _ => {}
                    }
                    if i > 0 {
                        let p = &checkpoints[i - 1];
                        if c.input <= p.input || c.output <= p.output {
                            return inv(format!(
                                "checkpoint {i} does not follow checkpoint {}",
                                i - 1
                            ));
                        }
                    }
                }
            }
            Compression::ZstdChunked { spans } => {
                if spans.len() != self.span_digests.len() {
                    return inv(format!(
                        "{} chunks for {} span digests",
                        spans.len(),
                        self.span_digests.len()
                    ));
                }
                let (mut cend, mut uend) = (0u64, 0u64);
                for (i, c) in spans.iter().enumerate() {
                    if c.compressed.start < cend
                        || c.compressed.end <= c.compressed.start
                        || c.compressed.end > self.compressed_size
                        || c.uncompressed.start < uend
                        || c.uncompressed.end <= c.uncompressed.start
                        || c.uncompressed.end > self.uncompressed_size
                    {
                        return inv(format!(
                            "chunk {i} ({:?} of the blob, {:?} of the tar) is empty, out of order or out of bounds",
                            c.compressed, c.uncompressed
                        ));
                    }
                    (cend, uend) = (c.compressed.end, c.uncompressed.end);
                }
                // Every file's data is covered by chunks, without a gap.
                for e in self
                    .entries
                    .iter()
                    .filter(|e| e.kind == EntryType::Reg && e.size > 0)
                {
                    let mut at = e.offset;
                    let end = e.offset + e.size;
                    let mut id = self.span_for_offset(at);
                    while at < end {
                        match spans.get(id) {
                            Some(c) if c.uncompressed.start == at && c.uncompressed.end <= end => {
                                at = c.uncompressed.end;
                                id += 1;
                            }
                            _ => {
                                return inv(format!(
                                    "the data of {:?} is not covered by its chunks at {at}",
                                    e.display_name()
                                ))
                            }
                        }
                    }
                }
            }
            Compression::Uncompressed { size } => {
                let spans = size.div_ceil(self.span_size);
                if *size != self.compressed_size || spans != self.span_digests.len() as u64 {
                    return inv(format!(
                        "tar of {size} bytes in {}-byte spans does not match {} spans of a {}-byte blob",
                        self.span_size,
                        self.span_digests.len(),
                        self.compressed_size
                    ));
                }
                if self.uncompressed_size > *size {
                    return inv("archive is larger than the blob".into());
                }
            }
        }
        Ok(())
    }

    /// The entry with this name (normalized: `./a`, `a` and `/a` are the same). A name listed
    /// more than once is its last copy, as extracting the tar (and the store's tree) leaves it.
    pub fn find(&self, name: &[u8]) -> Option<usize> {
        self.find_before(name, self.entries.len())
    }

    /// The last entry with this name among the first `end` entries.
    fn find_before(&self, name: &[u8], end: usize) -> Option<usize> {
        let want = path::normalize(name);
        self.entries[..end.min(self.entries.len())]
            .iter()
            .rposition(|e| path::normalize(&e.name) == want)
    }

    /// Follows hardlinks to the entry that holds the data. A hardlink names the file as it was
    /// when the link was extracted: the last copy of its target listed before it.
    pub fn resolve_hardlink(&self, i: usize) -> Result<usize, ZtocError> {
        let mut cur = i;
        // Each step goes to an earlier entry, so the chain ends.
        loop {
            let e = &self.entries[cur];
            if e.kind != EntryType::Hardlink {
                return Ok(cur);
            }
            cur = match self.find_before(&e.linkname, cur) {
                Some(target) => target,
                // Itself or a later entry: nothing an extraction could link to.
                None if self.find(&e.linkname).is_some() => {
                    return Err(ZtocError::Invalid(format!(
                        "hardlink {} points at {}, which is not listed before it",
                        e.display_name(),
                        String::from_utf8_lossy(&e.linkname)
                    )))
                }
                None => {
                    return Err(ZtocError::NotFound(format!(
                        "hardlink {} points at missing {}",
                        e.display_name(),
                        String::from_utf8_lossy(&e.linkname)
                    )))
                }
            };
        }
    }

    /// Whether every checkpoint window is in the zTOC (as after building or decoding a zTOC).
    pub fn windows_inline(&self) -> bool {
        match &self.compression {
            Compression::Gzip { checkpoints } => {
                checkpoints.iter().all(|c| c.window.inline().is_some())
            }
            Compression::Uncompressed { .. } | Compression::ZstdChunked { .. } => true,
        }
    }

    /// sha256 of the serialized zTOC, as index manifests name it.
    pub fn digest_of(bytes: &[u8]) -> crate::digest::Digest {
        crate::digest::Digest::of(bytes)
    }
}
