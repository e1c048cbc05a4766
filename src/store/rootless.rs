//! A store run for rootless podman lives in podman's user and mount namespaces, which podman's
//! pause process keeps: there its files have the owners podman expects, and its mount is one
//! podman sees. `serve` run by a user joins them ([`join_podman`]; or it is started inside them,
//! `podman unshare soci-store serve …`). When the pause process goes (`podman system migrate`,
//! the user's session ending), podman makes new namespaces in which the mount does not exist,
//! and the store must be started again: [`namespace_gone`] tells when.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// How often the pause process is looked at.
const EVERY: Duration = Duration::from_secs(2);

/// The pause process's pid file of the rootless podman whose namespaces this process is in.
fn pause_pid_file() -> Option<PathBuf> {
    let runtime = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty())?;
    Some(Path::new(&runtime).join("libpod/tmp/pause.pid"))
}

/// The pid in `file`, if that process is alive.
fn live_pid(file: &Path) -> Option<String> {
    let pid = std::fs::read_to_string(file).ok()?.trim().to_string();
    user_ns(&pid).map(|_| pid)
}

/// Joins the user and mount namespaces of this user's rootless podman, starting its pause
/// process (`podman --storage-opt "" unshare true`) when there is none. Must run before the process starts any
/// thread: the kernel lets only a single-threaded process change its user namespace.
pub fn join_podman() -> Result<()> {
    let file = pause_pid_file().context(
        "XDG_RUNTIME_DIR is not set: a store run by a user serves that user's rootless podman, which keeps its state there",
    )?;
    let pid = match live_pid(&file) {
        Some(pid) => pid,
        None => {
            // Without storage options: podman checks its additional layer stores first, and
            // this one's mount is not there yet (or is a dead one this store is to replace).
            let status = Command::new("podman")
                .args(["--storage-opt", "", "unshare", "true"])
                .status()
                .context("starting rootless podman's pause process (`podman unshare true`)")?;
            if !status.success() {
                bail!("`podman unshare true` failed ({status}): rootless podman does not work for this user");
            }
            live_pid(&file).with_context(|| {
                format!(
                    "rootless podman left no pause process in {} (is `pause_image`/`no_pivot_root` set up differently?)",
                    file.display()
                )
            })?
        }
    };
    let open = |ns: &str| {
        std::fs::File::open(format!("/proc/{pid}/ns/{ns}"))
            .with_context(|| format!("opening the {ns} namespace of podman's pause process {pid}"))
    };
    let (user, mnt) = (open("user")?, open("mnt")?);
    let cwd = std::env::current_dir().ok();
    nix::sched::setns(&user, nix::sched::CloneFlags::CLONE_NEWUSER)
        .with_context(|| format!("joining the user namespace of podman's pause process {pid}"))?;
    nix::sched::setns(&mnt, nix::sched::CloneFlags::CLONE_NEWNS)
        .with_context(|| format!("joining the mount namespace of podman's pause process {pid}"))?;
    // The working directory still names the old mount namespace's tree.
    if let Some(cwd) = cwd {
        std::env::set_current_dir(&cwd).with_context(|| format!("entering {}", cwd.display()))?;
    }
    tracing::info!("serving rootless podman: joined the namespaces of its pause process {pid}");
    Ok(())
}

/// The user namespace of `pid` (the target of `/proc/<pid>/ns/user`).
fn user_ns(pid: &str) -> Option<PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/user")).ok()
}

/// Whether the pause process named in `file` still keeps the user namespace `ours`.
fn still_ours(file: &Path, ours: &Path) -> bool {
    let Ok(pid) = std::fs::read_to_string(file) else {
        return false;
    };
    user_ns(pid.trim()).is_some_and(|ns| ns == ours)
}

/// In a user namespace kept by podman's pause process: resolves, with the reason, once that
/// process is gone. None (nothing to watch) on the host or without a pause process.
pub fn namespace_gone() -> Option<impl std::future::Future<Output = String>> {
    if !crate::paths::in_user_namespace() {
        return None;
    }
    let file = pause_pid_file()?;
    let ours = user_ns("self")?;
    if !still_ours(&file, &ours) {
        tracing::info!(
            "{} names no process of this user namespace: not watching for podman's namespace to go",
            file.display()
        );
        return None;
    }
    Some(async move {
        loop {
            tokio::time::sleep(EVERY).await;
            if !still_ours(&file, &ours) {
                return format!(
                    "podman's pause process ({}) is gone, and with it the user namespace this store serves in: start the store again (`podman unshare soci-store serve …`; the systemd user unit restarts it)",
                    file.display()
                );
            }
        }
    })
}
