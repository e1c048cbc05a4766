//! The zTOC wire format (formats.md §1): FlatBuffers tables, the gzip checkpoints blob (current and
//! older layout) and the TarZinfo blob of plain tar layers.

use flatbuffers::{FlatBufferBuilder, WIPOffset};

use super::fb::Table;
use super::{
    check_entry_place, Checkpoint, Compression, Entry, EntryType, Ztoc, ZtocError, MAX_ENTRIES,
    MAX_NAME_BYTES, MAX_PAX_BYTES, MAX_SPANS, MAX_ZTOC_BYTES, WINDOW_SIZE,
};

type Result<T> = std::result::Result<T, ZtocError>;

const ALGO_GZIP: i8 = 1;
const ALGO_UNCOMPRESSED: i8 = 2;
/// Size of one packed gzip checkpoint: in, out, bits, window.
const CHECKPOINT_LEN: usize = 8 + 8 + 1 + WINDOW_SIZE;
const CHECKPOINTS_HEADER_LEN: usize = 4 + 8;
const TAR_ZINFO_VERSION: i32 = 2;

fn malformed(m: impl Into<String>) -> ZtocError {
    ZtocError::Malformed(m.into())
}

fn non_negative(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| malformed(format!("negative {what}: {v}")))
}

/// Parses and validates a serialized zTOC.
pub fn decode(buf: &[u8]) -> Result<Ztoc> {
    decode_with(buf, decode_checkpoints)
}

/// Parses and validates a zTOC buffer whose gzip checkpoints blob `checkpoints` parses (the
/// zTOC's own layout, or the table layout of [`super::table`]).
pub(crate) fn decode_with(
    buf: &[u8],
    checkpoints: impl Fn(&[u8]) -> Result<(u64, Vec<Checkpoint>)>,
) -> Result<Ztoc> {
    if buf.len() as u64 > MAX_ZTOC_BYTES {
        return Err(malformed(format!(
            "{} bytes, more than the {MAX_ZTOC_BYTES} accepted",
            buf.len()
        )));
    }
    let root = Table::root(buf)?;
    let mut budget = Budget::new(buf.len());
    let version = budget.take(root.bytes(0)?, "version")?;
    let build_tool = budget.take(root.bytes(1)?, "build tool")?;
    let compressed_size = non_negative(root.i64(2, 0)?, "compressed archive size")?;
    let uncompressed_size = non_negative(root.i64(3, 0)?, "uncompressed archive size")?;

    let mut entries = Vec::new();
    if let Some(toc) = root.table(4)? {
        let md = toc.offsets(0)?;
        if md.len() > MAX_ENTRIES {
            return Err(malformed(format!(
                "{} entries, more than the {MAX_ENTRIES} accepted",
                md.len()
            )));
        }
        entries.reserve(md.len());
        let mut prev_data_end = 0;
        for i in 0..md.len() {
            let entry = decode_entry(&md.table(i)?, &mut budget).map_err(|e| match e {
                ZtocError::Malformed(m) => malformed(format!("entry {i}: {m}")),
                other => other,
            })?;
            // Placed now, not after the loop: entries sharing one table fail at the second.
            prev_data_end = check_entry_place(i, &entry, prev_data_end, uncompressed_size)?;
            entries.push(entry);
        }
    }

    let ci = root
        .table(5)?
        .ok_or_else(|| malformed("no compression_info"))?;
    let algo = ci.i8(0, ALGO_GZIP)?;
    let max_span_id = ci.i32(1, 0)?;
    let digests = ci.offsets(2)?;
    if digests.len() > MAX_SPANS {
        return Err(malformed(format!(
            "{} spans, more than the {MAX_SPANS} accepted",
            digests.len()
        )));
    }
    if max_span_id < 0 || max_span_id as usize + 1 != digests.len() {
        return Err(malformed(format!(
            "max_span_id {max_span_id} does not match {} span digests",
            digests.len()
        )));
    }
    let mut span_digests = Vec::with_capacity(digests.len());
    for i in 0..digests.len() {
        span_digests.push(parse_digest(digests.bytes(i)?)?);
    }
    let blob = ci.ubytes(3)?;
    let (compression, span_size) = match algo {
        ALGO_GZIP => {
            let (span_size, checkpoints) = checkpoints(blob)?;
            (Compression::Gzip { checkpoints }, span_size)
        }
        ALGO_UNCOMPRESSED => {
            let (span_size, size) = decode_tar_zinfo(blob)?;
            (Compression::Uncompressed { size }, span_size)
        }
        other => {
            return Err(ZtocError::UnsupportedCompression(format!(
                "zTOC compression algorithm {other}"
            )))
        }
    };
    let ztoc = Ztoc {
        version,
        build_tool,
        compressed_size,
        uncompressed_size,
        entries,
        span_size,
        span_digests,
        compression,
    };
    ztoc.validate()?;
    Ok(ztoc)
}

/// What decoding may copy out of a zTOC buffer. FlatBuffers lets many tables point at one string,
/// so a small buffer can name gigabytes; every string is checked against its own bound and
/// against this budget before it is copied.
struct Budget {
    /// String bytes still allowed: twice the buffer (a writer sharing short strings such as user
    /// names stays far below; each string stored once makes exactly the buffer's size at most).
    left: usize,
}

impl Budget {
    fn new(buf_len: usize) -> Self {
        Budget {
            left: buf_len.saturating_mul(2),
        }
    }

    /// Copies `s`, a string of at most [`MAX_NAME_BYTES`], out of the buffer.
    fn take(&mut self, s: &[u8], what: &str) -> Result<Vec<u8>> {
        if s.len() > MAX_NAME_BYTES {
            return Err(malformed(format!(
                "{what} of {} bytes, more than the {MAX_NAME_BYTES} accepted",
                s.len()
            )));
        }
        self.take_bytes(s)
    }

    fn take_bytes(&mut self, s: &[u8]) -> Result<Vec<u8>> {
        self.left = self.left.checked_sub(s.len()).ok_or_else(|| {
            malformed(
                "its strings add up to more than twice its size (one string shared by many entries?)",
            )
        })?;
        Ok(s.to_vec())
    }
}

fn decode_entry(t: &Table<'_>, budget: &mut Budget) -> Result<Entry> {
    let kind_raw = t.bytes(1)?;
    let kind = EntryType::parse(kind_raw).ok_or_else(|| {
        malformed(format!(
            "unknown entry type {:?}",
            String::from_utf8_lossy(&kind_raw[..kind_raw.len().min(64)])
        ))
    })?;
    let xattrs = t.offsets(13)?;
    let mut pax = Vec::new();
    let mut pax_bytes = 0usize;
    for i in 0..xattrs.len() {
        let x = xattrs.table(i)?;
        let (k, v) = (x.bytes(0)?, x.bytes(1)?);
        pax_bytes = pax_bytes.saturating_add(k.len() + v.len());
        if pax_bytes > MAX_PAX_BYTES {
            return Err(malformed(format!(
                "more than {MAX_PAX_BYTES} bytes of PAX records"
            )));
        }
        pax.push((budget.take_bytes(k)?, budget.take_bytes(v)?));
    }
    Ok(Entry {
        name: budget.take(t.bytes(0)?, "name")?,
        kind,
        offset: non_negative(t.i64(2, 0)?, "offset")?,
        size: non_negative(t.i64(3, 0)?, "size")?,
        linkname: budget.take(t.bytes(4)?, "link target")?,
        mode: t.i64(5, 0)?,
        uid: t.u32(6, 0)?,
        gid: t.u32(7, 0)?,
        uname: budget.take(t.bytes(8)?, "user name")?,
        gname: budget.take(t.bytes(9)?, "group name")?,
        mod_time: budget.take(t.bytes(10)?, "modification time")?,
        devmajor: t.i64(11, 0)?,
        devminor: t.i64(12, 0)?,
        pax,
    })
}

fn parse_digest(s: &[u8]) -> Result<[u8; 32]> {
    let hex_part = s
        .strip_prefix(b"sha256:")
        .ok_or_else(|| malformed(format!("span digest {:?}", String::from_utf8_lossy(s))))?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out)
        .map_err(|_| malformed(format!("span digest {:?}", String::from_utf8_lossy(s))))?;
    Ok(out)
}

/// Parses the gzip checkpoints blob in its current or older (implied first checkpoint) layout.
pub fn decode_checkpoints(blob: &[u8]) -> Result<(u64, Vec<Checkpoint>)> {
    if blob.len() < CHECKPOINTS_HEADER_LEN {
        return Err(malformed("checkpoints blob too short"));
    }
    let count = i32::from_le_bytes(blob[0..4].try_into().expect("4 bytes"));
    let span_size = i64::from_le_bytes(blob[4..12].try_into().expect("8 bytes"));
    if count < 1 {
        return Err(malformed(format!("checkpoint count {count}")));
    }
    let span_size = non_negative(span_size, "span size")?;
    let count = count as usize;
    let body = blob.len() - CHECKPOINTS_HEADER_LEN;
    let implied_first = if body == count.saturating_mul(CHECKPOINT_LEN) {
        false
    } else if body == (count - 1).saturating_mul(CHECKPOINT_LEN) {
        true
    } else {
        return Err(malformed(format!(
            "checkpoints blob of {} bytes does not hold {count} checkpoints",
            blob.len()
        )));
    };
    let mut checkpoints = Vec::with_capacity(count);
    if implied_first {
        checkpoints.push(Checkpoint {
            input: 10,
            output: 0,
            bits: 0,
            window: vec![0u8; WINDOW_SIZE].into(),
        });
    }
    for raw in blob[CHECKPOINTS_HEADER_LEN..].chunks_exact(CHECKPOINT_LEN) {
        let input = i64::from_le_bytes(raw[0..8].try_into().expect("8 bytes"));
        let output = i64::from_le_bytes(raw[8..16].try_into().expect("8 bytes"));
        checkpoints.push(Checkpoint {
            input: non_negative(input, "checkpoint offset")?,
            output: non_negative(output, "checkpoint offset")?,
            bits: raw[16],
            window: raw[17..].into(),
        });
    }
    Ok((span_size, checkpoints))
}

/// Serializes gzip checkpoints in the current layout; every window must be inline.
pub fn encode_checkpoints(span_size: u64, checkpoints: &[Checkpoint]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(CHECKPOINTS_HEADER_LEN + checkpoints.len() * CHECKPOINT_LEN);
    out.extend_from_slice(&(checkpoints.len() as i32).to_le_bytes());
    out.extend_from_slice(&(span_size as i64).to_le_bytes());
    for c in checkpoints {
        out.extend_from_slice(&(c.input as i64).to_le_bytes());
        out.extend_from_slice(&(c.output as i64).to_le_bytes());
        out.push(c.bits);
        let window = c.window.inline().ok_or_else(|| {
            ZtocError::Invalid("a zTOC whose windows are stored apart cannot be encoded".into())
        })?;
        out.extend_from_slice(window);
    }
    Ok(out)
}

fn decode_tar_zinfo(blob: &[u8]) -> Result<(u64, u64)> {
    let t = Table::root(blob).map_err(|e| malformed(format!("TarZinfo: {e}")))?;
    let version = t.i32(0, 0)?;
    if version != TAR_ZINFO_VERSION {
        return Err(malformed(format!("TarZinfo version {version}")));
    }
    let span_size = non_negative(t.i64(1, 0)?, "span size")?;
    let size = non_negative(t.i64(2, 0)?, "tar size")?;
    Ok((span_size, size))
}

fn encode_tar_zinfo(span_size: u64, size: u64) -> Vec<u8> {
    let mut b = FlatBufferBuilder::new();
    let start = b.start_table();
    b.push_slot::<i64>(slot(2), size as i64, 0);
    b.push_slot::<i64>(slot(1), span_size as i64, 0);
    b.push_slot::<i32>(slot(0), TAR_ZINFO_VERSION, 0);
    let root = b.end_table(start);
    b.finish_minimal(root);
    b.finished_data().to_vec()
}

/// The vtable offset of field `id`.
const fn slot(id: u16) -> u16 {
    4 + 2 * id
}

/// Serializes a zTOC. Fields equal to their default are omitted, as upstream's writer does.
/// Fails only for a zTOC whose windows are not inline (one loaded from its table form).
pub fn encode(z: &Ztoc) -> Result<Vec<u8>> {
    let blob = match &z.compression {
        Compression::Gzip { checkpoints } => encode_checkpoints(z.span_size, checkpoints)?,
        Compression::Uncompressed { size } => encode_tar_zinfo(z.span_size, *size),
        Compression::ZstdChunked { .. } => {
            return Err(ZtocError::Invalid(
                "a zstd:chunked layer's file table has no zTOC form".into(),
            ))
        }
    };
    Ok(encode_with(z, &blob))
}

/// Serializes a zTOC with `blob` as its checkpoints field.
pub(crate) fn encode_with(z: &Ztoc, blob: &[u8]) -> Vec<u8> {
    let mut b = FlatBufferBuilder::with_capacity(1 << 16);
    let mut md = Vec::with_capacity(z.entries.len());
    for e in &z.entries {
        md.push(encode_entry(&mut b, e));
    }
    let md = b.create_vector(&md);
    let toc = {
        let start = b.start_table();
        b.push_slot_always(slot(0), md);
        b.end_table(start)
    };

    let algo = match &z.compression {
        Compression::Gzip { .. } => ALGO_GZIP,
        // Not reached: `encode` refuses zstd:chunked.
        Compression::Uncompressed { .. } | Compression::ZstdChunked { .. } => ALGO_UNCOMPRESSED,
    };
    let digests: Vec<_> = z
        .span_digests
        .iter()
        .map(|d| b.create_string(&format!("sha256:{}", hex::encode(d))))
        .collect();
    let digests = b.create_vector(&digests);
    let blob = b.create_vector(blob);
    let ci = {
        let start = b.start_table();
        b.push_slot_always(slot(3), blob);
        b.push_slot_always(slot(2), digests);
        b.push_slot::<i32>(slot(1), z.span_digests.len() as i32 - 1, 0);
        b.push_slot::<i8>(slot(0), algo, ALGO_GZIP);
        b.end_table(start)
    };
    let version = b.create_byte_string(&z.version);
    let tool = b.create_byte_string(&z.build_tool);
    let root = {
        let start = b.start_table();
        b.push_slot::<i64>(slot(3), z.uncompressed_size as i64, 0);
        b.push_slot::<i64>(slot(2), z.compressed_size as i64, 0);
        b.push_slot_always(slot(5), ci);
        b.push_slot_always(slot(4), toc);
        b.push_slot_always(slot(1), tool);
        b.push_slot_always(slot(0), version);
        b.end_table(start)
    };
    b.finish_minimal(root);
    b.finished_data().to_vec()
}

fn encode_entry<'b>(
    b: &mut FlatBufferBuilder<'b>,
    e: &Entry,
) -> WIPOffset<flatbuffers::TableFinishedWIPOffset> {
    let xattrs: Vec<_> = e
        .pax
        .iter()
        .map(|(k, v)| {
            let k = b.create_byte_string(k);
            let v = b.create_byte_string(v);
            let start = b.start_table();
            b.push_slot_always(slot(1), v);
            b.push_slot_always(slot(0), k);
            b.end_table(start)
        })
        .collect();
    let xattrs = b.create_vector(&xattrs);
    let name = b.create_byte_string(&e.name);
    let kind = b.create_byte_string(e.kind.as_str().as_bytes());
    let linkname = b.create_byte_string(&e.linkname);
    let uname = b.create_byte_string(&e.uname);
    let gname = b.create_byte_string(&e.gname);
    let mod_time = b.create_byte_string(&e.mod_time);
    let start = b.start_table();
    b.push_slot::<i64>(slot(12), e.devminor, 0);
    b.push_slot::<i64>(slot(11), e.devmajor, 0);
    b.push_slot::<i64>(slot(5), e.mode, 0);
    b.push_slot::<i64>(slot(3), e.size as i64, 0);
    b.push_slot::<i64>(slot(2), e.offset as i64, 0);
    b.push_slot_always(slot(13), xattrs);
    b.push_slot_always(slot(10), mod_time);
    b.push_slot_always(slot(9), gname);
    b.push_slot_always(slot(8), uname);
    b.push_slot::<u32>(slot(7), e.gid, 0);
    b.push_slot::<u32>(slot(6), e.uid, 0);
    b.push_slot_always(slot(4), linkname);
    b.push_slot_always(slot(1), kind);
    b.push_slot_always(slot(0), name);
    b.end_table(start)
}
