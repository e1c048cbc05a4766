//! Reading from a registry: blob ranges and sizes, manifests, whole-blob streams, referrers.

use std::ops::Range;

use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, RANGE};
use reqwest::{Method, Response, StatusCode};

use super::http::{content_range_start, content_range_total, read_body};
use super::{RegistryClient, MAX_MANIFEST_BYTES};
use crate::digest::Digest;
use crate::fetch::{BlobLocator, FetchError};
use crate::reference::Reference;

/// Pulling: blobs, manifests and referrers.
impl RegistryClient {
    /// Bytes `range` of a blob. A registry that ignores Range (200) is streamed and cut, never
    /// buffered whole. Content is not verified here: spans are checked against their digests by
    /// the span store, whole blobs by their readers.
    pub async fn blob_range(
        &self,
        blob: &BlobLocator,
        range: Range<u64>,
    ) -> Result<Bytes, FetchError> {
        if range.start >= range.end {
            return Ok(Bytes::new());
        }
        let want = range.end - range.start;
        let mut retry = self.new_retry();
        let path = format!("blobs/{}", blob.digest);
        loop {
            let mut headers = HeaderMap::new();
            let value = format!("bytes={}-{}", range.start, range.end - 1);
            headers.insert(RANGE, HeaderValue::from_str(&value).expect("ascii"));
            let resp = self
                .send(
                    Method::GET,
                    &blob.reference,
                    &path,
                    headers,
                    Some(&blob.digest),
                    &mut retry,
                )
                .await?;
            let partial = resp.status() == StatusCode::PARTIAL_CONTENT;
            let skip = if partial {
                let start = content_range_start(resp.headers());
                if start != Some(range.start) {
                    return Err(FetchError::Integrity(format!(
                        "{blob}: asked for {value}, got Content-Range starting at {start:?}"
                    )));
                }
                0
            } else {
                range.start
            };
            let data = match read_body(resp, skip, want, true).await {
                Ok(data) => data,
                Err(e) => {
                    retry.wait(e, None).await?;
                    continue;
                }
            };
            return Ok(data);
        }
    }

    /// The size of a blob (a one-byte ranged GET, which works through redirects too).
    pub async fn blob_size(&self, blob: &BlobLocator) -> Result<u64, FetchError> {
        let mut retry = self.new_retry();
        let mut headers = HeaderMap::new();
        headers.insert(RANGE, HeaderValue::from_static("bytes=0-0"));
        let resp = self
            .send(
                Method::GET,
                &blob.reference,
                &format!("blobs/{}", blob.digest),
                headers,
                Some(&blob.digest),
                &mut retry,
            )
            .await?;
        let size = if resp.status() == StatusCode::PARTIAL_CONTENT {
            content_range_total(resp.headers())
        } else {
            resp.content_length()
        };
        size.ok_or_else(|| {
            FetchError::backend_msg(format!("{blob}: registry did not say the blob's size"))
        })
    }

    /// A manifest or index by tag or digest: its bytes, media type and digest. A digest
    /// reference is checked against the content.
    pub async fn manifest(
        &self,
        r: &Reference,
        accept: &[&str],
    ) -> Result<(Bytes, String, Digest), FetchError> {
        let mut retry = self.new_retry();
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_str(&accept.join(", "))
                .map_err(|e| FetchError::Invalid(e.to_string()))?,
        );
        let path = format!("manifests/{}", r.target());
        loop {
            let resp = self
                .send(Method::GET, r, &path, headers.clone(), None, &mut retry)
                .await?;
            let media_type = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_string();
            match read_body(resp, 0, MAX_MANIFEST_BYTES as u64 + 1, false).await {
                Ok(data) if data.len() > MAX_MANIFEST_BYTES => {
                    return Err(FetchError::Invalid(format!(
                        "{r}: manifest larger than {MAX_MANIFEST_BYTES} bytes"
                    )))
                }
                Ok(data) => {
                    let digest = Digest::of(&data);
                    if let Some(want) = &r.digest {
                        if *want != digest {
                            return Err(FetchError::Integrity(format!(
                                "{r}: manifest content has digest {digest}"
                            )));
                        }
                    }
                    return Ok((data, media_type, digest));
                }
                Err(e) => retry.wait(e, None).await?,
            }
        }
    }

    /// Streams a whole blob: the response, for callers that copy it elsewhere.
    pub async fn blob_stream(&self, blob: &BlobLocator) -> Result<Response, FetchError> {
        let mut retry = self.new_retry();
        self.send(
            Method::GET,
            &blob.reference,
            &format!("blobs/{}", blob.digest),
            HeaderMap::new(),
            Some(&blob.digest),
            &mut retry,
        )
        .await
    }

    /// The referrers of a manifest (an OCI image index), or None when the registry has no
    /// referrers API.
    pub async fn referrers(
        &self,
        r: &Reference,
        digest: &str,
        artifact_type: &str,
    ) -> Result<Option<Bytes>, FetchError> {
        let mut retry = self.new_retry();
        let mut headers = HeaderMap::new();
        headers.insert(
            ACCEPT,
            HeaderValue::from_static("application/vnd.oci.image.index.v1+json"),
        );
        let path = format!("referrers/{digest}?artifactType={artifact_type}");
        match self
            .send(Method::GET, r, &path, headers, None, &mut retry)
            .await
        {
            Ok(resp) => {
                let is_index = resp
                    .headers()
                    .get(reqwest::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|t| t.starts_with("application/vnd.oci.image.index.v1+json"));
                if !is_index {
                    return Ok(None);
                }
                Ok(Some(
                    read_body(resp, 0, MAX_MANIFEST_BYTES as u64, false).await?,
                ))
            }
            Err(FetchError::NotFound(_)) => Ok(None),
            Err(FetchError::Http {
                status: 400 | 405, ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
