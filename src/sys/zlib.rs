//! A minimal safe wrapper over zlib's inflate API, as implemented by zlib-rs (`libz-rs-sys`).
//!
//! Why the C-style API: resuming a deflate stream at a checkpoint needs `inflatePrime` (the bits
//! of a byte shared by two blocks) and stopping at block boundaries needs `Z_BLOCK` with
//! `data_type`; neither is exposed by flate2. Why zlib-rs: it inflates about twice as fast as
//! stock zlib here, and inflating spans is much of a lazy start's CPU time. The wrapper keeps the
//! `z_stream` boxed (the state keeps a pointer back to it), points `next_in`/`next_out` only at
//! the slices passed to one call, and frees it on drop.

use std::ffi::{c_int, c_uint};
use std::ptr;

use libz_rs_sys as z;

/// How the inflater expects its input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// A gzip member with header and trailer (CRC checked).
    Gzip,
    /// A raw deflate stream, as found after a checkpoint.
    Raw,
}

impl Format {
    fn window_bits(self) -> c_int {
        match self {
            Format::Gzip => 31,
            Format::Raw => -15,
        }
    }
}

/// What one `inflate` call did.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Step {
    pub consumed: usize,
    pub produced: usize,
    /// The end of the deflate stream (and, for gzip, its trailer) was reached.
    pub stream_end: bool,
    /// zlib's `data_type`: unused bits of the last input byte, +64 in the last block, +128 at a
    /// block boundary or just after a header.
    pub data_type: c_int,
}

/// A zlib inflate stream.
pub(crate) struct Inflater {
    strm: Box<z::z_stream>,
}

// The stream owns its zlib state exclusively; zlib keeps no thread-local data.
unsafe impl Send for Inflater {}

impl Inflater {
    pub(crate) fn new(format: Format) -> Self {
        // The default stream uses zlib-rs's own (Rust) allocator.
        let mut strm = Box::new(z::z_stream::default());
        // SAFETY: strm is a valid, boxed (address-stable) z_stream with allocator functions set.
        let rc = unsafe {
            z::inflateInit2_(
                &mut *strm,
                format.window_bits(),
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as c_int,
            )
        };
        assert_eq!(rc, z::Z_OK, "inflateInit2 failed: out of memory");
        Inflater { strm }
    }

    /// Starts a new stream of the given format, keeping the allocated state.
    pub(crate) fn reset(&mut self, format: Format) {
        // SAFETY: the stream was initialized in `new`.
        let rc = unsafe { z::inflateReset2(&mut *self.strm, format.window_bits()) };
        debug_assert_eq!(rc, z::Z_OK);
    }

    /// Inserts the top `bits` bits of `byte` as the start of the input (raw streams only).
    pub(crate) fn prime(&mut self, bits: u8, byte: u8) -> Result<(), String> {
        if bits == 0 {
            return Ok(());
        }
        let value = c_int::from(byte >> (8 - bits));
        // SAFETY: the stream was initialized in `new`.
        let rc = unsafe { z::inflatePrime(&mut *self.strm, c_int::from(bits), value) };
        if rc == z::Z_OK {
            Ok(())
        } else {
            Err(format!("inflatePrime failed ({rc})"))
        }
    }

    /// Sets the window of data preceding the resume point (raw streams only).
    pub(crate) fn set_dictionary(&mut self, dict: &[u8]) -> Result<(), String> {
        // SAFETY: zlib copies `dict.len()` bytes from a valid slice.
        let rc = unsafe {
            z::inflateSetDictionary(&mut *self.strm, dict.as_ptr(), dict.len() as c_uint)
        };
        if rc == z::Z_OK {
            Ok(())
        } else {
            Err(format!("inflateSetDictionary failed ({rc})"))
        }
    }

    /// Inflates from `input` into `output`. With `stop_at_block`, returns at every deflate block
    /// boundary (zlib's `Z_BLOCK`).
    pub(crate) fn inflate(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        stop_at_block: bool,
    ) -> Result<Step, String> {
        // zlib counts in c_uint; larger slices are processed in part and the caller loops.
        let avail_in = input.len().min(c_uint::MAX as usize) as c_uint;
        let avail_out = output.len().min(c_uint::MAX as usize) as c_uint;
        self.strm.next_in = input.as_ptr();
        self.strm.avail_in = avail_in;
        self.strm.next_out = output.as_mut_ptr();
        self.strm.avail_out = avail_out;
        let flush = if stop_at_block {
            z::Z_BLOCK
        } else {
            z::Z_NO_FLUSH
        };
        // SAFETY: next_in/next_out point at live slices of at least avail_in/avail_out bytes;
        // zlib reads only the input and writes only the output within those bounds.
        let rc = unsafe { z::inflate(&mut *self.strm, flush) };
        let consumed = (avail_in - self.strm.avail_in) as usize;
        let produced = (avail_out - self.strm.avail_out) as usize;
        self.strm.next_in = ptr::null();
        self.strm.avail_in = 0;
        self.strm.next_out = ptr::null_mut();
        self.strm.avail_out = 0;
        match rc {
            z::Z_OK | z::Z_BUF_ERROR | z::Z_STREAM_END => Ok(Step {
                consumed,
                produced,
                stream_end: rc == z::Z_STREAM_END,
                data_type: self.strm.data_type,
            }),
            z::Z_NEED_DICT => Err("deflate stream needs a preset dictionary".into()),
            _ => Err(self.message(rc)),
        }
    }

    fn message(&self, rc: c_int) -> String {
        if self.strm.msg.is_null() {
            format!("inflate error {rc}")
        } else {
            // SAFETY: zlib sets msg to a static NUL-terminated string.
            let msg = unsafe { std::ffi::CStr::from_ptr(self.strm.msg) };
            msg.to_string_lossy().into_owned()
        }
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        // SAFETY: the stream was initialized in `new` and is ended once.
        unsafe {
            z::inflateEnd(&mut *self.strm);
        }
    }
}
