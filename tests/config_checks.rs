//! A wrong configuration is a clear error naming the key, at `config show` and at the start of
//! `serve`, never a log line or a surprise later.

mod common;

use std::path::Path;
use std::process::Output;

fn soci_store(config: &Path, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_soci-store"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

/// `config show` with `toml` as the file: its error (it must fail).
fn show_error(dir: &Path, toml: &str) -> String {
    let cfg = dir.join("config.toml");
    std::fs::write(&cfg, toml).unwrap();
    let out = soci_store(&cfg, &["config", "show"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "accepted {toml:?}");
    stderr
}

#[test]
fn config_show_checks_the_cache_table() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[cache]\ntype = \"redis\"\n",
            "unknown cache type \"redis\" (known types: disk, memory, tiered)",
        ),
        (
            "[cache]\ntype = \"memory\"\nmax_bytes = \"lots\"\n",
            "not a size: \"lots\"",
        ),
        (
            "[cache]\ntype = \"memory\"\ndisk_bytes = \"1GiB\"\n",
            "unknown field `disk_bytes`",
        ),
        (
            "[cache]\ntype = \"tiered\"\nmemory_bytes = \"1 parsec\"\n",
            "unknown size unit",
        ),
    ];
    for (toml, want) in cases {
        let err = show_error(dir.path(), toml);
        assert!(err.contains(want), "{toml:?}: {err}");
        assert!(err.contains("cache"), "{toml:?}: {err}");
    }
    // A disk cache is checked, not created.
    let cache_dir = dir.path().join("not-created");
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!("[cache]\ntype = \"disk\"\npath = {cache_dir:?}\nmax_bytes = \"1GiB\"\n"),
    )
    .unwrap();
    let out = soci_store(&cfg, &["config", "show"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!cache_dir.exists());
}

#[test]
fn config_show_checks_paths_and_the_metrics_address() {
    let dir = tempfile::tempdir().unwrap();
    let err = show_error(dir.path(), "artifacts = \"\"\n");
    assert!(
        err.contains("artifacts: must be a directory, not empty"),
        "{err}"
    );
    let err = show_error(dir.path(), "state_dir = \"\"\n");
    assert!(
        err.contains("state_dir: must be a directory, not empty"),
        "{err}"
    );
    for bad in [
        "9300",
        "localhost",
        ":9300",
        "127.0.0.1:99999",
        "127.0.0.1:http",
    ] {
        let err = show_error(dir.path(), &format!("metrics_address = {bad:?}\n"));
        assert!(err.contains("metrics_address"), "{bad}: {err}");
    }
}

#[test]
fn cache_errors_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the cache directory should be.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "[cache]\ntype = \"disk\"\npath = {:?}\n",
            file.join("cache")
        ),
    )
    .unwrap();
    let config = soci_store::config::Config::load(Some(&cfg)).unwrap();
    let Err(err) = soci_store::backends::BackendRegistry::with_builtins().build_cache(&config)
    else {
        panic!("a cache under a file");
    };
    let err = err.to_string();
    assert!(err.contains(&file.display().to_string()), "{err}");
}

#[test]
fn serve_stops_at_start_when_the_metrics_address_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let cfg = dir.path().join("config.toml");
    std::fs::write(
        &cfg,
        format!(
            "artifacts = {:?}\nstate_dir = {:?}\nlocal_files = {:?}\nmetrics_address = \"{addr}\"\n[cache]\ntype = \"memory\"\n",
            dir.path().join("artifacts"),
            dir.path().join("state"),
            dir.path().join("files"),
        ),
    )
    .unwrap();
    // The mountpoint cannot exist (it is under a file): should the metrics check not stop the
    // start, the mount fails anyway (nothing is ever mounted by this test).
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"").unwrap();
    let mountpoint = file.join("mnt");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_soci-store"))
        .arg("--config")
        .arg(&cfg)
        .arg("serve")
        .arg(&mountpoint)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("serve did not stop");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("soci-store: error: metrics endpoint {addr}")),
        "{stderr}"
    );
}

/// The shipped `config/config.toml` loads as it is, and says what the defaults are.
#[test]
fn the_shipped_config_file_loads() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/config.toml");
    let out = soci_store(&shipped, &["config", "show"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let c: soci_store::config::Config = toml::from_str(&text).unwrap();
    let d = soci_store::config::Config::default();
    assert_eq!(c.local_files, d.local_files);
    assert_eq!(c.local_files_max_bytes, 20 << 30);
    assert_eq!(c.artifacts, d.artifacts);
}

/// The shipped storage.conf and its podman 6 drop-in name the same store, and the drop-in
/// appends to the list (a plain array would replace stores other files list).
#[test]
fn the_shipped_storage_files_name_the_same_store() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let read = |p: &str| -> toml::Table {
        toml::from_str(&std::fs::read_to_string(dir.join(p)).unwrap()).unwrap()
    };
    let stores = |t: &toml::Table| t["storage"]["options"]["additionallayerstores"].clone();
    let classic = stores(&read("storage.conf"));
    let dropin = stores(&read("storage.conf.d/50-soci-store.conf"));
    let classic = classic.as_array().unwrap();
    let dropin = dropin.as_array().unwrap();
    assert_eq!(classic.len(), 1);
    assert_eq!(dropin.len(), 2);
    assert_eq!(dropin[0], classic[0]);
    assert!(classic[0].as_str().unwrap().ends_with(":ref"));
    assert_eq!(dropin[1]["append"].as_bool(), Some(true));
    let registries = read("registries.conf.d/50-soci-store.conf");
    assert_eq!(
        registries["additional-layer-store-auth-helper"].as_str(),
        Some("/usr/local/bin/soci-store-auth-helper"),
        "where `cargo install --root /usr/local` (README) puts the helper"
    );
}
