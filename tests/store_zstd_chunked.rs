//! zstd:chunked layers served lazily, without any SOCI index: podman 5 (the Debian 13 chroot)
//! pushes an image as zstd:chunked to a real registry and runs it through the store; and the
//! layer podman made for tests/fixtures/zstd-chunked, read through the store's FUSE mount, with
//! its chunks and its TOC tampered with in the registry.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};

use common::chroot::Chroot;
use common::daemon::Daemon;
use common::podman::Podman;
use common::servers::{registry, sha256_digest, whole_blob_gets, Pusher, RegistryOpts, Server};
use common::*;

fn daemon_config(dir: &Path, reg: &Server) -> PathBuf {
    let cfg = dir.join("daemon.toml");
    std::fs::write(
        &cfg,
        format!(
            "artifacts = \"{a}/artifacts\"\nstate_dir = \"{a}/state\"\nlocal_files = \"{a}/files\"\n\
             [[fetchers]]\ntype = \"registry\"\ninsecure = [\"{r}\"]\nregistries_conf = \"/nonexistent\"\n\
             [cache]\ntype = \"memory\"\n",
            a = dir.display(),
            r = reg.addr()
        ),
    )
    .unwrap();
    cfg
}

/// A manifest or index of `repo` from the registry, as JSON.
async fn manifest_json(reg: &Server, repo: &str, reference: &str) -> serde_json::Value {
    let body = reqwest::Client::new()
        .get(format!(
            "http://{}/v2/{repo}/manifests/{reference}",
            reg.addr()
        ))
        .header(
            "Accept",
            "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
        )
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// The layer digests of image manifest `reference`, each checked to be zstd:chunked.
async fn chunked_layers(reg: &Server, repo: &str, reference: &str) -> Vec<String> {
    let manifest = manifest_json(reg, repo, reference).await;
    manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            assert!(
                l["annotations"]["io.github.containers.zstd-chunked.manifest-checksum"].is_string(),
                "a zstd:chunked layer: {l}"
            );
            l["digest"].as_str().unwrap().to_string()
        })
        .collect()
}

fn fixture() -> (Vec<u8>, serde_json::Value) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/zstd-chunked");
    let blob = std::fs::read(dir.join("layer.tar.zst")).unwrap();
    let desc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("descriptor.json")).unwrap()).unwrap();
    (blob, desc)
}

fn tar_of(blob: &[u8]) -> Vec<u8> {
    let mut tar = Vec::new();
    zstd::stream::read::Decoder::new(blob)
        .unwrap()
        .read_to_end(&mut tar)
        .unwrap();
    tar
}

/// The fixture layer as an image `repo:v1` of `reg`, its blob altered by `tamper` (in the
/// registry's storage, after the push) ; returns the image and the layer digest.
async fn fixture_image(
    reg: &Server,
    repo: &str,
    tamper: impl Fn(&mut Vec<u8>),
) -> (String, String) {
    let (blob, desc) = fixture();
    let fields = serde_json::json!({
        "mediaType": desc["mediaType"],
        "annotations": desc["annotations"],
    });
    let (_, digests) = Pusher::new(reg)
        .image_with(
            repo,
            "v1",
            &[(blob.clone(), fields)],
            &[sha256_digest(&tar_of(&blob))],
        )
        .await;
    let path = reg.blob_path(&digests[0]);
    let mut stored = std::fs::read(&path).unwrap();
    tamper(&mut stored);
    std::fs::write(&path, stored).unwrap();
    (format!("{}/{repo}:v1", reg.addr()), digests[0].clone())
}

fn layer_dir(mnt: &Path, image: &str, digest: &str) -> PathBuf {
    use base64::Engine;
    mnt.join(base64::engine::general_purpose::STANDARD.encode(image))
        .join(digest)
}

#[tokio::test(flavor = "multi_thread")]
async fn zstd_chunked_layer_is_served_file_by_file_and_verified() {
    let reg = registry(RegistryOpts::default());
    let (image, digest) = fixture_image(&reg, "chunked/ok", |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("store");
    let _daemon = Daemon::start_with(
        &daemon_config(dir.path(), &reg),
        &mnt,
        &dir.path().join("daemon.log"),
        &["--no-background-fetch"],
    );
    let before = reg.log_text().len();
    let layer = layer_dir(&mnt, &image, &digest);
    let (blob, desc) = fixture();
    let tar = tar_of(&blob);
    let mut a = tar::Archive::new(&tar[..]);
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().to_string_lossy().into_owned();
        if e.header().entry_type() != tar::EntryType::Regular || name.contains(".wh.") {
            continue;
        }
        let mut want = Vec::new();
        e.read_to_end(&mut want).unwrap();
        let got = std::fs::read(layer.join("diff").join(&name)).unwrap();
        assert!(got == want, "{name}");
    }
    use std::os::unix::fs::PermissionsExt;
    let hello = std::fs::metadata(layer.join("diff/etc/hello.txt")).unwrap();
    assert_eq!(hello.permissions().mode() & 0o7777, 0o4755);
    assert_eq!(
        std::fs::read_link(layer.join("diff/etc/link")).unwrap(),
        Path::new("hello.txt")
    );
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layer.join("info")).unwrap()).unwrap();
    assert_eq!(info["compression"], 4, "{info}");
    assert_eq!(info["diff-digest"], sha256_digest(&tar), "{info}");
    assert_eq!(info["diff-size"], tar.len() as u64, "{info}");
    assert_eq!(
        info["toc-digest"],
        desc["annotations"]["io.github.containers.zstd-chunked.manifest-checksum"]
    );
    let log = reg.log_text()[before..].to_string();
    assert_eq!(whole_blob_gets(&log, &digest), 0, "{log}");
    assert!(log.contains(" 206 "), "ranged reads: {log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn zstd_chunked_tampered_chunk_or_toc_is_never_served() {
    let (blob, desc) = fixture();
    let ann = &desc["annotations"];
    let toc_at: u64 = ann["io.github.containers.zstd-chunked.manifest-position"]
        .as_str()
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // Two registries: a registry keeps one copy of a blob for all its repositories.
    let reg = registry(RegistryOpts::default());
    let reg2 = registry(RegistryOpts::default());
    // A byte in the middle of the blob: inside random.bin's chunks (~14 KB to ~314 KB).
    let mid = blob.len() / 2;
    let (chunk_image, chunk_digest) =
        fixture_image(&reg, "chunked/chunk", |b| b[mid] ^= 0x5a).await;
    let (toc_image, toc_digest) =
        fixture_image(&reg2, "chunked/toc", |b| b[toc_at as usize + 40] ^= 0x5a).await;
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("store");
    let _daemon = Daemon::start_with(
        &daemon_config(dir.path(), &reg),
        &mnt,
        &dir.path().join("daemon.log"),
        &["--no-background-fetch"],
    );
    let layer = layer_dir(&mnt, &chunk_image, &chunk_digest);
    let err = std::fs::read(layer.join("diff/data/random.bin")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(5), "EIO: {err}");
    // Other files' chunks are intact, and served.
    assert_eq!(
        std::fs::read(layer.join("diff/etc/hello.txt")).unwrap(),
        b"hello from zstd:chunked\n"
    );
    // A TOC that does not match its digest: the layer is not served at all. (Its own store:
    // one that has the intact TOC of that digest already serves the layer from it, rightly.)
    let dir2 = tempfile::tempdir().unwrap();
    let mnt = dir2.path().join("store");
    let daemon = Daemon::start_with(
        &daemon_config(dir2.path(), &reg2),
        &mnt,
        &dir2.path().join("daemon.log"),
        &["--no-background-fetch"],
    );
    let toc_layer = layer_dir(&mnt, &toc_image, &toc_digest);
    assert!(std::fs::metadata(toc_layer.join("info")).is_err());
    assert!(
        daemon.log_text().contains("does not match its digest"),
        "{}",
        daemon.log_text()
    );
}

/// The real thing: podman 5 pushes an image as zstd:chunked itself, and podman 5 runs it through
/// the store with the same files, modes and owners as a plain pull; no layer is downloaded whole.
#[tokio::test(flavor = "multi_thread")]
async fn zstd_chunked_image_pushed_by_podman_runs_lazily() {
    let reg = registry(RegistryOpts::default());
    let layers = soci_test_image();
    let gz: Vec<Vec<u8>> = layers.iter().map(|(_, g)| g.clone()).collect();
    let diff_ids: Vec<String> = layers.iter().map(|(t, _)| sha256_digest(t)).collect();
    Pusher::new(&reg)
        .image("test/app", "v1", &gz, &diff_ids)
        .await;
    let gzip_image = format!("{}/test/app:v1", reg.addr());
    let image = format!("{}/test/app:v1-zstd", reg.addr());
    let plain = Podman::new().listing(&gzip_image);

    let chroot = Chroot::enter();
    let mnt = chroot.root.join("var/lib/soci-store/store");
    std::fs::create_dir_all(&mnt).unwrap();
    chroot.podman(&["pull", "-q", "--tls-verify=false", &gzip_image]);
    chroot.podman(&[
        "push",
        "-q",
        "--tls-verify=false",
        "--compression-format",
        "zstd:chunked",
        &gzip_image,
        &image,
    ]);
    chroot.podman(&["rmi", "-af"]);
    let digests = chunked_layers(&reg, "test/app", "v1-zstd").await;

    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(
        &daemon_config(dir.path(), &reg),
        &mnt,
        &dir.path().join("daemon.log"),
    );
    let before = reg.log_text().len();
    chroot.podman(&["pull", "-q", "--tls-verify=false", &image]);
    assert_eq!(chroot.run_listing(&image), plain);
    let log = reg.log_text()[before..].to_string();
    for d in &digests {
        assert_eq!(whole_blob_gets(&log, d), 0, "{d} downloaded whole:\n{log}");
    }
    let dlog = daemon.log_text();
    assert!(dlog.contains(" use"), "podman 5 used the store: {dlog}");

    // podman 4.3.1 asks the store by compressed digest, and gets the layers lazily too.
    let mut p4 = Podman::new();
    p4.storage_opts = vec![format!(
        "overlay.additionallayerstore={}:ref",
        mnt.display()
    )];
    let before = reg.log_text().len();
    assert_eq!(p4.listing(&image), plain);
    let log = reg.log_text()[before..].to_string();
    for d in &digests {
        assert_eq!(
            whole_blob_gets(&log, d),
            0,
            "podman 4: {d} downloaded whole:\n{log}"
        );
    }
}

/// `convert` says what it does with zstd layers: a zstd:chunked one needs no index (the store
/// reads its own TOC), a plain zstd one is pulled normally and how to make it lazy.
#[tokio::test(flavor = "multi_thread")]
async fn zstd_chunked_and_plain_zstd_layers_are_reported_by_convert() {
    let reg = registry(RegistryOpts::default());
    let (blob, desc) = fixture();
    let chunked =
        serde_json::json!({"mediaType": desc["mediaType"], "annotations": desc["annotations"]});
    let tar = tar_of(&blob);
    let plain = zstd::bulk::compress(&tar, 3).unwrap();
    let plain_fields =
        serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd"});
    let (_, digests) = Pusher::new(&reg)
        .image_with(
            "mixed/app",
            "v1",
            &[(blob.clone(), chunked), (plain, plain_fields)],
            &[sha256_digest(&tar), sha256_digest(&tar)],
        )
        .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = daemon_config(dir.path(), &reg);
    // One line per layer on stderr (not a terminal here).
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_soci-store"))
        .arg("--config")
        .arg(&cfg)
        .arg("convert")
        .arg(format!("{}/mixed/app:v1", reg.addr()))
        .arg(format!("{}/mixed/app:v1-soci", reg.addr()))
        .output()
        .unwrap();
    assert!(run.status.success());
    let out = String::from_utf8_lossy(&run.stderr).into_owned();
    let line = |d: &str| {
        out.lines()
            .find(|l| l.starts_with(d))
            .unwrap_or_else(|| panic!("{d} in:\n{out}"))
            .to_string()
    };
    assert!(
        line(&digests[0]).contains("zstd:chunked: served lazily from its own table of contents"),
        "{out}"
    );
    assert!(
        line(&digests[1]).contains("--compression-format zstd:chunked"),
        "{out}"
    );
}

/// Background completion, local copies and restart takeover work for a zstd:chunked layer as
/// for a gzip one: the layer becomes fully local, and a daemon killed with SIGKILL is replaced
/// by one that rebuilds the layer from the image's annotations and keeps serving it.
#[tokio::test(flavor = "multi_thread")]
async fn zstd_chunked_layer_completes_and_survives_a_restart() {
    let reg = registry(RegistryOpts::default());
    let (image, digest) = fixture_image(&reg, "chunked/bg", |_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = daemon_config(dir.path(), &reg);
    let metrics = common::daemon::Metrics::enable(&cfg);
    let mnt = dir.path().join("store");
    let first = Daemon::start(&cfg, &mnt, &dir.path().join("first.log"));
    let layer = layer_dir(&mnt, &image, &digest);
    let want = std::fs::read(layer.join("diff/etc/hello.txt")).unwrap();
    assert_eq!(want, b"hello from zstd:chunked\n");
    metrics
        .wait_for(
            "soci_store_layers_copied",
            1.0,
            std::time::Duration::from_secs(60),
        )
        .await;
    let text = metrics.text().await;
    assert!(
        common::daemon::Metrics::value(&text, "soci_store_spans_fetched_total") >= 9.0,
        "every chunk fetched: {text}"
    );

    first.crash();
    let second = Daemon::start(&cfg, &mnt, &dir.path().join("second.log"));
    assert!(
        second.log_text().contains("took over the mount"),
        "{}",
        second.log_text()
    );
    let (blob, _) = fixture();
    let tar = tar_of(&blob);
    let mut a = tar::Archive::new(&tar[..]);
    let mut random = Vec::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().ends_with("data/random.bin") {
            e.read_to_end(&mut random).unwrap();
        }
    }
    assert!(std::fs::read(layer.join("diff/data/random.bin")).unwrap() == random);
    assert!(
        !second.log_text().contains("cannot restore"),
        "{}",
        second.log_text()
    );
}

/// An image mixing SOCI-indexed gzip layers and a zstd:chunked one: podman 5 runs it with both
/// kinds served lazily, and so does podman 4 (which asks the store by compressed digest).
#[tokio::test(flavor = "multi_thread")]
async fn zstd_chunked_and_soci_indexed_layers_mix() {
    let reg = registry(RegistryOpts::default());
    let (blob, desc) = fixture();
    let gzip = serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"});
    let mut layers: Vec<(Vec<u8>, serde_json::Value)> = Vec::new();
    let mut diff_ids = Vec::new();
    for (t, g) in soci_test_image() {
        diff_ids.push(sha256_digest(&t));
        layers.push((g, gzip.clone()));
    }
    diff_ids.push(sha256_digest(&tar_of(&blob)));
    layers.push((
        blob.clone(),
        serde_json::json!({"mediaType": desc["mediaType"], "annotations": desc["annotations"]}),
    ));
    let (_, digests) = Pusher::new(&reg)
        .image_with("mixed/app", "v1", &layers, &diff_ids)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = daemon_config(dir.path(), &reg);
    let image = format!("{}/mixed/app:v1-soci", reg.addr());
    soci_store_ok(
        &cfg,
        &[
            "convert",
            "--quiet",
            "--span-size",
            "1MiB",
            &format!("{}/mixed/app:v1", reg.addr()),
            &image,
        ],
    );
    let text = dir.path().join("daemon-only.toml");
    std::fs::write(
        &text,
        std::fs::read_to_string(&cfg)
            .unwrap()
            .replace("/artifacts\"", "/daemon-artifacts\""),
    )
    .unwrap();

    let chroot = Chroot::enter();
    let mnt = chroot.root.join("var/lib/soci-store/store");
    let daemon = Daemon::start(&text, &mnt, &dir.path().join("daemon.log"));
    let check =
        "cat /etc/hello.txt; sha256sum /data/random.bin /data/big-random.bin | cut -d' ' -f1";
    let (tar_random, big) = {
        let tar = tar_of(&blob);
        let mut a = tar::Archive::new(&tar[..]);
        let mut r = Vec::new();
        for e in a.entries().unwrap() {
            let mut e = e.unwrap();
            if e.path().unwrap().ends_with("data/random.bin") {
                e.read_to_end(&mut r).unwrap();
            }
        }
        (
            sha256_digest(&r),
            sha256_digest(&random_bytes(12 << 20, 11)),
        )
    };
    let want = format!(
        "hello from zstd:chunked\n{}\n{}\n",
        &tar_random[7..],
        &big[7..]
    );

    let before = reg.log_text().len();
    chroot.podman(&["pull", "-q", "--tls-verify=false", &image]);
    let out = chroot.podman(&[
        "run",
        "--rm",
        "--network",
        "none",
        &image,
        "/bin/busybox",
        "sh",
        "-c",
        check,
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    let log = reg.log_text()[before..].to_string();
    // The two indexed gzip layers and the zstd:chunked one: none downloaded whole.
    for d in [&digests[0], &digests[1], &digests[3]] {
        assert_eq!(whole_blob_gets(&log, d), 0, "{d} downloaded whole:\n{log}");
    }

    let mut p4 = Podman::new();
    p4.storage_opts = vec![format!(
        "overlay.additionallayerstore={}:ref",
        mnt.display()
    )];
    let before = reg.log_text().len();
    p4.run(&["pull", "-q", "--tls-verify=false", &image]);
    let log = reg.log_text()[before..].to_string();
    // podman 4 asks the store by compressed digest: the zstd:chunked layer is lazy there too.
    for d in [&digests[0], &digests[1], &digests[3]] {
        assert_eq!(
            whole_blob_gets(&log, d),
            0,
            "podman 4: {d} downloaded whole:\n{log}"
        );
    }
    let out = p4.run(&[
        "run",
        "--rm",
        "--network",
        "none",
        &image,
        "/bin/busybox",
        "sh",
        "-c",
        check,
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    assert!(daemon.log_text().contains(" use"), "{}", daemon.log_text());
}

/// `convert --zstd-chunked` rewrites an image's plain zstd layers as zstd:chunked: podman 5
/// runs the result lazily through the store (no layer downloaded whole) with the same files as
/// a plain pull, and podman 5 alone pulls it as an ordinary image.
#[tokio::test(flavor = "multi_thread")]
async fn zstd_chunked_convert_rewrites_plain_zstd_layers() {
    let reg = registry(RegistryOpts::default());
    let zstd = serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd"});
    let gzip: Vec<Vec<u8>> = soci_test_image().into_iter().map(|(_, g)| g).collect();
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (t, _) in soci_test_image() {
        diff_ids.push(sha256_digest(&t));
        layers.push((zstd::bulk::compress(&t, 3).unwrap(), zstd.clone()));
    }
    Pusher::new(&reg)
        .image_with("plain/zstd", "v1", &layers, &diff_ids)
        .await;
    Pusher::new(&reg)
        .image("plain/gzip", "v1", &gzip, &diff_ids)
        .await;
    let plain = Podman::new().listing(&format!("{}/plain/gzip:v1", reg.addr()));
    let dir = tempfile::tempdir().unwrap();
    let cfg = daemon_config(dir.path(), &reg);
    let image = format!("{}/plain/zstd:v1-chunked", reg.addr());
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_soci-store"))
        .arg("--config")
        .arg(&cfg)
        .args(["convert", "--zstd-chunked"])
        .arg(format!("{}/plain/zstd:v1", reg.addr()))
        .arg(&image)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{err}");
    assert_eq!(err.matches("rewritten as zstd:chunked").count(), 3, "{err}");

    let index = manifest_json(&reg, "plain/zstd", "v1-chunked").await;
    let m = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let digests = chunked_layers(&reg, "plain/zstd", &m).await;

    let chroot = Chroot::enter();
    let mnt = chroot.root.join("var/lib/soci-store/store");
    std::fs::create_dir_all(&mnt).unwrap();
    // podman 5 alone reads the rewritten layers as ordinary zstd:chunked ones.
    chroot.podman(&["pull", "-q", "--tls-verify=false", &image]);
    chroot.podman(&["rmi", "-af"]);

    let daemon = Daemon::start(&cfg, &mnt, &dir.path().join("daemon.log"));
    let before = reg.log_text().len();
    chroot.podman(&["pull", "-q", "--tls-verify=false", &image]);
    assert_eq!(chroot.run_listing(&image), plain);
    let log = reg.log_text()[before..].to_string();
    for d in &digests {
        assert_eq!(whole_blob_gets(&log, d), 0, "{d} downloaded whole:\n{log}");
    }
    assert!(daemon.log_text().contains(" use"), "{}", daemon.log_text());
}
