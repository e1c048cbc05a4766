//! FUSE passthrough backing IDs by number, so that a restarted daemon can use the IDs its
//! predecessor registered on the same connection (the connection outlives the daemon).

use std::mem::ManuallyDrop;

use fuser::{BackingId, ReplyOpen};

/// The backing ID `id` of the connection `reply` belongs to, as the reply API wants it. It is
/// never closed by a drop (the caller closes it with [`ManuallyDrop::into_inner`] and a drop,
/// when the inode's last passthrough open is released).
///
/// Why this is sound: `wrap_backing` asks that the ID belongs to this connection and is not
/// closed while the handle lives. The IDs passed here are ones the kernel gave this connection
/// (made by `open_backing` in this daemon, or journaled by a predecessor on the same connection and
/// not journaled as closed), and nothing else closes them. A stale number would make the kernel
/// refuse the open (EIO), never touch memory.
pub fn backing(reply: &ReplyOpen, id: u32) -> ManuallyDrop<BackingId> {
    // SAFETY: see above; the handle is never dropped implicitly.
    ManuallyDrop::new(unsafe { reply.wrap_backing(id) })
}
