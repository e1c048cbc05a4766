//! Commands that print: a reader that goes away (`| head`) is a normal end, never a panic, and
//! `blob get` streams whatever range it is asked for.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use sha2::Digest;
use soci_store::ztoc::{self, format, BuildOptions};

fn soci_store() -> Command {
    Command::new(env!("CARGO_BIN_EXE_soci-store"))
}

/// A layer with many small spans (a long `info --json`), many entries (a long `ls`) and a big
/// file, and its zTOC: every output is well past a pipe's buffer.
fn layer(dir: &Path) -> (PathBuf, PathBuf) {
    let mut t = TarWriter::new();
    t.dir("./many/");
    for i in 0..2000 {
        t.file(&format!("./many/file-{i}"), b"x");
    }
    t.file("./big.txt", &random_bytes(6 << 20, 1));
    let blob = gzip(&t.finish().0, 6, 1);
    let opts = BuildOptions {
        span_size: 4096,
        min_layer_size: 0,
        ..Default::default()
    };
    let z = ztoc::build(&blob[..], &opts, &mut |_| {}).unwrap();
    assert!(z.span_count() > 250, "{}", z.span_count());
    let (layer, ztoc) = (dir.join("layer.tar.gz"), dir.join("layer.ztoc"));
    std::fs::write(&layer, &blob).unwrap();
    std::fs::write(&ztoc, format::encode(&z).unwrap()).unwrap();
    (layer, ztoc)
}

/// Runs the command, reads the first 100 bytes of its output and closes the pipe (as `head -c
/// 100` does); the command must end quietly and successfully.
fn closes_early(args: &[&str]) {
    let mut child = soci_store()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = [0u8; 100];
    child.stdout.take().unwrap().read_exact(&mut head).unwrap();
    // stdout dropped: the pipe is closed with most of the output unread.
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{args:?}: {:?} {stderr}", out.status);
    assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    assert!(stderr.is_empty(), "{args:?}: {stderr}");
}

#[test]
fn printing_commands_end_quietly_when_the_reader_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let (layer, ztoc) = layer(dir.path());
    let (layer, ztoc) = (layer.to_str().unwrap(), ztoc.to_str().unwrap());
    closes_early(&["ztoc", "info", "--json", ztoc]);
    closes_early(&["ztoc", "ls", ztoc]);
    let digest = soci_store::index::sha256_digest(&std::fs::read(ztoc).unwrap());
    closes_early(&[
        "ztoc",
        "get-file",
        "--ztoc-digest",
        &digest,
        ztoc,
        layer,
        "big.txt",
    ]);
}

/// `ztoc get-file` checks a zTOC file against the digest the SOCI index lists for it, and says
/// when it has none to check (the zTOC's windows and file table are then trusted as given).
#[test]
fn get_file_checks_the_ztoc_against_its_digest_or_says_it_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let (layer, ztoc) = layer(dir.path());
    let digest = soci_store::index::sha256_digest(&std::fs::read(&ztoc).unwrap());
    let run = |extra: &[&str]| {
        soci_store()
            .args(["ztoc", "get-file"])
            .args(extra)
            .args([&ztoc, &layer])
            .arg("big.txt")
            .output()
            .unwrap()
    };
    let checked = run(&["--ztoc-digest", &digest]);
    assert!(checked.status.success(), "{checked:?}");
    assert!(checked.stdout == random_bytes(6 << 20, 1));
    assert!(checked.stderr.is_empty(), "{checked:?}");

    let wrong = format!("sha256:{}", "0".repeat(64));
    let refused = run(&["--ztoc-digest", &wrong]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && refused.stdout.is_empty(),
        "{refused:?}"
    );
    assert!(
        stderr.contains(digest.as_str()) && stderr.contains(&wrong),
        "{stderr}"
    );

    let trusted = run(&[]);
    let stderr = String::from_utf8_lossy(&trusted.stderr);
    assert!(trusted.status.success() && trusted.stdout == random_bytes(6 << 20, 1));
    assert!(stderr.contains("trusted as given"), "{stderr}");
}

/// An OCI layout holding `blob`, and a config whose only fetcher reads it.
fn local_layout(dir: &Path, blob: &[u8]) -> (PathBuf, String) {
    let layout = dir.join("layout");
    let hex = hex::encode(sha2::Sha256::digest(blob));
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    std::fs::write(
        layout.join("index.json"),
        r#"{"schemaVersion":2,"manifests":[]}"#,
    )
    .unwrap();
    std::fs::write(layout.join("blobs/sha256").join(&hex), blob).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "artifacts = {:?}\n[[fetchers]]\ntype = \"local\"\npath = {:?}\n[cache]\ntype = \"memory\"\n",
            dir.join("artifacts"),
            layout
        ),
    )
    .unwrap();
    (config, format!("localhost/app@sha256:{hex}"))
}

/// `blob get` under a 2 GiB address-space limit.
fn blob_get(config: &Path, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg("ulimit -v 2097152 && exec \"$@\"")
        .arg("bash")
        .arg(env!("CARGO_BIN_EXE_soci-store"))
        .arg("--config")
        .arg(config)
        .args(["blob", "get"])
        .args(args);
    cmd.output().unwrap()
}

#[test]
fn blob_get_streams_any_range() {
    let dir = tempfile::tempdir().unwrap();
    let blob = random_bytes(20 << 20, 7);
    let (config, name) = local_layout(dir.path(), &blob);
    let out_path = dir.path().join("out");
    let out = out_path.to_str().unwrap();

    // A range far past the end: the blob from its start, streamed (never ~100 GB allocated).
    let r = blob_get(&config, &[&name, "--range", "0-99999999999", "-o", out]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(std::fs::read(&out_path).unwrap() == blob);

    let r = blob_get(&config, &[&name, "--range", "1000-9000000"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(r.stdout == blob[1000..9_000_000]);

    let r = blob_get(&config, &[&name, "--range", "30000000-30000010"]);
    assert!(!r.status.success());
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(stderr.contains("starts past the end"), "{stderr}");

    let r = blob_get(&config, &[&name]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(r.stdout == blob);

    // Its output closed early, too, is a normal end.
    closes_early(&["--config", config.to_str().unwrap(), "blob", "get", &name]);
}

#[test]
fn convert_refuses_a_span_size_it_could_not_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = local_layout(dir.path(), b"x");
    let layout = format!("oci:{}", dir.path().join("layout").display());
    let out = soci_store()
        .arg("--config")
        .arg(&config)
        .args(["convert", "--span-size", "1GiB", &layout, &layout])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--span-size 1073741824"), "{stderr}");
    let out = soci_store()
        .arg("--config")
        .arg(&config)
        .args(["convert", "--table-span-size", "0", &layout, &layout])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--table-span-size 0"), "{stderr}");
}
