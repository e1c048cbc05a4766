//! The podman 5 chroots (`.ci/podman-chroot.sh`), entered the way podman needs them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Debian 13 chroot with podman 5 that `.ci/podman-chroot.sh trixie` makes, bind-mounted the way
/// podman needs it; everything is unmounted on drop.
pub struct Chroot {
    pub root: PathBuf,
    pub mounts: Vec<PathBuf>,
    /// One test at a time in a chroot: its mounts and the store's mountpoint in it are shared.
    _turn: std::sync::MutexGuard<'static, ()>,
}

static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Chroot {
    pub fn enter() -> Chroot {
        Self::enter_at(
            "SOCI_PODMAN5_ROOT",
            "/var/cache/soci-store-ci/trixie",
            ".ci/podman-chroot.sh trixie",
        )
    }

    /// The chroot named by the environment variable `var` (`default` without it), which `.ci/run`
    /// makes with `script`.
    pub fn enter_at(var: &str, default: &str, script: &str) -> Chroot {
        let root = PathBuf::from(std::env::var(var).unwrap_or_else(|_| default.into()));
        assert!(
            root.join("usr/bin/podman").exists(),
            "no podman chroot at {} (.ci/run makes it with {script})",
            root.display()
        );
        let turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
        let mut c = Chroot {
            root: root.clone(),
            mounts: Vec::new(),
            _turn: turn,
        };
        let r = |p: &str| root.join(p);
        c.mount(
            &["--bind", root.to_str().unwrap(), root.to_str().unwrap()],
            &root,
        );
        sh(Command::new("mount").args(["--make-private"]).arg(&root));
        c.mount(
            &["-t", "proc", "proc", r("proc").to_str().unwrap()],
            &r("proc"),
        );
        c.mount(&["--rbind", "/sys", r("sys").to_str().unwrap()], &r("sys"));
        sh(Command::new("mount").args(["--make-rslave"]).arg(r("sys")));
        c.mount(&["--bind", "/dev", r("dev").to_str().unwrap()], &r("dev"));
        c.mount(
            &["--bind", "/dev/pts", r("dev/pts").to_str().unwrap()],
            &r("dev/pts"),
        );
        c.mount(
            &["-t", "tmpfs", "tmpfs", r("run").to_str().unwrap()],
            &r("run"),
        );
        std::fs::create_dir_all(r("etc/soci-test")).unwrap();
        std::fs::write(
            r("etc/soci-test/containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=1024:4096\", \"nproc=1024:4096\"]\nnetns = \"none\"\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .unwrap();
        c
    }

    /// podman 5's file listing of `image` from inside a container ([`super::podman::LIST_FILES`]).
    pub fn run_listing(&self, image: &str) -> String {
        let out = self.podman(&[
            "run",
            "--rm",
            "--network",
            "none",
            image,
            "/bin/busybox",
            "sh",
            "-c",
            super::podman::LIST_FILES,
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn mount(&mut self, args: &[&str], at: &Path) {
        sh(Command::new("mount").args(args));
        self.mounts.push(at.to_path_buf());
    }

    /// podman 5 inside the chroot with its own graph root and the store.
    pub fn podman(&self, args: &[&str]) -> std::process::Output {
        self.podman_with(&[], args)
    }

    /// [`Self::podman`] with more environment variables (`NAME=VALUE`).
    pub fn podman_with(&self, env: &[&str], args: &[&str]) -> std::process::Output {
        let out = Command::new("chroot")
            .arg(&self.root)
            .args([
                "env",
                "PODMAN_IGNORE_CGROUPSV1_WARNING=1",
                "CONTAINERS_CONF=/etc/soci-test/containers.conf",
            ])
            .args(env)
            .arg("podman")
            .args([
                "--root",
                "/var/lib/soci-test/root",
                "--runroot",
                "/run/soci-test",
                "--storage-driver",
                "overlay",
            ])
            .args([
                "--storage-opt",
                "overlay.additionallayerstore=/var/lib/soci-store/store:ref",
            ])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "podman 5 {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        let _ = Command::new("chroot")
            .arg(&self.root)
            .args([
                "env",
                "CONTAINERS_CONF=/etc/soci-test/containers.conf",
                "podman",
                "--root",
                "/var/lib/soci-test/root",
            ])
            .args(["--runroot", "/run/soci-test", "system", "reset", "-f"])
            .output();
        // Whatever podman left mounted below the graph root, then ours in reverse order.
        let graph = self.root.join("var/lib/soci-test");
        if let Ok(m) = std::fs::read_to_string("/proc/self/mounts") {
            let mut left: Vec<&str> = m
                .lines()
                .filter_map(|l| l.split(' ').nth(1))
                .filter(|p| p.starts_with(graph.to_str().unwrap_or("-")))
                .collect();
            left.sort_by_key(|p| std::cmp::Reverse(p.len()));
            for p in left {
                let _ = Command::new("umount").arg("-l").arg(p).status();
            }
        }
        for m in self.mounts.iter().rev() {
            let ok = Command::new("umount")
                .arg("-R")
                .arg(m)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
        let _ = std::fs::remove_dir_all(graph);
    }
}
