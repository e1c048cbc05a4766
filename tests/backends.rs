//! Fetchers and caches against real components: the Debian docker-registry (anonymous, Basic
//! auth, S3 storage with redirects), moto's S3 server, an OCI layout written by skopeo, nginx for
//! the plugin backend.

mod common;

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use common::servers::*;
use common::*;
use soci_store::backends::BackendRegistry;
use soci_store::cache::{DiskCache, MemoryCache, SpanCache};
use soci_store::config::Config;
use soci_store::fetch::local::LocalFetcher;
use soci_store::fetch::registry::{RegistryFetcher, RegistryOptions};
use soci_store::fetch::s3::{S3Fetcher, S3Options};
use soci_store::fetch::{BlobLocator, FetchError, Fetcher, FetcherChain};
use soci_store::reference::Reference;
use soci_store::spans::{RemoteLayer, SpanStore};
use soci_store::ztoc::{LayerReader, Ztoc};

fn registry_fetcher(addr: &str, auth_files: Vec<std::path::PathBuf>) -> RegistryFetcher {
    RegistryFetcher::new(RegistryOptions {
        insecure: vec![addr.to_string()],
        registries_conf: None,
        auth_files: Some(auth_files),
        request_timeout: 10.0,
        deadline: 20.0,
        ..Default::default()
    })
    .unwrap()
}

fn locator(addr: &str, repo: &str, digest: &str) -> BlobLocator {
    BlobLocator::new(
        Reference::parse(&format!("{addr}/{repo}:x")).unwrap(),
        common::digest(digest),
    )
}

fn slices(blob: &[u8]) -> Vec<Range<u64>> {
    let n = blob.len() as u64;
    vec![
        0..1,
        100..5000,
        5000..70_000,
        n / 2..n / 2 + 4096,
        n - 10..n,
        69_999..70_100,
    ]
}

async fn check_ranges(f: &dyn Fetcher, loc: &BlobLocator, blob: &[u8]) {
    assert_eq!(f.blob_size(loc).await.unwrap(), blob.len() as u64);
    let ranges = slices(blob);
    let got = f.read_ranges(loc, &ranges).await.unwrap();
    for (r, g) in ranges.iter().zip(got) {
        assert!(
            g[..] == blob[r.start as usize..r.end as usize],
            "{} {r:?}",
            f.name()
        );
    }
    let all = f.read_range(loc, 0..blob.len() as u64).await.unwrap();
    assert!(all[..] == blob[..], "{}: whole blob", f.name());
}

/// Every file of the layer read through the span stack (on a non-runtime thread, like FUSE).
async fn check_files(store: Arc<SpanStore>, loc: BlobLocator, z: Ztoc, expected: Vec<Expected>) {
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let reader = LayerReader::new(Arc::new(z), RemoteLayer::new(store, loc, handle));
        for f in &expected {
            let idx = reader.ztoc().find(&f.name).unwrap();
            assert!(
                reader.read_file(idx).unwrap() == f.data,
                "{}",
                String::from_utf8_lossy(&f.name)
            );
        }
    })
    .await
    .unwrap();
}

async fn pushed(reg: &Server, pusher: &Pusher, layer: &[u8], tar: &[u8]) -> String {
    let (_, layers) = pusher
        .image("test/app", "v1", &[layer.to_vec()], &[sha256_digest(tar)])
        .await;
    let _ = reg;
    layers[0].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_anonymous() {
    let (tar, gz, z, expected) = test_layer();
    let reg = registry(RegistryOpts::default());
    let digest = pushed(&reg, &Pusher::new(&reg), &gz, &tar).await;
    let f = registry_fetcher(&reg.addr(), vec![]);
    let loc = locator(&reg.addr(), "test/app", &digest);
    check_ranges(&f, &loc, &gz).await;

    let missing = locator(&reg.addr(), "test/app", &sha256_digest(b"nope"));
    assert!(matches!(
        f.read_range(&missing, 0..10).await,
        Err(FetchError::NotFound(_))
    ));

    let store = Arc::new(SpanStore::new(
        FetcherChain::new(vec![Arc::new(f)]),
        Arc::new(MemoryCache::new(64 << 20)),
    ));
    check_files(store.clone(), loc.clone(), z.clone(), expected).await;
    // Every span the reads needed is now cached, verified.
    assert!(store.cache().used_bytes() > 0);
}

fn auth_json(dir: &std::path::Path, host: &str, user: &str, pass: &str) -> std::path::PathBuf {
    let path = dir.join("auth.json");
    common::servers::auth_file(&path, host, user, pass);
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_basic_auth_from_auth_json() {
    let (tar, gz, _, _) = test_layer();
    let reg = registry(RegistryOpts {
        htpasswd: Some(("alice".into(), "s3cret".into())),
        ..Default::default()
    });
    let mut pusher = Pusher::new(&reg);
    pusher.auth = Some(("alice".into(), "s3cret".into()));
    let digest = pushed(&reg, &pusher, &gz, &tar).await;
    let loc = locator(&reg.addr(), "test/app", &digest);
    let dir = tempfile::tempdir().unwrap();

    let good = registry_fetcher(
        &reg.addr(),
        vec![auth_json(dir.path(), &reg.addr(), "alice", "s3cret")],
    );
    check_ranges(&good, &loc, &gz).await;

    let none = registry_fetcher(&reg.addr(), vec![dir.path().join("absent.json")]);
    let err = none.read_range(&loc, 0..10).await.unwrap_err();
    assert!(matches!(err, FetchError::Unauthorized(_)), "{err}");

    let bad_dir = tempfile::tempdir().unwrap();
    let bad = registry_fetcher(
        &reg.addr(),
        vec![auth_json(bad_dir.path(), &reg.addr(), "alice", "wrong")],
    );
    let err = bad.read_range(&loc, 0..10).await.unwrap_err();
    assert!(matches!(err, FetchError::Unauthorized(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_on_s3_with_redirects() {
    let (tar, gz, _, _) = test_layer();
    let s3 = moto(&["registry"]).await;
    let reg = registry(RegistryOpts {
        s3: Some((format!("http://{}", s3.addr()), "registry".into())),
        ..Default::default()
    });
    let digest = pushed(&reg, &Pusher::new(&reg), &gz, &tar).await;
    let loc = locator(&reg.addr(), "test/app", &digest);
    let f = registry_fetcher(&reg.addr(), vec![]);
    check_ranges(&f, &loc, &gz).await;
    let log = reg.log_text();
    let blob_gets = log
        .lines()
        .filter(|l| l.contains("\"GET /v2/test/app/blobs/"))
        .count();
    assert!(
        log.contains("\" 307 "),
        "the registry redirected blob GETs: {log}"
    );
    // Many ranged reads, but the presigned URL is reused: the registry saw one blob GET.
    assert_eq!(blob_gets, 1, "{log}");
}

fn s3_fetcher(s3: &Server, bucket: &str, prefix: &str) -> S3Fetcher {
    S3Fetcher::new(&S3Options {
        bucket: bucket.into(),
        prefix: prefix.into(),
        endpoint: Some(format!("http://{}", s3.addr())),
        region: Some("us-east-1".into()),
        access_key_id: Some("testing".into()),
        secret_access_key: Some("testing".into()),
        virtual_hosted_style: false,
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn s3_mirror_filled_by_the_mirror_command() {
    let (tar, gz, z, expected) = test_layer();
    let s3 = moto(&["mirror"]).await;
    let reg = registry(RegistryOpts::default());
    let digest = pushed(&reg, &Pusher::new(&reg), &gz, &tar).await;

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!("[[fetchers]]\ntype = \"registry\"\ninsecure = [\"{}\"]\n[cache]\ntype = \"memory\"\nmax_bytes = \"64MiB\"\n", reg.addr()),
    )
    .unwrap();
    let mirror = |expect: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_soci-store"))
            .arg("--config")
            .arg(&cfg)
            .args([
                "mirror",
                &format!("{}/test/app:v1", reg.addr()),
                "s3://mirror/pre",
            ])
            .args(["--endpoint", &format!("http://{}", s3.addr())])
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(expect), "{stdout}");
    };
    // Manifest, config and layer.
    mirror("copied 3 blobs");
    mirror("copied 0 blobs (0 bytes), 3 already there");

    let f = s3_fetcher(&s3, "mirror", "pre");
    let loc = locator(&reg.addr(), "test/app", &digest);
    check_ranges(&f, &loc, &gz).await;
    let missing = locator(&reg.addr(), "test/app", &sha256_digest(b"nope"));
    assert!(matches!(
        f.read_range(&missing, 0..1).await,
        Err(FetchError::NotFound(_))
    ));

    // Served from S3 alone: the registry is gone.
    drop(reg);
    let store = Arc::new(SpanStore::new(
        FetcherChain::new(vec![Arc::new(f)]),
        Arc::new(MemoryCache::new(64 << 20)),
    ));
    check_files(store, loc, z, expected).await;
}

fn skopeo_layout(reg: &Server, dest: &std::path::Path) {
    let out = std::process::Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{}/test/app:v1", reg.addr()))
        .arg(format!("oci:{}:v1", dest.display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn local_layout_and_fallthrough() {
    let (tar, gz, _, _) = test_layer();
    let reg = registry(RegistryOpts::default());
    let digest = pushed(&reg, &Pusher::new(&reg), &gz, &tar).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    skopeo_layout(&reg, &layout);
    let loc = locator(&reg.addr(), "test/app", &digest);
    let local = LocalFetcher::new(&layout).unwrap();
    check_ranges(&local, &loc, &gz).await;
    assert!(LocalFetcher::new(dir.path()).is_err(), "not a layout");

    // An empty layout misses, the registry behind it serves.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(empty.join("blobs/sha256")).unwrap();
    std::fs::write(
        empty.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let chain = FetcherChain::new(vec![
        Arc::new(LocalFetcher::new(&empty).unwrap()),
        Arc::new(registry_fetcher(&reg.addr(), vec![])),
    ]);
    let got = chain.read_range(&loc, 10..20).await.unwrap();
    assert_eq!(&got[..], &gz[10..20]);
    let missing = locator(&reg.addr(), "test/app", &sha256_digest(b"nope"));
    let err = chain.read_range(&missing, 0..1).await.unwrap_err();
    assert!(
        err.is_not_found()
            && err.to_string().contains("local")
            && err.to_string().contains("registry"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn plugin_backend_selected_by_name_from_config() {
    let (tar, gz, _, _) = test_layer();
    let reg = registry(RegistryOpts::default());
    let digest = pushed(&reg, &Pusher::new(&reg), &gz, &tar).await;
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    skopeo_layout(&reg, &layout);
    // nginx needs to traverse the temp directory as its worker user.
    for p in [dir.path(), layout.as_path()] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let web = nginx(&layout);
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[fetchers]]\ntype = \"http-mirror\"\nbase_url = \"http://{}\"\n",
            web.addr()
        ),
    )
    .unwrap();
    let config = Config::load(Some(&cfg)).unwrap();

    let builtins = BackendRegistry::with_builtins();
    let err = builtins.build_fetchers(&config).unwrap_err().to_string();
    assert!(
        err.contains("unknown fetcher type \"http-mirror\""),
        "{err}"
    );

    let mut backends = BackendRegistry::with_builtins();
    soci_store_http_mirror::register(&mut backends);
    let chain = backends.build_fetchers(&config).unwrap();
    assert_eq!(chain.fetchers()[0].name(), "http-mirror");
    let loc = locator(&reg.addr(), "test/app", &digest);
    check_ranges(chain.fetchers()[0].as_ref(), &loc, &gz).await;
}

/// Counts reads, to show what was fetched.
#[derive(Debug)]
struct Counting {
    inner: Arc<dyn Fetcher>,
    reads: AtomicUsize,
}

#[async_trait]
impl Fetcher for Counting {
    fn name(&self) -> &str {
        "counting"
    }
    async fn blob_size(&self, b: &BlobLocator) -> Result<u64, FetchError> {
        self.inner.blob_size(b).await
    }
    async fn read_range(&self, b: &BlobLocator, r: Range<u64>) -> Result<Bytes, FetchError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read_range(b, r).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn single_flight_under_32_readers() {
    let (tar, gz, z, _) = test_layer();
    let reg = registry(RegistryOpts::default());
    let digest = pushed(&reg, &Pusher::new(&reg), &gz, &tar).await;
    let loc = locator(&reg.addr(), "test/app", &digest);
    let counting = Arc::new(Counting {
        inner: Arc::new(registry_fetcher(&reg.addr(), vec![])),
        reads: AtomicUsize::new(0),
    });
    let store = Arc::new(SpanStore::new(
        FetcherChain::new(vec![counting.clone()]),
        Arc::new(MemoryCache::new(64 << 20)),
    ));
    let z = Arc::new(z);
    let barrier = Arc::new(tokio::sync::Barrier::new(32));
    let tasks: Vec<_> = (0..32)
        .map(|_| {
            let (store, loc, z, barrier) = (store.clone(), loc.clone(), z.clone(), barrier.clone());
            tokio::spawn(async move {
                barrier.wait().await;
                store.span(&loc, &z, 3).await.unwrap()
            })
        })
        .collect();
    let span = z.span(3);
    for t in tasks {
        let got = t.await.unwrap();
        assert!(got[..] == gz[span.compressed.start as usize..span.compressed.end as usize]);
    }
    assert_eq!(
        counting.reads.load(Ordering::SeqCst),
        1,
        "one fetch for 32 readers"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn disk_cache_serves_after_restart_without_fetching() {
    let (tar, gz, z, expected) = test_layer();
    let mut reg = registry(RegistryOpts::default());
    let digest = pushed(&reg, &Pusher::new(&reg), &gz, &tar).await;
    let loc = locator(&reg.addr(), "test/app", &digest);
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Arc::new(SpanStore::new(
            FetcherChain::new(vec![Arc::new(registry_fetcher(&reg.addr(), vec![]))]),
            Arc::new(DiskCache::open(dir.path(), 1 << 30).unwrap()),
        ));
        check_files(store, loc.clone(), z.clone(), expected.clone_all()).await;
    }
    reg.stop();
    let counting = Arc::new(Counting {
        inner: Arc::new(registry_fetcher(&reg.addr(), vec![])),
        reads: AtomicUsize::new(0),
    });
    let store = Arc::new(SpanStore::new(
        FetcherChain::new(vec![counting.clone()]),
        Arc::new(DiskCache::open(dir.path(), 1 << 30).unwrap()),
    ));
    check_files(store, loc, z, expected).await;
    assert_eq!(
        counting.reads.load(Ordering::SeqCst),
        0,
        "served from the disk cache"
    );
}

trait CloneAll {
    fn clone_all(&self) -> Self;
}

impl CloneAll for Vec<Expected> {
    fn clone_all(&self) -> Self {
        self.iter()
            .map(|e| Expected {
                name: e.name.clone(),
                data: e.data.clone(),
            })
            .collect()
    }
}

/// The child side of the kill -9 test: writes spans to a disk cache until killed.
#[test]
fn disk_cache_writer_child() {
    let Some(dir) = std::env::var_os("SOCI_TEST_CACHE_WRITER") else {
        return; // Only runs as the child of the test below.
    };
    let cache = DiskCache::open(dir, 1 << 40).unwrap();
    for i in 0usize.. {
        let data = Bytes::from(span_pattern(i));
        cache.put(
            &soci_store::cache::SpanKey::new(format!("sha256:{}", "ab".repeat(32)), i),
            data,
        );
    }
}

fn span_pattern(i: usize) -> Vec<u8> {
    random_bytes(200_000 + (i % 7) * 10_000, i as u64 + 1)
}

#[test]
fn disk_cache_survives_kill_9_mid_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "disk_cache_writer_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SOCI_TEST_CACHE_WRITER", dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait (bounded) until the child has written a good number of spans, then kill it mid-stream.
    let layer_dir = dir.path().join("spans").join("ab".repeat(32));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_dir(&layer_dir)
        .map(|d| d.count())
        .unwrap_or(0)
        < 40
    {
        assert!(std::time::Instant::now() < deadline, "child wrote nothing");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    let cache = DiskCache::open(dir.path(), 1 << 40).unwrap();
    let mut served = 0;
    for i in 0..100_000usize {
        let key = soci_store::cache::SpanKey::new(format!("sha256:{}", "ab".repeat(32)), i);
        if !cache.contains(&key) {
            continue;
        }
        if let Some(data) = cache.get(&key) {
            assert!(
                data[..] == span_pattern(i)[..],
                "span {i} served with wrong bytes"
            );
            served += 1;
        }
    }
    assert!(served >= 40, "{served} spans survived");
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0,
        "temp files cleaned up"
    );
}

/// Every cache type works with only its own keys, and the documented
/// `SOCI_STORE_CACHE__TYPE=memory` builds a memory cache (the tiered defaults are not merged into
/// another type's options).
#[test]
fn each_cache_type_builds_from_its_own_keys_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    let registry = BackendRegistry::with_builtins();
    let cases = [
        (
            "[cache]\ntype = \"memory\"\nmax_bytes = \"64MiB\"\n",
            "memory",
        ),
        (
            &*format!(
                "[cache]\ntype = \"disk\"\npath = \"{}/d\"\n",
                dir.path().display()
            ),
            "disk",
        ),
        (
            &*format!(
                "[cache]\ntype = \"tiered\"\npath = \"{}/t\"\n",
                dir.path().display()
            ),
            "tiered",
        ),
    ];
    for (text, name) in cases {
        std::fs::write(&cfg, text).unwrap();
        let c = Config::load(Some(&cfg)).unwrap();
        let store = registry.build_span_store(&c).unwrap();
        assert_eq!(store.cache().name(), name, "{text}");
    }
    // The environment, as docs/configuration.md shows it, through the real command.
    std::fs::write(&cfg, "").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_soci-store"))
        .args(["--config", cfg.to_str().unwrap(), "config", "show"])
        .env("SOCI_STORE_CACHE__TYPE", "memory")
        .env("SOCI_STORE_CACHE__MAX_BYTES", "1GiB")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c: Config = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(c.cache.kind, "memory");
    let store = registry.build_span_store(&c).unwrap();
    assert_eq!(store.cache().name(), "memory");
}
