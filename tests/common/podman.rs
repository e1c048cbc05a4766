//! Real podman (the host's 4.3.1) with its own graph root per test, removed afterwards.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Podman {
    dir: tempfile::TempDir,
    /// Extra `--storage-opt` values (e.g. an additional layer store).
    pub storage_opts: Vec<String>,
    /// Extra `pull` arguments of [`Self::listing`] (e.g. `--authfile FILE`).
    pub pull_args: Vec<String>,
}

impl Podman {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // These machines have a low fd hard limit and no systemd: podman's defaults fail.
        std::fs::write(
            dir.path().join("containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=1024:4096\", \"nproc=1024:4096\"]\nnetns = \"none\"\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .unwrap();
        Podman {
            dir,
            storage_opts: Vec::new(),
            pull_args: Vec::new(),
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn command(&self) -> Command {
        let mut c = Command::new("podman");
        c.env("CONTAINERS_CONF", self.dir.path().join("containers.conf"))
            .arg("--root")
            .arg(self.root())
            .arg("--runroot")
            .arg(self.dir.path().join("runroot"))
            // Its own libpod state too: tests run podman concurrently, and a podman starting
            // with a fresh graph root resets a shared /run/libpod under another one's feet
            // ("creating runtime status file: open /run/libpod/alive").
            .arg("--tmpdir")
            .arg(self.dir.path().join("tmp"))
            .arg("--storage-driver")
            .arg("overlay");
        for o in &self.storage_opts {
            c.arg("--storage-opt").arg(o);
        }
        c
    }

    /// Runs podman with these arguments; panics with its output on failure.
    ///
    /// podman 4.3.1 under load sometimes loses the exit code of a finished `run --rm` container
    /// ("no such exit code": its cleanup process removed the container first) after the container
    /// did all its work; such a run is repeated (at most twice more), nothing else is.
    pub fn run(&self, args: &[&str]) -> Output {
        let retriable = args.first() == Some(&"run") && args.contains(&"--rm");
        let mut attempts = 0;
        loop {
            let out = self
                .command()
                .args(args)
                .output()
                .expect("podman (installed by .ci/run)");
            let stderr = String::from_utf8_lossy(&out.stderr);
            attempts += 1;
            if !out.status.success()
                && retriable
                && attempts < 3
                && stderr.contains("no such exit code")
            {
                eprintln!("podman lost an exit code (podman 4.3 bug); running again: {stderr}");
                continue;
            }
            assert!(
                out.status.success(),
                "podman {args:?} failed: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                stderr
            );
            return out;
        }
    }

    /// Pulls `image` and lists its files with their sha256, modes and owners (from inside a
    /// container).
    pub fn listing(&self, image: &str) -> String {
        let mut pull = vec!["pull", "-q", "--tls-verify=false"];
        pull.extend(self.pull_args.iter().map(String::as_str));
        pull.push(image);
        self.run(&pull);
        let out = self.run(&[
            "run",
            "--rm",
            "--network",
            "none",
            image,
            "/bin/busybox",
            "sh",
            "-c",
            LIST_FILES,
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Unmount whatever podman left mounted under its graph root, then the tree goes away.
        let _ = self.command().args(["rm", "-af"]).output();
        let _ = self.command().args(["rmi", "-af"]).output();
        let _ = self.command().args(["system", "reset", "-f"]).output();
        let root = self.root();
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let mut ours: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(1))
                .filter(|m| m.starts_with(root.to_str().unwrap_or("-")))
                .collect();
            ours.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in ours {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
    }
}

/// A listing of every file with its sha256, from inside a container.
pub const LIST_FILES: &str =
    "cd / && /bin/busybox find . -xdev \\( -path ./proc -o -path ./sys -o -path ./dev -o -path ./run -o -path ./etc/hosts -o -path ./etc/hostname -o -path ./etc/resolv.conf \\) -prune -o -type f -print | /bin/busybox sort | /bin/busybox xargs /bin/busybox sha256sum; /bin/busybox find /bin /data /etc/hello.txt /etc/hello-link /etc/xattr.txt /opaque /more | /bin/busybox sort | /bin/busybox xargs /bin/busybox stat -c '%A %u:%g %N'; /bin/busybox stat -c '%A %u:%g %N' /";
