//! A small, bounds-checked FlatBuffers reader.
//!
//! The generic FlatBuffers verifier rejects strings that are not UTF-8, but upstream SOCI writes tar
//! names and xattr values as raw bytes. This reader checks every offset against the buffer instead,
//! returns strings as byte slices, and never allocates more than the buffer itself can justify.

use super::ZtocError;

type Result<T> = std::result::Result<T, ZtocError>;

fn bad(what: impl Into<String>) -> ZtocError {
    ZtocError::Malformed(what.into())
}

/// A position inside a FlatBuffers buffer that holds a table.
#[derive(Clone, Copy)]
pub(crate) struct Table<'a> {
    buf: &'a [u8],
    pos: usize,
    vtable: usize,
    vtable_len: usize,
}

fn read_u16(buf: &[u8], pos: usize) -> Result<u16> {
    buf.get(pos..pos + 2)
        .map(|b| u16::from_le_bytes([b[0], b[1]]))
        .ok_or_else(|| bad("offset past the end of the buffer"))
}

fn read_u32(buf: &[u8], pos: usize) -> Result<u32> {
    pos.checked_add(4)
        .and_then(|end| buf.get(pos..end))
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| bad("offset past the end of the buffer"))
}

fn follow(buf: &[u8], pos: usize) -> Result<usize> {
    let off = read_u32(buf, pos)? as usize;
    let target = pos.checked_add(off).ok_or_else(|| bad("offset overflow"))?;
    if target >= buf.len() {
        return Err(bad("offset points outside the buffer"));
    }
    Ok(target)
}

impl<'a> Table<'a> {
    /// The root table of a finished buffer.
    pub(crate) fn root(buf: &'a [u8]) -> Result<Self> {
        if buf.len() < 8 {
            return Err(bad("buffer too short for a FlatBuffers root"));
        }
        let pos = follow(buf, 0)?;
        Self::at(buf, pos)
    }

    fn at(buf: &'a [u8], pos: usize) -> Result<Self> {
        let soff = read_u32(buf, pos)? as i32 as i64;
        let vtable = pos as i64 - soff;
        if vtable < 0 || vtable as usize + 4 > buf.len() {
            return Err(bad("vtable outside the buffer"));
        }
        let vtable = vtable as usize;
        let vtable_len = read_u16(buf, vtable)? as usize;
        if vtable_len < 4 || vtable_len % 2 != 0 || vtable + vtable_len > buf.len() {
            return Err(bad("malformed vtable"));
        }
        let table_len = read_u16(buf, vtable + 2)? as usize;
        if pos + table_len > buf.len() {
            return Err(bad("table runs past the end of the buffer"));
        }
        Ok(Table {
            buf,
            pos,
            vtable,
            vtable_len,
        })
    }

    /// Absolute position of field `id`, or None when absent.
    fn field(&self, id: usize, size: usize) -> Result<Option<usize>> {
        let slot = 4 + 2 * id;
        if slot + 2 > self.vtable_len {
            return Ok(None);
        }
        let off = read_u16(self.buf, self.vtable + slot)? as usize;
        if off == 0 {
            return Ok(None);
        }
        let pos = self.pos + off;
        if pos + size > self.buf.len() {
            return Err(bad("field past the end of the buffer"));
        }
        Ok(Some(pos))
    }

    fn scalar<const N: usize>(&self, id: usize) -> Result<Option<[u8; N]>> {
        Ok(self
            .field(id, N)?
            .map(|p| self.buf[p..p + N].try_into().expect("length checked")))
    }

    pub(crate) fn i64(&self, id: usize, default: i64) -> Result<i64> {
        Ok(self.scalar::<8>(id)?.map_or(default, i64::from_le_bytes))
    }

    pub(crate) fn i32(&self, id: usize, default: i32) -> Result<i32> {
        Ok(self.scalar::<4>(id)?.map_or(default, i32::from_le_bytes))
    }

    pub(crate) fn u32(&self, id: usize, default: u32) -> Result<u32> {
        Ok(self.scalar::<4>(id)?.map_or(default, u32::from_le_bytes))
    }

    pub(crate) fn i8(&self, id: usize, default: i8) -> Result<i8> {
        Ok(self.scalar::<1>(id)?.map_or(default, i8::from_le_bytes))
    }

    /// A string field as raw bytes (no UTF-8 check); empty when absent.
    pub(crate) fn bytes(&self, id: usize) -> Result<&'a [u8]> {
        match self.field(id, 4)? {
            None => Ok(&[]),
            Some(p) => vector_bytes(self.buf, follow(self.buf, p)?),
        }
    }

    pub(crate) fn table(&self, id: usize) -> Result<Option<Table<'a>>> {
        match self.field(id, 4)? {
            None => Ok(None),
            Some(p) => Ok(Some(Table::at(self.buf, follow(self.buf, p)?)?)),
        }
    }

    /// A vector of offsets (tables or strings): the positions of its elements' slots.
    pub(crate) fn offsets(&self, id: usize) -> Result<OffsetVec<'a>> {
        match self.field(id, 4)? {
            None => Ok(OffsetVec {
                buf: self.buf,
                start: 0,
                len: 0,
            }),
            Some(p) => {
                let v = follow(self.buf, p)?;
                let len = read_u32(self.buf, v)? as usize;
                let start = v + 4;
                // Bounds first, so a hostile length never drives an allocation.
                if len
                    .checked_mul(4)
                    .and_then(|n| n.checked_add(start))
                    .is_none_or(|end| end > self.buf.len())
                {
                    return Err(bad("vector runs past the end of the buffer"));
                }
                Ok(OffsetVec {
                    buf: self.buf,
                    start,
                    len,
                })
            }
        }
    }
}

/// A length-prefixed byte vector (also strings) at `v`.
fn vector_bytes(buf: &[u8], v: usize) -> Result<&[u8]> {
    let len = read_u32(buf, v)? as usize;
    let start = v + 4;
    start
        .checked_add(len)
        .and_then(|end| buf.get(start..end))
        .ok_or_else(|| bad("vector runs past the end of the buffer"))
}

/// A bounds-checked vector of offsets.
pub(crate) struct OffsetVec<'a> {
    buf: &'a [u8],
    start: usize,
    len: usize,
}

impl<'a> OffsetVec<'a> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn table(&self, i: usize) -> Result<Table<'a>> {
        Table::at(self.buf, follow(self.buf, self.start + 4 * i)?)
    }

    pub(crate) fn bytes(&self, i: usize) -> Result<&'a [u8]> {
        vector_bytes(self.buf, follow(self.buf, self.start + 4 * i)?)
    }
}

impl<'a> Table<'a> {
    /// A `[ubyte]` field; empty when absent.
    pub(crate) fn ubytes(&self, id: usize) -> Result<&'a [u8]> {
        self.bytes(id)
    }
}
