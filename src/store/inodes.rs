//! The store's inode table: numbers for reference directories, layer directories, their `info` and
//! `blob` files and each layer's diff tree (a contiguous range per layer, never reused within a
//! mount), recorded in the journal before the kernel sees them; and the attributes the kernel
//! gets for each.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo};

use super::fs::StoreFs;
use super::journal::{LayerRecord, Record};
use super::layers::Layer;
use super::tree::NodeKind;

#[derive(Clone)]
pub(super) enum Special {
    Root,
    RefDir { reference: String },
    LayerDir(Arc<Layer>),
    Info(Arc<Layer>),
    Blob(Arc<Layer>),
}

#[derive(Default)]
pub(super) struct State {
    pub(super) specials: HashMap<u64, Special>,
    pub(super) ref_dirs: HashMap<Vec<u8>, u64>,
    pub(super) layer_dirs: HashMap<(u64, Vec<u8>), u64>,
    /// Diff trees: the first inode of each layer's range.
    pub(super) ranges: BTreeMap<u64, (Arc<Layer>, u64)>,
    /// Inodes of each layer's directory, info, blob and diff root, by layer identity.
    pub(super) layer_inodes: HashMap<usize, LayerInodes>,
}

#[derive(Clone, Copy)]
pub(super) struct LayerInodes {
    pub(super) dir: u64,
    pub(super) info: u64,
    pub(super) blob: u64,
    pub(super) diff_base: u64,
}

pub(super) fn time(secs: i64, nanos: u32) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
            + Duration::from_nanos(u64::from(nanos))
    }
}

pub(super) fn attr(ino: u64, kind: FileType, perm: u16, size: u64, nlink: u32) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind,
        perm,
        nlink,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn makedev(major: u32, minor: u32) -> u32 {
    // The kernel's encoding of a device number in 32 bits.
    ((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12)
}

impl StoreFs {
    pub(super) fn alloc(&self, n: u64) -> u64 {
        self.next_ino.fetch_add(n, Ordering::Relaxed)
    }

    pub(super) fn record(&self, r: &Record) {
        if let Some(j) = &self.journal {
            if let Err(e) = j.append(r) {
                tracing::warn!("inode journal: {e}; a restart will not keep this mount");
            }
        }
    }

    pub(super) fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn special(&self, ino: u64) -> Option<Special> {
        self.read_state().specials.get(&ino).cloned()
    }

    /// The layer and tree node behind a diff inode.
    pub(super) fn diff_node(&self, ino: u64) -> Option<(Arc<Layer>, usize)> {
        let st = self.read_state();
        let (base, (layer, n)) = st.ranges.range(..=ino).next_back()?;
        let idx = ino - base;
        (idx < *n).then(|| (layer.clone(), idx as usize))
    }

    pub(super) fn layer_inodes(&self, layer: &Arc<Layer>) -> LayerInodes {
        let key = Arc::as_ptr(layer) as usize;
        if let Some(i) = self.read_state().layer_inodes.get(&key) {
            return *i;
        }
        let mut st = self.write_state();
        if let Some(i) = st.layer_inodes.get(&key) {
            return *i;
        }
        let n = layer.tree.nodes.len() as u64;
        let base = self.alloc(3 + n);
        self.record(&Record::Layer(Box::new(LayerRecord {
            ino: base,
            nodes: n,
            reference: layer.reference.to_string(),
            blob: layer.blob.digest.clone(),
            blob_size: layer.blob_size,
            ztoc: layer.ztoc_digest.clone(),
            ztoc_size: layer.ztoc_size,
            table: layer.table.clone(),
            windows: layer.reader.source().windows().map(|w| w.digest.clone()),
            chunked: matches!(
                layer.ztoc.compression,
                crate::ztoc::Compression::ZstdChunked { .. }
            ),
            info: String::from_utf8_lossy(&layer.info).into_owned(),
        })));
        self.install(&mut st, base, layer)
    }

    /// Gives `layer` the numbers `base` (its directory), `base+1` (info), `base+2` (blob) and
    /// from `base+3` its diff tree.
    pub(super) fn install(&self, st: &mut State, base: u64, layer: &Arc<Layer>) -> LayerInodes {
        let n = layer.tree.nodes.len() as u64;
        let i = LayerInodes {
            dir: base,
            info: base + 1,
            blob: base + 2,
            diff_base: base + 3,
        };
        st.specials.insert(i.dir, Special::LayerDir(layer.clone()));
        st.specials.insert(i.info, Special::Info(layer.clone()));
        st.specials.insert(i.blob, Special::Blob(layer.clone()));
        st.ranges.insert(i.diff_base, (layer.clone(), n));
        st.layer_inodes.insert(Arc::as_ptr(layer) as usize, i);
        i
    }

    pub(super) fn special_attr(&self, ino: u64, s: &Special) -> FileAttr {
        match s {
            Special::Root | Special::RefDir { .. } | Special::LayerDir(_) => {
                attr(ino, FileType::Directory, 0o755, 0, 2)
            }
            Special::Info(l) => attr(ino, FileType::RegularFile, 0o444, l.info.len() as u64, 1),
            Special::Blob(l) => attr(ino, FileType::RegularFile, 0o444, l.blob_size, 1),
        }
    }

    pub(super) fn node_attr(&self, ino: u64, layer: &Layer, idx: usize) -> FileAttr {
        let n = &layer.tree.nodes[idx];
        let (kind, size, rdev) = match &n.kind {
            NodeKind::Dir => (FileType::Directory, 4096, 0),
            NodeKind::File { size, .. } => (FileType::RegularFile, *size, 0),
            NodeKind::Symlink(t) => (FileType::Symlink, t.len() as u64, 0),
            NodeKind::Char { major, minor } => (FileType::CharDevice, 0, makedev(*major, *minor)),
            NodeKind::Block { major, minor } => (FileType::BlockDevice, 0, makedev(*major, *minor)),
            NodeKind::Fifo => (FileType::NamedPipe, 0, 0),
            NodeKind::Whiteout => (FileType::CharDevice, 0, 0),
        };
        let t = time(n.mtime.0, n.mtime.1);
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: t,
            mtime: t,
            ctime: t,
            crtime: t,
            kind,
            perm: (n.mode & 0o7777) as u16,
            nlink: n.nlink,
            uid: n.uid,
            gid: n.gid,
            rdev,
            blksize: 4096,
            flags: 0,
        }
    }
}
