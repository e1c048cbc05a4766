//! The OCI distribution API over HTTP(S). `http`: the engine every request goes through (auth:
//! anonymous, Basic, Bearer tokens; redirects remembered per blob; retries with backoff inside a
//! deadline); `pull`: blobs, manifests and referrers; `push`: uploads, mounts and
//! manifests; here: the options and the `registry` fetcher built on them.

mod http;
mod pull;
#[cfg(feature = "daemon")]
mod push;

pub use http::RegistryClient;

use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{BlobLocator, FetchError, FetchedManifest, Fetcher};
use crate::reference::Reference;

/// Options of the `registry` fetcher (config keys).
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryOptions {
    /// Registries (host[:port]) reached over plain HTTP.
    pub insecure: Vec<String>,
    /// Also honour `insecure = true` entries of this registries.conf (and its `.d` directory).
    pub registries_conf: Option<PathBuf>,
    /// Auth files searched for credentials, in order (default: podman's and docker's).
    pub auth_files: Option<Vec<PathBuf>>,
    /// Timeout of one HTTP request, body included (seconds).
    pub request_timeout: f64,
    /// Bound on one read including all retries (seconds).
    pub deadline: f64,
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// Requests in flight at once.
    pub max_concurrency: usize,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            insecure: Vec::new(),
            registries_conf: Some(crate::paths::registries_conf()),
            auth_files: None,
            request_timeout: 30.0,
            deadline: 60.0,
            max_retries: 8,
            max_concurrency: 16,
        }
    }
}

/// Largest manifest or index accepted.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// The `registry` fetcher: blobs from the reference's own registry.
#[derive(Debug)]
pub struct RegistryFetcher {
    client: Arc<RegistryClient>,
}

impl RegistryFetcher {
    pub fn new(opts: RegistryOptions) -> Result<Self, FetchError> {
        Ok(RegistryFetcher {
            client: Arc::new(RegistryClient::new(opts)?),
        })
    }

    pub fn client(&self) -> &Arc<RegistryClient> {
        &self.client
    }
}

#[async_trait]
impl Fetcher for RegistryFetcher {
    fn name(&self) -> &str {
        "registry"
    }

    async fn blob_size(&self, blob: &BlobLocator) -> Result<u64, FetchError> {
        self.client.blob_size(blob).await
    }

    async fn manifest(
        &self,
        reference: &Reference,
        accept: &[&str],
    ) -> Result<FetchedManifest, FetchError> {
        let (data, media_type, digest) = self.client.manifest(reference, accept).await?;
        Ok(FetchedManifest {
            data,
            media_type,
            digest,
        })
    }

    async fn referrers(
        &self,
        reference: &Reference,
        subject: &str,
        artifact_type: &str,
    ) -> Result<Option<Bytes>, FetchError> {
        self.client
            .referrers(reference, subject, artifact_type)
            .await
    }

    async fn read_range(&self, blob: &BlobLocator, range: Range<u64>) -> Result<Bytes, FetchError> {
        let want = range.end.saturating_sub(range.start);
        let data = self.client.blob_range(blob, range.clone()).await?;
        if data.len() as u64 != want {
            return Err(FetchError::Integrity(format!(
                "{blob}: {range:?} returned {} bytes",
                data.len()
            )));
        }
        Ok(data)
    }
}
