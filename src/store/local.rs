//! The decompressed local copy: once every span of a layer is local, each of its regular files is
//! written out once as a plain file, `<local_files>/<blob hex>/<entry index>`. Reads of such a file
//! never inflate again; with FUSE passthrough the kernel reads it directly.
//!
//! Crash safety: a file is written under a temporary name, and a batch of them is flushed to disk
//! (`syncfs`) before any gets its final name, so a name that exists always holds the whole file,
//! after a `kill -9` or a power loss alike; temporary files are removed at start. Every file is
//! also checked against the size its zTOC entry gives before it is served.
//!
//! The copies are bounded by `local_files_max_bytes`: the least recently opened files are removed
//! first (an open file keeps its data until closed). A layer's copies are removed when podman
//! releases the layer (`podman rmi`).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::digest::Digest;

/// Copies written before they are flushed and renamed together: one `syncfs` per batch.
const BATCH_BYTES: u64 = 256 << 20;

/// The decompressed copies of one store.
#[derive(Debug)]
pub struct LocalFiles {
    root: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
}

/// (layer blob hex, entry index).
type Key = (String, usize);

#[derive(Debug, Default)]
struct State {
    /// Copies → size and last use.
    files: HashMap<Key, Kept>,
    /// Copies by last use, oldest first: eviction takes the first without scanning them all.
    order: BTreeMap<u64, Key>,
    used: u64,
    clock: u64,
}

impl State {
    /// Records (or replaces) a copy as just used.
    fn insert(&mut self, key: Key, size: u64) {
        self.remove(&key);
        self.clock += 1;
        self.order.insert(self.clock, key.clone());
        self.files.insert(
            key,
            Kept {
                size,
                last: self.clock,
            },
        );
        self.used += size;
    }

    /// Marks a copy as just used; false when there is none.
    fn touch(&mut self, key: &Key) -> bool {
        let Some(kept) = self.files.get_mut(key) else {
            return false;
        };
        self.clock += 1;
        self.order.remove(&kept.last);
        kept.last = self.clock;
        self.order.insert(self.clock, key.clone());
        true
    }

    fn remove(&mut self, key: &Key) {
        if let Some(kept) = self.files.remove(key) {
            self.order.remove(&kept.last);
            self.used -= kept.size;
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Kept {
    size: u64,
    last: u64,
}

fn is_hex_name(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl LocalFiles {
    /// Opens (and makes) the directory: removes temporary files a killed daemon left, takes
    /// stock of the copies there, oldest first, and trims them to `max_bytes`.
    pub fn open(root: &Path, max_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let mut found: Vec<(std::time::SystemTime, String, usize, u64)> = Vec::new();
        for layer in std::fs::read_dir(root)? {
            let layer = layer?;
            let name = layer.file_name().to_string_lossy().into_owned();
            if !is_hex_name(&name) || !layer.file_type()?.is_dir() {
                continue;
            }
            for f in std::fs::read_dir(layer.path())? {
                let f = f?;
                let fname = f.file_name().to_string_lossy().into_owned();
                match fname.parse::<usize>() {
                    Ok(idx) if f.file_type()?.is_file() => {
                        let meta = f.metadata()?;
                        let when = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                        found.push((when, name.clone(), idx, meta.len()));
                    }
                    // Temporary files of a daemon that stopped mid-write, and anything else.
                    _ => {
                        let _ = std::fs::remove_file(f.path());
                    }
                }
            }
        }
        found.sort();
        let mut state = State::default();
        for (_, hex, idx, size) in found {
            state.insert((hex, idx), size);
        }
        let files = LocalFiles {
            root: root.to_path_buf(),
            max_bytes,
            state: Mutex::new(state),
        };
        files.evict_to(max_bytes);
        Ok(files)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn layer_dir(&self, layer: &Digest) -> PathBuf {
        self.root.join(layer.hex())
    }

    /// The copy of `entry` of `layer`, if there is one of `size` bytes.
    pub fn get(&self, layer: &Digest, entry: usize, size: u64) -> Option<File> {
        let key = (layer.hex().to_string(), entry);
        if !self.lock().touch(&key) {
            return None;
        }
        let path = self.layer_dir(layer).join(entry.to_string());
        match File::open(&path) {
            Ok(f) if f.metadata().is_ok_and(|m| m.len() == size) => Some(f),
            Ok(_) => {
                tracing::warn!(path = %path.display(), "local copy has the wrong size; removed");
                self.forget(&key, &path);
                None
            }
            Err(_) => {
                self.forget(&key, &path);
                None
            }
        }
    }

    /// Whether `entry` of `layer` has a copy.
    pub fn contains(&self, layer: &Digest, entry: usize) -> bool {
        self.lock()
            .files
            .contains_key(&(layer.hex().to_string(), entry))
    }

    fn forget(&self, key: &Key, path: &Path) {
        let _ = std::fs::remove_file(path);
        self.lock().remove(key);
    }

    /// Bytes held.
    #[cfg(test)]
    fn used_bytes(&self) -> u64 {
        self.lock().used
    }

    /// Removes least recently used copies until at most `limit` bytes are held.
    fn evict_to(&self, limit: u64) {
        loop {
            let victim = {
                let st = self.lock();
                if st.used <= limit {
                    return;
                }
                st.order.first_key_value().map(|(_, key)| key.clone())
            };
            let Some(key) = victim else { return };
            let path = self.root.join(&key.0).join(key.1.to_string());
            self.forget(&key, &path);
        }
    }

    /// Removes every copy of `layer`.
    pub fn remove_layer(&self, layer: &Digest) {
        let hex = layer.hex().to_string();
        {
            let mut st = self.lock();
            let gone: Vec<_> = st.files.keys().filter(|k| k.0 == hex).cloned().collect();
            for k in gone {
                st.remove(&k);
            }
        }
        let _ = std::fs::remove_dir_all(self.layer_dir(layer));
    }

    /// A writer of copies for `layer`.
    pub fn writer(&self, layer: &Digest) -> io::Result<LayerWriter<'_>> {
        let dir = self.layer_dir(layer);
        std::fs::create_dir_all(&dir)?;
        Ok(LayerWriter {
            files: self,
            dir,
            hex: layer.hex().to_string(),
            pending: Vec::new(),
            pending_bytes: 0,
        })
    }
}

/// Writes copies of one layer's files in batches.
pub struct LayerWriter<'a> {
    files: &'a LocalFiles,
    dir: PathBuf,
    hex: String,
    pending: Vec<(usize, PathBuf, u64)>,
    pending_bytes: u64,
}

impl LayerWriter<'_> {
    /// Writes the `size` bytes of `entry` that `fill` produces under a temporary name; they are
    /// served after the next [`Self::commit`]. Returns false (writing nothing) when the file
    /// alone is larger than the bound.
    pub fn add(
        &mut self,
        entry: usize,
        size: u64,
        fill: impl FnOnce(&mut dyn Write) -> io::Result<()>,
    ) -> io::Result<bool> {
        if size > self.files.max_bytes {
            return Ok(false);
        }
        // A batch never holds more than the bound.
        if self.pending_bytes + size > self.files.max_bytes {
            self.commit()?;
        }
        let tmp = self.dir.join(format!("{entry}.tmp{}", std::process::id()));
        let result = (|| {
            let mut out = io::BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
            fill(&mut out)?;
            out.flush()?;
            let written = out.get_ref().metadata()?.len();
            if written != size {
                return Err(io::Error::other(format!(
                    "entry {entry}: wrote {written} bytes, its size is {size}"
                )));
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        self.pending.push((entry, tmp, size));
        self.pending_bytes += size;
        if self.pending_bytes >= BATCH_BYTES {
            self.commit()?;
        }
        Ok(true)
    }

    /// Flushes the batch to disk, then gives every file of it its final name.
    pub fn commit(&mut self) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let incoming = self.pending_bytes;
        self.files
            .evict_to(self.files.max_bytes.saturating_sub(incoming));
        // Durable before visible: one flush for the whole batch.
        nix::unistd::syncfs(File::open(&self.dir)?).map_err(io::Error::from)?;
        for (entry, tmp, size) in self.pending.drain(..) {
            std::fs::rename(&tmp, self.dir.join(entry.to_string()))?;
            self.files.lock().insert((self.hex.clone(), entry), size);
        }
        self.pending_bytes = 0;
        // Copies written meanwhile by another writer may have taken the room.
        self.files.evict_to(self.files.max_bytes);
        Ok(())
    }
}

impl Drop for LayerWriter<'_> {
    fn drop(&mut self) {
        for (_, tmp, _) in self.pending.drain(..) {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(files: &LocalFiles, layer: &Digest, entry: usize, data: &[u8]) {
        let mut w = files.writer(layer).unwrap();
        assert!(w
            .add(entry, data.len() as u64, |out| out.write_all(data))
            .unwrap());
        w.commit().unwrap();
    }

    #[test]
    fn copies_appear_whole_and_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let layer = Digest::of(b"layer");
        let files = LocalFiles::open(dir.path(), 10).unwrap();
        // Not committed: not served, and gone when the writer is dropped.
        {
            let mut w = files.writer(&layer).unwrap();
            w.add(1, 3, |out| out.write_all(b"abc")).unwrap();
            assert!(files.get(&layer, 1, 3).is_none());
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join(layer.hex()))
                .unwrap()
                .count(),
            0
        );
        // A fill that writes the wrong length is refused.
        let mut w = files.writer(&layer).unwrap();
        assert!(w.add(2, 5, |out| out.write_all(b"abc")).is_err());
        drop(w);
        write(&files, &layer, 1, b"abcd");
        write(&files, &layer, 2, b"efgh");
        assert!(files.get(&layer, 1, 4).is_some());
        // A third file pushes out the least recently used one (2: 1 was just read).
        write(&files, &layer, 3, b"ijkl");
        assert!(files.used_bytes() <= 10);
        assert!(!files.contains(&layer, 2) && files.contains(&layer, 1));
        // Larger than the bound: not kept.
        let mut w = files.writer(&layer).unwrap();
        assert!(!w.add(4, 11, |out| out.write_all(&[0; 11])).unwrap());
        // A wrong size on disk is never served.
        assert!(files.get(&layer, 1, 5).is_none());
        assert!(!files.contains(&layer, 1));
    }

    #[test]
    fn a_restart_keeps_copies_and_drops_temporary_files() {
        let dir = tempfile::tempdir().unwrap();
        let layer = Digest::of(b"layer");
        {
            let files = LocalFiles::open(dir.path(), 1 << 20).unwrap();
            write(&files, &layer, 7, b"kept");
        }
        // What a daemon killed mid-write leaves.
        let ldir = dir.path().join(layer.hex());
        std::fs::write(ldir.join("8.tmp123"), b"half").unwrap();
        let files = LocalFiles::open(dir.path(), 1 << 20).unwrap();
        assert!(!ldir.join("8.tmp123").exists());
        assert!(files.get(&layer, 8, 4).is_none());
        let mut f = files.get(&layer, 7, 4).unwrap();
        let mut s = String::new();
        std::io::Read::read_to_string(&mut f, &mut s).unwrap();
        assert_eq!(s, "kept");
        files.remove_layer(&layer);
        assert!(!ldir.exists() && files.used_bytes() == 0);
    }
}
