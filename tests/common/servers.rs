//! Real servers for the tests: the Debian `docker-registry` (CNCF distribution), moto's S3
//! server, nginx. Each runs on a free loopback port, logs to a file, and is killed on drop.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed (and reaped) on drop, even when the test fails.
pub struct Server {
    child: Child,
    pub port: u16,
    pub log: PathBuf,
    /// How to start it again (program, arguments).
    argv: Vec<std::ffi::OsString>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes an auth file (podman's and docker's format) with `user:password` for `registry`.
pub fn auth_file(path: &Path, registry: &str, user: &str, password: &str) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    std::fs::write(
        path,
        serde_json::json!({"auths": {registry: {"auth": b64}}}).to_string(),
    )
    .unwrap();
}

/// Lines of a registry access log that downloaded blob `digest` whole (answered 200; a lazily
/// served layer gets only ranged 206s).
pub fn whole_blob_gets(log: &str, digest: &str) -> usize {
    log.lines()
        .filter(|l| l.contains(&format!("/blobs/{digest} ")) && l.contains("\" 200 "))
        .count()
}

impl Server {
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Where a filesystem-backed registry keeps the bytes of blob `digest`.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self._dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the stopped server again on the same port and data.
    pub fn restart(&mut self) {
        self.stop();
        let mut cmd = Command::new(&self.argv[0]);
        cmd.args(&self.argv[1..]).env_remove("AWS_CA_BUNDLE");
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.log)
            .unwrap();
        cmd.stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null());
        self.child = cmd.spawn().unwrap();
        wait_for_port(self.port, &mut self.child, &self.log);
    }
}

/// Waits until something accepts TCP connections on `port` (readiness, bounded).
fn wait_for_port(port: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "server exited with {status} before listening: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "server did not listen on {port} in 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn spawn(mut cmd: Command, dir: tempfile::TempDir, port: u16) -> Server {
    let log = dir.path().join("server.log");
    let f = std::fs::File::create(&log).unwrap();
    cmd.stdout(f.try_clone().unwrap())
        .stderr(f)
        .stdin(Stdio::null());
    let argv = std::iter::once(cmd.get_program().to_os_string())
        .chain(cmd.get_args().map(|a| a.to_os_string()))
        .collect();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e} (does .ci/run install it?)"));
    wait_for_port(port, &mut child, &log);
    Server {
        child,
        port,
        log,
        argv,
        _dir: dir,
    }
}

/// Registry options.
#[derive(Default)]
pub struct RegistryOpts {
    /// Basic auth with this user and password (htpasswd, bcrypt).
    pub htpasswd: Option<(String, String)>,
    /// Store data in this S3 endpoint/bucket and redirect blob GETs to presigned URLs.
    pub s3: Option<(String, String)>,
    /// Token auth: (realm URL, PEM bundle of the issuer's certificate).
    pub token: Option<(String, String)>,
}

pub fn registry(opts: RegistryOpts) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let storage = match &opts.s3 {
        None => format!(
            "filesystem: {{rootdirectory: {}}}\n  delete: {{enabled: true}}\n  redirect: {{disable: true}}",
            dir.path().join("data").display()
        ),
        Some((endpoint, bucket)) => format!(
            "s3: {{accesskey: testing, secretkey: testing, region: us-east-1, regionendpoint: \"{endpoint}\", bucket: {bucket}, secure: false, v4auth: true, forcepathstyle: true}}\n  delete: {{enabled: true}}\n  redirect: {{disable: false}}"
        ),
    };
    let auth = match &opts.htpasswd {
        None if opts.token.is_some() => {
            let (realm, bundle) = opts.token.as_ref().unwrap();
            format!("auth:\n  token: {{realm: \"{realm}\", service: soci-test-registry, issuer: soci-test-issuer, rootcertbundle: {bundle}}}\n")
        }
        None => String::new(),
        Some((user, pass)) => {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .output()
                .expect("htpasswd (apache2-utils)");
            assert!(out.status.success());
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, &out.stdout).unwrap();
            format!(
                "auth:\n  htpasswd: {{realm: test, path: {}}}\n",
                file.display()
            )
        }
    };
    let cfg = format!(
        "version: 0.1\nlog: {{level: info, accesslog: {{disabled: false}}}}\nstorage:\n  {storage}\nhttp: {{addr: 127.0.0.1:{port}}}\n{auth}"
    );
    let cfg_path = dir.path().join("config.yml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let mut cmd = Command::new("docker-registry");
    cmd.arg("serve").arg(&cfg_path).env_remove("AWS_CA_BUNDLE");
    spawn(cmd, dir, port)
}

pub fn moto_bin() -> PathBuf {
    std::env::var_os("MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/soci-store-ci/venv/bin/moto_server"))
}

/// moto's S3 server, with the given buckets created.
pub async fn moto(buckets: &[&str]) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut cmd = Command::new(moto_bin());
    cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    let server = spawn(cmd, dir, port);
    let http = reqwest::Client::new();
    for b in buckets {
        let resp = http
            .put(format!("http://127.0.0.1:{port}/{b}"))
            .send()
            .await
            .unwrap();
        assert!(
            resp.status().is_success(),
            "creating bucket {b}: {}",
            resp.status()
        );
    }
    server
}

/// nginx serving `root` on a free port.
pub fn nginx(root: &Path) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = dir.path().display();
    let conf = format!(
        "daemon off; pid {d}/nginx.pid; error_log {d}/error.log; worker_processes 1;\n\
         events {{ worker_connections 64; }}\n\
         http {{ access_log {d}/access.log; client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
         server {{ listen 127.0.0.1:{port}; root {root}; }} }}\n",
        root = root.display()
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let mut cmd = Command::new("nginx");
    cmd.arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(dir.path().join("error.log"));
    spawn(cmd, dir, port)
}

pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// Pushes blobs and a manifest through the distribution API (monolithic uploads).
pub struct Pusher {
    pub base: String,
    pub auth: Option<(String, String)>,
    pub bearer: Option<String>,
    http: reqwest::Client,
}

impl Pusher {
    pub fn new(registry: &Server) -> Self {
        Pusher {
            base: format!("http://{}", registry.addr()),
            auth: None,
            bearer: None,
            http: reqwest::Client::new(),
        }
    }

    fn req(&self, m: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(m, url);
        match (&self.auth, &self.bearer) {
            (Some((u, p)), _) => r.basic_auth(u, Some(p)),
            (None, Some(t)) => r.bearer_auth(t),
            (None, None) => r,
        }
    }

    pub async fn blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256_digest(data);
        let resp = self
            .req(
                reqwest::Method::POST,
                &format!("{}/v2/{repo}/blobs/uploads/", self.base),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            202,
            "{}",
            resp.text().await.unwrap_or_default()
        );
        let loc = resp.headers()["location"].to_str().unwrap().to_string();
        let url = if loc.starts_with("http") {
            loc
        } else {
            format!("{}{loc}", self.base)
        };
        let sep = if url.contains('?') { '&' } else { '?' };
        let resp = self
            .req(reqwest::Method::PUT, &format!("{url}{sep}digest={digest}"))
            .header("Content-Type", "application/octet-stream")
            .body(data.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            201,
            "{}",
            resp.text().await.unwrap_or_default()
        );
        digest
    }

    /// Pushes an image with these gzip layers; returns (manifest digest, layer digests).
    pub async fn image(
        &self,
        repo: &str,
        tag: &str,
        layers: &[Vec<u8>],
        diff_ids: &[String],
    ) -> (String, Vec<String>) {
        let gzip = serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"});
        let layers: Vec<(Vec<u8>, serde_json::Value)> =
            layers.iter().map(|l| (l.clone(), gzip.clone())).collect();
        self.image_with(repo, tag, &layers, diff_ids).await
    }

    /// [`Self::image`] with each layer's descriptor fields (media type, annotations) given.
    pub async fn image_with(
        &self,
        repo: &str,
        tag: &str,
        layers: &[(Vec<u8>, serde_json::Value)],
        diff_ids: &[String],
    ) -> (String, Vec<String>) {
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "config": {}
        })
        .to_string();
        let config_digest = self.blob(repo, config.as_bytes()).await;
        let mut descs = Vec::new();
        let mut digests = Vec::new();
        for (l, fields) in layers {
            let d = self.blob(repo, l).await;
            let mut desc = fields.clone();
            desc["digest"] = d.clone().into();
            desc["size"] = l.len().into();
            descs.push(desc);
            digests.push(d);
        }
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len()},
            "layers": descs,
        })
        .to_string();
        let resp = self
            .req(
                reqwest::Method::PUT,
                &format!("{}/v2/{repo}/manifests/{tag}", self.base),
            )
            .header("Content-Type", "application/vnd.oci.image.manifest.v1+json")
            .body(manifest.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16(),
            201,
            "{}",
            resp.text().await.unwrap_or_default()
        );
        (sha256_digest(manifest.as_bytes()), digests)
    }
}
