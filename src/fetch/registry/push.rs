//! Writing to a registry: blob uploads and mounts, manifests (what `convert` and `create` do).

use bytes::{Bytes, BytesMut};
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_RANGE, LOCATION};
use reqwest::{Method, Response, StatusCode};

use super::RegistryClient;
use crate::digest::Digest;
use crate::fetch::FetchError;
use crate::reference::Reference;

/// Pushing: blobs, cross-repository mounts, manifests.
impl RegistryClient {
    /// Whether the repository has the blob.
    pub(crate) async fn blob_exists(
        &self,
        r: &Reference,
        digest: &str,
    ) -> Result<bool, FetchError> {
        let mut retry = self.new_retry();
        let path = format!("blobs/{digest}");
        match self
            .send(Method::HEAD, r, &path, HeaderMap::new(), None, &mut retry)
            .await
        {
            Ok(_) => Ok(true),
            Err(FetchError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Mounts a blob from another repository of the same registry; false when the registry
    /// declined (the caller then uploads).
    pub(crate) async fn mount_blob(
        &self,
        r: &Reference,
        digest: &str,
        from: &str,
    ) -> Result<bool, FetchError> {
        let mut retry = self.new_retry();
        let path = format!("blobs/uploads/?mount={digest}&from={from}");
        let resp = self
            .send_body(
                Method::POST,
                r,
                &path,
                HeaderMap::new(),
                Some(Bytes::new()),
                None,
                &mut retry,
            )
            .await?;
        Ok(resp.status() == StatusCode::CREATED)
    }

    /// Uploads a blob held in memory (skipped when the repository has it).
    pub(crate) async fn push_blob(
        &self,
        r: &Reference,
        digest: &str,
        data: Bytes,
    ) -> Result<(), FetchError> {
        use futures::StreamExt;
        if self.blob_exists(r, digest).await? {
            return Ok(());
        }
        self.push_blob_stream(r, digest, futures::stream::once(async { Ok(data) }).boxed())
            .await
    }

    /// Uploads a blob from a stream of chunks (OCI chunked upload: PATCH per ~8 MiB, then PUT
    /// with the digest), so large layers are never held in memory whole.
    pub(crate) async fn push_blob_stream(
        &self,
        r: &Reference,
        digest: &str,
        mut chunks: futures::stream::BoxStream<'_, Result<Bytes, FetchError>>,
    ) -> Result<(), FetchError> {
        use futures::StreamExt;
        let mut retry = self.new_retry();
        let resp = self
            .send_body(
                Method::POST,
                r,
                "blobs/uploads/",
                HeaderMap::new(),
                Some(Bytes::new()),
                None,
                &mut retry,
            )
            .await?;
        let mut location = self.upload_location(r, &resp)?;
        let mut offset = 0u64;
        let mut pending = BytesMut::new();
        let mut done = false;
        while !done {
            match chunks.next().await {
                Some(c) => pending.extend_from_slice(&c?),
                None => done = true,
            }
            if pending.len() >= 8 << 20 || (done && !pending.is_empty()) {
                let body = pending.split().freeze();
                let end = offset + body.len() as u64;
                let mut headers = HeaderMap::new();
                headers.insert(
                    reqwest::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                let range = format!("{offset}-{}", end - 1);
                headers.insert(CONTENT_RANGE, HeaderValue::from_str(&range).expect("ascii"));
                let resp = self
                    .send_body(
                        Method::PATCH,
                        r,
                        &location,
                        headers,
                        Some(body),
                        None,
                        &mut retry,
                    )
                    .await?;
                location = self.upload_location(r, &resp)?;
                offset = end;
            }
        }
        let sep = if location.contains('?') { '&' } else { '?' };
        self.send_body(
            Method::PUT,
            r,
            &format!("{location}{sep}digest={digest}"),
            HeaderMap::new(),
            Some(Bytes::new()),
            None,
            &mut retry,
        )
        .await?;
        Ok(())
    }

    fn upload_location(&self, r: &Reference, resp: &Response) -> Result<String, FetchError> {
        let loc = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                FetchError::backend_msg(format!("{r}: upload session without a Location"))
            })?;
        let base = reqwest::Url::parse(&self.repo_url(r))
            .map_err(|e| FetchError::Invalid(e.to_string()))?;
        base.join(loc)
            .map(|u| u.to_string())
            .map_err(|e| FetchError::backend(format!("{r}: bad upload Location {loc:?}"), e))
    }

    /// Puts a manifest under a tag or its digest; returns its digest.
    pub(crate) async fn put_manifest(
        &self,
        r: &Reference,
        tag_or_digest: &str,
        media_type: &str,
        data: Bytes,
    ) -> Result<Digest, FetchError> {
        let digest = Digest::of(&data);
        let mut retry = self.new_retry();
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_str(media_type).map_err(|e| FetchError::Invalid(e.to_string()))?,
        );
        self.send_body(
            Method::PUT,
            r,
            &format!("manifests/{tag_or_digest}"),
            headers,
            Some(data),
            None,
            &mut retry,
        )
        .await?;
        Ok(digest)
    }
}
