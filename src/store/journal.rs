//! The inode journal: every inode number the store hands the kernel, appended before the kernel
//! hears of it, so that a restarted daemon taking over the FUSE connection answers the kernel's
//! numbers exactly as its predecessor did. One JSON record per line.

use crate::digest::Digest;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

/// One journal line.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Record {
    /// The first line: which mount, and what the kernel said at the FUSE handshake.
    Mount {
        /// `major:minor` of the mount, as /proc/self/mountinfo shows it.
        dev: String,
        abi: (u32, u32),
        capabilities: u64,
    },
    /// A `<base64(ref)>` directory.
    RefDir { ino: u64, name: String },
    /// A layer: its directory, `info`, `blob` and `diff` root are `ino`..`ino+3`, its diff tree
    /// the `nodes` numbers from `ino+3`. Enough to rebuild it without the network.
    Layer(Box<LayerRecord>),
    /// `<digest>` in the ref directory `parent` is the layer at `ino`.
    LayerDir { parent: u64, name: String, ino: u64 },
    /// podman's reference count of the layer at `ino`.
    Uses { ino: u64, uses: i64 },
    /// File `ino` is open with FUSE passthrough through backing ID `id` of the connection.
    Backing { ino: u64, id: u32 },
    /// File `ino`'s backing ID is (about to be) closed: never to be used again.
    Unbacked { ino: u64 },
}

/// What a layer is, as [`Record::Layer`] stores it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerRecord {
    pub ino: u64,
    pub nodes: u64,
    pub reference: String,
    pub blob: Digest,
    pub blob_size: u64,
    pub ztoc: Digest,
    pub ztoc_size: u64,
    /// The zTOC table the layer was served from (digest, size), when it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<(Digest, u64)>,
    /// The windows blob of that table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub windows: Option<Digest>,
    /// A zstd:chunked layer: `ztoc` is its TOC's digest, rebuilt from the blob.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub chunked: bool,
    /// The `info` file, verbatim.
    pub info: String,
}

/// An append-only journal file.
pub struct Journal {
    file: Mutex<File>,
}

impl Journal {
    /// Starts a new, empty journal at `path` (replacing any old one); its first record must be
    /// a [`Record::Mount`].
    pub fn create(path: &Path) -> std::io::Result<Journal> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(path)?;
        Ok(Journal {
            file: Mutex::new(file),
        })
    }

    /// Continues the journal at `path`.
    pub fn reopen(path: &Path) -> std::io::Result<Journal> {
        let file = OpenOptions::new().append(true).open(path)?;
        Ok(Journal {
            file: Mutex::new(file),
        })
    }

    /// Appends one record. No fsync: the journal must outlive the daemon, not the machine (a
    /// FUSE connection does not survive a reboot either).
    pub fn append(&self, r: &Record) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.write_all(&line)
    }

    /// Reads every record of the journal at `path`. A torn last line (the daemon died while
    /// writing it) is dropped: its inode never reached the kernel.
    pub fn load(path: &Path) -> std::io::Result<Vec<Record>> {
        let mut out = Vec::new();
        let mut lines = BufReader::new(File::open(path)?).lines().peekable();
        while let Some(line) = lines.next() {
            let line = line?;
            match serde_json::from_str(&line) {
                Ok(r) => out.push(r),
                Err(_) if lines.peek().is_none() => break,
                Err(e) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: {e}", path.display()),
                    ))
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let first = Record::Mount {
            dev: "0:55".into(),
            abi: (7, 41),
            capabilities: 1 << 40,
        };
        let j = Journal::create(&p).unwrap();
        j.append(&first).unwrap();
        let r = Record::RefDir {
            ino: 2,
            name: "cmVm".into(),
        };
        j.append(&r).unwrap();
        drop(j);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(br#"{"kind":"uses","ino":"#).unwrap();
        assert_eq!(Journal::load(&p).unwrap(), vec![first, r]);
    }
}
