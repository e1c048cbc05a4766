//! The podman store end to end: the real registry, `soci-store convert`, `soci-store serve` on a
//! real FUSE mount, and the host's podman 4.3.1 pulling and running through it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::chroot::Chroot;
use common::daemon::{mounted, Daemon, Metrics};
use common::podman::{Podman, LIST_FILES};
use common::servers::{registry, Pusher, RegistryOpts, Server};
use common::*;

struct Env {
    reg: Server,
    dir: tempfile::TempDir,
    cfg: PathBuf,
    diff_ids: Vec<String>,
    layer_digests: Vec<String>,
}

async fn setup() -> Env {
    setup_with("").await
}

/// `fetcher_extra` adds options to the registry fetcher (e.g. a short deadline).
async fn setup_with(fetcher_extra: &str) -> Env {
    setup_converted(fetcher_extra, &[]).await
}

/// [`setup_with`], with extra `soci-store convert` arguments.
async fn setup_converted(fetcher_extra: &str, convert_extra: &[&str]) -> Env {
    let reg = registry(RegistryOpts::default());
    let layers = soci_test_image();
    let gz: Vec<Vec<u8>> = layers.iter().map(|(_, g)| g.clone()).collect();
    let diff_ids: Vec<String> = layers
        .iter()
        .map(|(t, _)| common::servers::sha256_digest(t))
        .collect();
    let (_, layer_digests) = Pusher::new(&reg)
        .image("test/app", "v1", &gz, &diff_ids)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "artifacts = \"{a}/artifacts\"\nstate_dir = \"{a}/state\"\nlocal_files = \"{a}/files\"\n[[fetchers]]\ntype = \"registry\"\ninsecure = [\"{r}\"]\nregistries_conf = \"/nonexistent\"\n{fetcher_extra}\n\
             [cache]\ntype = \"tiered\"\nmemory_bytes = \"64MiB\"\npath = \"{a}/cache\"\ndisk_bytes = \"1GiB\"\n",
            a = dir.path().display(),
            r = reg.addr()
        ),
    )
    .unwrap();
    let src = format!("{}/test/app:v1", reg.addr());
    let dst = format!("{}/test/app:v1-soci", reg.addr());
    let mut args = vec!["convert", "--quiet", "--span-size", "1MiB"];
    args.extend_from_slice(convert_extra);
    args.extend([src.as_str(), dst.as_str()]);
    common::soci_store_ok(&cfg, &args);
    Env {
        reg,
        dir,
        cfg,
        diff_ids,
        layer_digests,
    }
}

impl Env {
    /// A config for the daemon with an empty artifact store of its own (convert's has every
    /// zTOC already), so that what the store fetches shows in the registry log.
    fn fresh_daemon_config(&self) -> PathBuf {
        let text = std::fs::read_to_string(&self.cfg).unwrap();
        let a = self.dir.path().display().to_string();
        let text = text.replace(
            &format!("artifacts = \"{a}/artifacts\""),
            &format!("artifacts = \"{a}/daemon-artifacts\""),
        );
        let cfg = self.dir.path().join("daemon.toml");
        std::fs::write(&cfg, text).unwrap();
        cfg
    }

    /// (media type, digest) of the blobs the SOCI index of `image` lists.
    fn index_blobs(&self, image: &str) -> Vec<(String, String)> {
        let found = common::soci_store_ok(&self.cfg, &["index", "discover", image]);
        let index = found.split_whitespace().next().unwrap().to_string();
        let text = common::soci_store_ok(&self.cfg, &["index", "info", &index]);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| {
                let s = |k: &str| l[k].as_str().unwrap().to_string();
                (s("mediaType"), s("digest"))
            })
            .collect()
    }
}

const MT_ZTOC: &str = "application/octet-stream";
const MT_TABLE: &str = "application/vnd.soci-store.ztoc-table.v1+gzip";
const MT_WINDOWS: &str = "application/vnd.soci-store.ztoc-windows.v1";

/// The image's two indexed layers appear in `log` only as ranged reads (206), never whole (200).
fn assert_indexed_layers_not_downloaded_whole(env: &Env, log: &str) {
    for d in &env.layer_digests[..2] {
        let full = common::servers::whole_blob_gets(log, d);
        assert_eq!(full, 0, "indexed layer {d} was downloaded whole:\n{log}");
    }
}

/// Lines of a registry access log that GET `digest` (any status, any range).
fn blob_gets(log: &str, digest: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("\"GET ") && l.contains(&format!("/blobs/{digest} ")))
        .count()
}

/// A host whose store reads only an S3 mirror (filled by `soci-store mirror`): podman still asks
/// its registry for the manifest, the store takes manifests, config, index, zTOC tables, windows
/// and spans from the mirror, and the container starts lazily without the store ever asking the
/// registry.
#[tokio::test(flavor = "multi_thread")]
async fn mirror_only_store_starts_lazily_without_the_registry() {
    let env = setup().await;
    let s3 = common::servers::moto(&["mirror"]).await;
    let image = format!("{}/test/app:v1-soci", env.reg.addr());
    let endpoint = format!("http://{}", s3.addr());
    let out = Command::new(env!("CARGO_BIN_EXE_soci-store"))
        .arg("--config")
        .arg(&env.cfg)
        .args(["mirror", &image, "s3://mirror/pre", "--endpoint", &endpoint])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("1 tags recorded"), "{said}");

    // The example of docs/configuration.md, pointed at this test's S3 server.
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/docs/configuration.md"
    ))
    .unwrap();
    let example = doc
        .split("<!-- mirror-only example")
        .nth(1)
        .and_then(|rest| rest.split("```toml\n").nth(1))
        .and_then(|block| block.split("```").next())
        .expect("the mirror-only example in docs/configuration.md");
    assert!(example.contains("http://127.0.0.1:9000"), "{example}");
    let a = env.dir.path().display();
    let cfg = env.dir.path().join("mirror-only.toml");
    std::fs::write(
        &cfg,
        format!(
            "artifacts = \"{a}/mirror-artifacts\"\nstate_dir = \"{a}/mirror-state\"\nlocal_files = \"{a}/mirror-files\"\n{}\n\
             [cache]\ntype = \"memory\"\nmax_bytes = \"64MiB\"\n",
            example.replace("http://127.0.0.1:9000", &endpoint)
        ),
    )
    .unwrap();
    let plain = Podman::new().listing(&format!("{}/test/app:v1", env.reg.addr()));
    let mnt = env.dir.path().join("store");
    let daemon = Daemon::start(&cfg, &mnt, &env.dir.path().join("daemon.log"));
    let log_before = env.reg.log_text().len();
    let mut lazy = Podman::new();
    lazy.storage_opts.push(format!(
        "overlay.additionallayerstore={}:ref",
        mnt.display()
    ));
    assert_eq!(lazy.listing(&image), plain);
    let dlog = daemon.log_text();
    assert!(dlog.contains(" use"), "podman used the store: {dlog}");
    let log = env.reg.log_text()[log_before..].to_string();
    assert_indexed_layers_not_downloaded_whole(&env, &log);
    let from_store: Vec<&str> = log.lines().filter(|l| l.contains("soci-store/")).collect();
    assert!(
        from_store.is_empty(),
        "the store asked the registry:\n{}",
        from_store.join("\n")
    );
    assert!(
        log.contains("/manifests/v1-soci"),
        "podman read its manifest from the registry:\n{log}"
    );
    // The CLI's discovery reads the mirror alone too.
    let found = common::soci_store_ok(&cfg, &["index", "discover", &image]);
    assert!(found.contains("(2 zTOCs"), "{found}");
    let log = env.reg.log_text()[log_before..].to_string();
    assert!(
        !log.contains("soci-store/"),
        "discover asked the registry:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn podman_4_pulls_and_runs_lazily_through_the_store() {
    let env = setup().await;
    let mnt = env.dir.path().join("store");
    let mut daemon = Daemon::start(&env.cfg, &mnt, &env.dir.path().join("daemon.log"));

    let plain = Podman::new().listing(&format!("{}/test/app:v1", env.reg.addr()));
    let log_before = env.reg.log_text().len();

    let mut lazy = Podman::new();
    lazy.storage_opts.push(format!(
        "overlay.additionallayerstore={}:ref",
        mnt.display()
    ));
    let image = format!("{}/test/app:v1-soci", env.reg.addr());
    let listing = lazy.listing(&image);
    assert_eq!(listing, plain, "the lazily pulled image has the same files");
    assert!(
        !listing.contains("gone.txt") && !listing.contains("old.txt"),
        "whiteouts and opaque dirs hide: {listing}"
    );

    // No full GET of an indexed layer: only ranged reads (206) by the store.
    let log = env.reg.log_text()[log_before..].to_string();
    assert_indexed_layers_not_downloaded_whole(&env, &log);
    // The small unindexed layer was downloaded by podman itself.
    let small = &env.layer_digests[2];
    assert!(common::servers::whole_blob_gets(&log, small) > 0, "{log}");

    // podman save reads `blob` and checks it against the diff IDs.
    let archive = env.dir.path().join("saved.tar");
    lazy.run(&["save", "-o", archive.to_str().unwrap(), &image]);
    let mut ar = tar::Archive::new(std::fs::File::open(&archive).unwrap());
    let mut layer_sums = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".tar") {
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            layer_sums.push(common::servers::sha256_digest(&data));
        }
    }
    for id in &env.diff_ids {
        assert!(
            layer_sums.contains(id),
            "saved layers {layer_sums:?} lack {id}"
        );
    }

    // rmi releases the layers: every use is matched by a release.
    lazy.run(&["rmi", "-f", &image]);
    let dlog = daemon.log_text();
    for d in &env.layer_digests[..2] {
        let last = dlog
            .lines()
            .rfind(|l| l.contains(d.as_str()) && (l.contains(" use") || l.contains(" release")))
            .unwrap_or_else(|| panic!("no use/release for {d}: {dlog}"));
        assert!(last.contains("uses=0"), "{d}: {last}");
    }

    // An image without an index pulls and runs normally with the store configured.
    assert_eq!(
        lazy.listing(&format!("{}/test/app:v1", env.reg.addr())),
        plain
    );

    drop(lazy);
    let status = daemon.stop();
    assert!(
        status.success(),
        "serve exited with {status}: {}",
        daemon.log_text()
    );
    assert!(!mounted(&mnt), "unmounted on SIGTERM");
}

#[tokio::test(flavor = "multi_thread")]
async fn store_tree_answers_like_the_protocol_says() {
    use base64::Engine;
    let env = setup().await;
    let metrics = Metrics::enable(&env.cfg);
    let mnt = env.dir.path().join("store");
    let _daemon = Daemon::start(&env.cfg, &mnt, &env.dir.path().join("daemon.log"));
    let image = format!("{}/test/app:v1-soci", env.reg.addr());
    let b64 = base64::engine::general_purpose::STANDARD.encode(&image);
    let layer = mnt.join(&b64).join(&env.layer_digests[0]);
    let ztoc_path = {
        let info: serde_json::Value =
            serde_json::from_slice(&std::fs::read(layer.join("info")).unwrap()).unwrap();
        assert_eq!(info["diff-digest"], env.diff_ids[0].as_str());
        assert_eq!(
            info["flags"]["expected-layer-diffid"],
            env.diff_ids[0].as_str()
        );
        assert_eq!(
            info["compressed-diff-digest"],
            env.layer_digests[0].as_str()
        );
        assert_eq!(info["compression"], 2);
        mnt.join(&b64).join(info["toc-digest"].as_str().unwrap())
    };
    // The same layer by its zTOC digest (podman >= 5.1).
    assert!(ztoc_path.join("diff/data/big-random.bin").exists());
    let diff = layer.join("diff");
    assert_eq!(
        std::fs::read(diff.join("data/big-random.bin")).unwrap(),
        random_bytes(12 << 20, 11)
    );
    assert_eq!(
        std::fs::read_link(diff.join("etc/hello-link")).unwrap(),
        Path::new("hello.txt")
    );
    use std::os::unix::fs::MetadataExt;
    let a = std::fs::metadata(diff.join("data/text.txt")).unwrap();
    let b = std::fs::metadata(diff.join("data/text-hardlink.txt")).unwrap();
    assert_eq!(
        (a.ino(), a.nlink()),
        (b.ino(), 2),
        "hardlinks share an inode"
    );
    assert_eq!(
        std::fs::metadata(diff.join("bin/suid")).unwrap().mode() & 0o7777,
        0o4755
    );
    let xattr = Command::new("getfattr")
        .args(["--only-values", "-n", "user.soci"])
        .arg(diff.join("etc/xattr.txt"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&xattr.stdout), "yes");
    // The top layer: a whiteout is a 0:0 char device; the opaque dir says so in an xattr.
    let top = mnt.join(&b64).join(&env.layer_digests[1]).join("diff");
    use std::os::unix::fs::FileTypeExt;
    let wh = std::fs::symlink_metadata(top.join("etc/gone.txt")).unwrap();
    assert!(wh.file_type().is_char_device() && wh.rdev() == 0);
    let opq = Command::new("getfattr")
        .args(["--only-values", "-n", "trusted.overlay.opaque"])
        .arg(top.join("opaque"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&opq.stdout), "y");
    // Unknown names and the unindexed layer: ENOENT.
    assert!(!layer.join("diff1").exists());
    assert!(!mnt
        .join(&b64)
        .join(&env.layer_digests[2])
        .join("diff")
        .exists());
    // podman's `use` notification: open(O_CREAT) answers ENOENT.
    let used = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(layer.join("use"));
    assert_eq!(
        used.map_err(|e| e.kind()).err(),
        Some(std::io::ErrorKind::NotFound)
    );
    // blob is the compressed layer, byte for byte.
    let blob = std::fs::read(layer.join("blob")).unwrap();
    assert_eq!(common::servers::sha256_digest(&blob), env.layer_digests[0]);

    // The metrics endpoint counts what happened.
    let text = metrics.text().await;
    let value = |name: &str| Metrics::value(&text, name);
    assert!(value("soci_store_spans_fetched_total") >= 1.0, "{text}");
    assert!(value("soci_store_bytes_fetched_total") > 0.0);
    assert!(value("soci_store_read_seconds_count") >= 2.0);
    assert!(value("soci_store_layers_served") >= 2.0);
    assert_eq!(value("soci_store_fuse_errors_total"), 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn registry_outage_gives_eio_in_bounded_time_and_recovers() {
    use base64::Engine;
    let mut env = setup_with("deadline = 4.0\nrequest_timeout = 1.0").await;
    let mnt = env.dir.path().join("store");
    let _daemon = Daemon::start_with(
        &env.cfg,
        &mnt,
        &env.dir.path().join("daemon.log"),
        &["--no-background-fetch"],
    );
    let b64 = base64::engine::general_purpose::STANDARD
        .encode(format!("{}/test/app:v1-soci", env.reg.addr()));
    let diff = mnt.join(&b64).join(&env.layer_digests[0]).join("diff");
    // Cached before the outage.
    let hello = std::fs::read(diff.join("etc/hello.txt")).unwrap();
    assert_eq!(hello, b"hello from the base layer\n");

    env.reg.stop();
    assert_eq!(
        std::fs::read(diff.join("etc/hello.txt")).unwrap(),
        hello,
        "cached reads still work"
    );
    let t = Instant::now();
    let err = std::fs::read(diff.join("data/big-random.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "EIO came after {:?}",
        t.elapsed()
    );

    env.reg.restart();
    let data = std::fs::read(diff.join("data/big-random.bin")).unwrap();
    assert!(
        data == random_bytes(12 << 20, 11),
        "reads succeed again once the registry is back"
    );
}

fn libc_eio() -> i32 {
    5
}

#[tokio::test(flavor = "multi_thread")]
async fn podman_5_pulls_and_runs_lazily_through_the_store() {
    let env = setup().await;
    let plain = Podman::new().listing(&format!("{}/test/app:v1", env.reg.addr()));
    let chroot = Chroot::enter();
    let mnt = chroot.root.join("var/lib/soci-store/store");
    let cfg = env.fresh_daemon_config();
    let metrics = Metrics::enable(&cfg);
    let trace = env.dir.path().join("trace.jsonl");
    let daemon = Daemon::start_with(
        &cfg,
        &mnt,
        &env.dir.path().join("daemon.log"),
        &["--trace", trace.to_str().unwrap()],
    );
    let log_before = env.reg.log_text().len();

    let image = format!("{}/test/app:v1-soci", env.reg.addr());
    chroot.podman(&["pull", "-q", "--tls-verify=false", &image]);
    assert_eq!(chroot.run_listing(&image), plain);

    let log = env.reg.log_text()[log_before..].to_string();
    assert_indexed_layers_not_downloaded_whole(&env, &log);
    // podman 5 asked for the layers by their zTOC digests.
    let dlog = daemon.log_text();
    assert!(dlog.contains(" use"), "podman 5 used the store: {dlog}");
    // One resolution per layer, although podman asks by zTOC digest and the store resolves the
    // image's other layers by their compressed digests; every index artifact fetched at most once.
    let text = metrics.text().await;
    assert_eq!(
        Metrics::value(&text, "soci_store_layers_served"),
        2.0,
        "{text}"
    );
    // The store read each zTOC's table once, never a whole zTOC, and windows by range.
    let blobs = env.index_blobs(&image);
    let count = |mt: &str| blobs.iter().filter(|(m, _)| m == mt).count();
    assert_eq!(
        (count(MT_ZTOC), count(MT_TABLE), count(MT_WINDOWS)),
        (2, 2, 2)
    );
    for (mt, d) in &blobs {
        let gets = blob_gets(&log, d);
        match mt.as_str() {
            MT_ZTOC => assert_eq!(gets, 0, "zTOC {d} fetched:\n{log}"),
            MT_TABLE => assert_eq!(gets, 1, "table {d}:\n{log}"),
            _ => {}
        }
    }
    // The trace saw the lookups, and what the start read.
    let summary = common::soci_store_ok(&cfg, &["trace", "summary", trace.to_str().unwrap()]);
    for what in ["lookup", "read", "span/demand"] {
        assert!(summary.contains(what), "{summary}");
    }
    let json = common::soci_store_ok(
        &cfg,
        &["trace", "summary", "--json", trace.to_str().unwrap()],
    );
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(v["first_read_ms"].as_f64().is_some(), "{json}");
    assert!(
        v["events"]["window/demand"]["count"].as_u64() > Some(0),
        "{json}"
    );
    drop(daemon);
}

/// The background fetcher never starts a fetch while a reader waits for one (nor right after),
/// nor while a reader's read-ahead runs, so the start's reads do not share the link with it;
/// the trace shows every fetch.
#[tokio::test(flavor = "multi_thread")]
async fn background_fetch_gives_way_to_waiting_readers() {
    use base64::Engine;
    let env = setup().await;
    let metrics = Metrics::enable(&env.cfg);
    let trace = env.dir.path().join("trace.jsonl");
    let mnt = env.dir.path().join("store");
    // Slow pacing keeps the background fetcher busy for the whole test.
    let _daemon = Daemon::start_with(
        &env.cfg,
        &mnt,
        &env.dir.path().join("daemon.log"),
        &[
            "--background-rate",
            "4MiB",
            "--trace",
            trace.to_str().unwrap(),
        ],
    );
    let b64 = base64::engine::general_purpose::STANDARD
        .encode(format!("{}/test/app:v1-soci", env.reg.addr()));
    let base = mnt.join(&b64).join(&env.layer_digests[0]).join("diff");
    let top = mnt.join(&b64).join(&env.layer_digests[1]).join("diff");
    assert!(base.join("etc/hello.txt").exists());
    // Wait until the background fetcher runs, then read whole files span by span.
    metrics
        .wait_for(
            "soci_store_spans_fetched_total",
            1.0,
            Duration::from_secs(60),
        )
        .await;
    assert!(std::fs::read(base.join("data/big-random.bin")).unwrap() == random_bytes(12 << 20, 11));
    assert!(std::fs::read(top.join("more/random2.bin")).unwrap() == random_bytes(11 << 20, 13));

    let events = soci_store::trace::load(&trace).unwrap();
    let fetches = |kind: &str| -> Vec<soci_store::trace::Event> {
        events
            .iter()
            .filter(|e| e.ev == "span" && e.kind == kind)
            .cloned()
            .collect()
    };
    // What readers fetched: spans they waited for, and the spans after them fetched ahead.
    let mut demand = fetches("demand");
    demand.extend(fetches("ahead"));
    let background = fetches("background");
    assert!(!demand.is_empty() && !background.is_empty(), "{events:?}");
    for d in &demand {
        for b in &background {
            assert!(
                !(b.t_ms >= d.t_ms && b.t_ms <= d.t_ms + d.ms),
                "background fetch {b:?} started while a reader waited for {d:?}"
            );
        }
    }
}

/// The forky chroot with podman 5.8 (containers/storage 1.62), the store mounted in it and the test
/// image pulled through it; returns the image reference.
fn podman58_pulled(env: &Env) -> (Chroot, Daemon, String) {
    let chroot = Chroot::enter_at(
        "SOCI_PODMAN58_ROOT",
        "/var/cache/soci-store-ci/forky",
        ".ci/podman-chroot.sh forky",
    );
    let mnt = chroot.root.join("var/lib/soci-store/store");
    let daemon = Daemon::start(&env.cfg, &mnt, &env.dir.path().join("daemon.log"));
    let image = format!("{}/test/app:v1-soci", env.reg.addr());
    chroot.podman(&["pull", "-q", "--tls-verify=false", &image]);
    (chroot, daemon, image)
}

/// `podman run` of the test image's file listing in the chroot.
fn podman58_run(chroot: &Chroot, image: &str) -> std::process::Output {
    chroot.podman(&[
        "run",
        "--rm",
        "--network",
        "none",
        "--tls-verify=false",
        image,
        "/bin/busybox",
        "sh",
        "-c",
        LIST_FILES,
    ])
}

/// podman 5.8 pulls and runs lazily, and every later podman command still runs the image lazily.
/// (With containers/storage >= 1.58 a later command finds no record of the layers taken from the
/// store and pulls again, through the store: see [`podman58_keeps_the_lazily_pulled_image`].)
#[tokio::test(flavor = "multi_thread")]
async fn podman58_pulls_and_runs_lazily_through_the_store() {
    let env = setup().await;
    let plain = Podman::new().listing(&format!("{}/test/app:v1", env.reg.addr()));
    let log_before = env.reg.log_text().len();
    let (chroot, daemon, image) = podman58_pulled(&env);
    for _ in 0..2 {
        let out = podman58_run(&chroot, &image);
        assert_eq!(String::from_utf8_lossy(&out.stdout), plain);
    }
    let log = env.reg.log_text()[log_before..].to_string();
    assert_indexed_layers_not_downloaded_whole(&env, &log);
    let dlog = daemon.log_text();
    assert!(dlog.contains(" use"), "podman 5.8 used the store: {dlog}");
}

/// What a pull is for: the image stays, and running it needs no registry. podman 5.5 to 5.8
/// (containers/storage 1.58 to 1.62, at least) fail this with any additional layer store:
/// `layerStore.PutAdditionalLayer` leaves the new layer's store location unset, so the layer is
/// never written to `layers.json`; the next podman command finds the image's layers unknown
/// ("exists in local storage but may be corrupted") and pulls again.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "containers/storage >= 1.58 (podman >= 5.5) never saves layers taken from an additional layer store"]
async fn podman58_keeps_the_lazily_pulled_image() {
    let env = setup().await;
    let plain = Podman::new().listing(&format!("{}/test/app:v1", env.reg.addr()));
    let (chroot, _daemon, image) = podman58_pulled(&env);
    let images = chroot.podman(&["images", "--format", "{{.Repository}}:{{.Tag}}"]);
    assert!(
        String::from_utf8_lossy(&images.stdout)
            .lines()
            .any(|l| l == image),
        "podman images lists {image}: {}",
        String::from_utf8_lossy(&images.stdout)
    );
    let layers = chroot.podman(&[
        "image",
        "inspect",
        "--format",
        "{{json .RootFS.Layers}}",
        &image,
    ]);
    let layers: Vec<String> = serde_json::from_slice(&layers.stdout).unwrap();
    assert_eq!(layers, env.diff_ids);

    let log_before = env.reg.log_text().len();
    let out = podman58_run(&chroot, &image);
    assert_eq!(String::from_utf8_lossy(&out.stdout), plain);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("Trying to pull"),
        "run pulled again: {stderr}"
    );
    let log = env.reg.log_text()[log_before..].to_string();
    assert!(!log.contains("GET /v2/"), "run asked the registry:\n{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn background_fetch_makes_layers_fully_local() {
    use base64::Engine;
    let mut env = setup().await;
    let metrics = Metrics::enable(&env.cfg);
    let mnt = env.dir.path().join("store");
    let _daemon = Daemon::start_with(
        &env.cfg,
        &mnt,
        &env.dir.path().join("daemon.log"),
        &["--background-rate", "200MiB"],
    );
    let b64 = base64::engine::general_purpose::STANDARD
        .encode(format!("{}/test/app:v1-soci", env.reg.addr()));
    let base = mnt.join(&b64).join(&env.layer_digests[0]).join("diff");
    // One small read resolves the layer (and, in the background, its sibling).
    assert_eq!(
        std::fs::read(base.join("etc/hello.txt")).unwrap(),
        b"hello from the base layer\n"
    );
    metrics
        .wait_for("soci_store_layers_local", 2.0, Duration::from_secs(120))
        .await;
    // With the registry gone every file still reads: nothing needs the network any more.
    env.reg.stop();
    assert!(std::fs::read(base.join("data/big-random.bin")).unwrap() == random_bytes(12 << 20, 11));
    let top = mnt.join(&b64).join(&env.layer_digests[1]).join("diff");
    assert!(std::fs::read(top.join("more/random2.bin")).unwrap() == random_bytes(11 << 20, 13));
}

/// `convert --prefetch-file` writes a SOCI prefetch artifact, and the store's background fetcher
/// takes its spans first: with the pace slowed to a crawl after one span per layer, the prefetched
/// file (in the base layer's last span) reads with the registry gone, the layer's first span not.
#[tokio::test(flavor = "multi_thread")]
async fn prefetch_artifact_spans_are_fetched_first() {
    use base64::Engine;
    let mut env = setup_converted(
        "deadline = 4.0\nrequest_timeout = 1.0",
        &["--prefetch-file", "/bin/suid"],
    )
    .await;
    let metrics = Metrics::enable(&env.cfg);
    // The index lists one prefetch artifact, for the base layer.
    let image = format!("{}/test/app:v1-soci", env.reg.addr());
    let text = common::soci_store_ok(&env.cfg, &["index", "discover", &image]);
    assert!(text.contains("(2 zTOCs, 1 prefetch artifacts)"), "{text}");

    let mnt = env.dir.path().join("store");
    let _daemon = Daemon::start_with(
        &env.cfg,
        &mnt,
        &env.dir.path().join("daemon.log"),
        &["--background-rate", "1KiB"],
    );
    let b64 = base64::engine::general_purpose::STANDARD
        .encode(format!("{}/test/app:v1-soci", env.reg.addr()));
    let base = mnt.join(&b64).join(&env.layer_digests[0]).join("diff");
    // Metadata only: resolves both layers and starts their background fetch, reads nothing.
    assert!(base.join("bin/suid").exists());
    metrics
        .wait_for(
            "soci_store_spans_fetched_total",
            2.0,
            Duration::from_secs(60),
        )
        .await;
    env.reg.stop();
    assert_eq!(std::fs::read(base.join("bin/suid")).unwrap(), b"#suid!\n");
    let err = std::fs::read(base.join("etc/hello.txt")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
}

/// The daemon crashes (SIGKILL) while a container runs from lazily pulled layers; a new daemon on
/// the same mountpoint takes over the FUSE connection: the running container's next reads
/// succeed, podman starts new containers from the layers it already links to, and spans the first
/// daemon cached on disk are not fetched again.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_daemon_keeps_running_containers_reading() {
    let env = setup().await;
    let mnt = env.dir.path().join("store");
    let first = Daemon::start_with(
        &env.cfg,
        &mnt,
        &env.dir.path().join("first.log"),
        &["--no-background-fetch"],
    );
    let mut lazy = Podman::new();
    lazy.storage_opts.push(format!(
        "overlay.additionallayerstore={}:ref",
        mnt.display()
    ));
    let image = format!("{}/test/app:v1-soci", env.reg.addr());
    lazy.run(&["pull", "-q", "--tls-verify=false", &image]);
    lazy.run(&[
        "run",
        "-d",
        "--name",
        "keep",
        "--network",
        "none",
        &image,
        "/bin/busybox",
        "sleep",
        "3600",
    ]);
    let sum = |c: &str, path: &str| -> String {
        let out = lazy.run(&["exec", c, "/bin/busybox", "sha256sum", path]);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let text = common::servers::sha256_digest(&text_bytes(3 << 20, 12));
    assert_eq!(format!("sha256:{}", sum("keep", "/data/text.txt")), text);
    let hello = common::servers::sha256_digest(b"hello from the base layer\n");
    assert_eq!(format!("sha256:{}", sum("keep", "/etc/hello.txt")), hello);

    first.crash();
    assert!(mounted(&mnt), "the mount outlives the crashed daemon");
    // The kernel would answer from its page cache: make the reads reach the new daemon.
    std::fs::write("/proc/sys/vm/drop_caches", "1").unwrap();
    let log_before = env.reg.log_text().len();
    // A read while no daemon runs waits in the kernel for the next one.
    let waiting = lazy
        .command()
        .args([
            "exec",
            "keep",
            "/bin/busybox",
            "sha256sum",
            "/etc/hello.txt",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    let second = Daemon::start_with(
        &env.cfg,
        &mnt,
        &env.dir.path().join("second.log"),
        &["--no-background-fetch"],
    );
    assert!(
        second.log_text().contains("took over the mount"),
        "{}",
        second.log_text()
    );
    let waited = waiting.wait_with_output().unwrap();
    assert!(waited.status.success(), "{waited:?}");
    assert!(String::from_utf8_lossy(&waited.stdout).starts_with(&hello[7..]));
    // The running container: a cached file, then one never read before.
    assert_eq!(format!("sha256:{}", sum("keep", "/data/text.txt")), text);
    let random2 = common::servers::sha256_digest(&random_bytes(11 << 20, 13));
    assert_eq!(
        format!("sha256:{}", sum("keep", "/more/random2.bin")),
        random2
    );
    let base = &env.layer_digests[0];
    let log = env.reg.log_text()[log_before..].to_string();
    assert!(
        !log.contains(&format!("/blobs/{base} ")),
        "spans cached on disk were fetched again:\n{log}"
    );
    assert!(
        log.contains(&format!("/blobs/{} ", env.layer_digests[1])),
        "the uncached file came from the registry:\n{log}"
    );
    // A new container from the layers podman already links to.
    let out = lazy.run(&[
        "run",
        "--rm",
        "--network",
        "none",
        &image,
        "/bin/busybox",
        "cat",
        "/etc/hello.txt",
    ]);
    assert_eq!(out.stdout, b"hello from the base layer\n");

    // Again: the second daemon's journal additions (that container's use and release) carry over.
    second.crash();
    std::fs::write("/proc/sys/vm/drop_caches", "1").unwrap();
    let mut third = Daemon::start_with(
        &env.cfg,
        &mnt,
        &env.dir.path().join("third.log"),
        &["--no-background-fetch"],
    );
    assert!(third.log_text().contains("took over the mount"));
    assert_eq!(
        format!("sha256:{}", sum("keep", "/more/random2.bin")),
        random2
    );

    lazy.run(&["rm", "-f", "-t", "0", "keep"]);
    drop(lazy);
    let status = third.stop();
    assert!(status.success(), "{}", third.log_text());
    assert!(!mounted(&mnt), "unmounted on SIGTERM");
    assert!(
        third.holders().is_empty(),
        "the holder exits with a clean stop"
    );
}

/// A journal the new daemon cannot use (here: overwritten with garbage) means no takeover: it says
/// why, lets the old connection go and mounts afresh, and the store works.
#[tokio::test(flavor = "multi_thread")]
async fn an_unusable_journal_falls_back_to_a_fresh_mount() {
    use base64::Engine;
    let env = setup().await;
    let mnt = env.dir.path().join("store");
    let first = Daemon::start(&env.cfg, &mnt, &env.dir.path().join("first.log"));
    let b64 = base64::engine::general_purpose::STANDARD
        .encode(format!("{}/test/app:v1-soci", env.reg.addr()));
    let hello = mnt
        .join(&b64)
        .join(&env.layer_digests[0])
        .join("diff/etc/hello.txt");
    assert_eq!(
        std::fs::read(&hello).unwrap(),
        b"hello from the base layer\n"
    );
    let journals: Vec<PathBuf> = std::fs::read_dir(&first.state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "journal"))
        .collect();
    assert_eq!(journals.len(), 1);
    first.crash();
    std::fs::write(&journals[0], b"{ not a journal\n{}\n").unwrap();

    let second = Daemon::start(&env.cfg, &mnt, &env.dir.path().join("second.log"));
    let log = second.log_text();
    assert!(log.contains("cannot take over"), "{log}");
    assert!(!log.contains("took over"), "{log}");
    assert_eq!(
        std::fs::read(&hello).unwrap(),
        b"hello from the base layer\n"
    );
    assert_eq!(
        second.holders().len(),
        1,
        "the new mount has its own holder"
    );
}

/// An index as upstream SOCI tools write it (zTOCs only, no tables): the store fetches each zTOC
/// once, and podman 4 still starts the image lazily with the same files.
#[tokio::test(flavor = "multi_thread")]
async fn an_image_indexed_the_upstream_way_starts_lazily() {
    let env = setup_converted("", &["--no-ztoc-table"]).await;
    let image = format!("{}/test/app:v1-soci", env.reg.addr());
    let blobs = env.index_blobs(&image);
    assert!(blobs.iter().all(|(mt, _)| mt == MT_ZTOC), "{blobs:?}");
    let cfg = env.fresh_daemon_config();
    let mnt = env.dir.path().join("store");
    let _daemon = Daemon::start(&cfg, &mnt, &env.dir.path().join("daemon.log"));
    let plain = Podman::new().listing(&format!("{}/test/app:v1", env.reg.addr()));
    let log_before = env.reg.log_text().len();
    let mut lazy = Podman::new();
    lazy.storage_opts.push(format!(
        "overlay.additionallayerstore={}:ref",
        mnt.display()
    ));
    assert_eq!(lazy.listing(&image), plain);
    let log = env.reg.log_text()[log_before..].to_string();
    for (_, d) in &blobs {
        assert_eq!(blob_gets(&log, d), 1, "zTOC {d}:\n{log}");
    }
    assert_indexed_layers_not_downloaded_whole(&env, &log);
}

/// A window altered in the registry is refused: the read fails with EIO, never with wrong bytes,
/// while files whose windows are intact read correctly. (Windows the store derives from the span
/// before are not fetched at all: every window but the first few is altered, so that a file
/// spanning many groups of spans needs an altered one.)
#[tokio::test(flavor = "multi_thread")]
async fn a_tampered_window_is_never_served() {
    use base64::Engine;
    let env = setup().await;
    let image = format!("{}/test/app:v1-soci", env.reg.addr());
    let blobs = env.index_blobs(&image);
    let cfg = env.fresh_daemon_config();
    let mnt = env.dir.path().join("store");
    let _daemon = Daemon::start_with(
        &cfg,
        &mnt,
        &env.dir.path().join("daemon.log"),
        &["--no-background-fetch"],
    );
    // Alter every window blob of the image (the base layer's among them) from its 4 KiB on:
    // the first window (32 KiB of zeros, a few bytes compressed) stays intact.
    for (_, d) in blobs.iter().filter(|(mt, _)| mt == MT_WINDOWS) {
        let path = env.reg.blob_path(d);
        let mut bytes = std::fs::read(&path).unwrap();
        for b in bytes.iter_mut().skip(4096).step_by(512) {
            *b ^= 0x5a;
        }
        std::fs::write(&path, bytes).unwrap();
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(&image);
    let base = mnt.join(&b64).join(&env.layer_digests[0]).join("diff");
    // A read in the middle of the 12 MiB file (as a page fault is) needs its span's window, or
    // that of the span its group of spans starts with: altered.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(base.join("data/big-random.bin")).unwrap();
        let mut page = vec![0u8; 4096];
        let err = f.read_exact_at(&mut page, 8 << 20).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
    }
    // The first span's window is intact, and served.
    assert_eq!(
        std::fs::read(base.join("etc/hello.txt")).unwrap(),
        b"hello from the base layer\n"
    );
}

/// Reading a file sequentially fetches the file's next spans ahead, consecutive ones with one
/// request, so the reader waits for few of them (a lone read does not), and only the first
/// window of each run (the others are derived); every span is still fetched once and every
/// byte reads correctly. The trace shows which fetches were read-ahead.
#[tokio::test(flavor = "multi_thread")]
async fn a_file_read_fetches_its_next_spans_ahead() {
    use base64::Engine;
    let env = setup().await;
    let image = format!("{}/test/app:v1-soci", env.reg.addr());
    let cfg = env.fresh_daemon_config();
    let trace = env.dir.path().join("trace.jsonl");
    let mnt = env.dir.path().join("store");
    let daemon = Daemon::start_with(
        &cfg,
        &mnt,
        &env.dir.path().join("daemon.log"),
        &["--no-background-fetch", "--trace", trace.to_str().unwrap()],
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(&image);
    let base = mnt.join(&b64).join(&env.layer_digests[0]).join("diff");
    assert!(base.join("etc/hello.txt").exists());
    let log_before = env.reg.log_text().len();
    // A lone read in the middle of a file (as a page fault is) fetches only its span.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(base.join("data/big-random.bin")).unwrap();
        let mut page = vec![0u8; 4096];
        f.read_exact_at(&mut page, 5 << 20).unwrap();
        assert!(page[..] == random_bytes(12 << 20, 11)[5 << 20..(5 << 20) + 4096]);
        let events = soci_store::trace::load(&trace).unwrap();
        assert!(events.iter().all(|e| e.kind != "ahead"), "{events:?}");
    }
    // 12 MiB of random bytes: with 1 MiB spans, at least 12 spans of the base layer.
    assert!(std::fs::read(base.join("data/big-random.bin")).unwrap() == random_bytes(12 << 20, 11));
    let log = env.reg.log_text()[log_before..].to_string();
    drop(daemon);
    let events = soci_store::trace::load(&trace).unwrap();
    let fetches = |ev: &str, kind: &str| -> Vec<String> {
        events
            .iter()
            .filter(|e| e.ev == ev && e.kind == kind && e.outcome.is_empty())
            .map(|e| e.what.clone())
            .collect()
    };
    let (demand, ahead) = (fetches("span", "demand"), fetches("span", "ahead"));
    // `what` is `blob#id` or, for a run fetched with one request, `blob#first-last`.
    let ids = |what: &String| -> std::ops::RangeInclusive<usize> {
        let ids = what.rsplit('#').next().unwrap();
        let (a, b) = ids.split_once('-').unwrap_or((ids, ids));
        a.parse().unwrap()..=b.parse().unwrap()
    };
    let mut spans: Vec<usize> = demand.iter().chain(&ahead).flat_map(ids).collect();
    let fetched = spans.len();
    // 12 MiB of random bytes: with 512 KiB table spans, at least 12 spans of the base layer.
    assert!(fetched >= 12, "{events:?}");
    assert!(demand.len() <= 5, "the reader waited for {demand:?}");
    assert!(ahead.iter().any(|w| w.contains('-')), "{ahead:?}");
    // One window per run at most: the others are derived from the spans before them.
    let windows = fetches("window", "ahead").len() + fetches("window", "demand").len();
    assert!(windows <= demand.len() + ahead.len(), "{events:?}");
    // Each span once: no span fetched twice, and one registry request per fetch.
    spans.sort();
    spans.dedup();
    assert_eq!(spans.len(), fetched, "{events:?}");
    assert_eq!(
        blob_gets(&log, &env.layer_digests[0]),
        demand.len() + ahead.len(),
        "{log}"
    );
}

/// Every regular file under `dir` (recursively), with its size.
fn files_under(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else if let Ok(m) = e.metadata() {
            out.push((p, m.len()));
        }
    }
    out
}

/// Once both indexed layers are complete their files get decompressed local copies: a file
/// opened afterwards is read by the kernel from the copy (FUSE passthrough; the daemon sees no
/// read), byte for byte, with the registry gone; a file opened before the copies existed keeps
/// reading right through its spans.
#[tokio::test(flavor = "multi_thread")]
async fn local_copies_serve_files_once_layers_are_complete() {
    use base64::Engine;
    use std::os::unix::fs::FileExt;
    let mut env = setup().await;
    let metrics = Metrics::enable(&env.cfg);
    let mnt = env.dir.path().join("store");
    let daemon = Daemon::start_with(
        &env.cfg,
        &mnt,
        &env.dir.path().join("daemon.log"),
        &["--background-rate", "200MiB"],
    );
    let b64 = base64::engine::general_purpose::STANDARD
        .encode(format!("{}/test/app:v1-soci", env.reg.addr()));
    let base = mnt.join(&b64).join(&env.layer_digests[0]).join("diff");
    let top = mnt.join(&b64).join(&env.layer_digests[1]).join("diff");
    let big = random_bytes(12 << 20, 11);
    let early = std::fs::File::open(base.join("data/big-random.bin")).unwrap();
    metrics
        .wait_for("soci_store_layers_copied", 2.0, Duration::from_secs(120))
        .await;
    let copies = files_under(&env.dir.path().join("files"));
    assert!(
        copies.iter().any(|(_, n)| *n == 12 << 20),
        "the big file has a copy: {copies:?}"
    );
    assert!(
        copies
            .iter()
            .all(|(p, _)| !p.file_name().unwrap().to_string_lossy().contains(".tmp")),
        "no temporary files left: {copies:?}"
    );
    env.reg.stop();
    let before = metrics.text().await;
    let reads = |t: &str| Metrics::value(t, "soci_store_read_seconds_count");
    let got = std::fs::read(base.join("data/big-random.bin"))
        .unwrap_or_else(|e| panic!("{e}: {}", daemon.log_text()));
    assert!(got == big);
    assert!(std::fs::read(top.join("more/random2.bin")).unwrap() == random_bytes(11 << 20, 13));
    assert_eq!(
        std::fs::read(base.join("data/text-hardlink.txt")).unwrap(),
        text_bytes(3 << 20, 12)
    );
    let after = metrics.text().await;
    let passthrough = |t: &str| Metrics::value(t, "soci_store_passthrough_opens_total");
    // The big file is still open through its spans (`early`): the kernel allows no passthrough
    // open of it meanwhile, so the daemon read its copy.
    assert!(passthrough(&after) >= 2.0, "{after}");
    assert_eq!(
        reads(&after),
        reads(&before),
        "the kernel read the copies itself"
    );
    // The handle opened before the copies existed.
    let mut buf = vec![0u8; 1 << 20];
    for off in [0u64, 5 << 20, (12 << 20) - (1 << 20)] {
        early.read_exact_at(&mut buf, off).unwrap();
        assert!(buf[..] == big[off as usize..off as usize + buf.len()]);
    }
    // Closed, the next open of it is a passthrough one.
    drop(early);
    let was = passthrough(&metrics.text().await);
    // The kernel sends the close (FUSE_RELEASE) on its own time: open until it has arrived.
    for attempt in 0.. {
        assert!(std::fs::read(base.join("data/big-random.bin")).unwrap() == big);
        if passthrough(&metrics.text().await) > was {
            break;
        }
        assert!(
            attempt < 500,
            "no passthrough open after the early handle closed"
        );
    }
}

/// A file open with passthrough through a daemon restart: the old descriptor keeps reading (the
/// kernel reads the copy), and a new open of the same file, which the kernel only allows with
/// the same backing ID, works with the restarted daemon (it adopts the ID from the journal).
#[tokio::test(flavor = "multi_thread")]
async fn local_copies_open_with_passthrough_survive_a_restart() {
    use base64::Engine;
    use std::os::unix::fs::FileExt;
    let mut env = setup().await;
    let metrics = Metrics::enable(&env.cfg);
    let mnt = env.dir.path().join("store");
    let log = env.dir.path().join("daemon.log");
    let daemon = Daemon::start_with(&env.cfg, &mnt, &log, &["--background-rate", "200MiB"]);
    let b64 = base64::engine::general_purpose::STANDARD
        .encode(format!("{}/test/app:v1-soci", env.reg.addr()));
    let base = mnt.join(&b64).join(&env.layer_digests[0]).join("diff");
    assert!(base.is_dir());
    metrics
        .wait_for("soci_store_layers_copied", 2.0, Duration::from_secs(120))
        .await;
    let big = random_bytes(12 << 20, 11);
    let held = std::fs::File::open(base.join("data/big-random.bin")).unwrap();
    let text = metrics.text().await;
    assert_eq!(
        Metrics::value(&text, "soci_store_passthrough_opens_total"),
        1.0
    );
    daemon.crash();
    env.reg.stop();
    let daemon = Daemon::start_with(&env.cfg, &mnt, &log, &[]);
    let mut buf = vec![0u8; 1 << 20];
    held.read_exact_at(&mut buf, 7 << 20).unwrap();
    assert!(buf[..] == big[7 << 20..8 << 20]);
    let again = std::fs::read(base.join("data/big-random.bin"))
        .unwrap_or_else(|e| panic!("{e}: {}", daemon.log_text()));
    assert!(again == big);
    let text = metrics.text().await;
    assert_eq!(
        Metrics::value(&text, "soci_store_passthrough_opens_total"),
        1.0
    );
    assert_eq!(Metrics::value(&text, "soci_store_fuse_errors_total"), 0.0);
}

/// Without passthrough the daemon reads the copies (never inflating again); a daemon killed
/// while it writes copies leaves nothing half-written that a restarted one serves; copies stay
/// under their bound.
#[tokio::test(flavor = "multi_thread")]
async fn local_copies_survive_kill_9_and_stay_bounded() {
    use base64::Engine;
    let mut env = setup_with("").await;
    // Room for the 12 MiB file and a little: most of the other layer's 14 MiB is left out.
    let text = std::fs::read_to_string(&env.cfg).unwrap();
    std::fs::write(
        &env.cfg,
        format!("local_files_max_bytes = \"13MiB\"\n{text}"),
    )
    .unwrap();
    let metrics = Metrics::enable(&env.cfg);
    let mnt = env.dir.path().join("store");
    let log = env.dir.path().join("daemon.log");
    let args = ["--background-rate", "200MiB", "--no-passthrough"];
    let daemon = Daemon::start_with(&env.cfg, &mnt, &log, &args);
    let b64 = base64::engine::general_purpose::STANDARD
        .encode(format!("{}/test/app:v1-soci", env.reg.addr()));
    let base = mnt.join(&b64).join(&env.layer_digests[0]).join("diff");
    let top = mnt.join(&b64).join(&env.layer_digests[1]).join("diff");
    assert_eq!(
        std::fs::read(base.join("etc/hello.txt")).unwrap(),
        b"hello from the base layer\n"
    );
    // Both layers known to the kernel (and so to the journal a restarted daemon reads).
    assert!(top.is_dir());
    // Killed as soon as the spans are complete: copies are being written.
    metrics
        .wait_for("soci_store_layers_local", 1.0, Duration::from_secs(120))
        .await;
    daemon.crash();
    // And what a kill in the middle of a file leaves, by hand.
    let files = env.dir.path().join("files");
    let layer_dir = files.join(env.layer_digests[0].trim_start_matches("sha256:"));
    std::fs::create_dir_all(&layer_dir).unwrap();
    std::fs::write(layer_dir.join("3.tmp4242"), b"half a file").unwrap();
    let _daemon = Daemon::start_with(&env.cfg, &mnt, &log, &args);
    assert!(!layer_dir.join("3.tmp4242").exists());
    metrics
        .wait_for("soci_store_layers_copied", 2.0, Duration::from_secs(120))
        .await;
    let copies = files_under(&files);
    let held: u64 = copies.iter().map(|(_, n)| n).sum();
    assert!(held <= 13 << 20, "{held} bytes of copies: {copies:?}");
    assert!(!copies.is_empty());
    env.reg.stop();
    let text = metrics.text().await;
    assert!(std::fs::read(base.join("data/big-random.bin")).unwrap() == random_bytes(12 << 20, 11));
    assert!(std::fs::read(top.join("more/random2.bin")).unwrap() == random_bytes(11 << 20, 13));
    assert_eq!(
        std::fs::read(base.join("data/text.txt")).unwrap(),
        text_bytes(3 << 20, 12)
    );
    let after = metrics.text().await;
    let opens = |t: &str| Metrics::value(t, "soci_store_local_opens_total");
    assert!(
        opens(&after) > opens(&text),
        "a copy served a read: {after}"
    );
    assert_eq!(
        Metrics::value(&after, "soci_store_passthrough_opens_total"),
        0.0
    );
    assert_eq!(Metrics::value(&after, "soci_store_fuse_errors_total"), 0.0);
}

/// `podman rmi` releases the layers (their last reference) and with them their local copies.
#[tokio::test(flavor = "multi_thread")]
async fn local_copies_go_with_podman_rmi() {
    let env = setup().await;
    let metrics = Metrics::enable(&env.cfg);
    let mnt = env.dir.path().join("store");
    let _daemon = Daemon::start_with(
        &env.cfg,
        &mnt,
        &env.dir.path().join("daemon.log"),
        &["--background-rate", "200MiB"],
    );
    let mut lazy = Podman::new();
    lazy.storage_opts.push(format!(
        "overlay.additionallayerstore={}:ref",
        mnt.display()
    ));
    let image = format!("{}/test/app:v1-soci", env.reg.addr());
    let plain = Podman::new().listing(&format!("{}/test/app:v1", env.reg.addr()));
    assert_eq!(lazy.listing(&image), plain);
    metrics
        .wait_for("soci_store_layers_copied", 2.0, Duration::from_secs(120))
        .await;
    let files = env.dir.path().join("files");
    let dir_of = |d: &String| files.join(d.trim_start_matches("sha256:"));
    for d in &env.layer_digests[..2] {
        assert!(dir_of(d).exists(), "copies of {d}");
    }
    // A container started from the copies lists the same files.
    assert_eq!(lazy.listing(&image), plain);
    lazy.run(&["rmi", &image]);
    for d in &env.layer_digests[..2] {
        assert!(!dir_of(d).exists(), "the copies of {d} went with the image");
    }
}

/// A container holding a file open with passthrough through a daemon restart: the restarted
/// daemon (which adopts the open file's backing ID from the journal) serves new opens of that
/// file and of others in the running container, with the registry gone.
#[tokio::test(flavor = "multi_thread")]
async fn local_copies_keep_a_container_reading_through_a_restart() {
    let mut env = setup().await;
    let metrics = Metrics::enable(&env.cfg);
    let mnt = env.dir.path().join("store");
    let first = Daemon::start_with(
        &env.cfg,
        &mnt,
        &env.dir.path().join("first.log"),
        &["--background-rate", "200MiB"],
    );
    let mut lazy = Podman::new();
    lazy.storage_opts.push(format!(
        "overlay.additionallayerstore={}:ref",
        mnt.display()
    ));
    let image = format!("{}/test/app:v1-soci", env.reg.addr());
    lazy.run(&["pull", "-q", "--tls-verify=false", &image]);
    metrics
        .wait_for("soci_store_layers_copied", 2.0, Duration::from_secs(120))
        .await;
    // The container opens the big file (from its copy, with passthrough) and keeps it open.
    lazy.run(&[
        "run",
        "-d",
        "--name",
        "keep",
        "--network",
        "none",
        &image,
        "/bin/busybox",
        "sh",
        "-c",
        "exec 3</data/big-random.bin; exec /bin/busybox sleep 3600",
    ]);
    let sum = |path: &str| -> String {
        let out = lazy.run(&["exec", "keep", "/bin/busybox", "sha256sum", path]);
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .unwrap_or_default()
            .to_string()
    };
    let big = common::servers::sha256_digest(&random_bytes(12 << 20, 11));
    assert_eq!(format!("sha256:{}", sum("/data/big-random.bin")), big);
    let text = metrics.text().await;
    assert!(
        Metrics::value(&text, "soci_store_passthrough_opens_total") >= 1.0,
        "{text}"
    );

    first.crash();
    env.reg.stop();
    std::fs::write("/proc/sys/vm/drop_caches", "1").unwrap();
    let second = Daemon::start_with(&env.cfg, &mnt, &env.dir.path().join("second.log"), &[]);
    assert!(second.log_text().contains("took over the mount"));
    assert_eq!(format!("sha256:{}", sum("/data/big-random.bin")), big);
    let random2 = common::servers::sha256_digest(&random_bytes(11 << 20, 13));
    assert_eq!(format!("sha256:{}", sum("/more/random2.bin")), random2);
    let text = metrics.text().await;
    assert_eq!(
        Metrics::value(&text, "soci_store_fuse_errors_total"),
        0.0,
        "{}",
        second.log_text()
    );
}
