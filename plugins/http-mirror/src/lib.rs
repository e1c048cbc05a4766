//! A soci-store fetcher for a plain HTTP blob mirror: any web server that serves
//! `<base>/blobs/sha256/<hex>` with Range support (nginx over an OCI layout directory, a CDN).
//!
//! Register it in a custom build, then select it in the config file:
//!
//! ```toml
//! [[fetchers]]
//! type = "http-mirror"
//! base_url = "http://mirror.internal/oci"
//! ```

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use soci_store::async_trait;
use soci_store::backends::{parse_options, BackendRegistry};
use soci_store::bytes::Bytes;
use soci_store::fetch::{BlobLocator, FetchError, Fetcher};

/// The name this backend registers under.
pub const TYPE: &str = "http-mirror";

/// Config options.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// The mirror's base URL; blobs are at `<base_url>/blobs/sha256/<hex>`.
    pub base_url: String,
    /// Seconds for one request.
    #[serde(default = "default_timeout")]
    pub timeout: f64,
}

fn default_timeout() -> f64 {
    30.0
}

/// Reads blobs from a plain HTTP mirror.
#[derive(Debug)]
pub struct HttpMirror {
    base: String,
    http: reqwest::Client,
}

impl HttpMirror {
    pub fn new(opts: Options) -> anyhow::Result<Self> {
        if !(opts.base_url.starts_with("http://") || opts.base_url.starts_with("https://")) {
            anyhow::bail!(
                "base_url must be an http:// or https:// URL, not {:?}",
                opts.base_url
            );
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(opts.timeout))
            .build()?;
        Ok(HttpMirror {
            base: opts.base_url.trim_end_matches('/').to_string(),
            http,
        })
    }

    fn url(&self, blob: &BlobLocator) -> Result<String, FetchError> {
        Ok(format!("{}/blobs/sha256/{}", self.base, blob.hex()))
    }

    async fn get(
        &self,
        blob: &BlobLocator,
        range: Option<Range<u64>>,
    ) -> Result<reqwest::Response, FetchError> {
        let url = self.url(blob)?;
        let mut req = self.http.get(&url);
        if let Some(r) = &range {
            req = req.header("Range", format!("bytes={}-{}", r.start, r.end - 1));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| FetchError::connection(url.clone(), e))?;
        match resp.status().as_u16() {
            200 | 206 => Ok(resp),
            404 => Err(FetchError::NotFound(url)),
            s => Err(FetchError::Http {
                status: s,
                url,
                message: "unexpected status".into(),
            }),
        }
    }
}

#[async_trait]
impl Fetcher for HttpMirror {
    fn name(&self) -> &str {
        TYPE
    }

    async fn blob_size(&self, blob: &BlobLocator) -> Result<u64, FetchError> {
        let resp = self.get(blob, Some(0..1)).await?;
        let total = resp
            .headers()
            .get("Content-Range")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit('/').next())
            .and_then(|v| v.parse().ok());
        total.or(resp.content_length()).ok_or_else(|| {
            FetchError::backend_msg(format!("{blob}: the mirror did not say its size"))
        })
    }

    async fn read_range(&self, blob: &BlobLocator, range: Range<u64>) -> Result<Bytes, FetchError> {
        if range.is_empty() {
            return Ok(Bytes::new());
        }
        let resp = self.get(blob, Some(range.clone())).await?;
        if resp.status().as_u16() != 206 {
            return Err(FetchError::backend_msg(format!(
                "{}: the mirror ignored Range",
                self.url(blob)?
            )));
        }
        let data = resp
            .bytes()
            .await
            .map_err(|e| FetchError::connection(format!("{blob}: reading the body"), e))?;
        if data.len() as u64 != range.end - range.start {
            return Err(FetchError::Integrity(format!(
                "{blob}: {range:?} returned {} bytes",
                data.len()
            )));
        }
        Ok(data)
    }
}

/// Adds the `http-mirror` fetcher to a registry.
pub fn register(registry: &mut BackendRegistry) {
    registry.register_fetcher(TYPE, |opts| {
        let opts: Options = parse_options(opts)?;
        Ok(Arc::new(HttpMirror::new(opts)?) as Arc<dyn Fetcher>)
    });
}
