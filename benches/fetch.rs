//! Fetch and cache benchmark against a real local registry (`benches/fetch.sh` runs it).
//!
//! Ratios against baselines from the same run: the registry fetcher against `curl` for one large
//! blob; concurrent 4 MiB span reads; memory and disk cache hits.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use soci_store::cache::{DiskCache, MemoryCache, SpanCache, SpanKey};
use soci_store::fetch::registry::{RegistryFetcher, RegistryOptions};
use soci_store::fetch::{BlobLocator, Fetcher};
use soci_store::reference::Reference;

struct Registry {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_registry(port: u16) -> Registry {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.yml");
    std::fs::write(
        &cfg,
        format!(
            "version: 0.1\nlog: {{level: error}}\nstorage: {{filesystem: {{rootdirectory: {}}}}}\nhttp: {{addr: 127.0.0.1:{port}}}\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&cfg)
        .env_remove("AWS_CA_BUNDLE")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "registry did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Registry { child, _dir: dir }
}

fn best<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut best = Duration::MAX;
    let mut last = None;
    for _ in 0..runs {
        let t = Instant::now();
        last = Some(f());
        best = best.min(t.elapsed());
    }
    (best, last.unwrap())
}

fn main() {
    let blob: Vec<u8> = match std::env::var_os("BENCH_BLOB") {
        Some(p) => std::fs::read(p).unwrap(),
        None => {
            // Incompressible pseudo-random bytes.
            let mut x: u64 = 0x2545_f491_4f6c_dd1d;
            (0..(256usize << 20))
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x >> 24) as u8
                })
                .collect()
        }
    };
    let digest = soci_store::digest::Digest::of(&blob);
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _reg = start_registry(port);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    rt.block_on(async {
        let http = reqwest::Client::new();
        let resp = http
            .post(format!("{base}/v2/bench/blob/blobs/uploads/"))
            .send()
            .await
            .unwrap();
        let loc = resp.headers()["location"].to_str().unwrap().to_string();
        let url = if loc.starts_with("http") {
            loc
        } else {
            format!("{base}{loc}")
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        let resp = http
            .put(format!("{url}{sep}digest={digest}"))
            .body(blob.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 201);
    });
    let mb = blob.len() as f64 / 1e6;
    let url = format!("{base}/v2/bench/blob/blobs/{digest}");

    let (t_curl, ()) = best(3, || {
        let ok = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", &url])
            .status()
            .unwrap()
            .success();
        assert!(ok, "curl failed");
    });

    let f = Arc::new(
        RegistryFetcher::new(RegistryOptions {
            insecure: vec![format!("127.0.0.1:{port}")],
            registries_conf: None,
            auth_files: Some(vec![]),
            ..Default::default()
        })
        .unwrap(),
    );
    let loc = BlobLocator::new(
        Reference::parse(&format!("127.0.0.1:{port}/bench/blob:x")).unwrap(),
        &digest,
    );
    let n = blob.len() as u64;
    let (t_whole, ()) = best(3, || {
        let data = rt.block_on(f.read_range(&loc, 0..n)).unwrap();
        assert_eq!(data.len() as u64, n);
    });
    // Where bytes land matters on loopback: the fetcher returns them in memory, so also time curl
    // writing to memory (tmpfs) and plain reqwest both ways.
    let shm = std::path::Path::new("/dev/shm/soci-bench-blob");
    let (t_curl_mem, ()) = best(3, || {
        let ok = Command::new("curl")
            .args(["-sf", "-o"])
            .arg(shm)
            .arg(&url)
            .status()
            .unwrap()
            .success();
        assert!(ok, "curl failed");
        std::fs::remove_file(shm).unwrap();
    });
    let raw = |keep: bool| {
        rt.block_on(async {
            let mut resp = reqwest::Client::new().get(&url).send().await.unwrap();
            let mut out = Vec::with_capacity(if keep { blob.len() } else { 0 });
            let mut n = 0;
            while let Some(c) = resp.chunk().await.unwrap() {
                n += c.len();
                if keep {
                    out.extend_from_slice(&c);
                }
            }
            assert_eq!(n, blob.len());
        })
    };
    let (t_raw_sink, ()) = best(3, || raw(false));
    let (t_raw_mem, ()) = best(3, || raw(true));
    let span = 4u64 << 20;
    let ranges: Vec<_> = (0..n.div_ceil(span))
        .map(|i| i * span..((i + 1) * span).min(n))
        .collect();
    let (t_spans, ()) = best(3, || {
        let f = f.clone();
        let loc = loc.clone();
        let ranges = ranges.clone();
        rt.block_on(async move {
            // Separate requests (no coalescing): spans as the store asks for them, 16 at a time.
            let tasks: Vec<_> = ranges
                .into_iter()
                .map(|r| {
                    let (f, loc) = (f.clone(), loc.clone());
                    tokio::spawn(async move { f.read_range(&loc, r).await.unwrap().len() })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        })
    });

    // Cache hits of 4 MiB spans.
    let data = Bytes::from(blob[..span as usize].to_vec());
    let mem = MemoryCache::new(1 << 30);
    let dir = tempfile::tempdir().unwrap();
    let disk = DiskCache::open(dir.path(), 1 << 30).unwrap();
    let keys: Vec<_> = (0..32).map(|i| SpanKey::new(&digest, i)).collect();
    for k in &keys {
        mem.put(k, data.clone());
        disk.put(k, data.clone());
    }
    let hits = 2000;
    let t = Instant::now();
    for i in 0..hits {
        assert!(mem.get(&keys[i % keys.len()]).is_some());
    }
    let t_mem = t.elapsed() / hits as u32;
    let hits = 200;
    let t = Instant::now();
    for i in 0..hits {
        assert!(disk.get(&keys[i % keys.len()]).is_some());
    }
    let t_disk = t.elapsed() / hits as u32;

    let s = |d: Duration| d.as_secs_f64();
    println!("blob: {mb:.0} MB (incompressible), local registry (docker-registry) on loopback\n");
    println!("| measure | value | baseline (same run) | ratio | target |");
    println!("|---|---|---|---|---|");
    println!(
        "| one large blob, one ranged GET (registry fetcher) | {:.0} MB/s | `curl` of the same blob: {:.0} MB/s | {:.2} | >= 0.8 |",
        mb / s(t_whole), mb / s(t_curl), s(t_curl) / s(t_whole)
    );
    println!(
        "| same, baseline `curl -o /dev/shm/…` (bytes land in memory) | {:.0} MB/s | `curl` to tmpfs: {:.0} MB/s | {:.2} | >= 0.8 |",
        mb / s(t_whole), mb / s(t_curl_mem), s(t_curl_mem) / s(t_whole)
    );
    println!(
        "| reference: plain reqwest, body discarded / kept in memory | {:.0} / {:.0} MB/s | `curl`: {:.0} MB/s | {:.2} / {:.2} | - |",
        mb / s(t_raw_sink), mb / s(t_raw_mem), mb / s(t_curl), s(t_curl) / s(t_raw_sink), s(t_curl) / s(t_raw_mem)
    );
    println!(
        "| the blob as {} concurrent 4 MiB span reads | {:.0} MB/s | `curl`: {:.0} MB/s | {:.2} | - |",
        ranges.len(), mb / s(t_spans), mb / s(t_curl), s(t_curl) / s(t_spans)
    );
    println!(
        "| memory cache hit, 4 MiB span | {:.1} µs | - | - | - |",
        s(t_mem) * 1e6
    );
    println!(
        "| disk cache hit, 4 MiB span (page cache warm, CRC checked) | {:.2} ms ({:.0} MB/s) | - | - | - |",
        s(t_disk) * 1e3, 4.194304 / s(t_disk)
    );
}
