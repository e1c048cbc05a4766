//! The FUSE filesystem podman sees as an additional layer store:
//! `<base64(ref)>/<digest>/{diff, info, blob}`, `use` and rmdir as reference counting.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use fuser::{
    Errno, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, IoctlFlags,
    LockOwner, OpenFlags, PollEvents, PollFlags, PollNotifier, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyOpen, ReplyPoll, ReplyXattr, Request,
};

use super::context::StoreContext;
use super::inodes::{attr, Special, State};
use super::journal::{Journal, Record};
use super::layers::Layer;
use super::open_files::{BackingEvent, OpenFiles};
use super::tree::NodeKind;
use crate::report::Chain;

/// Layers never change: the kernel may cache what we say for long.
const TTL: Duration = Duration::from_secs(3600);
/// Unknown names (`diff1`, layers that are not served lazily): cached negative entries.
const NEGATIVE_TTL: Duration = Duration::from_secs(60);

/// The kernel's FUSE ABI version and capabilities, once the handshake happened.
pub type Handshake = Arc<std::sync::Mutex<Option<((u32, u32), u64)>>>;

/// The store filesystem.
pub struct StoreFs {
    pub(super) ctx: Arc<StoreContext>,
    pub(super) state: RwLock<State>,
    pub(super) next_ino: AtomicU64,
    /// Where new inode numbers are recorded before the kernel sees them (restart survival).
    pub(super) journal: Option<Arc<Journal>>,
    /// The kernel's ABI version and capabilities from the FUSE handshake.
    kernel: Handshake,
    /// Open files of the diff trees.
    pub(super) open_files: OpenFiles,
}

impl StoreFs {
    pub fn new(ctx: Arc<StoreContext>) -> Self {
        let mut state = State::default();
        state.specials.insert(1, Special::Root);
        StoreFs {
            ctx,
            state: RwLock::new(state),
            next_ino: AtomicU64::new(2),
            journal: None,
            kernel: Arc::default(),
            open_files: OpenFiles::default(),
        }
    }

    /// Records every inode number it hands out in `journal`.
    pub fn with_journal(mut self, journal: Arc<Journal>) -> Self {
        self.journal = Some(journal);
        self
    }

    /// What the kernel said at the FUSE handshake (ABI version, capabilities), once it happened.
    pub fn kernel_handshake(&self) -> Handshake {
        self.kernel.clone()
    }

    fn record_backing(&self, e: BackingEvent) {
        self.record(&match e {
            BackingEvent::Opened { ino, id } => Record::Backing { ino, id },
            BackingEvent::Closed { ino } => Record::Unbacked { ino },
        });
    }

    /// The decompressed local copy of diff node `idx`, when it is a regular file that has one.
    fn local_copy(&self, layer: &Layer, idx: usize) -> Option<std::fs::File> {
        let local = self.ctx.local.as_ref()?;
        let NodeKind::File { entry, size } = layer.tree.nodes[idx].kind else {
            return None;
        };
        let data = layer.ztoc.resolve_hardlink(entry).ok()?;
        local.get(&layer.blob.digest, data, size)
    }

    /// Resolves a layer on the runtime, bounded by the lookup timeout: `Ok(None)` when the
    /// image has no index for it, `Err` when it could not be found out (registry errors,
    /// missing credentials, the timeout) — worth asking again next time.
    fn resolve(&self, reference: &str, digest: &str) -> Result<Option<Arc<Layer>>, ()> {
        let ctx = self.ctx.clone();
        let (r, d) = (reference.to_string(), digest.to_string());
        let fut = async move { tokio::time::timeout(ctx.lookup_timeout, ctx.layer(&r, &d)).await };
        match self.ctx.runtime.block_on(fut) {
            Ok(Ok(found)) => Ok(found),
            Ok(Err(e)) => {
                tracing::warn!(
                    reference,
                    digest,
                    "cannot serve layer lazily: {}",
                    Chain(&*e)
                );
                Err(())
            }
            Err(_) => {
                tracing::warn!(reference, digest, "layer lookup timed out");
                Err(())
            }
        }
    }

    /// Counts podman's `use` notification (a create or mknod of `use` in a layer directory).
    fn note_use(&self, parent: u64, name: &OsStr) {
        if let (Some(Special::LayerDir(layer)), b"use") = (self.special(parent), name.as_bytes()) {
            let n = layer.uses.fetch_add(1, Ordering::SeqCst) + 1;
            self.record(&Record::Uses {
                ino: parent,
                uses: n,
            });
            tracing::info!(blob = %layer.blob, uses = n, "use");
        }
    }

    fn negative(reply: ReplyEntry) {
        // A zero inode with a timeout is a negative entry the kernel caches.
        let mut a = attr(0, FileType::RegularFile, 0, 0, 0);
        a.ino = INodeNo(0);
        reply.entry(&NEGATIVE_TTL, &a, Generation(0));
    }
}

pub(super) fn decode_ref(name: &[u8]) -> Option<String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(name)
        .ok()?;
    String::from_utf8(raw).ok()
}

impl Filesystem for StoreFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        let abi = config.kernel_abi();
        let caps = config.capabilities().bits();
        *self.kernel.lock().unwrap_or_else(|p| p.into_inner()) = Some(((abi.0, abi.1), caps));
        if self.ctx.passthrough && self.ctx.local.is_some() && crate::paths::in_user_namespace() {
            tracing::info!(
                "FUSE passthrough needs CAP_SYS_ADMIN on the host and this store runs in a user namespace: local copies are read through the daemon"
            );
        } else if self.ctx.passthrough && self.ctx.local.is_some() {
            // Depth 1: the store stays stackable under podman's overlay mounts.
            let granted = config
                .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
                .is_ok()
                && config.set_max_stack_depth(1).is_ok();
            if granted {
                tracing::info!("local copies are served with FUSE passthrough");
            } else {
                tracing::warn!(
                    "the kernel offers no FUSE passthrough (Linux >= 6.9 and CAP_SYS_ADMIN are needed); local copies are read through the daemon"
                );
            }
            self.open_files.set_passthrough(granted);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let parent = parent.0;
        let name_b = name.as_bytes();
        match self.special(parent) {
            Some(Special::Root) => {
                let Some(reference) = decode_ref(name_b) else {
                    return Self::negative(reply);
                };
                if crate::reference::Reference::parse(&reference).is_err() {
                    return Self::negative(reply);
                }
                let existing = self.read_state().ref_dirs.get(name_b).copied();
                let ino = existing.unwrap_or_else(|| {
                    let mut st = self.write_state();
                    if let Some(&i) = st.ref_dirs.get(name_b) {
                        return i;
                    }
                    let i = self.alloc(1);
                    self.record(&Record::RefDir {
                        ino: i,
                        name: String::from_utf8_lossy(name_b).into_owned(),
                    });
                    st.ref_dirs.insert(name_b.to_vec(), i);
                    st.specials.insert(i, Special::RefDir { reference });
                    i
                });
                reply.entry(
                    &TTL,
                    &attr(ino, FileType::Directory, 0o755, 0, 2),
                    Generation(0),
                );
            }
            Some(Special::RefDir { reference }) => {
                let Some(digest) = name.to_str() else {
                    return Self::negative(reply);
                };
                if crate::digest::Digest::parse(digest).is_err() {
                    return Self::negative(reply);
                }
                match self.resolve(&reference, digest) {
                    Ok(Some(layer)) => {
                        let inos = self.layer_inodes(&layer);
                        let mut st = self.write_state();
                        let key = (parent, name_b.to_vec());
                        if let std::collections::hash_map::Entry::Vacant(e) =
                            st.layer_dirs.entry(key)
                        {
                            self.record(&Record::LayerDir {
                                parent,
                                name: digest.to_string(),
                                ino: inos.dir,
                            });
                            e.insert(inos.dir);
                        }
                        drop(st);
                        reply.entry(
                            &TTL,
                            &attr(inos.dir, FileType::Directory, 0o755, 0, 2),
                            Generation(0),
                        );
                    }
                    Ok(None) => Self::negative(reply),
                    // Not cached by the kernel: the next pull asks again (e.g. once podman has
                    // handed credentials over, or the registry is back).
                    Err(()) => reply.error(Errno::ENOENT),
                }
            }
            Some(Special::LayerDir(layer)) => {
                let inos = self.layer_inodes(&layer);
                let (ino, s) = match name_b {
                    b"diff" => {
                        let a = self.node_attr(inos.diff_base, &layer, 0);
                        return reply.entry(&TTL, &a, Generation(0));
                    }
                    b"info" => (inos.info, Special::Info(layer.clone())),
                    b"blob" => (inos.blob, Special::Blob(layer.clone())),
                    _ => return Self::negative(reply),
                };
                reply.entry(&TTL, &self.special_attr(ino, &s), Generation(0));
            }
            Some(Special::Info(_) | Special::Blob(_)) => reply.error(Errno::ENOTDIR),
            None => match self.diff_node(parent) {
                Some((layer, idx)) => match layer.tree.nodes[idx].children.get(name_b) {
                    Some(&child) => {
                        let base = parent - idx as u64;
                        let ino = base + child as u64;
                        reply.entry(&TTL, &self.node_attr(ino, &layer, child), Generation(0));
                    }
                    None => Self::negative(reply),
                },
                None => reply.error(Errno::ENOENT),
            },
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ino = ino.0;
        if let Some(s) = self.special(ino) {
            return reply.attr(&TTL, &self.special_attr(ino, &s));
        }
        match self.diff_node(ino) {
            Some((layer, idx)) => reply.attr(&TTL, &self.node_attr(ino, &layer, idx)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.diff_node(ino.0) {
            Some((layer, idx)) => match &layer.tree.nodes[idx].kind {
                NodeKind::Symlink(t) => reply.data(t),
                _ => reply.error(Errno::EINVAL),
            },
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let writable = flags.0 & (libc::O_WRONLY | libc::O_RDWR) != 0;
        if writable {
            return reply.error(Errno::EROFS);
        }
        match self.special(ino.0) {
            Some(Special::Info(_) | Special::Blob(_)) => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
            ),
            Some(_) => reply.error(Errno::EISDIR),
            None => match self.diff_node(ino.0) {
                Some((layer, idx)) => {
                    let copy = self.local_copy(&layer, idx);
                    let journal = |e| self.record_backing(e);
                    self.open_files
                        .open(ino.0, copy, reply, &self.ctx.stats, journal)
                }
                None => reply.error(Errno::ENOENT),
            },
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.open_files.release(fh.0, |e| self.record_backing(e));
        reply.ok();
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        match self.open_files.read(fh.0, offset, size) {
            Some(Ok(data)) => return reply.data(&data),
            Some(Err(e)) => {
                self.ctx.stats.fuse_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("reading a local copy: {e}");
                return reply.error(Errno::EIO);
            }
            None => {}
        }
        match self.special(ino.0) {
            Some(Special::Info(l)) => {
                let start = (offset as usize).min(l.info.len());
                let end = (start + size as usize).min(l.info.len());
                reply.data(&l.info[start..end]);
            }
            Some(Special::Blob(l)) => {
                let end = (offset + u64::from(size)).min(l.blob_size);
                if offset >= end {
                    return reply.data(&[]);
                }
                let fut = self.ctx.read_blob(&l, offset..end);
                match self.ctx.runtime.block_on(fut) {
                    Ok(b) => reply.data(&b),
                    Err(e) => {
                        self.ctx.stats.fuse_errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(blob = %l.blob, "blob read failed: {}", Chain(&*e));
                        reply.error(Errno::EIO)
                    }
                }
            }
            Some(_) => reply.error(Errno::EISDIR),
            None => match self.diff_node(ino.0) {
                Some((layer, idx)) => match layer.tree.nodes[idx].kind {
                    NodeKind::File { entry, .. } => {
                        let started = std::time::Instant::now();
                        let mut buf = vec![0u8; size as usize];
                        let result = layer.reader.read_entry(entry, offset, &mut buf);
                        self.ctx.stats.read_done(started.elapsed());
                        let trace = self.ctx.spans.trace();
                        if trace.enabled() {
                            let event = crate::trace::Event {
                                ev: "read".into(),
                                what: format!(
                                    "{}:{}:{}+{size}",
                                    layer.blob.digest,
                                    layer.ztoc.entries[entry].display_name(),
                                    offset
                                ),
                                bytes: *result.as_ref().unwrap_or(&0) as u64,
                                outcome: if result.is_ok() { "" } else { "error" }.into(),
                                ..Default::default()
                            };
                            trace.record(started, event);
                        }
                        match result {
                            Ok(n) => reply.data(&buf[..n]),
                            Err(e) => {
                                self.ctx.stats.fuse_errors.fetch_add(1, Ordering::Relaxed);
                                tracing::warn!(blob = %layer.blob, "read failed: {}", Chain(&e));
                                reply.error(Errno::EIO)
                            }
                        }
                    }
                    _ => reply.error(Errno::EINVAL),
                },
                None => reply.error(Errno::ENOENT),
            },
        }
    }

    /// Every `close()` of a file: nothing is buffered, so nothing to write back. (fuser's
    /// default logs a warning and answers ENOSYS.)
    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    /// No file here answers an ioctl (`FS_IOC_GETFLAGS` from `lsattr`, tools probing for
    /// reflinks, …): ENOTTY, as a file without that ioctl answers.
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    /// Files never block (reads wait for their data inside `read`): always ready, as a local
    /// file's poll answers.
    #[allow(clippy::too_many_arguments)]
    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        reply.poll(
            PollEvents::POLLIN
                | PollEvents::POLLOUT
                | PollEvents::POLLRDNORM
                | PollEvents::POLLWRNORM,
        );
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let ino = ino.0;
        let mut entries: Vec<(u64, FileType, Vec<u8>)> = vec![
            (ino, FileType::Directory, b".".to_vec()),
            (1, FileType::Directory, b"..".to_vec()),
        ];
        match self.special(ino) {
            Some(Special::Root) => {
                let st = self.read_state();
                entries.extend(
                    st.ref_dirs
                        .iter()
                        .map(|(n, &i)| (i, FileType::Directory, n.clone())),
                );
            }
            Some(Special::RefDir { .. }) => {
                let st = self.read_state();
                entries.extend(
                    st.layer_dirs
                        .iter()
                        .filter(|((p, _), _)| *p == ino)
                        .map(|((_, n), &i)| (i, FileType::Directory, n.clone())),
                );
            }
            Some(Special::LayerDir(layer)) => {
                let inos = self.layer_inodes(&layer);
                entries.push((inos.diff_base, FileType::Directory, b"diff".to_vec()));
                entries.push((inos.info, FileType::RegularFile, b"info".to_vec()));
                entries.push((inos.blob, FileType::RegularFile, b"blob".to_vec()));
            }
            Some(_) => return reply.error(Errno::ENOTDIR),
            None => match self.diff_node(ino) {
                Some((layer, idx)) => {
                    let base = ino - idx as u64;
                    let node = &layer.tree.nodes[idx];
                    if node.kind != NodeKind::Dir {
                        return reply.error(Errno::ENOTDIR);
                    }
                    for (name, &child) in &node.children {
                        let kind = self.node_attr(base + child as u64, &layer, child).kind;
                        entries.push((base + child as u64, kind, name.clone()));
                    }
                }
                None => return reply.error(Errno::ENOENT),
            },
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), (i + 1) as u64, kind, OsStr::from_bytes(&name)) {
                break;
            }
        }
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let Some((layer, idx)) = self.diff_node(ino.0) else {
            return reply.error(Errno::NO_XATTR);
        };
        let all = layer.tree.nodes[idx].all_xattrs();
        match all.iter().find(|(k, _)| k == name.as_bytes()) {
            None => reply.error(Errno::NO_XATTR),
            Some((_, v)) if size == 0 => reply.size(v.len() as u32),
            Some((_, v)) if v.len() > size as usize => reply.error(Errno::ERANGE),
            Some((_, v)) => reply.data(v),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let mut list = Vec::new();
        if let Some((layer, idx)) = self.diff_node(ino.0) {
            for (k, _) in layer.tree.nodes[idx].all_xattrs() {
                list.extend_from_slice(&k);
                list.push(0);
            }
        }
        if size == 0 {
            reply.size(list.len() as u32)
        } else if list.len() > size as usize {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(&list)
        }
    }

    /// `use`: podman's "I use this layer" notification. Count it and answer ENOENT.
    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        self.note_use(parent.0, name);
        reply.error(Errno::ENOENT);
    }

    fn mknod(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        self.note_use(parent.0, name);
        reply.error(Errno::ENOENT);
    }

    /// rmdir of a layer directory: podman's "release". Count it and answer ENOENT.
    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let key = (parent.0, name.as_bytes().to_vec());
        let dir = self.read_state().layer_dirs.get(&key).copied();
        if let (Some(d), Some(Special::LayerDir(layer))) = (dir, dir.and_then(|d| self.special(d)))
        {
            let n = layer.uses.fetch_sub(1, Ordering::SeqCst) - 1;
            self.record(&Record::Uses { ino: d, uses: n });
            tracing::info!(blob = %layer.blob, uses = n, "release");
            // The last reference went (`podman rmi`): so do the layer's local copies.
            if let (0, Some(local)) = (n, &self.ctx.local) {
                local.remove_layer(&layer.blob.digest);
            }
        }
        reply.error(Errno::ENOENT);
    }
}
