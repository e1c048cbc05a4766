//! Whole-layer verification: every file read through the zTOC against a plain sequential read.

use std::io::{self, Read};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::builder::{detect, BlobKind};
use super::reader::LayerReader;
use super::{EntryType, Ztoc, ZtocError};

/// What [`verify_layer`] checked and what differed.
#[derive(Debug, Default, serde::Serialize)]
pub struct VerifyReport {
    /// Spans whose compressed bytes matched their digests.
    pub spans: usize,
    /// Regular files compared.
    pub files: usize,
    /// Hardlinks whose target resolved.
    pub hardlinks: usize,
    /// One line per problem; empty when the layer and zTOC agree.
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

struct HashWriter(Sha256);

impl io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Compares every span digest and every regular file read through `ztoc` with a sequential
/// decompression of `layer` (opened twice: once sequentially, once as a random-access source).
pub fn verify_layer(ztoc: Arc<Ztoc>, layer: &std::path::Path) -> Result<VerifyReport, ZtocError> {
    let source = std::fs::File::open(layer)?;
    if source.metadata()?.len() != ztoc.compressed_size {
        return Err(ZtocError::Invalid(format!(
            "layer is {} bytes but the zTOC is for a {}-byte blob",
            source.metadata()?.len(),
            ztoc.compressed_size
        )));
    }
    let reader = LayerReader::new(ztoc.clone(), source).with_span_cache(2);
    let mut report = VerifyReport::default();
    for id in 0..ztoc.span_count() {
        match reader.fetch_span(id) {
            Ok(_) => report.spans += 1,
            Err(e) => report.problems.push(e.to_string()),
        }
    }

    let mut file = io::BufReader::with_capacity(1 << 20, std::fs::File::open(layer)?);
    let mut head = [0u8; 8];
    let n = file.read(&mut head)?;
    let file = io::Cursor::new(head[..n].to_vec()).chain(file);
    let plain: Box<dyn Read> = match detect(&head[..n])? {
        BlobKind::Gzip => Box::new(flate2::read::MultiGzDecoder::new(file)),
        BlobKind::Tar => Box::new(file),
    };
    let mut plain = plain.take(ztoc.uncompressed_size);
    let mut pos = 0u64;
    let mut chunk = vec![0u8; 1 << 20];
    for (i, e) in ztoc.entries.iter().enumerate() {
        match e.kind {
            EntryType::Hardlink => {
                match ztoc.resolve_hardlink(i) {
                    Ok(_) => report.hardlinks += 1,
                    Err(err) => report.problems.push(err.to_string()),
                }
                continue;
            }
            EntryType::Reg => {}
            _ => continue,
        }
        io::copy(&mut (&mut plain).take(e.offset - pos), &mut io::sink())?;
        let mut seq = HashWriter(Sha256::new());
        let copied = io::copy(&mut (&mut plain).take(e.size), &mut seq)?;
        pos = e.offset + copied;
        if copied != e.size {
            report.problems.push(format!(
                "{}: layer ends after {copied} of {} bytes",
                e.display_name(),
                e.size
            ));
            break;
        }
        let mut via = Sha256::new();
        let mut off = 0u64;
        let result = loop {
            match reader.read_entry(i, off, &mut chunk) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    via.update(&chunk[..n]);
                    off += n as u64;
                }
                Err(err) => break Err(err),
            }
        };
        report.files += 1;
        match result {
            Err(err) => report.problems.push(format!("{}: {err}", e.display_name())),
            Ok(()) if via.finalize() != seq.0.finalize() => report.problems.push(format!(
                "{}: bytes read through the zTOC differ",
                e.display_name()
            )),
            Ok(()) => {}
        }
    }
    Ok(report)
}
