//! podman's credential hand-off end to end: registries.conf `additional-layer-store-auth-helper`
//! (podman 5.2 and later), a registry with Basic auth (htpasswd), credentials only in the auth
//! file podman is given for the pull, podman 5.4.2 in the Debian 13 chroot running
//! `soci-store-auth-helper`, and a store whose own configuration has no credentials at all.

mod common;

use std::path::Path;

use common::chroot::Chroot;
use common::daemon::Daemon;
use common::podman::Podman;
use common::servers::{registry, sha256_digest, whole_blob_gets, Pusher, RegistryOpts};
use common::*;

const USER: &str = "alice";
const PASSWORD: &str = "handed-over-pw";

#[tokio::test(flavor = "multi_thread")]
async fn auth_helper_hands_podmans_credentials_to_the_store() {
    let reg = registry(RegistryOpts {
        htpasswd: Some((USER.into(), PASSWORD.into())),
        ..Default::default()
    });
    let layers = soci_test_image();
    let gz: Vec<Vec<u8>> = layers.iter().map(|(_, g)| g.clone()).collect();
    let diff_ids: Vec<String> = layers.iter().map(|(t, _)| sha256_digest(t)).collect();
    let mut pusher = Pusher::new(&reg);
    pusher.auth = Some((USER.into(), PASSWORD.into()));
    let (_, layer_digests) = pusher.image("private/app", "v1", &gz, &diff_ids).await;

    // `convert` is given the credentials (a CI job would be); the store never is.
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("convert-auth.json");
    common::servers::auth_file(&creds, &reg.addr(), USER, PASSWORD);
    let convert_cfg = dir.path().join("convert.toml");
    std::fs::write(
        &convert_cfg,
        format!(
            "artifacts = \"{a}/convert-artifacts\"\n[[fetchers]]\ntype = \"registry\"\ninsecure = [\"{r}\"]\nregistries_conf = \"/nonexistent\"\nauth_files = [\"{c}\"]\n",
            a = dir.path().display(),
            r = reg.addr(),
            c = creds.display()
        ),
    )
    .unwrap();
    let image = format!("{}/private/app:v1-soci", reg.addr());
    soci_store_ok(
        &convert_cfg,
        &[
            "convert",
            "--quiet",
            &format!("{}/private/app:v1", reg.addr()),
            &image,
        ],
    );

    let mut plain = Podman::new();
    let plain_auth = dir.path().join("plain-auth.json");
    common::servers::auth_file(&plain_auth, &reg.addr(), USER, PASSWORD);
    plain.pull_args = vec!["--authfile".into(), plain_auth.display().to_string()];
    let plain_listing = plain.listing(&image);

    // Everything the chroot's podman and helper see lives under its /run (a tmpfs of the test).
    let chroot = Chroot::enter();
    let inside = "/run/soci-auth-test";
    let host = chroot.root.join(inside.trim_start_matches('/'));
    std::fs::create_dir_all(&host).unwrap();
    std::fs::copy(
        env!("CARGO_BIN_EXE_soci-store-auth-helper"),
        host.join("soci-store-auth-helper"),
    )
    .unwrap();
    common::servers::auth_file(&host.join("auth.json"), &reg.addr(), USER, PASSWORD);
    std::fs::write(
        host.join("registries-plain.conf"),
        format!(
            "[[registry]]\nlocation = \"{}\"\ninsecure = true\n",
            reg.addr()
        ),
    )
    .unwrap();
    // The shipped drop-in, with the helper where this test put it.
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/registries.conf.d/50-soci-store.conf"),
    )
    .unwrap();
    let installed = "/usr/local/bin/soci-store-auth-helper";
    assert!(shipped.contains(installed), "{shipped}");
    std::fs::write(
        host.join("registries.conf"),
        format!(
            "{}\n[[registry]]\nlocation = \"{}\"\ninsecure = true\n",
            shipped.replace(installed, &format!("{inside}/soci-store-auth-helper")),
            reg.addr()
        ),
    )
    .unwrap();
    let daemon_cfg = dir.path().join("daemon.toml");
    std::fs::write(
        &daemon_cfg,
        format!(
            "artifacts = \"{a}/daemon-artifacts\"\nstate_dir = \"{s}/state\"\nlocal_files = \"{a}/files\"\n\
             [[fetchers]]\ntype = \"registry\"\ninsecure = [\"{r}\"]\nregistries_conf = \"/nonexistent\"\nauth_files = []\n\
             [cache]\ntype = \"memory\"\n",
            a = dir.path().display(),
            s = host.display(),
            r = reg.addr()
        ),
    )
    .unwrap();
    let mnt = chroot.root.join("var/lib/soci-store/store");
    let daemon = Daemon::start(&daemon_cfg, &mnt, &dir.path().join("daemon.log"));
    let authfile = format!("{inside}/auth.json");
    let pull = |conf: &str| {
        chroot.podman_with(
            &[
                &format!("CONTAINERS_REGISTRIES_CONF={inside}/{conf}"),
                &format!("SOCI_STORE_STATE_DIR={inside}/state"),
            ],
            &["pull", "-q", "--authfile", &authfile, &image],
        )
    };

    // Without the helper the store cannot read the private image: podman downloads every layer.
    let before = reg.log_text().len();
    pull("registries-plain.conf");
    let log = reg.log_text()[before..].to_string();
    for d in &layer_digests[..2] {
        assert_eq!(
            whole_blob_gets(&log, d),
            1,
            "{d} downloaded by podman:\n{log}"
        );
    }
    chroot.podman(&["rmi", "-af"]);
    assert!(
        !daemon.log_text().contains("handed over"),
        "{}",
        daemon.log_text()
    );

    // With it, podman hands its credentials over and the layers start lazily.
    let before = reg.log_text().len();
    pull("registries.conf");
    let log = reg.log_text()[before..].to_string();
    for d in &layer_digests[..2] {
        assert_eq!(
            whole_blob_gets(&log, d),
            0,
            "{d} was downloaded whole; the store's log:\n{}",
            daemon.log_text()
        );
    }
    let dlog = daemon.log_text();
    assert!(
        dlog.contains(&format!(
            "podman handed over credentials for {}/private/app",
            reg.addr()
        )),
        "{dlog}"
    );
    assert!(dlog.contains(" use"), "podman used the store: {dlog}");
    // The store's range requests were answered: it authenticated with what podman handed over.
    assert!(
        log.lines()
            .any(|l| l.contains("soci-store/") && l.contains("/blobs/") && l.contains("\" 206 ")),
        "{log}"
    );
    assert_eq!(chroot.run_listing(&image), plain_listing);
    // The credentials stay in the daemon's memory: nothing of them is written anywhere.
    for entry in walk(dir.path()).into_iter().chain(walk(&host)) {
        if entry.to_string_lossy().ends_with("auth.json") {
            continue;
        }
        let data = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !data
                .windows(PASSWORD.len())
                .any(|w| w == PASSWORD.as_bytes()),
            "{} holds the password",
            entry.display()
        );
    }
}

/// Regular files below `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            out.extend(walk(&e.path()));
        } else if ft.is_file() {
            out.push(e.path());
        }
    }
    out
}
