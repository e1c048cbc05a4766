//! The HTTP engine of the registry client: connection pool, auth challenges, redirects, retries
//! inside one deadline, bounded bodies.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::{Bytes, BytesMut};
use reqwest::header::{
    HeaderMap, AUTHORIZATION, CONTENT_RANGE, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE,
};
use reqwest::{Method, Response, StatusCode};
use tokio::sync::Semaphore;

use super::RegistryOptions;
use crate::fetch::auth::{self, CredentialStore, Credentials};
use crate::fetch::FetchError;
use crate::reference::Reference;

/// How long a redirect target (usually a presigned URL) is reused.
const REDIRECT_TTL: Duration = Duration::from_secs(300);
const MAX_REDIRECTS: u32 = 5;

/// A client for one or many registries.
#[derive(Debug)]
pub struct RegistryClient {
    http: reqwest::Client,
    opts: RegistryOptions,
    insecure: Vec<String>,
    creds: CredentialStore,
    /// Bearer tokens per "host/repository", with expiry.
    tokens: Mutex<HashMap<String, (String, Instant)>>,
    /// Basic credentials per "host/repository", once a registry asked for them.
    basic: Mutex<HashMap<String, Credentials>>,
    /// Redirect targets per blob digest, with expiry.
    redirects: Mutex<HashMap<String, (reqwest::Url, Instant)>>,
    limit: Semaphore,
}

/// Retry bookkeeping shared by the status-level and body-level loops of one read.
pub(super) struct Retry {
    deadline: Instant,
    attempt: u32,
    max: u32,
}

impl Retry {
    /// Sleeps before the next attempt, or returns the final error.
    pub(super) async fn wait(
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
        let url = e.url().map(|u| u.to_string()).unwrap_or_default();
        FetchError::connection(url, e)
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
    pub(super) fn repo_url(&self, r: &Reference) -> String {
        let scheme = if self.is_insecure(&r.registry) || self.is_insecure(r.api_host()) {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{}/v2/{}/", r.api_host(), r.repository)
    }

    pub(super) fn new_retry(&self) -> Retry {
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
        Self::lock(&self.basic).get(&key).map(|c| {
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
            .map_err(|e| FetchError::backend("looking up credentials", e))?
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
                Self::lock(&self.basic).insert(format!("{}/{}", r.registry, r.repository), c);
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
                let timeout = retry
                    .remaining()
                    .min(Duration::from_secs_f64(self.opts.request_timeout));
                let req = match &creds {
                    // OAuth2: an identity token is a refresh token, traded by POST.
                    Some(c) if c.identity_token().is_some() => {
                        let mut form = reqwest::Url::parse("form:").expect("static URL");
                        {
                            let mut f = form.query_pairs_mut();
                            f.append_pair("grant_type", "refresh_token");
                            f.append_pair("refresh_token", &c.password);
                            f.append_pair("client_id", "soci-store");
                            for (k, v) in url.query_pairs() {
                                f.append_pair(&k, &v);
                            }
                        }
                        let mut post = url.clone();
                        post.set_query(None);
                        url = post.clone();
                        self.http
                            .post(post)
                            .header(
                                reqwest::header::CONTENT_TYPE,
                                "application/x-www-form-urlencoded",
                            )
                            .body(form.query().unwrap_or("").to_string())
                    }
                    Some(c) => self
                        .http
                        .get(url.clone())
                        .basic_auth(&c.username, Some(&c.password)),
                    None => self.http.get(url.clone()),
                }
                .timeout(timeout);
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
    pub(super) async fn send(
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
    pub(super) async fn send_body(
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
                .map_err(|e| FetchError::backend("looking up credentials", e))?;
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
}

pub(super) fn content_range_total(h: &HeaderMap) -> Option<u64> {
    h.get(CONTENT_RANGE)?
        .to_str()
        .ok()?
        .rsplit('/')
        .next()?
        .trim()
        .parse()
        .ok()
}

pub(super) fn content_range_start(h: &HeaderMap) -> Option<u64> {
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
pub(super) async fn read_body(
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
            return Err(FetchError::connection_msg(format!(
                "{url}: response body longer than the requested range"
            )));
        }
        out.extend_from_slice(&c[..c.len().min(room)]);
    }
    if require_all && (out.len() as u64) < want {
        return Err(FetchError::connection_msg(format!(
            "{url}: body ended after {} of {want} bytes",
            out.len()
        )));
    }
    Ok(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

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
