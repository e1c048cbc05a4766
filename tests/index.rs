//! SOCI indexes against the real registry: convert (v2) and create (v1), discovery by tag, by
//! digest, through the fallback tag and the referrers API, plain podman pulls of converted
//! images, OCI layouts, and bad indexes.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use common::podman::Podman;
use common::servers::sha256_digest;
use common::servers::{registry, Pusher, RegistryOpts, Server};
use common::*;
use soci_store::digest::Digest;
use soci_store::fetch::registry::{RegistryClient, RegistryFetcher, RegistryOptions};
use soci_store::fetch::FetcherChain;
use soci_store::index::discover::{fetch_ztoc, validate_index, IndexKind};
use soci_store::index::*;
use soci_store::reference::Reference;
use soci_store::ztoc::LayerReader;

struct Env {
    reg: Server,
    dir: tempfile::TempDir,
    cfg: PathBuf,
    layers: Vec<(Vec<u8>, Vec<u8>)>,
    layer_digests: Vec<String>,
}

async fn setup() -> Env {
    let reg = registry(RegistryOpts::default());
    let layers = soci_test_image();
    let gz: Vec<Vec<u8>> = layers.iter().map(|(_, g)| g.clone()).collect();
    let diff_ids: Vec<String> = layers.iter().map(|(t, _)| sha256_digest(t)).collect();
    let (_, layer_digests) = Pusher::new(&reg)
        .image("test/app", "v1", &gz, &diff_ids)
        .await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "artifacts = \"{}\"\n[[fetchers]]\ntype = \"registry\"\ninsecure = [\"{}\"]\nregistries_conf = \"/nonexistent\"\n",
            dir.path().join("artifacts").display(),
            reg.addr()
        ),
    )
    .unwrap();
    Env {
        reg,
        dir,
        cfg,
        layers,
        layer_digests,
    }
}

impl Env {
    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_soci-store"))
            .arg("--config")
            .arg(&self.cfg)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        common::soci_store_ok(&self.cfg, args)
    }

    fn image(&self, tail: &str) -> String {
        format!("{}/test/app{tail}", self.reg.addr())
    }

    fn client(&self) -> RegistryClient {
        RegistryClient::new(self.options()).unwrap()
    }

    fn options(&self) -> RegistryOptions {
        RegistryOptions {
            insecure: vec![self.reg.addr()],
            registries_conf: None,
            auth_files: Some(vec![]),
            ..Default::default()
        }
    }

    /// What the store reads through: a chain of one registry fetcher.
    fn fetchers(&self) -> FetcherChain {
        chain(self.options())
    }
}

fn chain(opts: RegistryOptions) -> FetcherChain {
    FetcherChain::new(vec![Arc::new(RegistryFetcher::new(opts).unwrap())])
}

async fn get(client: &RegistryClient, r: &str) -> (bytes::Bytes, String) {
    let (b, _, d) = client
        .manifest(&Reference::parse(r).unwrap(), MANIFEST_TYPES)
        .await
        .unwrap();
    (b, d.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn convert_makes_a_valid_soci_enabled_image() {
    let env = setup().await;
    let out = env.ok(&[
        "convert",
        &env.image(":v1"),
        &env.image(":v1-soci"),
        "--span-size",
        "1MiB",
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let layers = report["platforms"][0]["layers"].as_array().unwrap();
    assert_eq!(
        layers.iter().filter(|l| l["ztoc"].is_string()).count(),
        2,
        "{out}"
    );
    assert!(
        layers[2]["note"].as_str().unwrap().contains("smaller"),
        "{out}"
    );

    let client = env.client();
    let (index_bytes, index_digest) = get(&client, &env.image(":v1-soci")).await;
    // Every document validates against the OCI image-spec types.
    let index: oci_spec::image::ImageIndex = serde_json::from_slice(&index_bytes).unwrap();
    assert_eq!(index.manifests().len(), 2);
    let image_desc = &index.manifests()[0];
    let soci_desc = &index.manifests()[1];
    assert_eq!(image_desc.media_type().to_string(), MT_OCI_MANIFEST);
    assert!(image_desc.artifact_type().is_none());
    assert_eq!(
        soci_desc.artifact_type().as_ref().unwrap().to_string(),
        MT_SOCI_INDEX_V2
    );
    assert_eq!(soci_desc.platform(), image_desc.platform());
    assert_eq!(
        soci_desc.annotations().as_ref().unwrap()[ANN_IMAGE_MANIFEST_DIGEST],
        image_desc.digest().to_string()
    );

    let (image_bytes, _) = get(&client, &env.image(&format!("@{}", image_desc.digest()))).await;
    let image: oci_spec::image::ImageManifest = serde_json::from_slice(&image_bytes).unwrap();
    assert_eq!(
        image.annotations().as_ref().unwrap()[ANN_INDEX_DIGEST],
        soci_desc.digest().to_string()
    );
    // Layers unchanged: same blobs, no re-upload.
    let digests: Vec<String> = image
        .layers()
        .iter()
        .map(|l| l.digest().to_string())
        .collect();
    assert_eq!(digests, env.layer_digests);

    let (soci_bytes, _) = get(&client, &env.image(&format!("@{}", soci_desc.digest()))).await;
    let soci: oci_spec::image::ImageManifest = serde_json::from_slice(&soci_bytes).unwrap();
    assert_eq!(soci.config().media_type().to_string(), MT_SOCI_INDEX_V2);
    assert_eq!(soci.config().digest().to_string(), EMPTY_JSON_DIGEST);
    assert_eq!(soci.config().size(), 2);
    assert!(soci.subject().is_none());
    // Per indexed layer: its zTOC, then the zTOC's table and windows (ztoc::table).
    assert_eq!(soci.layers().len(), 6);
    let mut parsed = parse_manifest(&soci_bytes).unwrap();
    let (ztocs, split): (Vec<_>, Vec<_>) = parsed
        .layers
        .iter()
        .cloned()
        .partition(|d| d.media_type == MT_ZTOC);
    for z in &ztocs {
        let of_ztoc = |mt: &str| {
            split
                .iter()
                .filter(|d| {
                    d.media_type == mt
                        && d.annotations.get("io.github.soci-store.ztoc-digest").map(String::as_str) == Some(z.digest.as_str())
                        && d.annotations.get("io.github.soci-store.image-layer-digest")
                            == z.annotations.get(ANN_LAYER_DIGEST)
                        // Never mistaken for a zTOC by tools that look up by this key.
                        && !d.annotations.contains_key(ANN_LAYER_DIGEST)
                })
                .count()
        };
        assert_eq!(of_ztoc("application/vnd.soci-store.ztoc-table.v1+gzip"), 1);
        assert_eq!(of_ztoc("application/vnd.soci-store.ztoc-windows.v1"), 1);
    }
    parsed.layers = ztocs;
    assert_eq!(parsed.layers.len(), 2);
    for (z, l) in parsed.layers.iter().zip(image.layers()) {
        assert_eq!(z.media_type, MT_ZTOC);
        assert_eq!(z.annotations[ANN_LAYER_DIGEST], l.digest().to_string());
        assert_eq!(
            z.annotations[ANN_LAYER_MEDIA_TYPE],
            l.media_type().to_string()
        );
        // The podman TOC annotation names the zTOC.
        assert_eq!(l.annotations().as_ref().unwrap()[ANN_STARGZ_TOC], z.digest);
    }
    assert!(
        image.layers()[2].annotations().is_none(),
        "the small layer is not indexed"
    );

    // The zTOCs read the layers right.
    let store = ArtifactStore::open(env.dir.path().join("fetched")).unwrap();
    let r = Reference::parse(&env.image(":v1-soci")).unwrap();
    for (i, z) in parsed.layers.iter().enumerate() {
        let ztoc = fetch_ztoc(&env.fetchers(), Some(&store), &r, z)
            .await
            .unwrap();
        assert_eq!(ztoc.span_size, 1 << 20);
        let reader = LayerReader::new(Arc::new(ztoc), env.layers[i].1.clone());
        let all = reader
            .read_range(0..reader.ztoc().uncompressed_size)
            .unwrap();
        assert!(all[..] == env.layers[i].0[..all.len()]);
    }

    // The registry saw each layer uploaded once (by the test's push), never by convert.
    let log = env.reg.log_text();
    for d in &env.layer_digests {
        let uploads = log
            .lines()
            .filter(|l| l.contains("PUT /v2/") && l.contains(&format!("digest={d}")))
            .count();
        assert_eq!(uploads, 1, "{d} uploaded {uploads} times");
    }

    // Discovery: by tag and by digest; the unconverted image has none.
    let found = env.ok(&["index", "discover", &env.image(":v1-soci")]);
    assert!(
        found.starts_with(&soci_desc.digest().to_string()) && found.contains("V2"),
        "{found}"
    );
    let found = env.ok(&["index", "discover", &env.image(&format!("@{index_digest}"))]);
    assert!(
        found.starts_with(&soci_desc.digest().to_string()),
        "{found}"
    );
    let none = env.cli(&["index", "discover", &env.image(":v1")]);
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("no SOCI index"));

    // The artifact store lists what convert built.
    let ls = env.ok(&["index", "ls"]);
    assert!(
        ls.contains(&soci_desc.digest().to_string()) && ls.contains("built"),
        "{ls}"
    );
    let info = env.ok(&["index", "info", soci_desc.digest().as_ref()]);
    assert!(info.contains(MT_SOCI_INDEX_V2));
    // zTOCs convert built are in the store too, by digest.
    let ls = env.ok(&["ztoc", "ls", &parsed.layers[0].digest]);
    assert!(ls.contains(" data/big-random.bin"), "{ls}");

    // --no-podman-annotations leaves the layers bare.
    env.ok(&[
        "convert",
        &env.image(":v1"),
        &env.image(":bare"),
        "--no-podman-annotations",
        "--quiet",
    ]);
    let (b, _) = get(&client, &env.image(":bare")).await;
    let idx = parse_index(&b).unwrap();
    let (m, _) = get(
        &client,
        &env.image(&format!("@{}", idx.manifests[0].digest)),
    )
    .await;
    assert!(parse_manifest(&m)
        .unwrap()
        .layers
        .iter()
        .all(|l| !l.annotations.contains_key(ANN_STARGZ_TOC)));
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_podman_pulls_and_runs_the_converted_image() {
    let env = setup().await;
    env.ok(&[
        "convert",
        &env.image(":v1"),
        &env.image(":v1-soci"),
        "--quiet",
    ]);
    let original = Podman::new().listing(&env.image(":v1"));
    let converted = Podman::new().listing(&env.image(":v1-soci"));
    assert!(original.contains("./data/big-random.bin"), "{original}");
    assert!(
        !original.contains("gone.txt") && !original.contains("old.txt"),
        "whiteouts apply: {original}"
    );
    assert_eq!(original, converted);
}

#[tokio::test(flavor = "multi_thread")]
async fn create_v1_through_the_fallback_tag_keeps_every_index() {
    let env = setup().await;
    let out = env.ok(&["create", &env.image(":v1"), "--json"]);
    let first: serde_json::Value = serde_json::from_str(&out).unwrap();
    let first_index = first["platforms"][0]["soci_index"]
        .as_str()
        .unwrap()
        .to_string();
    let image_manifest = first["platforms"][0]["image_manifest"]
        .as_str()
        .unwrap()
        .to_string();

    let client = env.client();
    let (soci_bytes, _) = get(&client, &env.image(&format!("@{first_index}"))).await;
    let soci: oci_spec::image::ImageManifest = serde_json::from_slice(&soci_bytes).unwrap();
    assert_eq!(soci.config().media_type().to_string(), MT_SOCI_INDEX_V1);
    assert_eq!(
        soci.subject().as_ref().unwrap().digest().to_string(),
        image_manifest
    );

    let found = env.ok(&["index", "discover", &env.image(":v1")]);
    assert!(
        found.starts_with(&first_index) && found.contains("V1"),
        "{found}"
    );

    // A second index (other span size) is added to the fallback tag, not replacing the first.
    let out = env.ok(&["create", &env.image(":v1"), "--span-size", "4MiB", "--json"]);
    let second: serde_json::Value = serde_json::from_str(&out).unwrap();
    let second_index = second["platforms"][0]["soci_index"].as_str().unwrap();
    assert_ne!(first_index, second_index);
    let tag = format!(":sha256-{}", image_manifest.trim_start_matches("sha256:"));
    let (listing, _) = get(&client, &env.image(&tag)).await;
    let listing: oci_spec::image::ImageIndex = serde_json::from_slice(&listing).unwrap();
    let listed: Vec<String> = listing
        .manifests()
        .iter()
        .map(|d| d.digest().to_string())
        .collect();
    assert_eq!(listed, vec![first_index.clone(), second_index.to_string()]);
    for d in listing.manifests() {
        assert_eq!(
            d.artifact_type().as_ref().unwrap().to_string(),
            MT_SOCI_INDEX_V1
        );
    }
    // Discovery takes the newest.
    let found = env.ok(&["index", "discover", &env.image(":v1")]);
    assert!(found.starts_with(second_index), "{found}");
}

/// A stand-in for the one endpoint the Debian registry (2.8) lacks: `GET /v2/<name>/referrers/
/// <digest>` answers a canned listing; every other request goes to the real registry.
async fn referrers_responder(
    upstream: u16,
    listing: Vec<u8>,
) -> (u16, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = l.accept().await else {
                return;
            };
            let listing = listing.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if c.read(&mut b).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(b[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                if text.lines().next().unwrap_or("").contains("/referrers/") {
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/vnd.oci.image.index.v1+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        listing.len()
                    );
                    let _ = c.write_all(resp.as_bytes()).await;
                    let _ = c.write_all(&listing).await;
                    return;
                }
                let req: Vec<&str> = text
                    .split("\r\n")
                    .filter(|l| !l.is_empty() && !l.to_ascii_lowercase().starts_with("connection:"))
                    .collect();
                let req = format!("{}\r\nConnection: close\r\n\r\n", req.join("\r\n"));
                let mut up = tokio::net::TcpStream::connect(("127.0.0.1", upstream))
                    .await
                    .unwrap();
                up.write_all(req.as_bytes()).await.unwrap();
                let mut resp = Vec::new();
                let _ = up.read_to_end(&mut resp).await;
                let _ = c.write_all(&resp).await;
            });
        }
    });
    (port, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn discovery_through_the_referrers_api() {
    let env = setup().await;
    let out = env.ok(&["create", &env.image(":v1"), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let index = v["platforms"][0]["soci_index"].as_str().unwrap();
    let client = env.client();
    let (soci_bytes, _) = get(&client, &env.image(&format!("@{index}"))).await;
    // Drop the fallback tag so that only the referrers API can find the index.
    let image_manifest = v["platforms"][0]["image_manifest"].as_str().unwrap();
    let tag = format!("sha256-{}", image_manifest.trim_start_matches("sha256:"));
    let http = reqwest::Client::new();
    let resp = http
        .head(format!(
            "http://{}/v2/test/app/manifests/{tag}",
            env.reg.addr()
        ))
        .header("Accept", MT_OCI_INDEX)
        .send()
        .await
        .unwrap();
    let tag_digest = resp.headers()["docker-content-digest"]
        .to_str()
        .unwrap()
        .to_string();
    let del = http
        .delete(format!(
            "http://{}/v2/test/app/manifests/{tag_digest}",
            env.reg.addr()
        ))
        .send()
        .await
        .unwrap();
    assert!(del.status().is_success(), "{}", del.status());

    let mut entry = Descriptor::new(MT_OCI_MANIFEST, digest(index), soci_bytes.len() as u64);
    entry.artifact_type = Some(MT_SOCI_INDEX_V1.into());
    let listing = to_json(&Index {
        schema_version: 2,
        media_type: Some(MT_OCI_INDEX.into()),
        manifests: vec![entry],
        annotations: Default::default(),
    });
    let (port, task) = referrers_responder(env.reg.port, listing).await;
    let via = chain(RegistryOptions {
        insecure: vec![format!("127.0.0.1:{port}")],
        registries_conf: None,
        auth_files: Some(vec![]),
        ..Default::default()
    });
    let r = Reference::parse(&format!("127.0.0.1:{port}/test/app:v1")).unwrap();
    let found = discover(&via, None, &r, &Platform::host())
        .await
        .unwrap()
        .expect("found via referrers");
    assert_eq!(found.index_digest, index);
    assert_eq!(found.kind, IndexKind::V1);
    // Without the responder, the plain registry has neither referrers nor the fallback tag.
    let direct = Reference::parse(&env.image(":v1")).unwrap();
    assert!(discover(&env.fetchers(), None, &direct, &Platform::host())
        .await
        .unwrap()
        .is_none());
    task.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn oci_layouts_as_source_and_destination() {
    let env = setup().await;
    let layout = env.dir.path().join("layout");
    let dst = format!("oci:{}:soci", layout.display());
    env.ok(&["convert", &env.image(":v1"), &dst, "--quiet"]);
    assert!(layout.join("oci-layout").exists());
    // Layers were copied into the layout (streamed once with the zTOC build).
    for d in &env.layer_digests {
        assert!(layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
            .exists());
    }
    // And from the layout into another repository of the registry.
    env.ok(&[
        "convert",
        &dst,
        &format!("{}/test/fromlayout:v1", env.reg.addr()),
        "--quiet",
    ]);
    let found = env.ok(&[
        "index",
        "discover",
        &format!("{}/test/fromlayout:v1", env.reg.addr()),
    ]);
    assert!(found.contains("V2"), "{found}");
}

fn manifest_of(layers: &[&str]) -> Manifest {
    Manifest {
        schema_version: 2,
        media_type: Some(MT_OCI_MANIFEST.into()),
        artifact_type: None,
        config: Descriptor::new(MT_OCI_CONFIG, Digest::of(b"c"), 1),
        layers: layers
            .iter()
            .map(|d| Descriptor::new(MT_OCI_LAYER_GZIP, digest(d), 10))
            .collect(),
        subject: None,
        annotations: Default::default(),
    }
}

#[test]
fn bad_indexes_are_rejected_with_clear_errors() {
    let (l1, l2) = (sha256_digest(b"l1"), sha256_digest(b"l2"));
    let image = manifest_of(&[&l1, &l2]);
    let mut z = Descriptor::new(MT_ZTOC, Digest::of(b"z"), 1);
    z.annotations.insert(ANN_LAYER_DIGEST.into(), l1.clone());
    let good = Manifest {
        schema_version: 2,
        media_type: Some(MT_OCI_MANIFEST.into()),
        artifact_type: None,
        config: Descriptor::new(MT_SOCI_INDEX_V2, digest(EMPTY_JSON_DIGEST), 2),
        layers: vec![z.clone()],
        subject: None,
        annotations: Default::default(),
    };
    let check =
        |m: &Manifest, kind| validate_index(&to_json(m), "sha256:idx", kind, "sha256:img", &image);
    check(&good, IndexKind::V2).unwrap();

    let err = validate_index(
        b"{not json",
        "sha256:idx",
        IndexKind::V2,
        "sha256:img",
        &image,
    )
    .unwrap_err();
    assert!(err.to_string().contains("invalid SOCI index"), "{err}");

    let mut other = good.clone();
    other.layers[0]
        .annotations
        .insert(ANN_LAYER_DIGEST.into(), sha256_digest(b"elsewhere"));
    let err = check(&other, IndexKind::V2).unwrap_err();
    assert!(err.to_string().contains("does not have"), "{err}");

    let mut wrong_type = good.clone();
    wrong_type.config.media_type = MT_OCI_CONFIG.into();
    assert!(check(&wrong_type, IndexKind::V2).is_err());

    let mut v1 = good.clone();
    v1.config.media_type = MT_SOCI_INDEX_V1.into();
    v1.subject = Some(Descriptor::new(
        MT_OCI_MANIFEST,
        digest(&sha256_digest(b"another")),
        10,
    ));
    let err = check(&v1, IndexKind::V1).unwrap_err();
    assert!(err.to_string().contains("another image"), "{err}");
    v1.subject = None;
    assert!(check(&v1, IndexKind::V1).is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_or_corrupt_ztocs_are_errors() {
    let env = setup().await;
    let client = env.fetchers();
    let r = Reference::parse(&env.image(":v1")).unwrap();
    // A zTOC the registry does not have.
    let missing = Descriptor::new(MT_ZTOC, Digest::of(b"no such ztoc"), 100);
    let err = fetch_ztoc(&client, None, &r, &missing).await.unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
    // A descriptor whose digest does not match the blob it names (the layer is no zTOC).
    let (_, gz) = &env.layers[2];
    let mut lying = Descriptor::new(MT_ZTOC, digest(&env.layer_digests[2]), gz.len() as u64);
    let err = fetch_ztoc(&client, None, &r, &lying).await.unwrap_err();
    assert!(err.to_string().contains("zTOC"), "{err}");
    lying.size = 1 << 40;
    assert!(fetch_ztoc(&client, None, &r, &lying).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn convert_to_another_repository_mounts_layers() {
    let env = setup().await;
    let before = env.reg.log_text().len();
    env.ok(&[
        "convert",
        &env.image(":v1"),
        &format!("{}/other/app:soci", env.reg.addr()),
        "--quiet",
    ]);
    let log = env.reg.log_text()[before..].to_string();
    for d in &env.layer_digests {
        assert!(
            log.lines()
                .any(|l| l.contains("POST /v2/other/app/blobs/uploads/?mount=")
                    && l.contains(d.as_str())
                    && l.contains("\" 201 ")),
            "{d} was not mounted:\n{log}"
        );
        assert!(
            !log.lines()
                .any(|l| l.contains("PUT /v2/other/app/blobs/uploads/")
                    && l.contains(&format!("digest={d}"))),
            "{d} re-uploaded"
        );
    }
    let found = env.ok(&[
        "index",
        "discover",
        &format!("{}/other/app:soci", env.reg.addr()),
    ]);
    assert!(found.contains("V2"), "{found}");
}

#[tokio::test(flavor = "multi_thread")]
async fn zstd_layers_are_skipped_with_a_note() {
    let reg = registry(RegistryOpts::default());
    let (tar, _) = edge_layer(12 << 20);
    let dir = tempfile::tempdir().unwrap();
    let tar_path = dir.path().join("layer.tar");
    std::fs::write(&tar_path, &tar).unwrap();
    let out = Command::new("zstd")
        .args(["-q", "-1", "-f"])
        .arg(&tar_path)
        .output()
        .expect("zstd (installed by .ci/run)");
    assert!(out.status.success());
    let zst = std::fs::read(dir.path().join("layer.tar.zst")).unwrap();
    // An image whose only layer is zstd, pushed with the zstd media type.
    let pusher = Pusher::new(&reg);
    let config = serde_json::json!({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [sha256_digest(&tar)]}}).to_string();
    let config_digest = pusher.blob("z/app", config.as_bytes()).await;
    let layer_digest = pusher.blob("z/app", &zst).await;
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": MT_OCI_MANIFEST,
        "config": {"mediaType": MT_OCI_CONFIG, "digest": config_digest, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+zstd", "digest": layer_digest, "size": zst.len()}],
    })
    .to_string();
    let resp = reqwest::Client::new()
        .put(format!("http://{}/v2/z/app/manifests/v1", reg.addr()))
        .header("Content-Type", MT_OCI_MANIFEST)
        .body(manifest)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "artifacts = \"{}/a\"\n[[fetchers]]\ntype = \"registry\"\ninsecure = [\"{}\"]\n",
            dir.path().display(),
            reg.addr()
        ),
    )
    .unwrap();
    let out = common::soci_store_ok(
        &cfg,
        &[
            "convert",
            "--json",
            &format!("{}/z/app:v1", reg.addr()),
            &format!("{}/z/app:soci", reg.addr()),
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let layer = &report["platforms"][0]["layers"][0];
    assert!(layer["ztoc"].is_null());
    assert!(layer["note"].as_str().unwrap().contains("zstd"), "{layer}");
}

#[tokio::test(flavor = "multi_thread")]
async fn multi_platform_images_keep_their_other_platforms() {
    let env = setup().await;
    let client = env.client();
    let (amd64_bytes, amd64_digest) = get(&client, &env.image(":v1")).await;
    // An arm64 image of one small layer, in another repository of the same registry.
    let (tar, _) = edge_layer(1000);
    let gz = gzip(&tar, 6, 1);
    let pusher = Pusher::new(&env.reg);
    let (arm_digest, _) = pusher
        .image(
            "test/arm",
            "v1",
            std::slice::from_ref(&gz),
            &[sha256_digest(&tar)],
        )
        .await;
    let (arm_bytes, _) = get(
        &client,
        &format!("{}/test/arm@{arm_digest}", env.reg.addr()),
    )
    .await;
    // Both platforms under one index in test/app (the arm64 blobs mounted there first).
    let arm = parse_manifest(&arm_bytes).unwrap();
    for d in std::iter::once(&arm.config.digest).chain(arm.layers.iter().map(|l| &l.digest)) {
        let r = reqwest::Client::new()
            .post(format!(
                "http://{}/v2/test/app/blobs/uploads/?mount={d}&from=test/arm",
                env.reg.addr()
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
    }
    let put = |tag_or_digest: String, body: Vec<u8>, mt: &'static str| {
        let url = format!(
            "http://{}/v2/test/app/manifests/{tag_or_digest}",
            env.reg.addr()
        );
        async move {
            let r = reqwest::Client::new()
                .put(url)
                .header("Content-Type", mt)
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(
                r.status().as_u16(),
                201,
                "{}",
                r.text().await.unwrap_or_default()
            );
        }
    };
    put(arm_digest.clone(), arm_bytes.to_vec(), MT_OCI_MANIFEST).await;
    let mut amd = Descriptor::new(
        MT_OCI_MANIFEST,
        digest(&amd64_digest),
        amd64_bytes.len() as u64,
    );
    amd.platform = Some(Platform {
        architecture: "amd64".into(),
        os: "linux".into(),
        variant: None,
    });
    let mut armd = Descriptor::new(MT_OCI_MANIFEST, digest(&arm_digest), arm_bytes.len() as u64);
    armd.platform = Some(Platform {
        architecture: "arm64".into(),
        os: "linux".into(),
        variant: Some("v8".into()),
    });
    let index = Index {
        schema_version: 2,
        media_type: Some(MT_OCI_INDEX.into()),
        manifests: vec![amd, armd],
        annotations: Default::default(),
    };
    put("multi".into(), to_json(&index), MT_OCI_INDEX).await;

    // The host's platform is converted; arm64 is listed as it was.
    env.ok(&[
        "convert",
        &env.image(":multi"),
        &env.image(":multi-soci"),
        "--platform",
        "linux/amd64",
        "--quiet",
    ]);
    let (b, _) = get(&client, &env.image(":multi-soci")).await;
    let out: oci_spec::image::ImageIndex = serde_json::from_slice(&b).unwrap();
    let listed: Vec<(String, Option<String>)> = out
        .manifests()
        .iter()
        .map(|d| {
            (
                d.digest().to_string(),
                d.artifact_type().as_ref().map(|a| a.to_string()),
            )
        })
        .collect();
    assert_eq!(listed.len(), 3, "{listed:?}");
    assert_eq!(
        listed[1],
        (arm_digest.clone(), None),
        "arm64 unchanged: {listed:?}"
    );
    assert_eq!(listed[2].1.as_deref(), Some(MT_SOCI_INDEX_V2));

    // --all-platforms converts both: two image manifests, two SOCI indexes.
    env.ok(&[
        "convert",
        &env.image(":multi"),
        &format!("{}/copy/app:all", env.reg.addr()),
        "--all-platforms",
        "--quiet",
    ]);
    let (b, _) = get(&client, &format!("{}/copy/app:all", env.reg.addr())).await;
    let all = parse_index(&b).unwrap();
    assert_eq!(
        all.manifests
            .iter()
            .filter(|d| d.artifact_type.as_deref() == Some(MT_SOCI_INDEX_V2))
            .count(),
        2
    );
    // And the arm64 image is discoverable by its platform.
    let found = env.ok(&[
        "index",
        "discover",
        "--platform",
        "linux/arm64",
        &format!("{}/copy/app:all", env.reg.addr()),
    ]);
    assert!(found.contains("V2"), "{found}");
}
