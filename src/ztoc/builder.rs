//! Builds a zTOC in one streaming pass over a layer blob.
//!
//! Gzip layers are inflated block by block (zlib's `Z_BLOCK`); a checkpoint is placed at a block
//! boundary that is not after the final block when none exists yet or when more than `span_size`
//! bytes were output since the last one (formats.md §1.2), so checkpoints land where upstream's do.
//! The inflated stream feeds the tar scanner, and every compressed byte feeds the current span's
//! sha256. Memory stays bounded: fixed buffers plus 32 KiB per checkpoint and the entry table.
//!
//! [`build_with_table`] also makes, in the same pass, the layer's table form ([`super::table`])
//! with finer spans than the zTOC: its checkpoints are the zTOC's plus one wherever more than the
//! table's span size was output since the last, and their windows go compressed into the
//! windows blob as they are met (~12 KiB each, not 32 KiB held until the end).

use std::io::{ErrorKind, Read};

use sha2::{Digest, Sha256};

use super::table::{self, Split};
use super::tar::TarScanner;
use super::{
    Checkpoint, Compression, Window, Ztoc, ZtocError, BUILD_TOOL, DEFAULT_MIN_LAYER_SIZE,
    MAX_BUILD_SPAN_SIZE, UPSTREAM_SPAN_SIZE, WINDOW_SIZE, ZTOC_VERSION,
};
use crate::sys::zlib::{Format, Inflater};

const IN_BUF: usize = 256 * 1024;
const OUT_BUF: usize = 256 * 1024;

type Result<T> = std::result::Result<T, ZtocError>;

/// Options for [`build`].
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Uncompressed bytes per span (at least; spans end at the next block boundary). Default:
    /// [`UPSTREAM_SPAN_SIZE`], as upstream builds; `convert` uses [`super::DEFAULT_SPAN_SIZE`].
    pub span_size: u64,
    /// Layers whose blob is smaller than this are refused with [`ZtocError::LayerTooSmall`].
    pub min_layer_size: u64,
    /// Written as `build_tool_identifier`.
    pub build_tool: String,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            span_size: UPSTREAM_SPAN_SIZE,
            min_layer_size: DEFAULT_MIN_LAYER_SIZE,
            build_tool: BUILD_TOOL.to_string(),
        }
    }
}

/// What kind of blob a layer is, from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlobKind {
    Gzip,
    Tar,
}

/// Identifies the compression from the first bytes of a blob.
pub fn detect(head: &[u8]) -> Result<BlobKind> {
    let unsupported = |name: &str| {
        Err(ZtocError::UnsupportedCompression(format!(
            "{name} layers cannot be indexed (only gzip and plain tar)"
        )))
    };
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(BlobKind::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        unsupported("zstd")
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        unsupported("xz")
    } else if head.starts_with(b"BZh") {
        unsupported("bzip2")
    } else {
        Ok(BlobKind::Tar)
    }
}

/// Reads until `buf` is full or the input ends; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(n)
}

/// Builds the zTOC of a layer blob read from `input`. `progress` gets the compressed bytes
/// consumed so far.
pub fn build(input: impl Read, opts: &BuildOptions, progress: &mut dyn FnMut(u64)) -> Result<Ztoc> {
    Ok(build_with_table(input, opts, None, progress)?.0)
}

/// [`build`], and with `table_span_size` the layer's table form too, its spans that size (at
/// most the zTOC's; plain tar layers get a table with the zTOC's spans).
pub fn build_with_table(
    mut input: impl Read,
    opts: &BuildOptions,
    table_span_size: Option<u64>,
    progress: &mut dyn FnMut(u64),
) -> Result<(Ztoc, Option<Split>)> {
    for size in [Some(opts.span_size), table_span_size]
        .into_iter()
        .flatten()
    {
        if size == 0 {
            return Err(ZtocError::Invalid("span size must be positive".into()));
        }
        if size > MAX_BUILD_SPAN_SIZE {
            return Err(ZtocError::Invalid(format!(
                "span size {size} is larger than the {MAX_BUILD_SPAN_SIZE} accepted (spans are read whole)"
            )));
        }
    }
    let mut inbuf = vec![0u8; IN_BUF];
    let head = read_full(&mut input, &mut inbuf)?;
    if head == 0 {
        return Err(ZtocError::InvalidTar("empty layer".into()));
    }
    // A table with the zTOC's own spans is the zTOC split after the build (one hash per byte).
    let fine = table_span_size.filter(|&s| s < opts.span_size);
    let (ztoc, table) = match detect(&inbuf[..head])? {
        BlobKind::Gzip => build_gzip(input, inbuf, head, opts, fine, progress)?,
        BlobKind::Tar => (build_tar(input, inbuf, head, opts, progress)?, None),
    };
    if ztoc.compressed_size < opts.min_layer_size {
        return Err(ZtocError::LayerTooSmall {
            size: ztoc.compressed_size,
            min: opts.min_layer_size,
        });
    }
    ztoc.validate()?;
    let split = match (table, table_span_size) {
        (Some(t), _) => {
            t.0.validate()?;
            Some(Split {
                table: table::encode(&t.0)?,
                windows: t.1,
            })
        }
        (None, Some(_)) => Some(table::split(&ztoc)?),
        (None, None) => None,
    };
    Ok((ztoc, split))
}

/// A table with finer spans than its zTOC (windows stored apart), and its windows blob.
type FineTable = (Ztoc, Vec<u8>);

/// The table's side of a gzip build: its own checkpoints, span digests and windows blob.
struct FineSpans {
    span_size: u64,
    checkpoints: Vec<Checkpoint>,
    digests: Vec<[u8; 32]>,
    hasher: Sha256,
    windows: Vec<u8>,
}

fn finish_digest(h: Sha256) -> [u8; 32] {
    h.finalize().into()
}

fn build_gzip(
    mut input: impl Read,
    mut inbuf: Vec<u8>,
    head: usize,
    opts: &BuildOptions,
    table_span_size: Option<u64>,
    progress: &mut dyn FnMut(u64),
) -> Result<(Ztoc, Option<FineTable>)> {
    let corrupt =
        |at: u64, m: &str| ZtocError::CorruptLayer(format!("{m} at compressed offset {at}"));
    let mut inf = Inflater::new(Format::Gzip);
    // Output buffer; its first WINDOW_SIZE bytes always hold the window before `fill`
    // (zeros at the start of the stream, as the format wants).
    let mut out = vec![0u8; WINDOW_SIZE + OUT_BUF];
    let mut fill = WINDOW_SIZE;
    let (mut start, mut end) = (0usize, head);
    let mut eof = head < inbuf.len();
    let mut total_in: u64 = 0;
    let mut total_out: u64 = 0;
    let mut in_member = true;
    let mut last_byte = 0u8;
    let mut hasher = Sha256::new();
    let mut digests: Vec<[u8; 32]> = Vec::new();
    let mut checkpoints: Vec<Checkpoint> = Vec::new();
    let mut tar = TarScanner::new();
    let mut fine = table_span_size.map(|span_size| FineSpans {
        span_size,
        checkpoints: Vec::new(),
        digests: Vec::new(),
        hasher: Sha256::new(),
        windows: Vec::new(),
    });

    loop {
        if start == end {
            if eof {
                break;
            }
            end = read_full(&mut input, &mut inbuf)?;
            start = 0;
            eof = end < inbuf.len();
            continue;
        }
        if !in_member {
            // Between members: another gzip member, or zero padding to the end.
            if inbuf[start] == 0x1f {
                inf.reset(Format::Gzip);
                in_member = true;
            } else if inbuf[start..end].iter().all(|&b| b == 0) {
                hasher.update(&inbuf[start..end]);
                if let Some(f) = &mut fine {
                    f.hasher.update(&inbuf[start..end]);
                }
                total_in += (end - start) as u64;
                start = end;
                continue;
            } else {
                return Err(corrupt(
                    total_in,
                    "trailing data after the last gzip member",
                ));
            }
        }
        if fill == out.len() {
            out.copy_within(fill - WINDOW_SIZE..fill, 0);
            fill = WINDOW_SIZE;
        }
        let step = inf
            .inflate(&inbuf[start..end], &mut out[fill..], true)
            .map_err(|m| corrupt(total_in, &m))?;
        if step.consumed > 0 {
            hasher.update(&inbuf[start..start + step.consumed]);
            if let Some(f) = &mut fine {
                f.hasher.update(&inbuf[start..start + step.consumed]);
            }
            last_byte = inbuf[start + step.consumed - 1];
            start += step.consumed;
            total_in += step.consumed as u64;
        }
        if step.produced > 0 {
            tar.feed(&out[fill..fill + step.produced])?;
            fill += step.produced;
            total_out += step.produced as u64;
        }
        progress(total_in);
        if step.stream_end {
            in_member = false;
            continue;
        }
        let at_boundary = step.data_type & 128 != 0 && step.data_type & 64 == 0;
        let last_out = checkpoints.last().map(|c| c.output);
        let bits = (step.data_type & 7) as u8;
        let coarse = at_boundary && last_out.is_none_or(|l| total_out - l > opts.span_size);
        if let Some(f) = &mut fine {
            let last = f.checkpoints.last().map(|c| c.output);
            if coarse || at_boundary && last.is_none_or(|l| total_out - l > f.span_size) {
                start_span(
                    &mut f.hasher,
                    &mut f.digests,
                    f.checkpoints.is_empty(),
                    bits,
                    last_byte,
                );
                let window = &out[fill - WINDOW_SIZE..fill];
                f.checkpoints.push(Checkpoint {
                    input: total_in,
                    output: total_out,
                    bits,
                    window: Window::Remote(table::pack_window(window, &mut f.windows, coarse)?),
                });
            }
        }
        if coarse {
            start_span(
                &mut hasher,
                &mut digests,
                checkpoints.is_empty(),
                bits,
                last_byte,
            );
            checkpoints.push(Checkpoint {
                input: total_in,
                output: total_out,
                bits,
                window: out[fill - WINDOW_SIZE..fill].into(),
            });
        } else if step.consumed == 0 && step.produced == 0 && start < end {
            return Err(corrupt(total_in, "inflate made no progress"));
        }
    }
    if in_member {
        return Err(corrupt(total_in, "gzip stream truncated"));
    }
    if checkpoints.is_empty() {
        return Err(corrupt(total_in, "gzip stream holds no deflate data"));
    }
    digests.push(finish_digest(hasher));
    let (entries, tar_size) = tar.finish()?;
    let ztoc = Ztoc {
        version: ZTOC_VERSION.into(),
        build_tool: opts.build_tool.clone().into_bytes(),
        compressed_size: total_in,
        uncompressed_size: tar_size,
        entries,
        span_size: opts.span_size,
        span_digests: digests,
        compression: Compression::Gzip { checkpoints },
    };
    let table = fine.map(|mut f| {
        f.digests.push(finish_digest(f.hasher));
        let t = Ztoc {
            span_size: f.span_size,
            span_digests: f.digests,
            compression: Compression::Gzip {
                checkpoints: f.checkpoints,
            },
            ..ztoc.clone()
        };
        (t, f.windows)
    });
    Ok((ztoc, table))
}

/// Ends the span being hashed (none before the first checkpoint) and starts the next one.
fn start_span(
    hasher: &mut Sha256,
    digests: &mut Vec<[u8; 32]>,
    first: bool,
    bits: u8,
    last_byte: u8,
) {
    if first {
        *hasher = Sha256::new();
    } else {
        digests.push(finish_digest(std::mem::take(hasher)));
    }
    if bits != 0 {
        // Consecutive spans share the byte whose bits straddle the boundary.
        hasher.update([last_byte]);
    }
}

fn build_tar(
    mut input: impl Read,
    mut inbuf: Vec<u8>,
    head: usize,
    opts: &BuildOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<Ztoc> {
    let mut tar = TarScanner::new();
    let mut hasher = Sha256::new();
    let mut in_span: u64 = 0;
    let mut digests = Vec::new();
    let mut total: u64 = 0;
    let mut len = head;
    while len > 0 {
        let mut chunk = &inbuf[..len];
        tar.feed(chunk)?;
        while !chunk.is_empty() {
            let n = ((opts.span_size - in_span) as usize).min(chunk.len());
            hasher.update(&chunk[..n]);
            in_span += n as u64;
            chunk = &chunk[n..];
            if in_span == opts.span_size {
                digests.push(finish_digest(std::mem::take(&mut hasher)));
                in_span = 0;
            }
        }
        total += len as u64;
        progress(total);
        len = read_full(&mut input, &mut inbuf)?;
    }
    if in_span > 0 {
        digests.push(finish_digest(hasher));
    }
    let (entries, tar_size) = tar.finish()?;
    Ok(Ztoc {
        version: ZTOC_VERSION.into(),
        build_tool: opts.build_tool.clone().into_bytes(),
        compressed_size: total,
        uncompressed_size: tar_size,
        entries,
        span_size: opts.span_size,
        span_digests: digests,
        compression: Compression::Uncompressed { size: total },
    })
}
