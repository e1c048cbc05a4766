//! Where images are read from and written to: a registry repository or an OCI layout directory
//! (`oci:DIR[:tag]`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;

use super::{
    declared_media_type, parse_index, sha256_digest, Descriptor, Index, IndexError, MANIFEST_TYPES,
    MT_OCI_INDEX,
};
use crate::digest::Digest;
use crate::fetch::registry::RegistryClient;
use crate::fetch::{BlobLocator, FetchError};
use crate::reference::Reference;

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// An image location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageRef {
    Registry(Reference),
    Layout { dir: PathBuf, tag: Option<String> },
}

impl ImageRef {
    /// `oci:DIR[:tag]` or a registry reference.
    pub fn parse(s: &str) -> Result<ImageRef, IndexError> {
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') && !t.is_empty() => (d, Some(t.to_string())),
                _ => (rest, None),
            };
            if dir.is_empty() {
                return Err(IndexError::Other(format!("{s:?}: no directory")));
            }
            return Ok(ImageRef::Layout {
                dir: PathBuf::from(dir),
                tag,
            });
        }
        Reference::parse(s)
            .map(ImageRef::Registry)
            .map_err(|e| IndexError::Other(e.to_string()))
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ImageRef::Registry(r) => write!(f, "{r}"),
            ImageRef::Layout { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
            ImageRef::Layout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
        }
    }
}

/// An image location with the client to reach it.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    pub image: ImageRef,
    pub client: Arc<RegistryClient>,
}

/// How a blob reached the destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Copied {
    AlreadyThere,
    Mounted,
    Uploaded,
}

/// Reads a manifest, index or `index.json` of a layout: at most
/// [`MAX_MANIFEST_BYTES`](crate::fetch::registry::MAX_MANIFEST_BYTES), as registries allow.
fn read_document(p: &Path) -> Result<Vec<u8>, IndexError> {
    use std::io::Read;
    let max = crate::fetch::registry::MAX_MANIFEST_BYTES;
    let mut bytes = Vec::new();
    std::fs::File::open(p)
        .and_then(|f| f.take(max as u64 + 1).read_to_end(&mut bytes))
        .map_err(|e| io(e, p))?;
    if bytes.len() > max {
        return Err(IndexError::Manifest(format!(
            "{}: larger than the {max} bytes accepted for a manifest or index",
            p.display()
        )));
    }
    Ok(bytes)
}

/// A temporary name beside `p`, unique per write: two writes of one blob may run at once (in
/// this process or another).
fn temp_path(p: &Path) -> PathBuf {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    p.with_extension(format!("tmp{}-{n}", std::process::id()))
}

fn io(e: std::io::Error, what: &Path) -> IndexError {
    IndexError::Other(format!("{}: {e}", what.display()))
}

impl Endpoint {
    pub fn new(image: ImageRef, client: Arc<RegistryClient>) -> Self {
        Endpoint { image, client }
    }

    fn blob_path(dir: &Path, digest: &Digest) -> PathBuf {
        dir.join("blobs/sha256").join(digest.hex())
    }

    fn layout_index(dir: &Path) -> Result<Index, IndexError> {
        let p = dir.join("index.json");
        let bytes = read_document(&p)?;
        parse_index(&bytes).map_err(|e| IndexError::Manifest(format!("{}: {e}", p.display())))
    }

    /// A manifest by digest, or (with `None`) the one the reference names. Returns bytes,
    /// media type and digest; content is checked against a requested digest.
    pub async fn manifest(
        &self,
        digest: Option<&Digest>,
    ) -> Result<(Bytes, String, Digest), IndexError> {
        match &self.image {
            ImageRef::Registry(r) => {
                let target = match digest {
                    Some(d) => r.with_digest(d),
                    None => r.clone(),
                };
                Ok(self.client.manifest(&target, MANIFEST_TYPES).await?)
            }
            ImageRef::Layout { dir, tag } => {
                let (digest, served, size) = match digest {
                    Some(d) => (d.clone(), String::new(), None),
                    None => {
                        let idx = Self::layout_index(dir)?;
                        let entries = idx.manifests;
                        let pick = match tag {
                            Some(t) => entries
                                .into_iter()
                                .find(|m| m.annotations.get(REF_NAME) == Some(t)),
                            None if entries.len() == 1 => entries.into_iter().next(),
                            None => None,
                        };
                        let m = pick.ok_or_else(|| {
                            IndexError::Other(format!(
                                "{}: no such image in the layout",
                                self.image
                            ))
                        })?;
                        (m.digest, m.media_type, Some(m.size))
                    }
                };
                let p = Self::blob_path(dir, &digest);
                let data = Bytes::from(read_document(&p)?);
                if sha256_digest(&data) != digest {
                    return Err(IndexError::Manifest(format!(
                        "{}: content does not match {digest}",
                        p.display()
                    )));
                }
                if let Some(said) = size.filter(|&n| n != data.len() as u64) {
                    return Err(IndexError::Manifest(format!(
                        "{}: index.json says {digest} is {said} bytes, it is {}",
                        self.image,
                        data.len()
                    )));
                }
                let mt = declared_media_type(&data, &served);
                Ok((data, mt, digest))
            }
        }
    }

    /// A blob as a stream of chunks.
    pub async fn blob_stream(
        &self,
        digest: &Digest,
    ) -> Result<BoxStream<'static, Result<Bytes, FetchError>>, IndexError> {
        match &self.image {
            ImageRef::Registry(r) => {
                let resp = self
                    .client
                    .blob_stream(&BlobLocator::new(r.clone(), digest))
                    .await?;
                Ok(resp
                    .bytes_stream()
                    .map(|c| c.map_err(|e| FetchError::connection("reading a blob", e)))
                    .boxed())
            }
            ImageRef::Layout { dir, .. } => {
                let p = Self::blob_path(dir, digest);
                let file = std::fs::File::open(&p).map_err(|e| io(e, &p))?;
                Ok(futures::stream::unfold(Some(file), |file| async move {
                    let mut file = file?;
                    let r = tokio::task::spawn_blocking(move || {
                        use std::io::Read;
                        let mut buf = vec![0u8; 1 << 20];
                        let n = file.read(&mut buf)?;
                        buf.truncate(n);
                        Ok::<_, std::io::Error>((buf, file))
                    })
                    .await;
                    match r {
                        Ok(Ok((buf, _))) if buf.is_empty() => None,
                        Ok(Ok((buf, file))) => Some((Ok(Bytes::from(buf)), Some(file))),
                        Ok(Err(e)) => {
                            Some((Err(FetchError::backend("reading a layout blob", e)), None))
                        }
                        Err(e) => {
                            Some((Err(FetchError::backend("reading a layout blob", e)), None))
                        }
                    }
                })
                .boxed())
            }
        }
    }

    pub async fn has_blob(&self, digest: &Digest) -> Result<bool, IndexError> {
        match &self.image {
            ImageRef::Registry(r) => Ok(self.client.blob_exists(r, digest).await?),
            ImageRef::Layout { dir, .. } => Ok(Self::blob_path(dir, digest).exists()),
        }
    }

    fn ensure_layout(dir: &Path) -> Result<(), IndexError> {
        std::fs::create_dir_all(dir.join("blobs/sha256")).map_err(|e| io(e, dir))?;
        let marker = dir.join("oci-layout");
        if !marker.exists() {
            std::fs::write(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)
                .map_err(|e| io(e, &marker))?;
        }
        Ok(())
    }

    fn write_layout_blob(dir: &Path, digest: &Digest, data: &[u8]) -> Result<(), IndexError> {
        Self::ensure_layout(dir)?;
        let p = Self::blob_path(dir, digest);
        if p.exists() {
            return Ok(());
        }
        let tmp = temp_path(&p);
        std::fs::write(&tmp, data).map_err(|e| io(e, &tmp))?;
        std::fs::rename(&tmp, &p).map_err(|e| io(e, &p))
    }

    pub async fn put_blob(&self, digest: &Digest, data: Bytes) -> Result<(), IndexError> {
        match &self.image {
            ImageRef::Registry(r) => Ok(self.client.push_blob(r, digest, data).await?),
            ImageRef::Layout { dir, .. } => Self::write_layout_blob(dir, digest, &data),
        }
    }

    /// Makes a blob of `src` present here: already there, mounted within a registry, or copied
    /// as a stream (checked against its digest).
    pub async fn copy_blob_from(
        &self,
        src: &Endpoint,
        digest: &Digest,
    ) -> Result<Copied, IndexError> {
        if self.has_blob(digest).await? {
            return Ok(Copied::AlreadyThere);
        }
        if let (ImageRef::Registry(d), ImageRef::Registry(s)) = (&self.image, &src.image) {
            if d.registry == s.registry && self.client.mount_blob(d, digest, &s.repository).await? {
                return Ok(Copied::Mounted);
            }
        }
        let stream = src.blob_stream(digest).await?;
        self.put_blob_stream(digest, stream).await?;
        Ok(Copied::Uploaded)
    }

    /// Stores a blob from a stream of chunks, checked against its digest.
    pub async fn put_blob_stream(
        &self,
        digest: &Digest,
        stream: BoxStream<'static, Result<Bytes, FetchError>>,
    ) -> Result<(), IndexError> {
        match &self.image {
            // The registry checks the digest on the final PUT.
            ImageRef::Registry(d) => Ok(self.client.push_blob_stream(d, digest, stream).await?),
            ImageRef::Layout { dir, .. } => {
                Self::ensure_layout(dir)?;
                let p = Self::blob_path(dir, digest);
                let tmp = temp_path(&p);
                let mut f = std::fs::File::create(&tmp).map_err(|e| io(e, &tmp))?;
                let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
                let mut s = stream;
                while let Some(c) = s.next().await {
                    let c = match c {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = std::fs::remove_file(&tmp);
                            return Err(e.into());
                        }
                    };
                    sha2::Digest::update(&mut hasher, &c);
                    std::io::Write::write_all(&mut f, &c).map_err(|e| io(e, &tmp))?;
                }
                let got = Digest::from_sha256(sha2::Digest::finalize(hasher).into());
                if got != *digest {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(IndexError::Other(format!(
                        "blob {digest} arrived with digest {got}"
                    )));
                }
                std::fs::rename(&tmp, &p).map_err(|e| io(e, &p))
            }
        }
    }

    /// Stores a manifest; with a tag, points the tag at it. Returns its digest.
    pub async fn put_manifest(
        &self,
        data: Bytes,
        media_type: &str,
        tag: Option<&str>,
    ) -> Result<Digest, IndexError> {
        let digest = sha256_digest(&data);
        match &self.image {
            ImageRef::Registry(r) => {
                self.client
                    .put_manifest(r, tag.unwrap_or(&digest), media_type, data)
                    .await?;
            }
            ImageRef::Layout { dir, .. } => {
                Self::write_layout_blob(dir, &digest, &data)?;
                if let Some(t) = tag {
                    let mut idx = Self::layout_index(dir).unwrap_or_else(|_| Index {
                        schema_version: 2,
                        media_type: Some(MT_OCI_INDEX.into()),
                        manifests: Vec::new(),
                        annotations: Default::default(),
                    });
                    idx.manifests
                        .retain(|m| m.annotations.get(REF_NAME).map(String::as_str) != Some(t));
                    let mut entry = Descriptor::new(media_type, &digest, data.len() as u64);
                    entry.annotations.insert(REF_NAME.into(), t.to_string());
                    idx.manifests.push(entry);
                    let p = dir.join("index.json");
                    let tmp = dir.join("index.json.tmp");
                    std::fs::write(&tmp, serde_json::to_vec(&idx).expect("json"))
                        .map_err(|e| io(e, &tmp))?;
                    std::fs::rename(&tmp, &p).map_err(|e| io(e, &p))?;
                }
            }
        }
        Ok(digest)
    }

    /// The tag the reference names (registry tag, or layout ref name).
    pub fn tag(&self) -> Option<&str> {
        match &self.image {
            ImageRef::Registry(r) => r.tag.as_deref(),
            ImageRef::Layout { tag, .. } => tag.as_deref(),
        }
    }
}
