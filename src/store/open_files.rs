//! Open files of the diff trees, by handle. A file with a decompressed local copy (`local`) is
//! opened with FUSE passthrough when the kernel allows it (the kernel then reads the copy itself),
//! else the daemon reads the copy; other files are read through their spans.
//!
//! The kernel allows one mode per inode at a time: while an inode is open through the page cache
//! (spans or a copy the daemon reads) it cannot be opened with passthrough, and while it is open
//! with passthrough every further open must use the same backing ID. So modes and backing IDs are
//! kept per inode. Backing IDs belong to the FUSE connection, which outlives a daemon restart:
//! they are journaled when made and dropped, and a restarted daemon adopts the ones still open, so
//! a container holding a file open through a restart can open it again.

use std::collections::HashMap;
use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use fuser::{BackingId, FileHandle, FopenFlags, ReplyOpen};

use super::metrics::StoreStats;

/// What a file handle stands for (handle 0: `info` and `blob`).
enum Handle {
    /// Read through spans.
    Spans { ino: u64 },
    /// The daemon reads this copy.
    Local { ino: u64, file: Arc<File> },
    /// The kernel reads the copy behind the inode's backing ID.
    Passthrough { ino: u64 },
}

/// One inode's opens.
#[derive(Default)]
struct Inode {
    /// Opens through the page cache (spans or a copy the daemon reads).
    cached: u64,
    /// The backing ID (its number, and as the reply API wants it) while the inode is open with
    /// passthrough, with the number of such opens. Never closed by a drop: a daemon that exits
    /// leaves it to its successor.
    backing: Option<Backing>,
}

struct Backing {
    handle: ManuallyDrop<BackingId>,
    opens: u64,
}

/// What the journal needs to know of backing IDs.
pub(super) enum BackingEvent {
    Opened { ino: u64, id: u32 },
    Closed { ino: u64 },
}

/// The open files of one mount.
#[derive(Default)]
pub(super) struct OpenFiles {
    handles: Mutex<HashMap<u64, Handle>>,
    inodes: Mutex<HashMap<u64, Inode>>,
    next_fh: AtomicU64,
    /// Backing IDs of a previous daemon not taken over yet, by inode.
    adoptable: Mutex<HashMap<u64, u32>>,
    /// Whether opens may use passthrough: granted at the FUSE handshake, dropped at the first
    /// refusal.
    passthrough: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Files never change and nothing is written: the kernel may keep their pages, and a close needs
/// no FLUSH round trip (which would also block a close while a restarting daemon is away).
const CACHED: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE.union(FopenFlags::FOPEN_NOFLUSH);
/// A passthrough open (the page cache is the copy's own).
const NOFLUSH: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// Opens adopted from a previous daemon: their closes went to it, so they are never counted down.
const ADOPTED: u64 = u64::MAX / 2;

impl OpenFiles {
    /// Whether opens use passthrough.
    pub(super) fn set_passthrough(&self, on: bool) {
        self.passthrough.store(on, Ordering::SeqCst);
    }

    /// Answers the open of diff inode `ino`, from its local copy when it has one; `journal`
    /// learns of backing IDs made.
    pub(super) fn open(
        &self,
        ino: u64,
        copy: Option<File>,
        reply: ReplyOpen,
        stats: &StoreStats,
        journal: impl Fn(BackingEvent),
    ) {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed) + 1;
        let mut inodes = lock(&self.inodes);
        let inode = inodes.entry(ino).or_default();
        if let Some(raw) = lock(&self.adoptable).remove(&ino) {
            // Its opens from before the restart are released to nobody: never counted down.
            inode.backing = Some(Backing {
                handle: crate::sys::fuse::backing(&reply, raw),
                opens: ADOPTED,
            });
        }
        if let Some(b) = &mut inode.backing {
            // Open with passthrough already: the kernel wants the same backing file again.
            b.opens += 1;
            lock(&self.handles).insert(fh, Handle::Passthrough { ino });
            stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
            return reply.opened_passthrough(FileHandle(fh), NOFLUSH, &b.handle);
        }
        let Some(file) = copy else {
            inode.cached += 1;
            lock(&self.handles).insert(fh, Handle::Spans { ino });
            return reply.opened(FileHandle(fh), CACHED);
        };
        stats.local_opens.fetch_add(1, Ordering::Relaxed);
        if inode.cached == 0 && self.passthrough.load(Ordering::SeqCst) {
            match reply.open_backing(&file) {
                Ok(id) => {
                    let raw = id.into_raw();
                    journal(BackingEvent::Opened { ino, id: raw });
                    let b = inode.backing.insert(Backing {
                        handle: crate::sys::fuse::backing(&reply, raw),
                        opens: 1,
                    });
                    lock(&self.handles).insert(fh, Handle::Passthrough { ino });
                    stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                    return reply.opened_passthrough(FileHandle(fh), NOFLUSH, &b.handle);
                }
                Err(e) => {
                    // Said once: passthrough stays off for this mount.
                    if self.passthrough.swap(false, Ordering::SeqCst) {
                        tracing::warn!(
                            "FUSE passthrough refused ({e}); local copies are read through the daemon"
                        );
                    }
                }
            }
        }
        inode.cached += 1;
        let file = Arc::new(file);
        lock(&self.handles).insert(fh, Handle::Local { ino, file });
        reply.opened(FileHandle(fh), CACHED);
    }

    /// Reads `size` bytes at `offset` of the copy behind `fh`; None when the daemon does not
    /// read `fh` from a copy (spans, or a handle of a previous daemon).
    pub(super) fn read(&self, fh: u64, offset: u64, size: u32) -> Option<std::io::Result<Vec<u8>>> {
        let file = match lock(&self.handles).get(&fh)? {
            Handle::Local { file, .. } => file.clone(),
            Handle::Spans { .. } | Handle::Passthrough { .. } => return None,
        };
        let mut buf = vec![0u8; size as usize];
        let mut got = 0;
        while got < buf.len() {
            match file.read_at(&mut buf[got..], offset + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Some(Err(e)),
            }
        }
        buf.truncate(got);
        Some(Ok(buf))
    }

    /// Forgets `fh`; the last passthrough close of an inode releases its backing ID.
    pub(super) fn release(&self, fh: u64, journal: impl Fn(BackingEvent)) {
        let Some(handle) = lock(&self.handles).remove(&fh) else {
            return;
        };
        let mut inodes = lock(&self.inodes);
        let (ino, passthrough) = match handle {
            Handle::Spans { ino } | Handle::Local { ino, .. } => (ino, false),
            Handle::Passthrough { ino } => (ino, true),
        };
        let Some(inode) = inodes.get_mut(&ino) else {
            return;
        };
        if passthrough {
            if let Some(b) = &mut inode.backing {
                b.opens -= 1;
                if b.opens == 0 {
                    // Journaled first: a successor must never adopt a number the kernel may
                    // reuse for another file.
                    journal(BackingEvent::Closed { ino });
                    let b = inode.backing.take().expect("some");
                    drop(ManuallyDrop::into_inner(b.handle));
                }
            }
        } else {
            inode.cached = inode.cached.saturating_sub(1);
        }
        if inode.cached == 0 && inode.backing.is_none() {
            inodes.remove(&ino);
        }
    }

    /// Backing IDs a previous daemon left open on this connection, by inode: the next open of
    /// such an inode (with `reply` at hand) takes its ID over.
    pub(super) fn adopt(&self, ids: HashMap<u64, u32>) {
        *lock(&self.adoptable) = ids;
    }
}
