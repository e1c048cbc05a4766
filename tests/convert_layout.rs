//! `convert` between OCI layouts (no registry): images that repeat layers, and layouts whose
//! documents are too large or whose descriptors lie.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use serde_json::{json, Value};
use sha2::Digest;

const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MT_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MT_ZTOC: &str = "application/octet-stream";
const ANN_LAYER: &str = "com.amazon.soci.image-layer-digest";
const ANN_TOC: &str = "containerd.io/snapshot/stargz/toc.digest";

fn digest(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(b)))
}

/// An OCI layout being written by a test.
struct Layout {
    dir: PathBuf,
}

impl Layout {
    fn new(dir: PathBuf) -> Self {
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        Layout { dir }
    }

    fn blob_path(&self, d: &str) -> PathBuf {
        self.dir
            .join("blobs/sha256")
            .join(d.strip_prefix("sha256:").unwrap())
    }

    /// Stores a blob; returns its descriptor.
    fn blob(&self, media_type: &str, data: &[u8]) -> Value {
        let d = digest(data);
        std::fs::write(self.blob_path(&d), data).unwrap();
        json!({"mediaType": media_type, "digest": d, "size": data.len()})
    }

    /// Stores an image manifest with these layers and tags it `v1`; returns its descriptor.
    fn image(&self, layers: &[Value]) -> Value {
        let config = self.blob(
            MT_CONFIG,
            &serde_json::to_vec(&json!({
                "architecture": "amd64", "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": []},
            }))
            .unwrap(),
        );
        self.manifest(&json!({
            "schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config, "layers": layers,
        }))
    }

    fn manifest(&self, m: &Value) -> Value {
        let mut desc = self.blob(MT_MANIFEST, &serde_json::to_vec(m).unwrap());
        desc["annotations"] = json!({"org.opencontainers.image.ref.name": "v1"});
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [desc.clone()]})).unwrap(),
        )
        .unwrap();
        desc
    }

    fn read_json(&self, d: &str) -> Value {
        serde_json::from_slice(&std::fs::read(self.blob_path(d)).unwrap()).unwrap()
    }
}

fn layer_blob(seed: u64, len: usize) -> Vec<u8> {
    let mut t = TarWriter::new();
    t.dir("./data/");
    t.file("./data/random.bin", &random_bytes(len, seed));
    gzip(&t.finish().0, 1, 1)
}

fn convert(dir: &Path, src: &Path, extra: &[&str]) -> Output {
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!("artifacts = {:?}\n", dir.join("artifacts").display()),
    )
    .unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_soci-store"))
        .arg("--config")
        .arg(&config)
        .args(["convert", "--json", "--min-layer-size", "0"])
        .args(extra)
        .arg(format!("oci:{}:v1", src.display()))
        .arg(format!("oci:{}:soci", dir.join("dst").display()))
        .output()
        .unwrap()
}

#[test]
fn an_image_that_repeats_a_layer_converts_with_several_jobs() {
    let tmp = tempfile::tempdir().unwrap();
    let src = Layout::new(tmp.path().join("src"));
    let big = layer_blob(1, 6 << 20);
    let small = layer_blob(2, 100_000);
    let l1 = src.blob(MT_LAYER, &big);
    let l2 = src.blob(MT_LAYER, &small);
    src.image(&[l1.clone(), l2.clone(), l1.clone(), l2.clone(), l1.clone()]);

    let out = convert(tmp.path(), &src.dir, &["--jobs", "4"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let layers = report["platforms"][0]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 5);
    for (i, first) in [(2, 0), (3, 1), (4, 0)] {
        assert_eq!(layers[i]["ztoc"], layers[first]["ztoc"], "{report}");
        assert_eq!(
            layers[i]["note"],
            format!("same layer as layer {first}"),
            "{report}"
        );
    }

    // The destination holds each layer, whole, and one zTOC per distinct layer.
    let dst = Layout::new(tmp.path().join("dst"));
    assert!(std::fs::read(dst.blob_path(l1["digest"].as_str().unwrap())).unwrap() == big);
    assert!(std::fs::read(dst.blob_path(l2["digest"].as_str().unwrap())).unwrap() == small);
    let leftovers: Vec<_> = std::fs::read_dir(dst.dir.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let image = dst.read_json(report["platforms"][0]["image_manifest"].as_str().unwrap());
    let soci = dst.read_json(report["platforms"][0]["soci_index"].as_str().unwrap());
    for (i, first) in [(2, 0), (3, 1), (4, 0)] {
        let toc = &image["layers"][i]["annotations"][ANN_TOC];
        assert!(toc.is_string(), "{image}");
        assert_eq!(toc, &image["layers"][first]["annotations"][ANN_TOC]);
    }
    for l in [&l1, &l2] {
        let ztocs = soci["layers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|z| z["mediaType"] == MT_ZTOC && z["annotations"][ANN_LAYER] == l["digest"])
            .count();
        assert_eq!(ztocs, 1, "{soci}");
    }
}

/// Converts `src` and returns the error `convert` printed (it must fail).
fn convert_error(dir: &Path, src: &Path) -> String {
    let out = convert(dir, src, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "converted: {stderr}");
    stderr
}

#[test]
fn oversized_layout_documents_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = Layout::new(tmp.path().join("src"));
    let l = src.blob(MT_LAYER, &layer_blob(1, 1000));
    let desc = src.image(std::slice::from_ref(&l));

    // index.json of 5 MB (valid JSON: a long annotation).
    let big = "x".repeat(5 << 20);
    let index = json!({"schemaVersion": 2, "manifests": [desc], "annotations": {"pad": big}});
    std::fs::write(
        src.dir.join("index.json"),
        serde_json::to_vec(&index).unwrap(),
    )
    .unwrap();
    let err = convert_error(tmp.path(), &src.dir);
    assert!(
        err.contains("index.json: larger than the 4194304 bytes"),
        "{err}"
    );

    // An image manifest of 5 MB.
    let config = src.blob(MT_CONFIG, br#"{"architecture":"amd64","os":"linux"}"#);
    src.manifest(&json!({
        "schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config, "layers": [l],
        "annotations": {"pad": big},
    }));
    let err = convert_error(tmp.path(), &src.dir);
    assert!(err.contains("larger than the 4194304 bytes"), "{err}");
}

#[test]
fn descriptors_that_lie_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let src = Layout::new(tmp.path().join("src"));
    let blob = layer_blob(1, 100_000);
    let good = src.blob(MT_LAYER, &blob);

    let mut short = good.clone();
    short["size"] = json!(100);
    src.image(&[short]);
    let err = convert_error(tmp.path(), &src.dir);
    assert!(
        err.contains(&format!("is {} bytes, its descriptor says 100", blob.len())),
        "{err}"
    );

    let mut text = good.clone();
    text["mediaType"] = json!("text/plain");
    src.image(&[text]);
    let err = convert_error(tmp.path(), &src.dir);
    assert!(
        err.contains("media type \"text/plain\", not an image layer"),
        "{err}"
    );

    let config = src.blob(
        "application/vnd.example.not-a-config",
        br#"{"architecture":"amd64","os":"linux"}"#,
    );
    src.manifest(&json!({
        "schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config, "layers": [good],
    }));
    let err = convert_error(tmp.path(), &src.dir);
    assert!(err.contains("not an image config"), "{err}");

    let mut config = src.blob(MT_CONFIG, br#"{"architecture":"amd64","os":"linux"}"#);
    config["size"] = json!(5);
    src.manifest(&json!({
        "schemaVersion": 2, "mediaType": MT_MANIFEST, "config": config, "layers": [good],
    }));
    let err = convert_error(tmp.path(), &src.dir);
    assert!(err.contains("its descriptor says 5"), "{err}");

    // The manifest's own size in index.json.
    let mut desc = src.image(&[good]);
    desc["size"] = json!(7);
    std::fs::write(
        src.dir.join("index.json"),
        serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [desc]})).unwrap(),
    )
    .unwrap();
    let err = convert_error(tmp.path(), &src.dir);
    assert!(err.contains("index.json says"), "{err}");
}
