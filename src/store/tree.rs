//! A layer's file tree built from its zTOC, as overlayfs wants to see it: whiteouts (`.wh.X`) as
//! 0:0 character devices named X, opaque markers (`.wh..wh..opq`) as an xattr on their directory,
//! hardlinks sharing one node, implicit parent directories filled in.

use std::collections::BTreeMap;

use crate::ztoc::{path, EntryType, Ztoc};

/// What a node is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeKind {
    Dir,
    /// A regular file whose data is entry `entry` of the zTOC.
    File {
        entry: usize,
        size: u64,
    },
    Symlink(Vec<u8>),
    Char {
        major: u32,
        minor: u32,
    },
    Block {
        major: u32,
        minor: u32,
    },
    Fifo,
    /// An overlay whiteout: a 0:0 character device.
    Whiteout,
}

/// One inode of the tree.
#[derive(Clone, Debug)]
pub struct Node {
    pub kind: NodeKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: (i64, u32),
    pub nlink: u32,
    pub parent: usize,
    pub children: BTreeMap<Vec<u8>, usize>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    pub opaque: bool,
}

impl Node {
    fn dir(parent: usize) -> Node {
        Node {
            kind: NodeKind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: (0, 0),
            nlink: 2,
            parent,
            children: BTreeMap::new(),
            xattrs: Vec::new(),
            opaque: false,
        }
    }

    /// The xattrs the node answers: its tar xattrs, plus the overlay opaque markers.
    pub fn all_xattrs(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = self.xattrs.clone();
        if self.opaque {
            for k in [&b"trusted.overlay.opaque"[..], b"user.overlay.opaque"] {
                if !out.iter().any(|(n, _)| n == k) {
                    out.push((k.to_vec(), b"y".to_vec()));
                }
            }
        }
        out
    }
}

/// The tree; node 0 is the root.
#[derive(Clone, Debug)]
pub struct LayerTree {
    pub nodes: Vec<Node>,
}

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

impl LayerTree {
    pub fn build(z: &Ztoc) -> LayerTree {
        let mut root = Node::dir(0);
        root.mode = 0o555;
        let mut t = LayerTree { nodes: vec![root] };
        for (i, e) in z.entries.iter().enumerate() {
            let norm = path::normalize(&e.name);
            let meta = |kind: NodeKind| Node {
                kind,
                mode: (e.mode & 0o7777) as u32,
                uid: e.uid,
                gid: e.gid,
                mtime: crate::ztoc::time::parse_rfc3339(&e.mod_time).unwrap_or((0, 0)),
                nlink: 1,
                parent: 0,
                children: BTreeMap::new(),
                xattrs: e.xattrs().map(|(k, v)| (k.to_vec(), v.to_vec())).collect(),
                opaque: false,
            };
            if norm.is_empty() {
                // The root entry is ignored, as a normal pull ignores it: containers/storage
                // makes every layer root 0555 root:root and copies that to the container's root.
                continue;
            }
            let (parent_path, base) = path::split_parent(&norm);
            let parent = t.ensure_dir(parent_path);
            if base == OPAQUE {
                t.nodes[parent].opaque = true;
                continue;
            }
            if let Some(hidden) = base.strip_prefix(WHITEOUT) {
                if matches!(hidden, b"" | b"." | b"..") {
                    // `.wh.`, `.wh..`, `.wh...`: no file could be named so; a normal pull
                    // cannot apply them either.
                    tracing::warn!("whiteout {}: names no file; ignored", e.display_name());
                    continue;
                }
                let mut n = meta(NodeKind::Whiteout);
                n.mode = 0;
                t.insert(parent, hidden.to_vec(), n);
                continue;
            }
            let node = match e.kind {
                EntryType::Dir => {
                    // A directory listed again (or after an implicit one) keeps its children.
                    if let Some(&existing) = t.nodes[parent].children.get(base) {
                        if t.nodes[existing].kind == NodeKind::Dir {
                            let keep = std::mem::take(&mut t.nodes[existing].children);
                            let opaque = t.nodes[existing].opaque;
                            let mut d = meta(NodeKind::Dir);
                            d.nlink = 2;
                            d.parent = parent;
                            d.children = keep;
                            d.opaque = opaque;
                            t.nodes[existing] = d;
                            continue;
                        }
                    }
                    let mut d = meta(NodeKind::Dir);
                    d.nlink = 2;
                    d
                }
                EntryType::Reg => meta(NodeKind::File {
                    entry: i,
                    size: e.size,
                }),
                EntryType::Symlink => meta(NodeKind::Symlink(e.linkname.clone())),
                EntryType::Char => meta(NodeKind::Char {
                    major: e.devmajor as u32,
                    minor: e.devminor as u32,
                }),
                EntryType::Block => meta(NodeKind::Block {
                    major: e.devmajor as u32,
                    minor: e.devminor as u32,
                }),
                EntryType::Fifo => meta(NodeKind::Fifo),
                EntryType::Hardlink => {
                    match t.lookup_path(&path::normalize(&e.linkname)) {
                        Some(target) if t.nodes[target].kind != NodeKind::Dir => {
                            t.nodes[target].nlink += 1;
                            t.nodes[parent].children.insert(base.to_vec(), target);
                        }
                        _ => tracing::warn!(
                            "hardlink {} to missing {}: skipped",
                            e.display_name(),
                            String::from_utf8_lossy(&e.linkname)
                        ),
                    }
                    continue;
                }
            };
            t.insert(parent, base.to_vec(), node);
        }
        // A directory's links: its name, its ".", and each subdirectory's "..".
        for i in 0..t.nodes.len() {
            if t.nodes[i].kind == NodeKind::Dir {
                let subdirs = t.nodes[i]
                    .children
                    .values()
                    .filter(|&&c| t.nodes[c].kind == NodeKind::Dir)
                    .count();
                t.nodes[i].nlink = 2 + subdirs as u32;
            }
        }
        t
    }

    fn insert(&mut self, parent: usize, name: Vec<u8>, mut node: Node) -> usize {
        node.parent = parent;
        let id = self.nodes.len();
        self.nodes.push(node);
        self.nodes[parent].children.insert(name, id);
        id
    }

    /// The directory at a normalized path, created (0755, root-owned) where missing.
    fn ensure_dir(&mut self, p: &[u8]) -> usize {
        let mut cur = 0;
        if p.is_empty() {
            return cur;
        }
        for part in p.split(|&b| b == b'/') {
            cur = match self.nodes[cur].children.get(part) {
                Some(&c) if self.nodes[c].kind == NodeKind::Dir => c,
                _ => self.insert(cur, part.to_vec(), Node::dir(cur)),
            };
        }
        cur
    }

    /// The node at a normalized path.
    pub fn lookup_path(&self, p: &[u8]) -> Option<usize> {
        let mut cur = 0;
        if p.is_empty() {
            return Some(0);
        }
        for part in p.split(|&b| b == b'/') {
            cur = *self.nodes[cur].children.get(part)?;
        }
        Some(cur)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ztoc::{Compression, Entry};

    fn entry(name: &str, kind: EntryType, link: &str) -> Entry {
        Entry {
            name: name.as_bytes().to_vec(),
            kind,
            offset: 0,
            size: 3,
            linkname: link.as_bytes().to_vec(),
            mode: 0o644,
            uid: 1,
            gid: 2,
            uname: vec![],
            gname: vec![],
            mod_time: b"2023-11-14T22:13:20Z".to_vec(),
            devmajor: 0,
            devminor: 0,
            pax: vec![],
        }
    }

    #[test]
    fn overlay_view_of_a_layer() {
        let z = Ztoc {
            version: b"0.9".to_vec(),
            build_tool: vec![],
            compressed_size: 0,
            uncompressed_size: 0,
            entries: vec![
                entry("./", EntryType::Dir, ""),
                entry("./a/f", EntryType::Reg, ""),
                entry("./a/.wh.gone", EntryType::Reg, ""),
                entry("./o/.wh..wh..opq", EntryType::Reg, ""),
                entry("./a/h", EntryType::Hardlink, "a/f"),
                entry("./a/s", EntryType::Symlink, "f"),
            ],
            span_size: 1,
            span_digests: vec![],
            compression: Compression::Uncompressed { size: 0 },
        };
        let t = LayerTree::build(&z);
        let f = t.lookup_path(b"a/f").unwrap();
        assert_eq!(t.lookup_path(b"a/h"), Some(f), "hardlinks share a node");
        assert_eq!(t.nodes[f].nlink, 2);
        // Directories: 2 plus one per subdirectory (each one's "..").
        assert_eq!(t.nodes[0].nlink, 4, "the root holds a and o");
        assert_eq!(t.nodes[t.lookup_path(b"a").unwrap()].nlink, 2);
        assert_eq!(
            t.nodes[t.lookup_path(b"a/gone").unwrap()].kind,
            NodeKind::Whiteout
        );
        assert!(t.lookup_path(b"a/.wh.gone").is_none());
        let o = t.lookup_path(b"o").unwrap();
        assert!(t.nodes[o].opaque);
        assert!(t.nodes[o]
            .all_xattrs()
            .contains(&(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())));
        assert_eq!(
            t.nodes[t.lookup_path(b"a/s").unwrap()].kind,
            NodeKind::Symlink(b"f".to_vec())
        );
        assert_eq!(
            (t.nodes[0].mode, t.nodes[0].uid),
            (0o555, 0),
            "the root is what containers/storage gives a layer root, whatever `./` says"
        );
    }

    fn ztoc_of(entries: Vec<Entry>) -> Ztoc {
        Ztoc {
            version: b"0.9".to_vec(),
            build_tool: vec![],
            compressed_size: 0,
            uncompressed_size: 0,
            entries,
            span_size: 1,
            span_digests: vec![],
            compression: Compression::Uncompressed { size: 0 },
        }
    }

    #[test]
    fn whiteouts_of_no_name_make_no_entry() {
        let t = LayerTree::build(&ztoc_of(vec![
            entry("./a/.wh.", EntryType::Reg, ""),
            entry("./a/.wh..", EntryType::Reg, ""),
            entry("./a/.wh...", EntryType::Reg, ""),
            entry("./.wh.", EntryType::Reg, ""),
            entry("./a/.wh....", EntryType::Reg, ""),
        ]));
        let a = t.lookup_path(b"a").unwrap();
        let names: Vec<&[u8]> = t.nodes[a].children.keys().map(Vec::as_slice).collect();
        assert_eq!(names, [&b"..."[..]], "only `.wh....` names a file (`...`)");
        assert!(t.nodes[0].children.keys().all(|n| n == b"a"));
    }

    #[test]
    fn a_name_listed_twice_is_its_last_copy_as_in_the_ztoc() {
        let z = ztoc_of(vec![
            entry("./f", EntryType::Reg, ""),
            entry("./h", EntryType::Hardlink, "f"),
            entry("./f", EntryType::Reg, ""),
        ]);
        let t = LayerTree::build(&z);
        let file = |p: &[u8]| match t.nodes[t.lookup_path(p).unwrap()].kind {
            NodeKind::File { entry, .. } => entry,
            ref other => panic!("{other:?}"),
        };
        assert_eq!(file(b"f"), 2);
        assert_eq!(z.find(b"./f"), Some(2));
        // The hardlink was made to the copy there when it was extracted.
        assert_eq!(file(b"h"), 0);
        assert_eq!(z.resolve_hardlink(1).unwrap(), 0);
    }
}
