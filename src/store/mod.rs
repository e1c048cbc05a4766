//! The podman store: a FUSE "additional layer store" (podman-store.md) serving SOCI-indexed
//! layers lazily. `layers` resolves what podman asks for, `tree` shapes a layer's files the way
//! overlayfs wants them, `fs` answers the kernel.

pub mod fs;
pub mod layers;
pub mod metrics;
pub mod tree;

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use fuser::{Config as FuseConfig, MountOption, SessionACL};

pub use fs::StoreFs;
pub use layers::StoreContext;

/// Unmounts a dead FUSE mount (ENOTCONN) left at `path` by a crashed daemon, and makes sure the
/// mountpoint is a directory.
pub fn prepare_mountpoint(path: &Path) -> Result<()> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => bail!("{} is not a directory", path.display()),
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            tracing::warn!("{}: replacing a stale mount", path.display());
            let ok = std::process::Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(path)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                let status = std::process::Command::new("umount")
                    .arg("-l")
                    .arg(path)
                    .status()?;
                if !status.success() {
                    bail!("cannot unmount the stale mount at {}", path.display());
                }
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("checking {}", path.display())),
    }
}

/// FUSE options for podman: others may read, devices and setuid work, read-write so that the
/// `use` create reaches the daemon, kernel permission checks by mode.
pub fn fuse_config(threads: usize) -> FuseConfig {
    let mut c = FuseConfig::default();
    c.mount_options = vec![
        MountOption::FSName("soci-store".into()),
        MountOption::Subtype("soci-store".into()),
        MountOption::RW,
        MountOption::Dev,
        MountOption::Suid,
        MountOption::DefaultPermissions,
    ];
    c.acl = SessionACL::All;
    c.n_threads = Some(threads.max(1));
    c
}

/// Tells a service manager we are ready, when it asked (`NOTIFY_SOCKET`).
pub fn notify_ready() {
    let Some(sock) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let d = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(d) => d,
        Err(e) => return tracing::warn!("sd_notify: {e}"),
    };
    let bytes = sock.as_encoded_bytes();
    let result = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|a| d.send_to_addr(b"READY=1", &a))
    } else {
        d.send_to(b"READY=1", Path::new(&sock))
    };
    if let Err(e) = result {
        tracing::warn!("sd_notify: {e}");
    }
}

/// Mounts the store at `mountpoint` and serves until SIGINT or SIGTERM, then unmounts. With a
/// `metrics_address`, also serves Prometheus metrics there.
pub fn serve(
    ctx: Arc<StoreContext>,
    mountpoint: &Path,
    threads: usize,
    metrics_address: Option<String>,
) -> Result<()> {
    prepare_mountpoint(mountpoint)?;
    if let Some(addr) = metrics_address {
        let (stats, spans) = (ctx.stats.clone(), ctx.spans.clone());
        let listener = ctx
            .runtime
            .spawn(metrics::serve_metrics(addr.clone(), stats, spans));
        ctx.runtime.spawn(async move {
            if let Ok(Err(e)) = listener.await {
                tracing::error!("metrics endpoint {addr}: {e}");
            }
        });
    }
    let fs = StoreFs::new(ctx.clone());
    let session = fuser::spawn_mount(fs, mountpoint, &fuse_config(threads))
        .with_context(|| format!("mounting the store at {}", mountpoint.display()))?;
    tracing::info!("serving at {}", mountpoint.display());
    notify_ready();
    ctx.runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        Ok::<_, std::io::Error>(())
    })?;
    tracing::info!("unmounting {}", mountpoint.display());
    session.umount_and_join().context("unmounting")?;
    Ok(())
}
