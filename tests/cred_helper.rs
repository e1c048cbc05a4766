//! Credentials from a docker credential helper named in auth.json (`credHelpers`), against a real
//! registry with Basic auth. The helper is a tiny script speaking the helper protocol (the real
//! helpers need a desktop keyring). Its own test binary, because it changes PATH.

mod common;

use common::servers::*;
use common::*;
use soci_store::fetch::registry::{RegistryFetcher, RegistryOptions};
use soci_store::fetch::{BlobLocator, Fetcher};
use soci_store::reference::Reference;

#[tokio::test(flavor = "multi_thread")]
async fn credentials_from_a_helper_program() {
    let (tar, gz, _, _) = test_layer();
    let reg = registry(RegistryOpts {
        htpasswd: Some(("bob".into(), "helper-pw".into())),
        ..Default::default()
    });
    let mut pusher = Pusher::new(&reg);
    pusher.auth = Some(("bob".into(), "helper-pw".into()));
    let (_, layers) = pusher
        .image(
            "test/app",
            "v1",
            std::slice::from_ref(&gz),
            &[sha256_digest(&tar)],
        )
        .await;

    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let helper = bin.join("docker-credential-soci-test");
    // Answers `get` for our registry only, as real helpers do.
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread host\n[ \"$1\" = get ] && [ \"$host\" = \"{}\" ] || {{ echo 'credentials not found'; exit 1; }}\n\
             echo '{{\"ServerURL\":\"'$host'\",\"Username\":\"bob\",\"Secret\":\"helper-pw\"}}'\n",
            reg.addr()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    // SAFETY of set_var: this test binary holds only this test, and it sets PATH before any thread
    // of its own reads the environment.
    std::env::set_var("PATH", path);

    let auth = dir.path().join("auth.json");
    std::fs::write(
        &auth,
        serde_json::json!({"credHelpers": {reg.addr(): "soci-test"}}).to_string(),
    )
    .unwrap();
    let f = RegistryFetcher::new(RegistryOptions {
        insecure: vec![reg.addr()],
        registries_conf: None,
        auth_files: Some(vec![auth]),
        ..Default::default()
    })
    .unwrap();
    let loc = BlobLocator::new(
        Reference::parse(&format!("{}/test/app:v1", reg.addr())).unwrap(),
        digest(&layers[0]),
    );
    let got = f.read_range(&loc, 0..gz.len() as u64).await.unwrap();
    assert!(got[..] == gz[..]);
}
