//! Keeping a mount alive across a daemon restart.
//!
//! A FUSE connection lives as long as some process holds its `/dev/fuse` file open. `serve`
//! therefore starts a tiny holder process (`soci-store hold-fuse`, in its own process group) that
//! keeps a duplicate of the open file and hands it, over a Unix socket in the state directory, to
//! the next `serve` on the same mountpoint. While no daemon runs, the kernel queues requests; the
//! next daemon answers them, including those its predecessor read but never answered (the kernel's
//! `FUSE_NOTIFY_RESEND`). The holder exits when the connection ends (unmount) or when a daemon
//! stopping for good tells it to.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::sys::fd::{recv_fd, send_fd};

const GET: u8 = b'g';
const QUIT: u8 = b'q';
const FD: u8 = b'f';
const OK: u8 = b'k';

/// The state files of one mountpoint.
#[derive(Debug, Clone)]
pub struct StatePaths {
    pub socket: PathBuf,
    pub journal: PathBuf,
    /// Where podman's credentials are handed over (`auth_socket`).
    pub auth: PathBuf,
}

impl StatePaths {
    /// Named after the mountpoint, so several stores can share a state directory.
    pub fn new(state_dir: &Path, mountpoint: &Path) -> StatePaths {
        let digest = crate::index::sha256_digest(mountpoint.as_os_str().as_encoded_bytes());
        let id = &digest["sha256:".len()..][..16];
        StatePaths {
            socket: state_dir.join(format!("{id}.sock")),
            journal: state_dir.join(format!("{id}.journal")),
            auth: state_dir.join(format!("{id}{}", super::auth_socket::SUFFIX)),
        }
    }
}

/// Starts the holder for the open FUSE file `fuse`, serving it at `socket`; returns once it
/// listens.
pub fn spawn_holder(fuse: BorrowedFd<'_>, socket: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("finding our own executable")?;
    let mut child = Command::new(exe)
        .arg("hold-fuse")
        .arg(socket)
        .stdin(Stdio::from(fuse.try_clone_to_owned()?))
        .stdout(Stdio::piped())
        .process_group(0)
        .spawn()
        .context("starting the FUSE holder")?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        BufReader::new(out).read_line(&mut line)?;
    }
    if line.trim() != "ready" {
        let status = child.wait()?;
        bail!("the FUSE holder did not start ({status})");
    }
    Ok(())
}

/// The holder: keeps stdin (the open `/dev/fuse` file) until the connection ends or a daemon
/// says quit; hands a duplicate to every daemon that asks at `socket`.
pub fn hold(socket: &Path) -> Result<()> {
    let fuse = std::io::stdin().as_fd().try_clone_to_owned()?;
    {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        let m = std::fs::File::from(fuse.try_clone()?).metadata()?;
        // /dev/fuse is character device 10:229.
        if !m.file_type().is_char_device() || m.rdev() != libc::makedev(10, 229) {
            bail!(
                "hold-fuse keeps a /dev/fuse connection given as stdin (it is internal to serve)"
            );
        }
    }
    let _ = std::fs::remove_file(socket);
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready")?;
        out.flush()?;
    }
    let result = serve_holder(&fuse, &listener);
    let _ = std::fs::remove_file(socket);
    result
}

fn serve_holder(fuse: &OwnedFd, listener: &UnixListener) -> Result<()> {
    loop {
        // No events asked of the FUSE file: poll reports only its end (POLLERR once the
        // connection is aborted or unmounted).
        let mut fds = [
            PollFd::new(fuse.as_fd(), PollFlags::empty()),
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
        ];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
        let ended = fds[0].revents().unwrap_or(PollFlags::POLLERR);
        if ended.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL) {
            tracing::info!("FUSE connection ended; holder exits");
            return Ok(());
        }
        let readable = fds[1].revents().unwrap_or(PollFlags::empty());
        if !readable.contains(PollFlags::POLLIN) {
            continue;
        }
        let Ok((mut conn, _)) = listener.accept() else {
            continue;
        };
        let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(5)));
        let mut req = [0u8; 1];
        if conn.read_exact(&mut req).is_err() {
            continue;
        }
        match req[0] {
            GET => {
                if let Err(e) = send_fd(&conn, FD, fuse.as_fd()) {
                    tracing::warn!("handing over the FUSE connection: {e}");
                }
            }
            QUIT => {
                let _ = conn.write_all(&[OK]);
                return Ok(());
            }
            _ => {}
        }
    }
}

/// Asks a holder at `socket` for its FUSE connection; None when no holder runs there.
pub fn take_over(socket: &Path) -> Result<Option<OwnedFd>> {
    let conn = match UnixStream::connect(socket) {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", socket.display())),
    };
    conn.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    (&conn).write_all(&[GET])?;
    match recv_fd(&conn)? {
        (FD, Some(fd)) => Ok(Some(fd)),
        _ => bail!("{}: the holder sent no FUSE connection", socket.display()),
    }
}

/// Tells the holder at `socket`, if any, to let go of its connection and exit.
pub fn release(socket: &Path) {
    let Ok(mut conn) = UnixStream::connect(socket) else {
        return;
    };
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(10)));
    let mut rest = Vec::new();
    // Until EOF: the holder closes the connection when it exits, after the FUSE file.
    if conn.write_all(&[QUIT]).is_ok() && conn.read_to_end(&mut rest).is_ok() {
        tracing::debug!("FUSE holder released");
    }
}

/// What mountinfo says of a mount.
#[derive(Debug, Clone, PartialEq)]
pub struct MountInfo {
    /// `major:minor`.
    pub dev: String,
    pub fstype: String,
    pub source: String,
}

impl MountInfo {
    /// A FUSE mount made by soci-store (`fuse` or `fuse.<subtype>`, source `soci-store`).
    pub fn is_ours(&self) -> bool {
        (self.fstype == "fuse" || self.fstype.starts_with("fuse.")) && self.source == "soci-store"
    }
}

/// What is mounted at `mountpoint` (the topmost mount), read from /proc/self/mountinfo without
/// touching the mount itself (a mount whose daemon is gone would block).
pub fn mount_at(mountpoint: &Path) -> Option<MountInfo> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let want = mountpoint.to_str()?;
    text.lines()
        .rev()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let mut r = right.split(' ');
            let info = MountInfo {
                fstype: r.next()?.to_string(),
                source: unescape(r.next()?),
                dev: f.get(2)?.to_string(),
            };
            (unescape(f.get(4)?) == want).then_some(info)
        })
        .next()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The FUSE_INIT request a resumed session is started with: the kernel sent the real one to the
/// first daemon, and never sends another on the same connection.
pub fn synthetic_init(abi: (u32, u32), capabilities: u64) -> Vec<u8> {
    const FUSE_INIT: u32 = 26;
    const FUSE_INIT_EXT: u32 = 1 << 30;
    let mut m = Vec::with_capacity(104);
    m.extend_from_slice(&104u32.to_le_bytes());
    m.extend_from_slice(&FUSE_INIT.to_le_bytes());
    m.extend_from_slice(&1u64.to_le_bytes()); // unique
    m.extend_from_slice(&0u64.to_le_bytes()); // nodeid
    m.extend_from_slice(&[0u8; 16]); // uid, gid, pid, total_extlen, padding
    m.extend_from_slice(&abi.0.to_le_bytes());
    m.extend_from_slice(&abi.1.to_le_bytes());
    m.extend_from_slice(&(128u32 * 1024).to_le_bytes()); // max_readahead
    let low = capabilities as u32;
    let high = (capabilities >> 32) as u32;
    let low = if high != 0 { low | FUSE_INIT_EXT } else { low };
    m.extend_from_slice(&low.to_le_bytes());
    m.extend_from_slice(&high.to_le_bytes());
    m.resize(104, 0);
    m
}

/// Asks the kernel to send again the requests a dead daemon had read but not answered
/// (`FUSE_NOTIFY_RESEND`, Linux 6.9 and later; older kernels refuse, and those requests stay
/// unanswered until the connection ends).
pub fn resend_pending(fuse: BorrowedFd<'_>) {
    const FUSE_NOTIFY_RESEND: i32 = 7;
    let mut m = Vec::with_capacity(16);
    m.extend_from_slice(&16u32.to_le_bytes());
    m.extend_from_slice(&FUSE_NOTIFY_RESEND.to_le_bytes());
    m.extend_from_slice(&0u64.to_le_bytes());
    let file = match fuse.try_clone_to_owned() {
        Ok(fd) => std::fs::File::from(fd),
        Err(e) => return tracing::warn!("FUSE resend: {e}"),
    };
    if let Err(e) = (&file).write_all(&m) {
        tracing::info!("the kernel cannot resend unanswered requests: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_names_are_unescaped() {
        assert_eq!(unescape(r"/a\040b\134c"), "/a b\\c");
        assert_eq!(unescape(r"/plain\04"), r"/plain\04");
    }

    #[test]
    fn synthetic_init_has_the_kernel_layout() {
        let m = synthetic_init((7, 41), (1 << 33) | 1);
        assert_eq!(m.len(), 104);
        assert_eq!(u32::from_le_bytes(m[4..8].try_into().unwrap()), 26);
        assert_eq!(u32::from_le_bytes(m[44..48].try_into().unwrap()), 41);
        assert_eq!(
            u32::from_le_bytes(m[52..56].try_into().unwrap()),
            1 | (1 << 30)
        );
        assert_eq!(u32::from_le_bytes(m[56..60].try_into().unwrap()), 2);
    }
}
