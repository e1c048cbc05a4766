//! A push-style tar scanner: fed the uncompressed stream in chunks of any size, it records every
//! entry with the offset of its data, reading ustar, PAX (local records), GNU long names and links.
//! It never buffers file data, and metadata blocks are bounded by [`MAX_META_SIZE`].

use std::collections::BTreeMap;

use super::time::format_rfc3339;
use super::{Entry, EntryType, ZtocError};

/// Largest PAX or GNU long-name block accepted.
pub const MAX_META_SIZE: u64 = 1 << 20;
const BLOCK: usize = 512;

type Result<T> = std::result::Result<T, ZtocError>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Meta {
    Pax,
    GlobalPax,
    LongName,
    LongLink,
}

enum State {
    /// Collecting a header block.
    Header,
    /// Collecting the data of a metadata entry, then skipping its padding.
    Meta { kind: Meta, size: u64, buf: Vec<u8> },
    /// Skipping file data and padding.
    Skip { remaining: u64 },
    /// One zero block seen; a second one ends the archive.
    Zero,
    /// End of archive reached; the rest of the stream is ignored.
    Done,
}

#[derive(Default)]
struct Pending {
    pax: BTreeMap<Vec<u8>, Vec<u8>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
}

/// Streaming tar scanner.
pub struct TarScanner {
    pos: u64,
    state: State,
    block: [u8; BLOCK],
    fill: usize,
    pending: Pending,
    entries: Vec<Entry>,
    end: Option<u64>,
}

impl Default for TarScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl TarScanner {
    pub fn new() -> Self {
        Self::starting_at(0)
    }

    /// A scanner whose first byte is at tar offset `pos` (to re-read one entry's header).
    pub fn starting_at(pos: u64) -> Self {
        TarScanner {
            pos,
            state: State::Header,
            block: [0; BLOCK],
            fill: 0,
            pending: Pending::default(),
            entries: Vec::new(),
            end: None,
        }
    }

    /// Entries seen so far.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Whether the end-of-archive blocks were seen.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Feeds the next bytes of the stream.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            match &mut self.state {
                State::Done => return Ok(()),
                State::Skip { remaining } => {
                    let n = (*remaining).min(data.len() as u64);
                    *remaining -= n;
                    self.pos += n;
                    data = &data[n as usize..];
                    if *remaining == 0 {
                        self.state = State::Header;
                    }
                }
                State::Meta { kind, size, buf } => {
                    let want = (*size as usize - buf.len()).min(data.len());
                    buf.extend_from_slice(&data[..want]);
                    self.pos += want as u64;
                    data = &data[want..];
                    if buf.len() as u64 == *size {
                        let (kind, size) = (*kind, *size);
                        let buf = std::mem::take(buf);
                        self.finish_meta(kind, buf)?;
                        let pad = padding(size);
                        self.state = if pad == 0 {
                            State::Header
                        } else {
                            State::Skip { remaining: pad }
                        };
                    }
                }
                State::Header | State::Zero => {
                    let want = (BLOCK - self.fill).min(data.len());
                    self.block[self.fill..self.fill + want].copy_from_slice(&data[..want]);
                    self.fill += want;
                    self.pos += want as u64;
                    data = &data[want..];
                    if self.fill == BLOCK {
                        self.fill = 0;
                        self.header_block()?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Ends the stream: returns the entries and the archive size (just after the end blocks).
    pub fn finish(self) -> Result<(Vec<Entry>, u64)> {
        let clean = match self.state {
            State::Done => true,
            State::Header | State::Zero => self.fill == 0,
            _ => false,
        };
        if !clean {
            return Err(ZtocError::InvalidTar(format!(
                "archive truncated at offset {}",
                self.pos
            )));
        }
        Ok((self.entries, self.end.unwrap_or(self.pos)))
    }

    fn header_block(&mut self) -> Result<()> {
        let header_start = self.pos - BLOCK as u64;
        if self.block.iter().all(|&b| b == 0) {
            self.state = match self.state {
                State::Zero => {
                    self.end = Some(self.pos);
                    State::Done
                }
                _ => State::Zero,
            };
            return Ok(());
        }
        if matches!(self.state, State::Zero) {
            return Err(ZtocError::InvalidTar(format!(
                "a zero block followed by a header at offset {header_start}"
            )));
        }
        let h = Header::parse(&self.block, header_start)?;
        let meta = match h.typeflag {
            b'x' => Some(Meta::Pax),
            b'g' => Some(Meta::GlobalPax),
            b'L' => Some(Meta::LongName),
            b'K' => Some(Meta::LongLink),
            _ => None,
        };
        if let Some(kind) = meta {
            if h.size > MAX_META_SIZE {
                return Err(ZtocError::InvalidTar(format!(
                    "metadata block of {} bytes at offset {header_start} exceeds {MAX_META_SIZE}",
                    h.size
                )));
            }
            self.state = if h.size == 0 {
                self.finish_meta(kind, Vec::new())?;
                State::Header
            } else {
                State::Meta {
                    kind,
                    size: h.size,
                    buf: Vec::with_capacity(h.size as usize),
                }
            };
            return Ok(());
        }
        let entry = self.make_entry(h, header_start)?;
        let skip = entry.data_len() + padding(entry.data_len());
        self.entries.push(entry);
        self.state = if skip == 0 {
            State::Header
        } else {
            State::Skip { remaining: skip }
        };
        Ok(())
    }

    fn finish_meta(&mut self, kind: Meta, buf: Vec<u8>) -> Result<()> {
        match kind {
            Meta::Pax => {
                for (k, v) in parse_pax(&buf, self.pos)? {
                    self.pending.pax.insert(k, v);
                }
            }
            // Global records describe the archive, not the next entry; validate and drop them.
            Meta::GlobalPax => {
                parse_pax(&buf, self.pos)?;
            }
            Meta::LongName => self.pending.long_name = Some(cstr(&buf).to_vec()),
            Meta::LongLink => self.pending.long_link = Some(cstr(&buf).to_vec()),
        }
        Ok(())
    }

    fn make_entry(&mut self, h: Header, header_start: u64) -> Result<Entry> {
        let pending = std::mem::take(&mut self.pending);
        let pax = pending.pax;
        let bad = |m: String| ZtocError::InvalidTar(format!("entry at offset {header_start}: {m}"));
        let mut name = h.name;
        let mut linkname = h.linkname;
        let (mut size, mut uid, mut gid) = (h.size, h.uid, h.gid);
        let (mut uname, mut gname) = (h.uname, h.gname);
        let (mut secs, mut nanos) = (h.mtime, 0u32);
        for (k, v) in &pax {
            match k.as_slice() {
                b"path" => name = v.clone(),
                b"linkpath" => linkname = v.clone(),
                b"uname" => uname = v.clone(),
                b"gname" => gname = v.clone(),
                b"size" => size = parse_decimal(v).ok_or_else(|| bad("bad PAX size".into()))?,
                b"uid" => uid = parse_decimal(v).ok_or_else(|| bad("bad PAX uid".into()))? as i64,
                b"gid" => gid = parse_decimal(v).ok_or_else(|| bad("bad PAX gid".into()))? as i64,
                b"mtime" => {
                    (secs, nanos) = parse_pax_time(v).ok_or_else(|| bad("bad PAX mtime".into()))?
                }
                _ => {}
            }
        }
        if let Some(n) = pending.long_name {
            name = n;
        }
        if let Some(l) = pending.long_link {
            linkname = l;
        }
        let kind = match h.typeflag {
            b'0' | b'7' => EntryType::Reg,
            0 if name.last() == Some(&b'/') => EntryType::Dir,
            0 => EntryType::Reg,
            b'1' => EntryType::Hardlink,
            b'2' => EntryType::Symlink,
            b'3' => EntryType::Char,
            b'4' => EntryType::Block,
            b'5' => EntryType::Dir,
            b'6' => EntryType::Fifo,
            t => return Err(bad(format!("unsupported entry type {:?}", char::from(t)))),
        };
        let display = String::from_utf8_lossy(&name).into_owned();
        super::path::check_entry_name(&name).map_err(|m| bad(format!("name {display:?}: {m}")))?;
        if kind == EntryType::Hardlink {
            super::path::check_entry_name(&linkname)
                .map_err(|m| bad(format!("hardlink {display:?} target: {m}")))?;
        }
        Ok(Entry {
            name,
            kind,
            offset: self.pos,
            size,
            linkname,
            mode: h.mode,
            uid: uid as u32,
            gid: gid as u32,
            uname,
            gname,
            mod_time: format_rfc3339(secs, nanos).into_bytes(),
            devmajor: h.devmajor,
            devminor: h.devminor,
            pax: pax.into_iter().collect(),
        })
    }
}

fn padding(n: u64) -> u64 {
    (BLOCK as u64 - n % BLOCK as u64) % BLOCK as u64
}

/// The bytes before the first NUL.
fn cstr(b: &[u8]) -> &[u8] {
    match b.iter().position(|&c| c == 0) {
        Some(i) => &b[..i],
        None => b,
    }
}

struct Header {
    name: Vec<u8>,
    mode: i64,
    uid: i64,
    gid: i64,
    size: u64,
    mtime: i64,
    typeflag: u8,
    linkname: Vec<u8>,
    uname: Vec<u8>,
    gname: Vec<u8>,
    devmajor: i64,
    devminor: i64,
}

impl Header {
    fn parse(b: &[u8; BLOCK], at: u64) -> Result<Header> {
        let bad = |m: &str| ZtocError::InvalidTar(format!("header at offset {at}: {m}"));
        let num = |r: std::ops::Range<usize>, what: &str| {
            parse_numeric(&b[r]).ok_or_else(|| bad(&format!("bad {what} field")))
        };
        let stored = num(148..156, "checksum")?;
        let unsigned: i64 = b
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    i64::from(c)
                }
            })
            .sum();
        let signed: i64 = b
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    i64::from(c as i8)
                }
            })
            .sum();
        if stored != unsigned && stored != signed {
            return Err(bad("checksum mismatch (not a tar archive, or corrupt)"));
        }
        let magic = &b[257..263];
        let version = &b[263..265];
        let ustar = magic == b"ustar\0" && version == b"00";
        let gnu = magic == b"ustar " && version == b" \0";
        let mut name = cstr(&b[0..100]).to_vec();
        if ustar {
            let prefix = cstr(&b[345..500]);
            if !prefix.is_empty() {
                let mut full = prefix.to_vec();
                full.push(b'/');
                full.extend_from_slice(&name);
                name = full;
            }
        }
        let modern = ustar || gnu;
        let size = num(124..136, "size")?;
        if size < 0 {
            return Err(bad("negative size"));
        }
        Ok(Header {
            name,
            mode: num(100..108, "mode")?,
            uid: num(108..116, "uid")?,
            gid: num(116..124, "gid")?,
            size: size as u64,
            mtime: num(136..148, "mtime")?,
            typeflag: b[156],
            linkname: cstr(&b[157..257]).to_vec(),
            uname: if modern {
                cstr(&b[265..297]).to_vec()
            } else {
                Vec::new()
            },
            gname: if modern {
                cstr(&b[297..329]).to_vec()
            } else {
                Vec::new()
            },
            devmajor: if modern {
                num(329..337, "devmajor")?
            } else {
                0
            },
            devminor: if modern {
                num(337..345, "devminor")?
            } else {
                0
            },
        })
    }
}

/// Octal (space/NUL padded) or GNU base-256 numbers.
fn parse_numeric(b: &[u8]) -> Option<i64> {
    if b.first().is_some_and(|&c| c & 0x80 != 0) {
        // Base-256, big-endian two's complement; the first byte's top bit is the marker.
        let inv: u8 = if b[0] & 0x40 != 0 { 0xff } else { 0 };
        let mut x: u64 = 0;
        for (i, &c) in b.iter().enumerate() {
            let mut c = c ^ inv;
            if i == 0 {
                c &= 0x7f;
            }
            if x >> 56 != 0 {
                return None;
            }
            x = x << 8 | u64::from(c);
        }
        if x >> 63 != 0 {
            return None;
        }
        return Some(if inv == 0xff { !(x as i64) } else { x as i64 });
    }
    let s = trim(b);
    if s.is_empty() {
        return Some(0);
    }
    let mut v: i64 = 0;
    for &c in s {
        if !(b'0'..=b'7').contains(&c) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add(i64::from(c - b'0'))?;
    }
    Some(v)
}

fn trim(b: &[u8]) -> &[u8] {
    let is_pad = |c: &u8| *c == b' ' || *c == 0;
    let start = b.iter().position(|c| !is_pad(c)).unwrap_or(b.len());
    let end = b.iter().rposition(|c| !is_pad(c)).map_or(start, |i| i + 1);
    &b[start..end]
}

fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// PAX time: `[-]seconds[.fraction]`, fraction truncated to nanoseconds.
fn parse_pax_time(v: &[u8]) -> Option<(i64, u32)> {
    let (neg, v) = match v.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let (s, frac) = match v.iter().position(|&c| c == b'.') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &b""[..]),
    };
    let secs = parse_decimal(s)? as i64;
    if !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut nanos: u32 = 0;
    for i in 0..9 {
        nanos = nanos * 10 + frac.get(i).map_or(0, |c| u32::from(c - b'0'));
    }
    if !neg {
        return Some((secs, nanos));
    }
    Some(if nanos == 0 {
        (-secs, 0)
    } else {
        (-secs - 1, 1_000_000_000 - nanos)
    })
}

/// PAX records: `"%d %s=%s\n"`, the length counting the whole record.
fn parse_pax(mut buf: &[u8], at: u64) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let bad = || ZtocError::InvalidTar(format!("malformed PAX record before offset {at}"));
    let mut out = Vec::new();
    // Some writers pad the block with NULs after the last record.
    while !buf.is_empty() && buf[0] != 0 {
        let sp = buf.iter().position(|&c| c == b' ').ok_or_else(bad)?;
        let len = parse_decimal(&buf[..sp]).ok_or_else(bad)? as usize;
        if len <= sp + 1 || len > buf.len() || buf[len - 1] != b'\n' {
            return Err(bad());
        }
        let rec = &buf[sp + 1..len - 1];
        let eq = rec.iter().position(|&c| c == b'=').ok_or_else(bad)?;
        out.push((rec[..eq].to_vec(), rec[eq + 1..].to_vec()));
        buf = &buf[len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numeric_fields() {
        assert_eq!(parse_numeric(b"0000644\0"), Some(0o644));
        assert_eq!(parse_numeric(b"   12 \0"), Some(10));
        assert_eq!(parse_numeric(b"\0\0\0"), Some(0));
        assert_eq!(parse_numeric(&[0x80, 0, 0, 0, 0, 0, 1, 0]), Some(256));
        assert_eq!(parse_numeric(&[0xff; 8]), Some(-1));
        assert_eq!(parse_numeric(b"12x"), None);
    }

    #[test]
    fn pax_records_and_times() {
        let recs = parse_pax(b"16 path=a/b/cde\n8 x=y=z\n", 0).unwrap();
        assert_eq!(recs[0], (b"path".to_vec(), b"a/b/cde".to_vec()));
        assert_eq!(recs[1], (b"x".to_vec(), b"y=z".to_vec()));
        assert!(parse_pax(b"99 path=a\n", 0).is_err());
        assert!(parse_pax(b"5 a=b\n", 0).is_err());
        assert_eq!(
            parse_pax_time(b"1700000000.123456789"),
            Some((1_700_000_000, 123_456_789))
        );
        assert_eq!(parse_pax_time(b"-315619200"), Some((-315_619_200, 0)));
        assert_eq!(parse_pax_time(b"-1.25"), Some((-2, 750_000_000)));
        assert_eq!(parse_pax_time(b"1.1234567891"), Some((1, 123_456_789)));
    }

    #[test]
    fn rejects_non_tar() {
        let mut s = TarScanner::new();
        assert!(s.feed(&[b'x'; 512]).is_err());
    }
}
