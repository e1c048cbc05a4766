//! The store daemon (`soci-store serve` on a real FUSE mount) and its metrics endpoint, as the
//! end-to-end tests run them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The store daemon; killed and its mount removed on drop, even when the test fails (unless
/// [`Daemon::crash`] left the mount to a successor).
pub struct Daemon {
    pub child: Child,
    pub mnt: PathBuf,
    pub log: PathBuf,
    /// The holder's handoff socket directory (the config's `state_dir`).
    pub state: PathBuf,
    pub keep_mount: bool,
}

pub fn mounted(mnt: &Path) -> bool {
    let m = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    m.lines()
        .any(|l| l.split(' ').nth(1) == Some(mnt.to_str().unwrap()))
}

/// The config file's `state_dir`.
fn state_dir(cfg: &Path) -> PathBuf {
    let text = std::fs::read_to_string(cfg).unwrap();
    let doc: toml::Table = toml::from_str(&text).unwrap();
    let dir = doc["state_dir"]
        .as_str()
        .expect("the test config sets state_dir");
    PathBuf::from(dir)
}

impl Daemon {
    pub fn start(cfg: &Path, mnt: &Path, log: &Path) -> Daemon {
        Self::start_with(cfg, mnt, log, &[])
    }

    /// Starts `soci-store serve` and waits for its readiness notification (`NOTIFY_SOCKET`).
    pub fn start_with(cfg: &Path, mnt: &Path, log: &Path, extra: &[&str]) -> Daemon {
        // A mount left by a crashed daemon is not touched: stat would wait for the next daemon.
        if !mounted(mnt) {
            std::fs::create_dir_all(mnt).unwrap();
        }
        let f = std::fs::File::create(log).unwrap();
        let notify_path = log.with_extension("notify");
        let _ = std::fs::remove_file(&notify_path);
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_soci-store"))
            .arg("--config")
            .arg(cfg)
            .arg("serve")
            .arg(mnt)
            .args(extra)
            .env("SOCI_STORE_LOG", "info")
            .env("NOTIFY_SOCKET", &notify_path)
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child,
            mnt: mnt.to_path_buf(),
            log: log.to_path_buf(),
            state: state_dir(cfg),
            keep_mount: false,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 64];
        loop {
            if let Ok(n) = notify.recv(&mut buf) {
                if &buf[..n] == b"READY=1" {
                    break;
                }
            }
            if let Ok(Some(s)) = d.child.try_wait() {
                panic!("soci-store serve exited with {s}: {}", d.log_text());
            }
            assert!(Instant::now() < deadline, "not ready after 60 s");
        }
        assert!(mounted(mnt), "ready but not mounted");
        d
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().unwrap()
    }

    /// SIGKILL: a crash. The mount stays for the next daemon.
    pub fn crash(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.keep_mount = true;
    }

    /// Handoff sockets of running holders.
    pub fn holders(&self) -> Vec<PathBuf> {
        std::fs::read_dir(&self.state)
            .map(|d| {
                d.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                    // Not the credential hand-off socket.
                    .filter(|p| !p.to_string_lossy().ends_with(".auth.sock"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.keep_mount {
            return;
        }
        if mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        // The holder: told to let go of the connection (its protocol: "q", then EOF).
        for sock in self.holders() {
            if let Ok(mut c) = std::os::unix::net::UnixStream::connect(&sock) {
                use std::io::{Read, Write};
                let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = c.write_all(b"q");
                let _ = c.read_to_end(&mut Vec::new());
            }
        }
    }
}

/// The daemon's Prometheus endpoint.
pub struct Metrics {
    pub port: u16,
}

impl Metrics {
    /// Turns the endpoint on in the config file `cfg`.
    pub fn enable(cfg: &Path) -> Metrics {
        let port = super::servers::free_port();
        let text = std::fs::read_to_string(cfg).unwrap();
        std::fs::write(
            cfg,
            format!("metrics_address = \"127.0.0.1:{port}\"\n{text}"),
        )
        .unwrap();
        Metrics { port }
    }

    pub async fn text(&self) -> String {
        reqwest::get(format!("http://127.0.0.1:{}/metrics", self.port))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn value(text: &str, name: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
            .parse()
            .unwrap()
    }

    /// Polls until `name` reaches `at_least`; fails after `within`.
    pub async fn wait_for(&self, name: &str, at_least: f64, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let text = self.text().await;
            if Self::value(&text, name) >= at_least {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name} below {at_least} after {within:?}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
