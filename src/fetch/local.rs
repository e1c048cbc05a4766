//! A local OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/<hex>`), such as
//! `skopeo copy … oci:DIR` writes.

use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use async_trait::async_trait;
use bytes::Bytes;

use super::{BlobLocator, FetchError, FetchedManifest, Fetcher};
use crate::reference::Reference;

/// Reads blobs from an OCI layout directory.
#[derive(Debug)]
pub struct LocalFetcher {
    root: PathBuf,
}

impl LocalFetcher {
    /// Opens a layout; fails unless `root/oci-layout` exists.
    pub fn new(root: impl Into<PathBuf>) -> Result<Self, FetchError> {
        let root = root.into();
        if !root.join("oci-layout").is_file() {
            return Err(FetchError::Invalid(format!(
                "{} is not an OCI image layout (no oci-layout file)",
                root.display()
            )));
        }
        Ok(LocalFetcher { root })
    }

    fn path(&self, digest: &crate::digest::Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    fn open(&self, blob: &BlobLocator) -> Result<std::fs::File, FetchError> {
        let path = self.path(&blob.digest);
        std::fs::File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                FetchError::NotFound(format!("{} in {}", blob.digest, self.root.display()))
            }
            _ => FetchError::backend(path.display().to_string(), e),
        })
    }
}

#[async_trait]
impl Fetcher for LocalFetcher {
    fn name(&self) -> &str {
        "local"
    }

    async fn blob_size(&self, blob: &BlobLocator) -> Result<u64, FetchError> {
        let f = self.open(blob)?;
        f.metadata()
            .map(|m| m.len())
            .map_err(|e| FetchError::backend(self.root.display().to_string(), e))
    }

    /// By digest, or by tag: the `index.json` entry whose `org.opencontainers.image.ref.name`
    /// is the tag (as `skopeo copy … oci:DIR:TAG` writes it).
    async fn manifest(
        &self,
        reference: &Reference,
        _accept: &[&str],
    ) -> Result<FetchedManifest, FetchError> {
        let max = crate::fetch::registry::MAX_MANIFEST_BYTES as u64;
        let read = |path: PathBuf| -> Result<Vec<u8>, FetchError> {
            use std::io::Read;
            let mut data = Vec::new();
            let f = std::fs::File::open(&path).map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    FetchError::NotFound(format!("{} in {}", reference, self.root.display()))
                }
                _ => FetchError::backend(path.display().to_string(), e),
            })?;
            f.take(max + 1)
                .read_to_end(&mut data)
                .map_err(|e| FetchError::backend(path.display().to_string(), e))?;
            if data.len() as u64 > max {
                return Err(FetchError::Invalid(format!(
                    "{}: larger than the {max} bytes accepted for a manifest",
                    path.display()
                )));
            }
            Ok(data)
        };
        let (digest, media_type) = match (&reference.digest, &reference.tag) {
            (Some(d), _) => (d.clone(), String::new()),
            (None, Some(tag)) => {
                #[derive(serde::Deserialize)]
                struct Entry {
                    digest: crate::digest::Digest,
                    #[serde(rename = "mediaType", default)]
                    media_type: String,
                    #[serde(default)]
                    annotations: std::collections::HashMap<String, String>,
                }
                #[derive(serde::Deserialize)]
                struct Index {
                    manifests: Vec<Entry>,
                }
                let raw = read(self.root.join("index.json"))?;
                let index: Index = serde_json::from_slice(&raw).map_err(|e| {
                    FetchError::backend(format!("{}/index.json", self.root.display()), e)
                })?;
                let entry = index
                    .manifests
                    .into_iter()
                    .find(|m| m.annotations.get("org.opencontainers.image.ref.name") == Some(tag))
                    .ok_or_else(|| {
                        FetchError::NotFound(format!("tag {tag:?} in {}", self.root.display()))
                    })?;
                (entry.digest, entry.media_type)
            }
            (None, None) => {
                return Err(FetchError::Invalid(format!(
                    "{reference} names neither a tag nor a digest"
                )))
            }
        };
        let data = read(self.path(&digest))?;
        FetchedManifest::checked(data.into(), media_type, Some(&digest), reference)
    }

    async fn read_range(&self, blob: &BlobLocator, range: Range<u64>) -> Result<Bytes, FetchError> {
        let f = self.open(blob)?;
        let len = usize::try_from(range.end.saturating_sub(range.start))
            .map_err(|_| FetchError::Invalid("range too large".into()))?;
        let start = range.start;
        tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            f.read_exact_at(&mut buf, start)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => {
                        FetchError::Invalid(format!("range {range:?} past the end of the blob"))
                    }
                    _ => FetchError::backend("reading a local blob", e),
                })?;
            Ok(Bytes::from(buf))
        })
        .await
        .map_err(|e| FetchError::backend(self.root.display().to_string(), e))?
    }
}
