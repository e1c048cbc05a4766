//! Fetchers: where compressed layer bytes come from (an OCI registry, an S3 mirror, a local OCI
//! layout, or a backend from another crate), tried in the configured order.

pub mod auth;
pub mod handover;
pub mod local;
pub mod registry;
pub mod s3;

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::digest::Digest;
use crate::reference::Reference;

/// Which blob: the repository it belongs to and its digest.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BlobLocator {
    pub reference: Reference,
    pub digest: Digest,
}

impl BlobLocator {
    pub fn new(reference: Reference, digest: impl Into<Digest>) -> Self {
        BlobLocator {
            reference,
            digest: digest.into(),
        }
    }

    /// The hex part of the digest (for paths and object keys).
    pub fn hex(&self) -> &str {
        self.digest.hex()
    }
}

impl fmt::Display for BlobLocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.reference.name(), self.digest)
    }
}

/// A backend's own error, kept as the source of a [`FetchError`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a fetch failed. Its `Display` is this level's message only; the cause, when there is
/// one, is its `source()` (print the whole chain with [`crate::report::Chain`] or anyhow's `{:#}`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The backend does not have the blob: the next fetcher is tried.
    #[error("not found: {0}")]
    NotFound(String),
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    #[error("HTTP {status} from {url}: {message}")]
    Http {
        status: u16,
        url: String,
        message: String,
    },
    /// Bytes that do not match their digest or expected length: never served.
    #[error("integrity failure: {0}")]
    Integrity(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("connection failed: {message}")]
    Connection {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
    #[error("invalid request: {0}")]
    Invalid(String),
    /// Anything else a backend reports.
    #[error("{message}")]
    Backend {
        message: String,
        #[source]
        source: Option<BoxError>,
    },
}

impl FetchError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, FetchError::NotFound(_))
    }

    /// A backend failure caused by `source`.
    pub fn backend(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        FetchError::Backend {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A backend failure with no underlying error.
    pub fn backend_msg(message: impl Into<String>) -> Self {
        FetchError::Backend {
            message: message.into(),
            source: None,
        }
    }

    /// A connection that failed or broke, caused by `source`.
    pub fn connection(message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        FetchError::Connection {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    /// A connection that failed or broke, with no underlying error.
    pub fn connection_msg(message: impl Into<String>) -> Self {
        FetchError::Connection {
            message: message.into(),
            source: None,
        }
    }
}

/// A manifest or image index as a backend holds it.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    pub data: Bytes,
    /// The media type the backend declared (an HTTP `Content-Type`, a mirror's tag record);
    /// empty when it declared none.
    pub media_type: String,
    pub digest: Digest,
}

impl FetchedManifest {
    /// Wraps `data`, computing its digest; with `want`, content of another digest is an
    /// integrity error (never returned).
    pub fn checked(
        data: Bytes,
        media_type: impl Into<String>,
        want: Option<&Digest>,
        what: &dyn fmt::Display,
    ) -> Result<Self, FetchError> {
        let digest = crate::index::sha256_digest(&data);
        if let Some(want) = want.filter(|w| **w != digest) {
            return Err(FetchError::Integrity(format!(
                "{what}: manifest content has digest {digest}, not {want}"
            )));
        }
        Ok(FetchedManifest {
            data,
            media_type: media_type.into(),
            digest,
        })
    }
}

/// A source of blob bytes. Implementations must return exactly the bytes asked for.
#[async_trait]
pub trait Fetcher: Send + Sync + fmt::Debug {
    /// A short name for logs and errors (usually the configured `type`).
    fn name(&self) -> &str;

    /// The blob's size in bytes.
    async fn blob_size(&self, blob: &BlobLocator) -> Result<u64, FetchError>;

    /// Bytes `[range.start, range.end)` of the blob.
    async fn read_range(&self, blob: &BlobLocator, range: Range<u64>) -> Result<Bytes, FetchError>;

    /// The manifest or image index `reference` names (by digest when it has one, else by tag),
    /// for backends that hold manifests; `accept` lists the media types the caller understands.
    /// The default holds none (`NotFound`), and the next fetcher is asked.
    async fn manifest(
        &self,
        reference: &Reference,
        accept: &[&str],
    ) -> Result<FetchedManifest, FetchError> {
        let _ = accept;
        Err(FetchError::NotFound(format!(
            "{}: the {} fetcher holds no manifests",
            reference,
            self.name()
        )))
    }

    /// The referrers of manifest `subject` in `reference`'s repository with `artifact_type`, as
    /// an OCI image index; `Ok(None)` when the backend has a referrers API and it lists nothing.
    /// The default has no referrers API (`NotFound`): callers then look for the fallback tag.
    async fn referrers(
        &self,
        reference: &Reference,
        subject: &str,
        artifact_type: &str,
    ) -> Result<Option<Bytes>, FetchError> {
        let _ = (subject, artifact_type);
        Err(FetchError::NotFound(format!(
            "{}: the {} fetcher has no referrers API",
            reference.name(),
            self.name()
        )))
    }

    /// Several ranges: adjacent or overlapping ones are merged into one request, and the requests
    /// run concurrently.
    async fn read_ranges(
        &self,
        blob: &BlobLocator,
        ranges: &[Range<u64>],
    ) -> Result<Vec<Bytes>, FetchError> {
        let groups = coalesce(ranges);
        let fetched = futures::future::try_join_all(
            groups.iter().map(|(r, _)| self.read_range(blob, r.clone())),
        )
        .await?;
        Ok(split_coalesced(ranges, &groups, &fetched))
    }
}

/// Merges ranges that touch or overlap (spans overlap by one byte). Returns each merged range
/// with the indices of the input ranges it serves.
pub fn coalesce(ranges: &[Range<u64>]) -> Vec<(Range<u64>, Vec<usize>)> {
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&i| ranges[i].start);
    let mut out: Vec<(Range<u64>, Vec<usize>)> = Vec::new();
    for i in order {
        let r = &ranges[i];
        match out.last_mut() {
            Some((cur, members)) if r.start <= cur.end => {
                cur.end = cur.end.max(r.end);
                members.push(i);
            }
            _ => out.push((r.clone(), vec![i])),
        }
    }
    out
}

fn split_coalesced(
    ranges: &[Range<u64>],
    groups: &[(Range<u64>, Vec<usize>)],
    fetched: &[Bytes],
) -> Vec<Bytes> {
    let mut out = vec![Bytes::new(); ranges.len()];
    for ((g, members), data) in groups.iter().zip(fetched) {
        for &i in members {
            let r = &ranges[i];
            out[i] = data.slice((r.start - g.start) as usize..(r.end - g.start) as usize);
        }
    }
    out
}

/// Fetchers tried in order: a miss (not found) in one falls through to the next; any other error
/// is reported.
#[derive(Debug, Clone)]
pub struct FetcherChain {
    fetchers: Vec<Arc<dyn Fetcher>>,
}

impl FetcherChain {
    pub fn new(fetchers: Vec<Arc<dyn Fetcher>>) -> Self {
        FetcherChain { fetchers }
    }

    pub fn fetchers(&self) -> &[Arc<dyn Fetcher>] {
        &self.fetchers
    }

    async fn first_hit<'a, T, F>(
        &'a self,
        blob: &(dyn fmt::Display + Sync),
        f: F,
    ) -> Result<T, FetchError>
    where
        F: Fn(&'a Arc<dyn Fetcher>) -> futures::future::BoxFuture<'a, Result<T, FetchError>>,
    {
        let mut misses = Vec::new();
        for fetcher in &self.fetchers {
            match f(fetcher).await {
                Err(FetchError::NotFound(m)) => {
                    tracing::debug!(fetcher = fetcher.name(), %blob, "miss: {m}");
                    misses.push(format!("{}: {m}", fetcher.name()));
                }
                other => return other,
            }
        }
        Err(FetchError::NotFound(if misses.is_empty() {
            format!("{blob}: no fetchers configured")
        } else {
            format!("{blob} ({})", misses.join("; "))
        }))
    }

    /// The blob's size from the first fetcher that has it.
    pub async fn blob_size(&self, blob: &BlobLocator) -> Result<u64, FetchError> {
        self.first_hit(blob, |f| f.blob_size(blob)).await
    }

    /// Ranges from the first fetcher that has the blob.
    pub async fn read_ranges(
        &self,
        blob: &BlobLocator,
        ranges: &[Range<u64>],
    ) -> Result<Vec<Bytes>, FetchError> {
        self.first_hit(blob, |f| f.read_ranges(blob, ranges)).await
    }

    pub async fn read_range(
        &self,
        blob: &BlobLocator,
        range: Range<u64>,
    ) -> Result<Bytes, FetchError> {
        self.first_hit(blob, |f| f.read_range(blob, range.clone()))
            .await
    }

    /// A whole blob of `size` bytes, checked against its digest.
    pub async fn read_blob(&self, blob: &BlobLocator, size: u64) -> Result<Bytes, FetchError> {
        let data = self.read_range(blob, 0..size).await?;
        if crate::index::sha256_digest(&data) != blob.digest {
            return Err(FetchError::Integrity(format!(
                "{blob}: content does not match its digest"
            )));
        }
        Ok(data)
    }

    /// The manifest `reference` names, from the first fetcher that holds it; one named by
    /// digest is checked against it whichever backend answered.
    pub async fn manifest(
        &self,
        reference: &Reference,
        accept: &[&str],
    ) -> Result<FetchedManifest, FetchError> {
        let m = self
            .first_hit(reference, |f| f.manifest(reference, accept))
            .await?;
        FetchedManifest::checked(m.data, m.media_type, reference.digest.as_ref(), reference)
    }

    /// Referrers from the first fetcher with a referrers API; `Ok(None)` when none has one or
    /// it lists nothing.
    pub async fn referrers(
        &self,
        reference: &Reference,
        subject: &str,
        artifact_type: &str,
    ) -> Result<Option<Bytes>, FetchError> {
        match self
            .first_hit(reference, |f| {
                f.referrers(reference, subject, artifact_type)
            })
            .await
        {
            Err(FetchError::NotFound(_)) => Ok(None),
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesces_touching_and_overlapping_ranges() {
        let ranges = [10..20, 0..5, 19..30, 5..8, 40..50];
        let groups = coalesce(&ranges);
        let merged: Vec<_> = groups.iter().map(|(r, _)| r.clone()).collect();
        assert_eq!(merged, vec![0..8, 10..30, 40..50]);
        let blob: Vec<u8> = (0..60u8).collect();
        let fetched: Vec<Bytes> = merged
            .iter()
            .map(|r| Bytes::copy_from_slice(&blob[r.start as usize..r.end as usize]))
            .collect();
        let parts = split_coalesced(&ranges, &groups, &fetched);
        for (r, p) in ranges.iter().zip(parts) {
            assert_eq!(&p[..], &blob[r.start as usize..r.end as usize]);
        }
    }
}
