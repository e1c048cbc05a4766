//! The podman store: a FUSE "additional layer store" (podman-store.md) serving SOCI-indexed
//! layers lazily. `context` holds what the store needs and resolves what podman asks for into a
//! `layers::Layer`; `background` completes resolved layers while the store is idle; `tree` shapes
//! a layer's files the way overlayfs wants them; `fs` answers the kernel (`inodes`: the inode
//! table; `restore`: rebuilding it after a restart); `journal` and `handoff` survive restarts.

pub mod auth_socket;
mod background;
mod chunked;
mod context;
pub mod fs;
pub mod handoff;
mod inodes;
pub mod journal;
mod layers;
pub mod local;
pub mod metrics;
mod open_files;
mod restore;
pub mod rootless;
pub mod tree;

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use fuser::{Config as FuseConfig, MountOption, SessionACL};

pub use context::StoreContext;
pub use fs::StoreFs;
use handoff::StatePaths;
use journal::{Journal, Record};

/// Makes `mountpoint` ready for a fresh mount: a soci-store mount still there (a daemon that died
/// without a holder, or whose holder was let go) is detached without touching it — touching a mount
/// whose daemon is gone blocks or fails — as is any other dead FUSE mount; the directory is made
/// when missing.
pub fn prepare_mountpoint(path: &Path) -> Result<()> {
    if handoff::mount_at(path).is_some_and(|m| m.is_ours()) {
        tracing::warn!(
            "{}: replacing the mount an earlier daemon left",
            path.display()
        );
        detach(path)?;
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => bail!("{} is not a directory", path.display()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTCONN | libc::ECONNABORTED)) => {
            tracing::warn!("{}: replacing a dead FUSE mount", path.display());
            detach(path)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("checking {}", path.display())),
    }
}

/// Lazily unmounts whatever is mounted at `path`.
fn detach(path: &Path) -> Result<()> {
    let ok = |c: &mut std::process::Command| c.status().map(|s| s.success()).unwrap_or(false);
    if ok(std::process::Command::new("fusermount3")
        .args(["-u", "-z"])
        .arg(path))
        || ok(std::process::Command::new("umount").arg("-l").arg(path))
    {
        return Ok(());
    }
    bail!("cannot unmount the stale mount at {}", path.display())
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

/// How `serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// FUSE worker threads.
    pub threads: usize,
    /// `host:port` for Prometheus metrics.
    pub metrics_address: Option<String>,
    /// Where the handoff socket and inode journal live; without it a restarted daemon mounts
    /// afresh and running containers lose their layers.
    pub state_dir: Option<PathBuf>,
}

/// Mounts the store at `mountpoint` (or takes over the mount a previous daemon left there) and
/// serves until SIGINT or SIGTERM, then unmounts. SIGUSR1 exits leaving the mount to the next
/// daemon.
pub fn serve(ctx: Arc<StoreContext>, mountpoint: &Path, opts: &ServeOptions) -> Result<()> {
    let mountpoint = std::path::absolute(mountpoint)?;
    let mountpoint = mountpoint.as_path();
    if let Some(addr) = opts.metrics_address.clone() {
        // Bound before mounting: an address that cannot be used stops the start.
        let listener = ctx
            .runtime
            .block_on(tokio::net::TcpListener::bind(&addr))
            .with_context(|| format!("metrics endpoint {addr}"))?;
        let (stats, spans) = (ctx.stats.clone(), ctx.spans.clone());
        let server = ctx
            .runtime
            .spawn(metrics::serve_metrics_on(listener, stats, spans));
        ctx.runtime.spawn(async move {
            if let Ok(Err(e)) = server.await {
                tracing::error!("metrics endpoint {addr}: {e}");
            }
        });
    }
    let paths = match &opts.state_dir {
        Some(dir) => match create_state_dir(dir) {
            Ok(()) => Some(StatePaths::new(dir, mountpoint)),
            Err(e) => {
                tracing::warn!("{e:#}: a restarted daemon will not keep this mount");
                None
            }
        },
        None => None,
    };
    let mut session = None;
    if let Some(p) = &paths {
        match resume(&ctx, mountpoint, opts.threads, p) {
            Ok(Some(s)) => {
                tracing::info!("took over the mount at {}", mountpoint.display());
                session = Some(s);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(
                    "cannot take over the mount at {}: {e:#}",
                    mountpoint.display()
                );
                handoff::release(&p.socket);
            }
        }
    }
    let session = match session {
        Some(s) => s,
        None => mount(&ctx, mountpoint, opts.threads, paths.as_ref())?,
    };
    if let Some(p) = &paths {
        if let Err(e) = auth_socket::listen(&p.auth, &ctx.runtime) {
            tracing::warn!("{e:#}: podman cannot hand credentials over to this store");
        }
    }
    tracing::info!("serving at {}", mountpoint.display());
    notify_ready();
    let mut namespace_gone = None;
    let handover = ctx.runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut usr1 = signal(SignalKind::user_defined1())?;
        let gone = async {
            match rootless::namespace_gone() {
                Some(f) => f.await,
                None => std::future::pending().await,
            }
        };
        let handover = tokio::select! {
            _ = term.recv() => false,
            _ = int.recv() => false,
            _ = usr1.recv() => true,
            why = gone => {
                namespace_gone = Some(why);
                false
            }
        };
        Ok::<_, std::io::Error>(handover)
    })?;
    if handover && paths.is_some() {
        tracing::info!(
            "leaving the mount at {} to the next daemon",
            mountpoint.display()
        );
        // Dropping the session would unmount.
        std::mem::forget(session);
        return Ok(());
    }
    tracing::info!("unmounting {}", mountpoint.display());
    // Not joined: while containers still use its layers the connection outlives the unmount,
    // and it ends when this process exits.
    drop(session);
    if handoff::mount_at(mountpoint).is_some_and(|m| m.is_ours()) {
        detach(mountpoint)?;
    }
    if let Some(p) = &paths {
        handoff::release(&p.socket);
        let _ = std::fs::remove_file(&p.journal);
        let _ = std::fs::remove_file(&p.auth);
    }
    match namespace_gone {
        Some(why) => bail!("{why}"),
        None => Ok(()),
    }
}

fn create_state_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the state directory {}", dir.display()))
}

/// A fresh mount; with state paths, journaled and kept alive by a holder process.
fn mount(
    ctx: &Arc<StoreContext>,
    mountpoint: &Path,
    threads: usize,
    paths: Option<&StatePaths>,
) -> Result<fuser::BackgroundSession> {
    prepare_mountpoint(mountpoint)?;
    let mut fs = StoreFs::new(ctx.clone());
    let journal = match paths.map(|p| Journal::create(&p.journal)) {
        Some(Ok(j)) => Some(Arc::new(j)),
        Some(Err(e)) => {
            tracing::warn!("inode journal: {e}; a restarted daemon will not keep this mount");
            None
        }
        None => None,
    };
    if let Some(j) = &journal {
        fs = fs.with_journal(j.clone());
    }
    let kernel = fs.kernel_handshake();
    let session = fuser::Session::new(fs, mountpoint, &fuse_config(threads)).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied
            && std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/fuse")
                .is_err()
        {
            " (this user cannot open /dev/fuse: it must be mode 0666, as Debian makes it, for a store run by a user; see docs/rootless.md)"
        } else {
            ""
        };
        anyhow::Error::new(e).context(format!(
            "mounting the store at {}{hint}",
            mountpoint.display()
        ))
    })?;
    if let (Some(p), Some(j)) = (paths, &journal) {
        let kept = (|| {
            let (abi, capabilities) = kernel
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .context("no FUSE handshake")?;
            let dev = handoff::mount_at(mountpoint)
                .context("the mount is not listed")?
                .dev;
            j.append(&Record::Mount {
                dev,
                abi,
                capabilities,
            })?;
            handoff::spawn_holder(session.as_fd(), &p.socket)
        })();
        if let Err(e) = kept {
            tracing::warn!("{e:#}: a restarted daemon will not keep this mount");
        }
    }
    Ok(session.spawn()?)
}

/// Takes over the mount a previous daemon left at `mountpoint`, if its holder still runs.
fn resume(
    ctx: &Arc<StoreContext>,
    mountpoint: &Path,
    threads: usize,
    p: &StatePaths,
) -> Result<Option<fuser::BackgroundSession>> {
    let Some(fuse) = handoff::take_over(&p.socket)? else {
        return Ok(None);
    };
    let records =
        Journal::load(&p.journal).with_context(|| format!("reading {}", p.journal.display()))?;
    let Some(Record::Mount {
        dev,
        abi,
        capabilities,
    }) = records.first()
    else {
        bail!("{} does not start with the mount", p.journal.display());
    };
    match handoff::mount_at(mountpoint) {
        Some(m) if &m.dev == dev && m.is_ours() => {}
        other => bail!(
            "{} is no longer the mount the previous daemon served (now {other:?})",
            mountpoint.display()
        ),
    }
    let fs = StoreFs::restore(ctx.clone(), &records)
        .with_journal(Arc::new(Journal::reopen(&p.journal)?));
    // fuser starts a session with the FUSE handshake, which the kernel does not repeat: give it
    // the handshake on a socket, then point the session's descriptor at the live connection.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    (&ours).write_all(&handoff::synthetic_init(*abi, *capabilities))?;
    let cfg = fuse_config(threads);
    let session = fuser::Session::from_fd(fs, OwnedFd::from(theirs), cfg.acl, cfg.clone())
        .context("starting the resumed FUSE session")?;
    drop(ours);
    crate::sys::fd::repoint(session.as_fd(), fuse.as_fd())?;
    let session = session.spawn()?;
    handoff::resend_pending(fuse.as_fd());
    Ok(Some(session))
}
