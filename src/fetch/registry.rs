//! The OCI distribution API over HTTP(S): ranged blob GETs with auth (anonymous, Basic, Bearer
//! tokens), redirects remembered per blob, retries with backoff inside a deadline.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use base64::Engine;
use bytes::{Bytes, BytesMut};
use reqwest::header::{
    HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_RANGE, LOCATION, RANGE, RETRY_AFTER,
    WWW_AUTHENTICATE,
};
use reqwest::{Method, Response, StatusCode};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use super::auth::{self, CredentialStore, Credentials};
use super::{BlobLocator, FetchError, Fetcher};
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
            registries_conf: Some(PathBuf::from("/etc/containers/registries.conf")),
            auth_files: None,
            request_timeout: 30.0,
            deadline: 60.0,
            max_retries: 8,
            max_concurrency: 16,
        }
    }
}

/// How long a redirect target (usually a presigned URL) is reused.
const REDIRECT_TTL: Duration = Duration::from_secs(300);
const MAX_REDIRECTS: u32 = 5;
/// Largest manifest or index accepted.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;

/// A client for one or many registries.
#[derive(Debug)]
pub struct RegistryClient {
    http: reqwest::Client,
    opts: RegistryOptions,
    insecure: Vec<String>,
    creds: CredentialStore,
    /// Bearer tokens per "host/repository", with expiry.
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    /// Basic credentials per host, once a registry asked for them.
    basic: Mutex<HashMap<String, Credentials>>,
    /// Redirect targets per blob digest, with expiry.
    redirects: Mutex<HashMap<String, (reqwest::Url, Instant)>>,
    limit: Semaphore,
}

/// Retry bookkeeping shared by the status-level and body-level loops of one read.
struct Retry {
    deadline: Instant,
    attempt: u32,
    max: u32,
}

impl Retry {
    /// Sleeps before the next attempt, or returns the final error.
    async fn wait(
        &mut self,
        err: FetchError,
        retry_after: Option<Duration>,
    ) -> Result<(), FetchError> {
        self.attempt += 1;
        let backoff =
            Duration::from_millis(100 * (1u64 << self.attempt.min(5))).min(Duration::from_secs(3));
        let delay = retry_after.unwrap_or(backoff);
        let now = Instant::now();
        if self.attempt > self.max || now + delay >= self.deadline {
            return Err(match err {
                FetchError::Timeout(m) => {
                    FetchError::Timeout(format!("{m} (gave up after {} attempts)", self.attempt))
                }
                other if now + delay >= self.deadline => FetchError::Timeout(format!(
                    "deadline reached after {} attempts; last error: {other}",
                    self.attempt
                )),
                other => other,
            });
        }
        tracing::debug!(attempt = self.attempt, ?delay, "retrying: {err}");
        tokio::time::sleep(delay).await;
        Ok(())
    }

    fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }
}

fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(RETRY_AFTER)?.to_str().ok()?;
    v.trim()
        .parse::<u64>()
        .ok()
        .map(|s| Duration::from_secs(s.min(60)))
}

fn parse_challenge(h: &str) -> (String, HashMap<String, String>) {
    let (scheme, rest) = h.trim().split_once(' ').unwrap_or((h.trim(), ""));
    let mut params = HashMap::new();
    // key="value" pairs; values may contain commas (scopes), so scan quotes.
    let mut s = rest.trim();
    while !s.is_empty() {
        let Some((k, after)) = s.split_once('=') else {
            break;
        };
        let k = k.trim().trim_start_matches(',').trim().to_ascii_lowercase();
        let after = after.trim_start();
        let (v, next) = if let Some(q) = after.strip_prefix('"') {
            match q.find('"') {
                Some(end) => (&q[..end], &q[end + 1..]),
                None => (q, ""),
            }
        } else {
            match after.find(',') {
                Some(end) => (&after[..end], &after[end..]),
                None => (after, ""),
            }
        };
        params.insert(k, v.to_string());
        s = next.trim_start().trim_start_matches(',').trim_start();
    }
    (scheme.to_ascii_lowercase(), params)
}

fn http_error(status: StatusCode, url: &str, message: impl Into<String>) -> FetchError {
    FetchError::Http {
        status: status.as_u16(),
        url: url.to_string(),
        message: message.into(),
    }
}

fn transport_error(e: reqwest::Error) -> FetchError {
    if e.is_timeout() {
        FetchError::Timeout(e.to_string())
    } else {
        let mut msg = e.to_string();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            src = s.source();
        }
        FetchError::Connection(msg)
    }
}

impl RegistryClient {
    pub fn new(opts: RegistryOptions) -> Result<Self, FetchError> {
        if !(opts.request_timeout > 0.0 && opts.deadline > 0.0 && opts.max_concurrency > 0) {
            return Err(FetchError::Invalid(
                "request_timeout, deadline and max_concurrency must be positive".into(),
            ));
        }
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs_f64(opts.request_timeout.min(10.0)))
            .pool_max_idle_per_host(opts.max_concurrency)
            .tcp_keepalive(Duration::from_secs(30))
            .user_agent(concat!("soci-store/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| FetchError::Invalid(format!("HTTP client: {e}")))?;
        let mut insecure = opts.insecure.clone();
        if let Some(conf) = &opts.registries_conf {
            insecure.extend(auth::insecure_registries(conf));
        }
        let creds = CredentialStore::new(
            opts.auth_files
                .clone()
                .unwrap_or_else(auth::default_auth_files),
        );
        Ok(RegistryClient {
            http,
            limit: Semaphore::new(opts.max_concurrency),
            opts,
            insecure,
            creds,
            tokens: Mutex::default(),
            basic: Mutex::default(),
            redirects: Mutex::default(),
        })
    }

    fn is_insecure(&self, host: &str) -> bool {
        self.insecure
            .iter()
            .any(|loc| loc == host || loc.split('/').next() == Some(host))
    }

    /// `scheme://host/v2/<repository>/`
    fn repo_url(&self, r: &Reference) -> String {
        let scheme = if self.is_insecure(&r.registry) || self.is_insecure(r.api_host()) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}/v2/{}/", r.api_host(), r.repository)
    }

    fn new_retry(&self) -> Retry {
        Retry {
            deadline: Instant::now() + Duration::from_secs_f64(self.opts.deadline),
            attempt: 0,
            max: self.opts.max_retries,
        }
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn authorization(&self, r: &Reference) -> Option<String> {
        let key = format!("{}/{}", r.registry, r.repository);
        if let Some((tok, exp)) = Self::lock(&self.tokens).get(&key) {
            if *exp > Instant::now() {
                return Some(format!("Bearer {tok}"));
            }
        }
        Self::lock(&self.basic).get(&r.registry).map(|c| {
            let raw = format!("{}:{}", c.username, c.password);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(raw)
            )
        })
    }

    async fn credentials(&self, r: &Reference) -> Result<Option<Credentials>, FetchError> {
        let store = self.creds.clone();
        let (reg, repo) = (r.registry.clone(), r.repository.clone());
        tokio::task::spawn_blocking(move || store.lookup(&reg, &repo))
            .await
            .map_err(|e| FetchError::Backend(e.to_string()))?
            .map_err(|e| FetchError::Unauthorized(format!("reading credentials: {e}")))
    }

    /// Answers a 401 challenge: remembers Basic credentials or obtains a Bearer token.
    async fn authenticate(
        &self,
        r: &Reference,
        challenge: &str,
        retry: &Retry,
    ) -> Result<(), FetchError> {
        let (scheme, params) = parse_challenge(challenge);
        let creds = self.credentials(r).await?;
        match scheme.as_str() {
            "basic" => {
                let c = creds.ok_or_else(|| {
                    FetchError::Unauthorized(format!(
                        "{} wants Basic auth and no credentials were found for it",
                        r.registry
                    ))
                })?;
                Self::lock(&self.basic).insert(r.registry.clone(), c);
                Ok(())
            }
            "bearer" => {
                let realm = params.get("realm").ok_or_else(|| {
                    FetchError::Unauthorized(format!("Bearer challenge without realm: {challenge}"))
                })?;
                let mut url = reqwest::Url::parse(realm).map_err(|e| {
                    FetchError::Unauthorized(format!("bad token realm {realm:?}: {e}"))
                })?;
                let scope = format!("repository:{}:pull", r.repository);
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = params.get("service") {
                        q.append_pair("service", s);
                    }
                    q.append_pair("scope", params.get("scope").unwrap_or(&scope));
                }
                let mut req = self.http.get(url.clone()).timeout(
                    retry
                        .remaining()
                        .min(Duration::from_secs_f64(self.opts.request_timeout)),
                );
                if let Some(c) = &creds {
                    req = req.basic_auth(&c.username, Some(&c.password));
                }
                let resp = req.send().await.map_err(transport_error)?;
                if !resp.status().is_success() {
                    return Err(FetchError::Unauthorized(format!(
                        "token endpoint {url} answered {}",
                        resp.status()
                    )));
                }
                let raw = read_body(resp, 0, 1 << 20, false).await?;
                let body: serde_json::Value = serde_json::from_slice(&raw)
                    .map_err(|e| FetchError::Unauthorized(format!("token endpoint {url}: {e}")))?;
                let token = body
                    .get("token")
                    .or_else(|| body.get("access_token"))
                    .and_then(|v| v.as_str())
                    .ok_or_else(|| {
                        FetchError::Unauthorized(format!("token endpoint {url} returned no token"))
                    })?;
                let ttl = body
                    .get("expires_in")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(60)
                    .max(10);
                let expiry = Instant::now() + Duration::from_secs(ttl - ttl.min(5));
                Self::lock(&self.tokens).insert(
                    format!("{}/{}", r.registry, r.repository),
                    (token.to_string(), expiry),
                );
                Ok(())
            }
            other => Err(FetchError::Unauthorized(format!(
                "unsupported auth scheme {other:?} from {}",
                r.registry
            ))),
        }
    }

    /// Sends a GET/HEAD for `path` (relative to the repository URL), handling auth, redirects and
    /// retryable statuses. `redirect_key` remembers where a blob was redirected to.
    async fn send(
        &self,
        method: Method,
        r: &Reference,
        path: &str,
        headers: HeaderMap,
        redirect_key: Option<&str>,
        retry: &mut Retry,
    ) -> Result<Response, FetchError> {
        self.send_body(method, r, path, headers, None, redirect_key, retry)
            .await
    }

    /// [`Self::send`] with a request body; `path` may also be an absolute URL (an upload
    /// location).
    #[allow(clippy::too_many_arguments)]
    async fn send_body(
        &self,
        method: Method,
        r: &Reference,
        path: &str,
        headers: HeaderMap,
        body: Option<Bytes>,
        redirect_key: Option<&str>,
        retry: &mut Retry,
    ) -> Result<Response, FetchError> {
        let base = if path.starts_with("http://") || path.starts_with("https://") {
            path.to_string()
        } else {
            format!("{}{path}", self.repo_url(r))
        };
        let mut auth_tried = false;
        let mut redirects = 0;
        let mut target: Option<reqwest::Url> = redirect_key.and_then(|k| {
            Self::lock(&self.redirects)
                .get(k)
                .filter(|(_, exp)| *exp > Instant::now())
                .map(|(u, _)| u.clone())
        });
        loop {
            let to_registry = target.is_none();
            let url = target.as_ref().map_or(base.clone(), |u| u.to_string());
            let timeout = retry
                .remaining()
                .min(Duration::from_secs_f64(self.opts.request_timeout));
            let mut req = self
                .http
                .request(method.clone(), &url)
                .headers(headers.clone())
                .timeout(timeout);
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            if to_registry {
                if let Some(a) = self.authorization(r) {
                    req = req.header(AUTHORIZATION, a);
                }
            }
            let permit = self
                .limit
                .acquire()
                .await
                .map_err(|e| FetchError::Backend(e.to_string()))?;
            let result = req.send().await;
            drop(permit);
            let (err, wait) = match result {
                Err(e) => (transport_error(e), None),
                Ok(resp) => {
                    let status = resp.status();
                    if status.is_success() {
                        return Ok(resp);
                    }
                    if status.is_redirection() {
                        redirects += 1;
                        let loc = resp.headers().get(LOCATION).and_then(|v| v.to_str().ok());
                        let next = loc.and_then(|l| reqwest::Url::parse(&url).ok()?.join(l).ok());
                        match next {
                            Some(next) if redirects <= MAX_REDIRECTS => {
                                if let Some(k) = redirect_key {
                                    Self::lock(&self.redirects).insert(
                                        k.to_string(),
                                        (next.clone(), Instant::now() + REDIRECT_TTL),
                                    );
                                }
                                target = Some(next);
                                continue;
                            }
                            _ => return Err(http_error(status, &url, "bad or too many redirects")),
                        }
                    }
                    if status == StatusCode::UNAUTHORIZED && to_registry && !auth_tried {
                        auth_tried = true;
                        let challenge = resp
                            .headers()
                            .get(WWW_AUTHENTICATE)
                            .and_then(|v| v.to_str().ok())
                            .map(String::from);
                        match challenge {
                            Some(c) => {
                                // A stale token: forget it before asking again.
                                Self::lock(&self.tokens)
                                    .remove(&format!("{}/{}", r.registry, r.repository));
                                self.authenticate(r, &c, retry).await?;
                                continue;
                            }
                            None => {
                                return Err(FetchError::Unauthorized(format!(
                                    "{url}: 401 without a challenge"
                                )))
                            }
                        }
                    }
                    if !to_registry && matches!(status.as_u16(), 400 | 401 | 403) {
                        // An expired presigned URL: go back to the registry for a fresh one.
                        if let Some(k) = redirect_key {
                            Self::lock(&self.redirects).remove(k);
                        }
                        target = None;
                        (
                            http_error(status, &url, "redirect target refused the request"),
                            None,
                        )
                    } else {
                        match status.as_u16() {
                            401 => {
                                return Err(FetchError::Unauthorized(format!(
                                    "{url}: credentials rejected"
                                )))
                            }
                            404 => return Err(FetchError::NotFound(url)),
                            408 | 429 | 500..=599 => {
                                let wait = retry_after(resp.headers());
                                let body = resp.text().await.unwrap_or_default();
                                (
                                    http_error(
                                        status,
                                        &url,
                                        body.chars().take(200).collect::<String>(),
                                    ),
                                    wait,
                                )
                            }
                            _ => {
                                let body = resp.text().await.unwrap_or_default();
                                return Err(http_error(
                                    status,
                                    &url,
                                    body.chars().take(300).collect::<String>(),
                                ));
                            }
                        }
                    }
                }
            };
            retry.wait(err, wait).await?;
        }
    }

    /// Bytes `range` of a blob. A registry that ignores Range (200) is streamed and cut, never
    /// buffered whole. Content is not verified here: spans are checked against their digests by
    /// the span store, whole blobs by their readers.
    pub async fn blob_range(
        &self,
        blob: &BlobLocator,
        range: Range<u64>,
    ) -> Result<Bytes, FetchError> {
        blob.hex()?;
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
        blob.hex()?;
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
            FetchError::Backend(format!("{blob}: registry did not say the blob's size"))
        })
    }

    /// A manifest or index by tag or digest: its bytes, media type and digest. A digest
    /// reference is checked against the content.
    pub async fn manifest(
        &self,
        r: &Reference,
        accept: &[&str],
    ) -> Result<(Bytes, String, String), FetchError> {
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
                    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
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
        blob.hex()?;
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
}

fn content_range_total(h: &HeaderMap) -> Option<u64> {
    h.get(CONTENT_RANGE)?
        .to_str()
        .ok()?
        .rsplit('/')
        .next()?
        .trim()
        .parse()
        .ok()
}

fn content_range_start(h: &HeaderMap) -> Option<u64> {
    let v = h.get(CONTENT_RANGE)?.to_str().ok()?;
    v.trim()
        .strip_prefix("bytes")?
        .trim()
        .split('-')
        .next()?
        .trim()
        .parse()
        .ok()
}

/// Reads `want` bytes after skipping `skip`, chunk by chunk; stops reading (dropping the
/// connection) once it has them. With `require_all`, fewer bytes than wanted is an error.
async fn read_body(
    mut resp: Response,
    mut skip: u64,
    want: u64,
    require_all: bool,
) -> Result<Bytes, FetchError> {
    let url = resp.url().to_string();
    let exact = resp.status() == StatusCode::PARTIAL_CONTENT;
    // For ranges `want` is the caller's request (spans are bounded when their zTOC is loaded);
    // bodies of unknown length (manifests, tokens) grow as they arrive.
    let mut out = BytesMut::with_capacity(if require_all {
        want
    } else {
        want.min(64 << 10)
    } as usize);
    while (out.len() as u64) < want {
        let chunk = match resp.chunk().await.map_err(transport_error)? {
            Some(c) => c,
            None => break,
        };
        let mut c = &chunk[..];
        if skip > 0 {
            let n = skip.min(c.len() as u64) as usize;
            skip -= n as u64;
            c = &c[n..];
        }
        let room = (want - out.len() as u64) as usize;
        if exact && c.len() > room {
            return Err(FetchError::Connection(format!(
                "{url}: response body longer than the requested range"
            )));
        }
        out.extend_from_slice(&c[..c.len().min(room)]);
    }
    if require_all && (out.len() as u64) < want {
        return Err(FetchError::Connection(format!(
            "{url}: body ended after {} of {want} bytes",
            out.len()
        )));
    }
    Ok(out.freeze())
}

/// The `registry` fetcher: blobs from the reference's own registry.
#[derive(Debug)]
pub struct RegistryFetcher {
    client: RegistryClient,
}

impl RegistryFetcher {
    pub fn new(opts: RegistryOptions) -> Result<Self, FetchError> {
        Ok(RegistryFetcher {
            client: RegistryClient::new(opts)?,
        })
    }

    pub fn client(&self) -> &RegistryClient {
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

/// Pushing: blobs, cross-repository mounts, manifests, and the referrers API.
impl RegistryClient {
    /// Whether the repository has the blob.
    pub async fn blob_exists(&self, r: &Reference, digest: &str) -> Result<bool, FetchError> {
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
    pub async fn mount_blob(
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
    pub async fn push_blob(
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
    pub async fn push_blob_stream(
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
                FetchError::Backend(format!("{r}: upload session without a Location"))
            })?;
        let base = reqwest::Url::parse(&self.repo_url(r))
            .map_err(|e| FetchError::Invalid(e.to_string()))?;
        base.join(loc)
            .map(|u| u.to_string())
            .map_err(|e| FetchError::Backend(format!("{r}: bad upload Location {loc:?}: {e}")))
    }

    /// Puts a manifest under a tag or its digest; returns its digest.
    pub async fn put_manifest(
        &self,
        r: &Reference,
        tag_or_digest: &str,
        media_type: &str,
        data: Bytes,
    ) -> Result<String, FetchError> {
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&data)));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_challenges() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(s, "bearer");
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        let (s, p) = parse_challenge(r#"Basic realm="Registry Realm""#);
        assert_eq!(
            (s.as_str(), p["realm"].as_str()),
            ("basic", "Registry Realm")
        );
    }

    #[test]
    fn content_range_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_RANGE,
            HeaderValue::from_static("bytes 100-199/12345"),
        );
        assert_eq!(content_range_total(&h), Some(12345));
        assert_eq!(content_range_start(&h), Some(100));
    }
}
