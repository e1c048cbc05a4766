//! An S3 (or S3-compatible) bucket mirroring blobs as `<prefix>/blobs/sha256/<hex>` (manifests
//! and indexes are blobs too) and tags as `<prefix>/tags/<registry>/<repository>/<tag>` (a small
//! JSON record: the manifest's digest and media type), as `soci-store mirror` writes them.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::{Deserialize, Serialize};

use super::{BlobLocator, FetchError, FetchedManifest, Fetcher};
use crate::digest::Digest;
use crate::reference::Reference;

/// Options of the `s3` fetcher (config keys). Unset credentials and region come from the usual
/// AWS environment variables.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct S3Options {
    pub bucket: String,
    #[serde(default)]
    pub prefix: String,
    /// e.g. `http://127.0.0.1:9000` for an S3-compatible server.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`), as most S3-compatible servers want.
    #[serde(default)]
    pub virtual_hosted_style: bool,
}

/// Parses `s3://bucket/prefix` into bucket and prefix.
pub fn parse_s3_url(url: &str) -> Result<(String, String), FetchError> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| FetchError::Invalid(format!("{url:?} is not an s3://bucket/prefix URL")))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(FetchError::Invalid(format!("{url:?} names no bucket")));
    }
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}

/// What a tag object holds.
#[derive(Debug, Deserialize, Serialize)]
struct TagRecord {
    digest: Digest,
    #[serde(rename = "mediaType", default)]
    media_type: String,
}

/// Largest tag record read.
const MAX_TAG_RECORD: u64 = 64 << 10;

/// Blobs in an S3 bucket.
#[derive(Debug, Clone)]
pub struct S3Fetcher {
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

fn map_err(e: object_store::Error) -> FetchError {
    match e {
        object_store::Error::NotFound { path, .. } => {
            FetchError::NotFound(format!("s3 object {path}"))
        }
        other => FetchError::backend("s3", other),
    }
}

impl S3Fetcher {
    pub fn new(opts: &S3Options) -> Result<Self, FetchError> {
        if opts.bucket.is_empty() {
            return Err(FetchError::Invalid("s3: `bucket` is required".into()));
        }
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&opts.bucket)
            .with_virtual_hosted_style_request(opts.virtual_hosted_style);
        if let Some(e) = &opts.endpoint {
            b = b.with_endpoint(e).with_allow_http(e.starts_with("http://"));
        }
        if let Some(r) = &opts.region {
            b = b.with_region(r);
        } else if std::env::var_os("AWS_REGION").is_none()
            && std::env::var_os("AWS_DEFAULT_REGION").is_none()
        {
            b = b.with_region("us-east-1");
        }
        if let Some(k) = &opts.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(s) = &opts.secret_access_key {
            b = b.with_secret_access_key(s);
        }
        let store = b
            .build()
            .map_err(|e| FetchError::Invalid(format!("s3: {e}")))?;
        Ok(S3Fetcher {
            store: Arc::new(store),
            prefix: opts.prefix.trim_matches('/').to_string(),
        })
    }

    /// The object store, for writers (the mirror command).
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Where a blob lives in the bucket.
    pub fn blob_path(&self, digest_hex: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(format!("blobs/sha256/{digest_hex}"))
        } else {
            Path::from(format!("{}/blobs/sha256/{digest_hex}", self.prefix))
        }
    }

    /// Where the record of `reference`'s tag lives; None without a tag.
    pub fn tag_path(&self, reference: &Reference) -> Option<Path> {
        let tag = reference.tag.as_deref()?;
        let parts = self
            .prefix
            .split('/')
            .filter(|p| !p.is_empty())
            .chain(["tags", reference.registry.as_str()])
            .chain(reference.repository.split('/'))
            .chain([tag]);
        Some(Path::from_iter(parts))
    }

    /// Points `reference`'s tag at the manifest `digest` (which the mirror must hold as a blob).
    pub async fn put_tag(
        &self,
        reference: &Reference,
        digest: &Digest,
        media_type: &str,
    ) -> Result<(), FetchError> {
        let path = self
            .tag_path(reference)
            .ok_or_else(|| FetchError::Invalid(format!("{reference} names no tag")))?;
        let record = serde_json::to_vec(&TagRecord {
            digest: digest.clone(),
            media_type: media_type.to_string(),
        })
        .expect("json");
        self.store
            .put(&path, record.into())
            .await
            .map(drop)
            .map_err(map_err)
    }

    /// A whole object of at most `max` bytes.
    async fn small_object(&self, path: &Path, max: u64) -> Result<Bytes, FetchError> {
        let meta = self.store.head(path).await.map_err(map_err)?;
        if meta.size > max {
            return Err(FetchError::Invalid(format!(
                "s3 object {path} has {} bytes, more than the {max} accepted",
                meta.size
            )));
        }
        self.store
            .get_range(path, 0..meta.size)
            .await
            .map_err(map_err)
    }

    /// Whether the blob is already there.
    pub async fn exists(&self, digest_hex: &str) -> Result<bool, FetchError> {
        match self.store.head(&self.blob_path(digest_hex)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(map_err(e)),
        }
    }
}

#[async_trait]
impl Fetcher for S3Fetcher {
    fn name(&self) -> &str {
        "s3"
    }

    async fn blob_size(&self, blob: &BlobLocator) -> Result<u64, FetchError> {
        let meta = self
            .store
            .head(&self.blob_path(blob.hex()))
            .await
            .map_err(map_err)?;
        Ok(meta.size)
    }

    async fn manifest(
        &self,
        reference: &Reference,
        _accept: &[&str],
    ) -> Result<FetchedManifest, FetchError> {
        let max = crate::fetch::registry::MAX_MANIFEST_BYTES as u64;
        let (digest, media_type) = match (&reference.digest, self.tag_path(reference)) {
            (Some(d), _) => (d.clone(), String::new()),
            (None, Some(tag)) => {
                let raw = self.small_object(&tag, MAX_TAG_RECORD).await?;
                let rec: TagRecord = serde_json::from_slice(&raw)
                    .map_err(|e| FetchError::backend(format!("s3 tag record {tag}"), e))?;
                (rec.digest, rec.media_type)
            }
            (None, None) => {
                return Err(FetchError::Invalid(format!(
                    "{reference} names neither a tag nor a digest"
                )))
            }
        };
        let data = self
            .small_object(&self.blob_path(digest.hex()), max)
            .await?;
        FetchedManifest::checked(data, media_type, Some(&digest), reference)
    }

    async fn read_range(&self, blob: &BlobLocator, range: Range<u64>) -> Result<Bytes, FetchError> {
        let want = range.end.saturating_sub(range.start);
        let data = self
            .store
            .get_range(&self.blob_path(blob.hex()), range.clone())
            .await
            .map_err(map_err)?;
        if data.len() as u64 != want {
            return Err(FetchError::Integrity(format!(
                "{blob}: {range:?} returned {} bytes",
                data.len()
            )));
        }
        Ok(data)
    }

    async fn read_ranges(
        &self,
        blob: &BlobLocator,
        ranges: &[Range<u64>],
    ) -> Result<Vec<Bytes>, FetchError> {
        // object_store coalesces and parallelizes ranges itself.
        self.store
            .get_ranges(&self.blob_path(blob.hex()), ranges)
            .await
            .map_err(map_err)
    }
}
