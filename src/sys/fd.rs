//! File descriptors across processes (`SCM_RIGHTS`) and re-pointing a descriptor number at
//! another open file (`dup2`).

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};

/// Sends the byte `tag` with a duplicate of `fd` over a Unix stream socket. The peer gets the
/// same open file (not a reopening), which is what keeps a FUSE connection alive.
pub fn send_fd(sock: &UnixStream, tag: u8, fd: BorrowedFd<'_>) -> std::io::Result<()> {
    let raw = [fd.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let iov = [IoSlice::new(std::slice::from_ref(&tag))];
    sendmsg::<()>(sock.as_raw_fd(), &iov, &cmsg, MsgFlags::empty(), None)?;
    Ok(())
}

/// Receives one byte and the descriptor sent with it, if any (extra descriptors are closed).
pub fn recv_fd(sock: &UnixStream) -> std::io::Result<(u8, Option<OwnedFd>)> {
    let mut tag = [0u8; 1];
    let mut received = None;
    let bytes = {
        let mut iov = [IoSliceMut::new(&mut tag)];
        let mut space = nix::cmsg_space!([RawFd; 1]);
        let msg = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(fds) = c {
                for raw in fds {
                    // SAFETY: the kernel installed `raw` in our descriptor table for this message
                    // alone; nothing else refers to it, so it is ours to own and close.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    if received.is_none() {
                        received = Some(owned);
                    }
                }
            }
        }
        msg.bytes
    };
    if bytes == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok((tag[0], received))
}

/// Makes the descriptor number of `target` refer to the open file of `source` (`dup2`): the
/// owner of `target` keeps owning it and closes it once, as before, but now reads and writes
/// `source`'s file. The caller makes sure no other thread uses `target` meanwhile.
pub fn repoint(target: BorrowedFd<'_>, source: BorrowedFd<'_>) -> std::io::Result<()> {
    // SAFETY: dup2 touches no memory of ours; it atomically replaces what the number `target`
    // refers to, so the number stays open and owned by its owner, and no descriptor is leaked or
    // closed twice.
    let rc = unsafe { libc::dup2(source.as_raw_fd(), target.as_raw_fd()) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
