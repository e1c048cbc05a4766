//! The local artifact store: a content-addressed directory keeping every SOCI index and zTOC this
//! machine built or fetched (`blobs/sha256/<hex>`), plus a record per index (`indexes/<hex>.json`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::sha256_digest;
use crate::digest::Digest;

/// What is known about one stored SOCI index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexRecord {
    /// Digest of the SOCI index manifest.
    pub digest: Digest,
    /// `v1` (found through referrers) or `v2` (annotation on the image manifest).
    pub kind: String,
    /// The image reference it was made or found for.
    pub image: String,
    /// The image manifest it indexes.
    pub image_manifest: Digest,
    pub platform: String,
    pub ztocs: usize,
    /// `built` here or `fetched` from a registry.
    pub origin: String,
}

/// A content-addressed directory.
#[derive(Clone, Debug)]
pub struct ArtifactStore {
    root: PathBuf,
}

fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)
}

impl ArtifactStore {
    pub fn open(root: impl Into<PathBuf>) -> std::io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(root.join("blobs/sha256"))?;
        std::fs::create_dir_all(root.join("indexes"))?;
        Ok(ArtifactStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    /// Stores bytes; returns their digest.
    pub fn put(&self, data: &[u8]) -> std::io::Result<Digest> {
        let digest = sha256_digest(data);
        let p = self.blob_path(&digest);
        if !p.exists() {
            write_atomic(&p, data)?;
        }
        Ok(digest)
    }

    /// Bytes by digest, checked; a corrupt entry is removed and reported missing.
    pub fn get(&self, digest: &Digest) -> std::io::Result<Option<Vec<u8>>> {
        let p = self.blob_path(digest);
        match std::fs::read(&p) {
            Ok(data) if sha256_digest(&data) == *digest => Ok(Some(data)),
            Ok(_) => {
                tracing::warn!("removing corrupt artifact {}", p.display());
                let _ = std::fs::remove_file(&p);
                Ok(None)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub fn record_index(&self, rec: &IndexRecord) -> std::io::Result<()> {
        let p = self
            .root
            .join("indexes")
            .join(format!("{}.json", rec.digest.hex()));
        write_atomic(&p, &serde_json::to_vec_pretty(rec).expect("json"))
    }

    pub fn index_record(&self, digest: &Digest) -> std::io::Result<Option<IndexRecord>> {
        let p = self
            .root
            .join("indexes")
            .join(format!("{}.json", digest.hex()));
        match std::fs::read(&p) {
            Ok(b) => Ok(serde_json::from_slice(&b).ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every recorded index, sorted by image.
    pub fn indexes(&self) -> std::io::Result<Vec<IndexRecord>> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(self.root.join("indexes"))? {
            let p = e?.path();
            if p.extension().is_some_and(|x| x == "json") {
                if let Ok(rec) = serde_json::from_slice::<IndexRecord>(&std::fs::read(&p)?) {
                    out.push(rec);
                }
            }
        }
        out.sort_by(|a, b| (&a.image, &a.digest).cmp(&(&b.image, &b.digest)));
        Ok(out)
    }
}
