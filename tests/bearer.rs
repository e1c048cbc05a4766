//! The Bearer token flow against the real registry configured for token auth. The token issuer
//! is a small in-test stand-in (Debian packages no token server): it checks Basic credentials
//! and signs JWTs with a key whose certificate the registry trusts (`openssl` does the signing).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use base64::Engine;
use common::servers::*;
use common::*;
use soci_store::fetch::registry::{RegistryFetcher, RegistryOptions};
use soci_store::fetch::{BlobLocator, FetchError, Fetcher};
use soci_store::reference::Reference;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// A JWT for `scope` signed with `key` (RS256), carrying the certificate in `x5c`.
fn jwt(dir: &Path, scope: &str, ttl: u64) -> String {
    let der = Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in"])
        .arg(dir.join("cert.pem"))
        .output()
        .unwrap()
        .stdout;
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT", "x5c": [base64::engine::general_purpose::STANDARD.encode(&der)]});
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let mut parts = scope.split(':');
    let (kind, name, actions) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let claims = serde_json::json!({
        "iss": "soci-test-issuer", "sub": "alice", "aud": "soci-test-registry",
        "exp": now + ttl, "nbf": now - 10, "iat": now, "jti": format!("{now}-{scope}"),
        "access": [{"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}],
    });
    let signing_input = format!(
        "{}.{}",
        b64url(header.to_string().as_bytes()),
        b64url(claims.to_string().as_bytes())
    );
    let input_file = dir.join(format!("input-{}", std::process::id()));
    std::fs::write(&input_file, &signing_input).unwrap();
    let sig = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(dir.join("key.pem"))
        .arg(&input_file)
        .output()
        .unwrap();
    assert!(sig.status.success());
    format!("{signing_input}.{}", b64url(&sig.stdout))
}

/// The token endpoint: Basic alice:s3cret (GET) or the refresh token `alice-refresh` (an
/// identity token, POSTed as OAuth2 `grant_type=refresh_token`) gets a token for the scope
/// asked; counts issues.
async fn token_server(dir: Arc<tempfile::TempDir>, issued: Arc<AtomicUsize>, ttl: u64) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = l.accept().await else {
                return;
            };
            let (dir, issued) = (dir.clone(), issued.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                }
                let end = buf[..n].windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                let head = String::from_utf8_lossy(&buf[..end]).to_string();
                let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut url = reqwest::Url::parse(&format!("http://x{path}")).unwrap();
                let post = head.starts_with("POST ");
                if post {
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().to_string())
                        })
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(0);
                    let mut body = buf[end..n].to_vec();
                    while body.len() < len {
                        let mut more = vec![0u8; len - body.len()];
                        match c.read(&mut more).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => body.extend_from_slice(&more[..k]),
                        }
                    }
                    url.set_query(Some(&String::from_utf8_lossy(&body)));
                }
                let param = |name: &str| {
                    url.query_pairs()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.to_string())
                        .unwrap_or_default()
                };
                let scope = param("scope");
                let good = format!(
                    "authorization: basic {}",
                    base64::engine::general_purpose::STANDARD.encode("alice:s3cret")
                )
                .to_lowercase();
                let authorized = if post {
                    param("grant_type") == "refresh_token"
                        && param("refresh_token") == "alice-refresh"
                } else {
                    head.to_lowercase().lines().any(|l| l.trim() == good)
                };
                let resp = if authorized {
                    issued.fetch_add(1, Ordering::SeqCst);
                    let token = tokio::task::spawn_blocking(move || jwt(dir.path(), &scope, ttl))
                        .await
                        .unwrap();
                    let body = serde_json::json!({"token": token, "expires_in": ttl}).to_string();
                    format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
                } else {
                    "HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_string()
                };
                let _ = c.write_all(resp.as_bytes()).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn bearer_tokens_from_the_announced_realm() {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=soci-test-token",
        ])
        .arg("-keyout")
        .arg(dir.path().join("key.pem"))
        .arg("-out")
        .arg(dir.path().join("cert.pem"))
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let issued = Arc::new(AtomicUsize::new(0));
    let token_port = token_server(dir.clone(), issued.clone(), 3600).await;
    let reg = registry(RegistryOpts {
        token: Some((
            format!("http://127.0.0.1:{token_port}/token"),
            dir.path().join("cert.pem").display().to_string(),
        )),
        ..Default::default()
    });

    // Push with a token of our own (pull,push) straight from the issuer.
    let (tar, gz, _, _) = test_layer();
    let push_token = jwt(dir.path(), "repository:test/app:pull,push", 600);
    let mut pusher = Pusher::new(&reg);
    pusher.bearer = Some(push_token);
    let (_, layers) = pusher
        .image(
            "test/app",
            "v1",
            std::slice::from_ref(&gz),
            &[sha256_digest(&tar)],
        )
        .await;
    let loc = BlobLocator::new(
        Reference::parse(&format!("{}/test/app:v1", reg.addr())).unwrap(),
        digest(&layers[0]),
    );

    let auth = dir.path().join("auth.json");
    std::fs::write(
        &auth,
        serde_json::json!({"auths": {reg.addr(): {"auth": base64::engine::general_purpose::STANDARD.encode("alice:s3cret")}}}).to_string(),
    )
    .unwrap();
    let f = RegistryFetcher::new(RegistryOptions {
        insecure: vec![reg.addr()],
        registries_conf: None,
        auth_files: Some(vec![auth]),
        ..Default::default()
    })
    .unwrap();
    let issued_before = issued.load(Ordering::SeqCst);
    for r in [0..100u64, 1000..5000, 0..gz.len() as u64] {
        let got = f.read_range(&loc, r.clone()).await.unwrap();
        assert!(got[..] == gz[r.start as usize..r.end as usize]);
    }
    // One token, cached for the later reads.
    assert_eq!(issued.load(Ordering::SeqCst) - issued_before, 1);

    // Wrong credentials: the issuer refuses, and the fetcher says so.
    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        serde_json::json!({"auths": {reg.addr(): {"auth": base64::engine::general_purpose::STANDARD.encode("alice:wrong")}}}).to_string(),
    )
    .unwrap();
    let f = RegistryFetcher::new(RegistryOptions {
        insecure: vec![reg.addr()],
        registries_conf: None,
        auth_files: Some(vec![bad]),
        ..Default::default()
    })
    .unwrap();
    assert!(matches!(
        f.read_range(&loc, 0..10).await,
        Err(FetchError::Unauthorized(_))
    ));

    // An identity token (docker's `identitytoken`, or one podman hands over) is an OAuth2
    // refresh token: traded at the realm by POST for a bearer token.
    let with_token = |token: &str| {
        let file = dir.path().join(format!("identity-{token}.json"));
        std::fs::write(
            &file,
            serde_json::json!({"auths": {reg.addr(): {"identitytoken": token}}}).to_string(),
        )
        .unwrap();
        RegistryFetcher::new(RegistryOptions {
            insecure: vec![reg.addr()],
            registries_conf: None,
            auth_files: Some(vec![file]),
            ..Default::default()
        })
        .unwrap()
    };
    let issued_before = issued.load(Ordering::SeqCst);
    let got = with_token("alice-refresh")
        .read_range(&loc, 0..100)
        .await
        .unwrap();
    assert!(got[..] == gz[..100]);
    assert_eq!(issued.load(Ordering::SeqCst) - issued_before, 1);
    assert!(matches!(
        with_token("stale-refresh").read_range(&loc, 0..10).await,
        Err(FetchError::Unauthorized(_))
    ));
}
