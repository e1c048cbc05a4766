//! Random reads of a layer's uncompressed tar stream through its zTOC.
//!
//! A read finds the spans that hold the range, gets each span's compressed bytes from a
//! [`BlobSource`], checks them against the span digest (a mismatch is an error, never data), and
//! inflates from the span's checkpoint: raw inflate, primed with the straddling bits, the 32 KiB
//! window as dictionary, continuing across gzip member boundaries.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::tar::TarScanner;
use super::{Compression, EntryType, Ztoc, ZtocError, MAX_SPAN_UNCOMPRESSED};
use crate::sys::zlib::{Format, Inflater};

type Result<T> = std::result::Result<T, ZtocError>;

/// A source of a blob's compressed bytes: "give me bytes [a, b) of this blob".
pub trait BlobSource: Send + Sync {
    /// Returns exactly the bytes of `range`, or an error.
    fn read_range(&self, range: Range<u64>) -> std::io::Result<Vec<u8>>;
}

impl BlobSource for std::fs::File {
    fn read_range(&self, range: Range<u64>) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        self.read_exact_at(&mut buf, range.start)?;
        Ok(buf)
    }
}

impl BlobSource for [u8] {
    fn read_range(&self, range: Range<u64>) -> std::io::Result<Vec<u8>> {
        usize::try_from(range.start)
            .ok()
            .zip(usize::try_from(range.end).ok())
            .and_then(|(a, b)| self.get(a..b))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| std::io::ErrorKind::UnexpectedEof.into())
    }
}

impl BlobSource for Vec<u8> {
    fn read_range(&self, range: Range<u64>) -> std::io::Result<Vec<u8>> {
        self.as_slice().read_range(range)
    }
}

impl<T: BlobSource + ?Sized> BlobSource for Arc<T> {
    fn read_range(&self, range: Range<u64>) -> std::io::Result<Vec<u8>> {
        (**self).read_range(range)
    }
}

/// Where a [`LayerReader`] gets each span's verified compressed bytes. Any [`BlobSource`] is one
/// (it reads the span's range and checks the digest); a caching, fetching stack is another.
pub trait SpanSource: Send + Sync {
    /// The compressed bytes of span `id`, checked against `ztoc.span_digests[id]`.
    fn span_bytes(&self, ztoc: &Ztoc, id: usize) -> Result<bytes::Bytes>;

    /// The inflate window of span `id`'s checkpoint, for a zTOC whose windows are stored apart
    /// ([`super::table`]); verified against its reference.
    fn window(&self, _ztoc: &Ztoc, id: usize) -> Result<bytes::Bytes> {
        Err(ZtocError::Invalid(format!(
            "the window of span {id} is stored apart and this source cannot fetch it"
        )))
    }

    /// [`Self::span_bytes`] for a read of file data that lies at `file` (uncompressed offsets):
    /// a source that fetches over a network may fetch the file's neighbouring spans with it.
    fn span_bytes_for(
        &self,
        ztoc: &Ztoc,
        id: usize,
        file: Option<&Range<u64>>,
    ) -> Result<bytes::Bytes> {
        let _ = file;
        self.span_bytes(ztoc, id)
    }

    /// Span `id` was inflated whole into `data`: a source may keep its last 32 KiB, the window
    /// of the next span's checkpoint, instead of fetching that window. Nothing by default.
    fn inflated(&self, _ztoc: &Ztoc, _id: usize, _data: &[u8]) {}

    /// A hint that spans `ids` are likely read next (the rest of a file being read): a source
    /// that fetches over a network may start fetching them now. Nothing by default.
    fn read_ahead(&self, _ztoc: &Arc<Ztoc>, _ids: Range<usize>) {}
}

/// Read-ahead within a file: by default at most this many spans after the one a read needs...
pub const READ_AHEAD_SPANS: usize = 8;
/// ...and at most this many compressed bytes of them.
const READ_AHEAD_BYTES: u64 = 4 << 20;

impl<T: BlobSource + ?Sized> SpanSource for T {
    fn span_bytes(&self, ztoc: &Ztoc, id: usize) -> Result<bytes::Bytes> {
        let span = ztoc.span(id);
        let bytes = self.read_range(span.compressed.clone())?;
        if bytes.len() as u64 != span.compressed.end - span.compressed.start {
            return Err(ZtocError::CorruptLayer(format!(
                "span {id}: source returned {} bytes for {:?}",
                bytes.len(),
                span.compressed
            )));
        }
        verify_span(ztoc, id, &bytes)?;
        Ok(bytes.into())
    }
}

/// Checks a span's compressed bytes against its digest (for zstd:chunked, whose digests are
/// of the uncompressed bytes, after decompressing them).
pub fn verify_span(ztoc: &Ztoc, id: usize, bytes: &[u8]) -> Result<()> {
    let actual: [u8; 32] = match &ztoc.compression {
        Compression::ZstdChunked { .. } => Sha256::digest(decode_chunk(ztoc, id, bytes)?).into(),
        _ => Sha256::digest(bytes).into(),
    };
    let expected = ztoc.span_digests[id];
    if actual == expected {
        Ok(())
    } else {
        Err(ZtocError::SpanDigestMismatch {
            span: id,
            expected: hex::encode(expected),
            actual: hex::encode(actual),
        })
    }
}

/// The uncompressed bytes of chunk `id` of a zstd:chunked layer from its compressed bytes:
/// exactly the chunk's length, or an error.
fn decode_chunk(ztoc: &Ztoc, id: usize, bytes: &[u8]) -> Result<Vec<u8>> {
    let span = ztoc.span(id);
    crate::chunked::decompress(bytes, span.uncompressed.end - span.uncompressed.start)
        .map_err(|m| ZtocError::CorruptLayer(format!("chunk {id}: {m}")))
}

/// Fills `out` with uncompressed bytes of span `id` starting `skip` bytes into the span.
/// `bytes` are the span's verified compressed bytes; the window is the zTOC's own.
pub fn inflate_span(ztoc: &Ztoc, id: usize, bytes: &[u8], skip: u64, out: &mut [u8]) -> Result<()> {
    inflate_span_with(ztoc, id, bytes, None, skip, out)
}

/// [`inflate_span`] with the checkpoint's window given (when the zTOC stores it apart).
pub fn inflate_span_with(
    ztoc: &Ztoc,
    id: usize,
    bytes: &[u8],
    window: Option<&[u8]>,
    skip: u64,
    out: &mut [u8],
) -> Result<()> {
    SpanInflater::start(ztoc, id, bytes, window)?.read(skip, out)
}

/// An inflate stream inside one span: reads at increasing offsets continue where the last one
/// ended, so reading a span in many pieces inflates it once.
struct SpanInflater<B> {
    id: usize,
    /// The span's verified compressed bytes.
    bytes: B,
    /// Uncompressed bytes of the span, and the bytes produced so far.
    len: u64,
    produced: u64,
    /// `None` for a plain tar span (a copy, no inflate).
    inflate: Option<(Inflater, Format)>,
    /// A zstd:chunked chunk, decoded whole (it is one frame); copied from like a plain span.
    decoded: Option<Vec<u8>>,
    /// Compressed bytes consumed so far.
    pos: usize,
}

impl<B: AsRef<[u8]>> SpanInflater<B> {
    fn start(ztoc: &Ztoc, id: usize, bytes: B, window: Option<&[u8]>) -> Result<Self> {
        let span = ztoc.span(id);
        let mut this = SpanInflater {
            id,
            bytes,
            len: span.uncompressed.end - span.uncompressed.start,
            produced: 0,
            inflate: None,
            decoded: None,
            pos: 0,
        };
        if let Compression::ZstdChunked { .. } = &ztoc.compression {
            this.decoded = Some(decode_chunk(ztoc, id, this.bytes.as_ref())?);
            return Ok(this);
        }
        let Compression::Gzip { checkpoints } = &ztoc.compression else {
            return Ok(this);
        };
        let cp = &checkpoints[id];
        let mut inf = Inflater::new(Format::Raw);
        if cp.bits != 0 {
            let first = *this
                .bytes
                .as_ref()
                .first()
                .ok_or_else(|| this.corrupt("empty span".into()))?;
            inf.prime(cp.bits, first).map_err(|m| this.corrupt(m))?;
            this.pos = 1;
        }
        let window = window
            .or(cp.window.inline())
            .ok_or_else(|| ZtocError::Invalid(format!("span {id}: no window given")))?;
        inf.set_dictionary(window).map_err(|m| this.corrupt(m))?;
        this.inflate = Some((inf, Format::Raw));
        Ok(this)
    }

    fn corrupt(&self, m: String) -> ZtocError {
        ZtocError::CorruptLayer(format!("span {}: {m}", self.id))
    }

    /// Whether a read at `skip` can continue this stream.
    fn can_reach(&self, id: usize, skip: u64) -> bool {
        self.id == id && skip >= self.produced
    }

    /// Fills `out` with the span's bytes from `skip` on; `skip` must not be behind what this
    /// stream has produced ([`Self::can_reach`]).
    fn read(&mut self, skip: u64, out: &mut [u8]) -> Result<()> {
        if skip
            .checked_add(out.len() as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err(ZtocError::OutOfRange(format!(
                "{}+{} past the end of span {}",
                skip,
                out.len(),
                self.id
            )));
        }
        if skip < self.produced {
            return Err(ZtocError::OutOfRange(format!(
                "span {}: {skip} is behind the inflate stream",
                self.id
            )));
        }
        let Some((inf, format)) = self.inflate.as_mut() else {
            let from = skip as usize;
            let plain = self.decoded.as_deref().unwrap_or(self.bytes.as_ref());
            out.copy_from_slice(plain.get(from..from + out.len()).ok_or_else(|| {
                ZtocError::CorruptLayer(format!("span {} is shorter than the zTOC says", self.id))
            })?);
            self.produced = skip + out.len() as u64;
            return Ok(());
        };
        let id = self.id;
        let corrupt = |m: String| ZtocError::CorruptLayer(format!("span {id}: {m}"));
        let bytes = self.bytes.as_ref();
        let mut skip = skip - self.produced;
        let mut scratch = vec![0u8; skip.min(64 * 1024) as usize];
        let mut filled = 0usize;
        while filled < out.len() {
            let target = if skip > 0 {
                let n = skip.min(scratch.len() as u64) as usize;
                &mut scratch[..n]
            } else {
                &mut out[filled..]
            };
            let step = inf
                .inflate(&bytes[self.pos..], target, false)
                .map_err(corrupt)?;
            self.pos += step.consumed;
            self.produced += step.produced as u64;
            if skip > 0 {
                skip -= step.produced as u64;
            } else {
                filled += step.produced;
            }
            if filled == out.len() {
                break;
            }
            if step.stream_end {
                // End of a gzip member: continue with the next member's header. In raw mode the
                // trailer is still ahead; gzip mode has consumed (and checked) it.
                if *format == Format::Raw {
                    self.pos += 8;
                }
                if self.pos >= bytes.len() {
                    return Err(corrupt("data ends at a gzip member boundary".into()));
                }
                *format = Format::Gzip;
                inf.reset(Format::Gzip);
            } else if step.consumed == 0 && step.produced == 0 {
                return Err(corrupt(
                    "compressed data ends before the span's uncompressed end".into(),
                ));
            }
        }
        Ok(())
    }
}

/// (reader key, span id) and the span's inflated bytes.
type InflatedEntry = ((u64, usize), Arc<[u8]>);

/// An LRU of fully inflated spans, bounded by bytes; one can serve many layers (each reader
/// keys its spans with its own layer key).
pub struct InflatedSpans {
    budget: usize,
    state: Mutex<(usize, VecDeque<InflatedEntry>)>,
}

impl InflatedSpans {
    /// Holds up to `budget` bytes of inflated spans.
    pub fn new(budget: usize) -> Self {
        InflatedSpans {
            budget,
            state: Mutex::default(),
        }
    }

    /// Drops everything kept.
    pub fn clear(&self) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Default::default();
    }

    fn get(&self, key: (u64, usize)) -> Option<Arc<[u8]>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let i = st.1.iter().position(|(k, _)| *k == key)?;
        let hit = st.1.remove(i).expect("index in range");
        let data = hit.1.clone();
        st.1.push_front(hit);
        Some(data)
    }

    fn put(&self, key: (u64, usize), data: Arc<[u8]>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.1.iter().any(|(k, _)| *k == key) {
            return;
        }
        st.0 += data.len();
        st.1.push_front((key, data));
        while st.0 > self.budget && st.1.len() > 1 {
            if let Some((_, old)) = st.1.pop_back() {
                st.0 -= old.len();
            }
        }
    }
}

/// A read of one file's data.
struct FileRead {
    /// Where the file's data lies in the uncompressed stream.
    data: Range<u64>,
    /// Read where an earlier read of it ended (read-ahead is for these only).
    sequential: bool,
}

/// Distinct keys for readers sharing one [`InflatedSpans`].
static NEXT_READER_KEY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Reads any uncompressed range of a layer through its zTOC.
pub struct LayerReader<S> {
    ztoc: Arc<Ztoc>,
    source: S,
    cache: Option<(Arc<InflatedSpans>, u64)>,
    verify_headers: bool,
    header_checked: Vec<AtomicBool>,
    read_ahead: usize,
    /// (entry, end) of the last few file reads, to tell sequential reading.
    recent: Mutex<[(usize, u64); 8]>,
    /// Where the last partial read of a span stopped, so the next read of that span continues.
    stream: Mutex<Option<SpanInflater<bytes::Bytes>>>,
}

impl<S: SpanSource> LayerReader<S> {
    /// A reader that inflates only what each read needs.
    pub fn new(ztoc: Arc<Ztoc>, source: S) -> Self {
        let n = ztoc.entries.len();
        LayerReader {
            ztoc,
            source,
            cache: None,
            verify_headers: false,
            header_checked: (0..n).map(|_| AtomicBool::new(false)).collect(),
            read_ahead: READ_AHEAD_SPANS,
            recent: Mutex::new([(usize::MAX, 0); 8]),
            stream: Mutex::new(None),
        }
    }

    /// Keeps up to `spans` fully inflated spans in memory (for sequential or clustered reads).
    pub fn with_span_cache(self, spans: usize) -> Self {
        let budget = spans.saturating_mul(self.ztoc.span_size.min(MAX_SPAN_UNCOMPRESSED) as usize);
        if spans == 0 {
            return self;
        }
        self.with_shared_span_cache(Arc::new(InflatedSpans::new(budget)))
    }

    /// Keeps fully inflated spans in `cache`, which other readers may share.
    pub fn with_shared_span_cache(mut self, cache: Arc<InflatedSpans>) -> Self {
        let key = NEXT_READER_KEY.fetch_add(1, Ordering::Relaxed);
        self.cache = Some((cache, key));
        self
    }

    /// Hints the source with at most `spans` spans after one a file read misses (0: none).
    pub fn read_ahead(mut self, spans: usize) -> Self {
        self.read_ahead = spans;
        self
    }

    /// Checks each entry's tar header against its zTOC entry on the entry's first read.
    pub fn verify_headers(mut self, on: bool) -> Self {
        self.verify_headers = on;
        self
    }

    pub fn ztoc(&self) -> &Arc<Ztoc> {
        &self.ztoc
    }

    /// Span `id`'s verified compressed bytes.
    pub fn fetch_span(&self, id: usize) -> Result<bytes::Bytes> {
        self.source.span_bytes(&self.ztoc, id)
    }

    pub fn source(&self) -> &S {
        &self.source
    }

    /// Span `id`'s window when the zTOC stores it apart (None: the zTOC's own, or no window).
    fn remote_window(&self, id: usize) -> Result<Option<bytes::Bytes>> {
        match &self.ztoc.compression {
            Compression::Gzip { checkpoints } if checkpoints[id].window.inline().is_none() => {
                Ok(Some(self.source.window(&self.ztoc, id)?))
            }
            _ => Ok(None),
        }
    }

    /// Fetches span `id` (and its window, when stored apart) and inflates from `skip` into `out`;
    /// for a read of a file whose data ends at `file_end`, hints the source to fetch the file's
    /// next spans meanwhile. A read that continues where the previous one stopped resumes its
    /// inflate stream, so reading a span in pieces costs one inflate of the span, not one per
    /// piece.
    fn inflate(&self, id: usize, skip: u64, out: &mut [u8], file: Option<&FileRead>) -> Result<()> {
        let lock = || self.stream.lock().unwrap_or_else(|p| p.into_inner());
        let resumed = lock().take().filter(|s| s.can_reach(id, skip));
        let mut stream = match resumed {
            Some(stream) => stream,
            None => {
                if let Some(f) = file.filter(|f| f.sequential) {
                    self.hint_ahead(id, f.data.end);
                }
                let bytes = self
                    .source
                    .span_bytes_for(&self.ztoc, id, file.map(|f| &f.data))?;
                let window = self.remote_window(id)?;
                SpanInflater::start(&self.ztoc, id, bytes, window.as_deref())?
            }
        };
        stream.read(skip, out)?;
        if stream.produced < stream.len {
            *lock() = Some(stream);
        } else if skip == 0 && out.len() as u64 == stream.len {
            self.source.inflated(&self.ztoc, id, out);
        }
        Ok(())
    }

    /// Tells the source about the spans after `id` that hold file data up to `end`.
    fn hint_ahead(&self, id: usize, end: u64) {
        if end == 0 || self.read_ahead == 0 || id + 1 >= self.ztoc.span_count() {
            return;
        }
        let last = self.ztoc.span_for_offset(end - 1).min(id + self.read_ahead);
        let mut to = id + 1;
        let mut bytes = 0;
        while to <= last {
            let c = self.ztoc.span(to).compressed;
            bytes += c.end - c.start;
            if bytes > READ_AHEAD_BYTES {
                break;
            }
            to += 1;
        }
        if to > id + 1 {
            self.source.read_ahead(&self.ztoc, id + 1..to);
        }
    }

    fn cached_span(&self, id: usize, file: Option<&FileRead>) -> Result<Option<Arc<[u8]>>> {
        let Some((cache, reader)) = &self.cache else {
            return Ok(None);
        };
        let span = self.ztoc.span(id);
        // An outsized span (far above the zTOC's span size and half the cache) would push every
        // other span out: it is read in place instead.
        let len = span.uncompressed.end - span.uncompressed.start;
        let outsized = len > 2 * self.ztoc.span_size && len > cache.budget as u64 / 2;
        if len > MAX_SPAN_UNCOMPRESSED || outsized {
            return Ok(None);
        }
        if let Some(hit) = cache.get((*reader, id)) {
            return Ok(Some(hit));
        }
        let mut data = vec![0u8; (span.uncompressed.end - span.uncompressed.start) as usize];
        self.inflate(id, 0, &mut data, file)?;
        let data: Arc<[u8]> = data.into();
        cache.put((*reader, id), data.clone());
        Ok(Some(data))
    }

    /// Reads uncompressed bytes at `offset` into `buf`; returns how many (short only at the end
    /// of the archive).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<usize> {
        self.read_within(offset, buf, None)
    }

    /// [`Self::read_at`] within a file's data (read-ahead and fetches stay inside it).
    fn read_within(&self, offset: u64, buf: &mut [u8], file: Option<&FileRead>) -> Result<usize> {
        let size = self.ztoc.uncompressed_size;
        if offset >= size || buf.is_empty() {
            return Ok(0);
        }
        let len = (buf.len() as u64).min(size - offset) as usize;
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let id = self.ztoc.span_for_offset(pos);
            let span = self.ztoc.span(id);
            if !span.uncompressed.contains(&pos) {
                // Between zstd:chunked chunks: a tar header, which no chunk holds.
                return Err(ZtocError::OutOfRange(format!(
                    "offset {pos} lies in no span (only file data of this layer can be read)"
                )));
            }
            let skip = pos - span.uncompressed.start;
            let n = ((span.uncompressed.end - pos) as usize).min(len - done);
            if n == 0 {
                return Err(ZtocError::Invalid(format!("no span covers offset {pos}")));
            }
            let out = &mut buf[done..done + n];
            match self.cached_span(id, file)? {
                Some(data) => out.copy_from_slice(&data[skip as usize..skip as usize + n]),
                None => self.inflate(id, skip, out, file)?,
            }
            done += n;
        }
        Ok(len)
    }

    /// Reads `range` of the uncompressed stream into a new vector.
    pub fn read_range(&self, range: Range<u64>) -> Result<Vec<u8>> {
        if range.end > self.ztoc.uncompressed_size || range.start > range.end {
            return Err(ZtocError::OutOfRange(format!(
                "{range:?} outside the {}-byte archive",
                self.ztoc.uncompressed_size
            )));
        }
        let mut buf = vec![0u8; (range.end - range.start) as usize];
        self.read_at(range.start, &mut buf)?;
        Ok(buf)
    }

    /// Reads file data of entry `idx` (hardlinks read their target) at `offset` into `buf`.
    pub fn read_entry(&self, idx: usize, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let data_idx = self.ztoc.resolve_hardlink(idx)?;
        let e = &self.ztoc.entries[data_idx];
        if e.kind != EntryType::Reg {
            return Err(ZtocError::Invalid(format!(
                "{} is a {}, not a regular file",
                e.display_name(),
                e.kind.as_str()
            )));
        }
        if self.verify_headers && !self.header_checked[data_idx].load(Ordering::Relaxed) {
            self.verify_header(data_idx)?;
            self.header_checked[data_idx].store(true, Ordering::Relaxed);
        }
        if offset >= e.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(e.size - offset) as usize;
        // Read-ahead only for a file read sequentially (each read where an earlier one ended):
        // page faults of a mapped library and one-shot reads of small files would mostly fetch
        // spans nobody reads before the start is over.
        let sequential = self.read_ahead > 0 && self.continues(data_idx, offset, offset + n as u64);
        let file = FileRead {
            data: e.offset..e.offset + e.size,
            sequential,
        };
        self.read_within(e.offset + offset, &mut buf[..n], Some(&file))
    }

    /// Whether a read of entry `idx` at `offset` continues an earlier read of it (one of the
    /// last few reads of this layer ended there); remembers where this one ends.
    fn continues(&self, idx: usize, offset: u64, end: u64) -> bool {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let hit = recent.iter().position(|&(i, e)| i == idx && e == offset);
        match hit {
            Some(slot) => recent[slot] = (idx, end),
            None => {
                recent.rotate_right(1);
                recent[0] = (idx, end);
            }
        }
        hit.is_some() && offset > 0
    }

    /// Reads the whole data of entry `idx`. Memory grows with the data actually read, never
    /// with the size the zTOC claims.
    pub fn read_file(&self, idx: usize) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut chunk = vec![0u8; 1 << 20];
        loop {
            let n = self.read_entry(idx, out.len() as u64, &mut chunk)?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&chunk[..n]);
        }
    }

    /// Re-reads the tar header blocks of entry `idx` and checks them against the zTOC entry.
    pub fn verify_header(&self, idx: usize) -> Result<()> {
        let e = &self.ztoc.entries[idx];
        let start = self.ztoc.header_offset(idx);
        let bytes = self.read_range(start..e.offset)?;
        let mut scanner = TarScanner::starting_at(start);
        let mismatch = |what: String| ZtocError::HeaderMismatch {
            name: e.display_name(),
            what,
        };
        scanner
            .feed(&bytes)
            .map_err(|err| mismatch(err.to_string()))?;
        let found = match scanner.entries() {
            [one] => one,
            other => return Err(mismatch(format!("{} headers found", other.len()))),
        };
        let checks: [(&str, bool); 6] = [
            ("name", found.name == e.name),
            ("type", found.kind == e.kind),
            ("size", found.size == e.size),
            ("data offset", found.offset == e.offset),
            ("link target", found.linkname == e.linkname),
            ("mode", found.mode == e.mode),
        ];
        match checks.iter().find(|(_, ok)| !ok) {
            Some((what, _)) => Err(mismatch(format!("{what} differs"))),
            None => Ok(()),
        }
    }
}
