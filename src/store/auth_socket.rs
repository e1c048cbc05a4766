//! The daemon's end of podman's credential hand-off (`fetch::handover`): a Unix socket in the
//! state directory (mode 0700, so only the daemon's user reaches it) that takes the JSON
//! podman gives `soci-store-auth-helper`, and the helper's end that delivers it to every store
//! running with that state directory.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::fetch::handover::{self, MAX_MESSAGE_BYTES};

/// How the sockets are named in the state directory: `<mountpoint id>` + this.
pub const SUFFIX: &str = ".auth.sock";
/// Longest a hand-over may take on either end (podman waits for the helper while it pulls).
const TIMEOUT: Duration = Duration::from_secs(5);

/// Listens at `path` (replacing a socket an earlier daemon left) and keeps what arrives.
pub fn listen(path: &Path, runtime: &tokio::runtime::Handle) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    let listener = {
        let _guard = runtime.enter();
        tokio::net::UnixListener::bind(path)
            .with_context(|| format!("listening at {}", path.display()))?
    };
    runtime.spawn(async move {
        loop {
            let conn = match listener.accept().await {
                Ok((conn, _)) => conn,
                Err(e) => {
                    // Out of descriptors, say: do not spin on it.
                    tracing::warn!("credential hand-off socket: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                if let Err(e) = tokio::time::timeout(TIMEOUT, answer(conn)).await {
                    tracing::warn!("credential hand-off: {e}");
                }
            });
        }
    });
    Ok(())
}

async fn answer(mut conn: tokio::net::UnixStream) {
    let mut message = Vec::new();
    let read = (&mut conn)
        .take(MAX_MESSAGE_BYTES as u64 + 1)
        .read_to_end(&mut message)
        .await;
    let reply = match read {
        Err(e) => format!("error: reading the hand-over: {e}\n"),
        Ok(_) => match handover::accept(&message) {
            Ok(named) => {
                tracing::info!("podman handed over credentials for {}", named.join(", "));
                format!("ok {}\n", named.len())
            }
            Err(e) => {
                tracing::warn!("refused a credential hand-off: {e}");
                format!("error: {e}\n")
            }
        },
    };
    let _ = conn.write_all(reply.as_bytes()).await;
}

/// Every hand-over socket in `state_dir`.
pub fn sockets(state_dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(state_dir)
        .with_context(|| format!("reading the state directory {}", state_dir.display()))?;
    let mut found: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(SUFFIX))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// The helper's end: gives `message` to every store of `state_dir`; returns how many took it.
/// Sockets nobody listens at (a daemon gone) are passed over; none taking it is an error.
pub fn deliver(state_dir: &Path, message: &[u8]) -> Result<usize> {
    let mut delivered = 0;
    let mut errors = Vec::new();
    for socket in sockets(state_dir)? {
        match deliver_to(&socket, message) {
            Ok(()) => delivered += 1,
            Err(e) => errors.push(format!("{}: {e:#}", socket.display())),
        }
    }
    if delivered == 0 {
        if errors.is_empty() {
            bail!(
                "no soci-store serves with the state directory {} (is `soci-store serve` running, with the same config?)",
                state_dir.display()
            );
        }
        bail!("no store took the credentials: {}", errors.join("; "));
    }
    Ok(delivered)
}

fn deliver_to(socket: &Path, message: &[u8]) -> Result<()> {
    let mut conn = UnixStream::connect(socket).context("connecting")?;
    conn.set_read_timeout(Some(TIMEOUT))?;
    conn.set_write_timeout(Some(TIMEOUT))?;
    conn.write_all(message).context("sending")?;
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut reply = String::new();
    conn.take(4096)
        .read_to_string(&mut reply)
        .context("reading the answer")?;
    match reply.trim_end().strip_prefix("ok") {
        Some(_) => Ok(()),
        None => bail!("{}", reply.trim_end()),
    }
}
