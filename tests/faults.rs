//! Faults between the registry fetcher and a real registry, injected by a small HTTP proxy (a
//! hand-written stand-in: no fault-injecting proxy is packaged for this machine). Every read
//! returns the right bytes after retries, or fails within the deadline with a clear error; wrong
//! bytes are never returned.

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::servers::*;
use common::*;
use soci_store::cache::MemoryCache;
use soci_store::fetch::registry::{RegistryFetcher, RegistryOptions};
use soci_store::fetch::{BlobLocator, FetchError, FetcherChain};
use soci_store::reference::Reference;
use soci_store::spans::SpanStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    Pass,
    Status500,
    TooMany,
    DropMidBody,
    AlterByte,
    Truncate,
    Stall,
    /// Forwards without the Range header: the registry answers 200 with the whole blob.
    IgnoreRange,
}

/// Applies queued faults to blob requests, in order; `always` once the queue is empty.
struct Plan {
    queue: VecDeque<Fault>,
    always: Fault,
    blob_requests: usize,
}

struct Proxy {
    port: u16,
    plan: Arc<Mutex<Plan>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn read_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await.ok()? == 0 {
            return None;
        }
        head.push(b[0]);
    }
    Some(head)
}

async fn handle(mut client: TcpStream, upstream: u16, plan: Arc<Mutex<Plan>>) {
    let Some(head) = read_head(&mut client).await else {
        return;
    };
    let text = String::from_utf8_lossy(&head).to_string();
    let is_blob = text.lines().next().is_some_and(|l| l.contains("/blobs/"));
    let fault = if is_blob {
        let mut p = plan.lock().unwrap();
        p.blob_requests += 1;
        let always = p.always;
        p.queue.pop_front().unwrap_or(always)
    } else {
        Fault::Pass
    };
    let canned = |status: &str, extra: &str| {
        format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n{extra}Connection: close\r\n\r\n")
    };
    match fault {
        Fault::Status500 => {
            let _ = client
                .write_all(canned("500 Internal Server Error", "").as_bytes())
                .await;
            return;
        }
        Fault::TooMany => {
            let _ = client
                .write_all(canned("429 Too Many Requests", "Retry-After: 1\r\n").as_bytes())
                .await;
            return;
        }
        _ => {}
    }
    // Forward with Connection: close, so one connection carries one response.
    let mut req: Vec<String> = text
        .split("\r\n")
        .filter(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("connection:"))
        .filter(|l| fault != Fault::IgnoreRange || !l.to_ascii_lowercase().starts_with("range:"))
        .map(String::from)
        .collect();
    req.push("Connection: close".into());
    let req = format!("{}\r\n\r\n", req.join("\r\n"));
    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    if up.write_all(req.as_bytes()).await.is_err() {
        return;
    }
    let mut resp = Vec::new();
    if up.read_to_end(&mut resp).await.is_err() {
        return;
    }
    let body_at = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(resp.len(), |i| i + 4);
    let body_len = resp.len() - body_at;
    let out: &[u8] = match fault {
        Fault::DropMidBody => &resp[..body_at + body_len / 2],
        Fault::Truncate => &resp[..resp.len() - body_len.min(100)],
        Fault::AlterByte => {
            if body_len > 0 {
                let i = body_at + body_len / 2;
                resp[i] ^= 0x40;
            }
            &resp
        }
        Fault::Stall => {
            let _ = client.write_all(&resp[..body_at]).await;
            tokio::time::sleep(Duration::from_secs(120)).await;
            return;
        }
        _ => &resp,
    };
    let _ = client.write_all(out).await;
    let _ = client.shutdown().await;
}

async fn proxy(upstream: u16, always: Fault, queue: &[Fault]) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let plan = Arc::new(Mutex::new(Plan {
        queue: queue.iter().copied().collect(),
        always,
        blob_requests: 0,
    }));
    let p = plan.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((c, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(handle(c, upstream, p.clone()));
        }
    });
    Proxy { port, plan, task }
}

const DEADLINE: f64 = 6.0;

fn store_via(port: u16) -> SpanStore {
    let f = RegistryFetcher::new(RegistryOptions {
        insecure: vec![format!("127.0.0.1:{port}")],
        registries_conf: None,
        auth_files: Some(vec![]),
        request_timeout: 1.5,
        deadline: DEADLINE,
        max_retries: 8,
        ..Default::default()
    })
    .unwrap();
    SpanStore::new(
        FetcherChain::new(vec![Arc::new(f)]),
        Arc::new(MemoryCache::new(64 << 20)),
    )
}

struct Setup {
    _registry: Server,
    upstream: u16,
    gz: Vec<u8>,
    z: soci_store::ztoc::Ztoc,
    digest: String,
}

async fn setup() -> Setup {
    let (tar, gz, z, _) = test_layer();
    let reg = registry(RegistryOpts::default());
    let (_, layers) = Pusher::new(&reg)
        .image(
            "test/app",
            "v1",
            std::slice::from_ref(&gz),
            &[sha256_digest(&tar)],
        )
        .await;
    Setup {
        upstream: reg.port,
        _registry: reg,
        gz,
        z,
        digest: layers[0].clone(),
    }
}

/// Reads span 2 through a proxy with these faults.
async fn read_span(
    s: &Setup,
    always: Fault,
    queue: &[Fault],
) -> (Result<bytes::Bytes, Arc<FetchError>>, Duration, usize) {
    let p = proxy(s.upstream, always, queue).await;
    let store = store_via(p.port);
    let loc = BlobLocator::new(
        Reference::parse(&format!("127.0.0.1:{}/test/app:v1", p.port)).unwrap(),
        digest(&s.digest),
    );
    let t = Instant::now();
    let result = store.span(&loc, &s.z, 2).await;
    let requests = p.plan.lock().unwrap().blob_requests;
    (result, t.elapsed(), requests)
}

fn expected(s: &Setup) -> &[u8] {
    let span = s.z.span(2);
    &s.gz[span.compressed.start as usize..span.compressed.end as usize]
}

#[tokio::test(flavor = "multi_thread")]
async fn transient_faults_are_retried_to_correct_bytes() {
    let s = setup().await;
    for queue in [
        vec![Fault::Status500, Fault::Status500],
        vec![Fault::TooMany],
        vec![Fault::DropMidBody],
        vec![Fault::Truncate],
        vec![Fault::AlterByte],
        vec![Fault::Stall],
        vec![Fault::DropMidBody, Fault::Status500, Fault::Truncate],
    ] {
        let (result, _, requests) = read_span(&s, Fault::Pass, &queue).await;
        let got = result.unwrap_or_else(|e| panic!("{queue:?}: {e}"));
        assert!(got[..] == *expected(&s), "{queue:?}: wrong bytes");
        assert_eq!(requests, queue.len() + 1, "{queue:?}: one retry per fault");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn persistent_faults_fail_within_the_deadline() {
    let s = setup().await;
    let bound = Duration::from_secs_f64(DEADLINE + 3.0);
    for always in [
        Fault::Status500,
        Fault::Stall,
        Fault::DropMidBody,
        Fault::Truncate,
        Fault::TooMany,
    ] {
        let (result, took, _) = read_span(&s, always, &[]).await;
        let err = result.expect_err("a persistent fault cannot succeed");
        assert!(took < bound, "{always:?}: took {took:?}");
        assert!(
            matches!(
                *err,
                FetchError::Timeout(_) | FetchError::Http { status: 500, .. }
            ),
            "{always:?}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registry_that_ignores_range_is_cut_to_the_range() {
    let s = setup().await;
    let (result, _, requests) = read_span(&s, Fault::IgnoreRange, &[]).await;
    assert!(result.unwrap()[..] == *expected(&s));
    assert_eq!(requests, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn altered_bytes_are_never_served() {
    let s = setup().await;
    let (result, _, _) = read_span(&s, Fault::AlterByte, &[]).await;
    let err = result.expect_err("altered bytes must not be served");
    assert!(matches!(*err, FetchError::Integrity(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn client_errors_are_not_retried() {
    let s = setup().await;
    let p = proxy(s.upstream, Fault::Pass, &[]).await;
    let store = store_via(p.port);
    let loc = BlobLocator::new(
        Reference::parse(&format!("127.0.0.1:{}/test/app:v1", p.port)).unwrap(),
        digest(&sha256_digest(b"not there")),
    );
    let err = store.span(&loc, &s.z, 0).await.unwrap_err();
    assert!(matches!(*err, FetchError::NotFound(_)), "{err}");
    assert_eq!(
        p.plan.lock().unwrap().blob_requests,
        1,
        "a 404 is not retried"
    );
}
