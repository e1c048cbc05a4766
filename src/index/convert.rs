//! `convert SRC DST`: a SOCI-enabled image (index manifest v2), and what `convert` and `create`
//! share: options, reports, choosing platform manifests, checking what is carried over. The
//! layers are indexed by `build`; `create` makes v1 indexes.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures::stream::StreamExt;

use super::build::{index_layers, push_ztocs, soci_index};
use super::discover::IndexKind;
use super::image::Endpoint;
use super::store::{ArtifactStore, IndexRecord};
use super::*;
use crate::digest::Digest;
use crate::ztoc::{self};

/// Which platforms to convert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Platforms {
    Host,
    These(Vec<Platform>),
    All,
}

/// The span size `convert` and `create` use unless told.
pub use crate::ztoc::DEFAULT_SPAN_SIZE;

/// Options for [`convert`] and [`create`].
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    pub span_size: u64,
    pub min_layer_size: u64,
    pub platforms: Platforms,
    /// Add the podman TOC annotation to indexed layers (formats.md §2.3).
    pub podman_annotations: bool,
    /// Layers processed at once.
    pub concurrency: usize,
    /// Files (paths in the image) whose spans a prefetch artifact per layer lists, first listed
    /// first: the store fetches those before the rest of the layer.
    pub prefetch_files: Vec<String>,
    /// Also push each zTOC's split form (`ztoc::table`: a compact table and its windows), which
    /// the store prefers: a lazy start then fetches the table at lookup and a window per span
    /// read, not the whole zTOC. Upstream tools ignore both blobs.
    pub ztoc_tables: bool,
    /// Uncompressed bytes per span of those tables (at most `span_size`): finer than the zTOC's,
    /// so a start fetches less, while the zTOC upstream tools read keeps its size.
    pub table_span_size: u64,
    /// Layers rewritten as zstd:chunked before indexing (`convert` only).
    pub zstd_chunked: super::rewrite::ZstdChunked,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            span_size: DEFAULT_SPAN_SIZE,
            min_layer_size: ztoc::DEFAULT_MIN_LAYER_SIZE,
            platforms: Platforms::Host,
            podman_annotations: true,
            concurrency: 3,
            prefetch_files: Vec::new(),
            ztoc_tables: true,
            table_span_size: ztoc::table::TABLE_SPAN_SIZE,
            zstd_chunked: Default::default(),
        }
    }
}

/// Progress callbacks (a terminal display, JSON lines, or nothing).
pub trait Progress: Send + Sync {
    fn layer_started(&self, _layer: &str, _size: u64) {}
    fn layer_bytes(&self, _layer: &str, _done: u64) {}
    fn layer_done(&self, _layer: &LayerReport) {}
}

/// No progress output.
pub struct Quiet;
impl Progress for Quiet {}

/// What happened to one layer.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LayerReport {
    pub digest: Digest,
    pub size: u64,
    /// The zTOC digest, when the layer was indexed.
    pub ztoc: Option<Digest>,
    pub spans: usize,
    /// Why it was not indexed, or how it reached the destination.
    pub note: String,
}

/// One converted platform.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PlatformReport {
    pub platform: String,
    pub image_manifest: Digest,
    pub soci_index: Digest,
    pub layers: Vec<LayerReport>,
}

/// What `convert` or `create` made.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConvertReport {
    /// The image index (`convert`), or the fallback tag index (`create` without referrers API).
    pub index: Option<Digest>,
    pub platforms: Vec<PlatformReport>,
}

pub(super) fn oci_media_type(mt: &str) -> String {
    match mt {
        MT_DOCKER_CONFIG => MT_OCI_CONFIG.into(),
        MT_DOCKER_LAYER_GZIP => MT_OCI_LAYER_GZIP.into(),
        "application/vnd.docker.image.rootfs.diff.tar" => MT_OCI_LAYER_TAR.into(),
        other => other.into(),
    }
}

/// Whether a media type is an image layer's (OCI or Docker; any compression, foreign or
/// non-distributable layers included).
pub(super) fn is_layer_type(mt: &str) -> bool {
    mt.starts_with("application/vnd.oci.image.layer.")
        || mt.starts_with("application/vnd.docker.image.rootfs.")
}

/// Checks what the converted manifest will carry over from the source: the config's and the
/// layers' media types, and the config's size (layers are sized as they stream).
pub(super) async fn check_image(src: &Endpoint, image: &Manifest) -> Result<(), IndexError> {
    let config = &image.config;
    if config.media_type != MT_OCI_CONFIG && config.media_type != MT_DOCKER_CONFIG {
        return Err(IndexError::Manifest(format!(
            "config {} has media type {:?}, not an image config",
            config.digest, config.media_type
        )));
    }
    for (i, l) in image.layers.iter().enumerate() {
        if !is_layer_type(&l.media_type) {
            return Err(IndexError::Manifest(format!(
                "layer {i} ({}) has media type {:?}, not an image layer",
                l.digest, l.media_type
            )));
        }
    }
    let max = crate::fetch::registry::MAX_MANIFEST_BYTES as u64;
    if config.size > max {
        return Err(IndexError::Manifest(format!(
            "config {} of {} bytes is larger than the {max} accepted",
            config.digest, config.size
        )));
    }
    let mut stream = src.blob_stream(&config.digest).await?;
    let mut size = 0u64;
    while let Some(c) = stream.next().await {
        size += c?.len() as u64;
        if size > config.size {
            break;
        }
    }
    if size != config.size {
        return Err(IndexError::Manifest(format!(
            "config {} is {}{size} bytes, its descriptor says {}",
            config.digest,
            if size > config.size { "over " } else { "" },
            config.size
        )));
    }
    Ok(())
}

/// The image manifests to convert (platform, bytes, digest), and the descriptors of the platforms
/// left as they are.
pub(super) type Selection = (Vec<(Platform, Bytes, Digest)>, Vec<Descriptor>);

pub(super) async fn platform_manifests(
    src: &Endpoint,
    opts: &ConvertOptions,
) -> Result<Selection, IndexError> {
    let (data, mt, digest) = src.manifest(None).await?;
    let mt = declared_media_type(&data, &mt);
    if !is_index_type(&mt) {
        let m = parse_manifest(&data)?;
        let mut s = src.blob_stream(&m.config.digest).await?;
        let mut config = Vec::new();
        while let Some(c) = s.next().await {
            config.extend_from_slice(&c?);
            if config.len() > crate::fetch::registry::MAX_MANIFEST_BYTES {
                return Err(IndexError::Manifest("image config too large".into()));
            }
        }
        let cfg: super::ImageConfig = serde_json::from_slice(&config)
            .map_err(|e| IndexError::Manifest(format!("image config: {e}")))?;
        let platform = Platform {
            architecture: cfg.architecture.unwrap_or_else(|| "amd64".into()),
            os: cfg.os.unwrap_or_else(|| "linux".into()),
            variant: cfg.variant,
        };
        return Ok((vec![(platform, data, digest)], Vec::new()));
    }
    let index = parse_index(&data)?;
    let mut out = Vec::new();
    let mut others = Vec::new();
    for d in index.manifests.iter().filter(|d| d.artifact_type.is_none()) {
        let Some(p) = &d.platform else { continue };
        let selected = match &opts.platforms {
            Platforms::All => true,
            Platforms::Host => Platform::host().matches(p),
            Platforms::These(list) => list.iter().any(|w| w.matches(p)),
        };
        if selected {
            let (m, _, digest) = src.manifest(Some(&d.digest)).await?;
            out.push((p.clone(), m, digest));
        } else {
            others.push(d.clone());
        }
    }
    if out.is_empty() {
        return Err(IndexError::NoPlatform(format!(
            "{:?} in {}",
            opts.platforms, src.image
        )));
    }
    Ok((out, others))
}

/// Copies an image manifest that is not converted (another platform), with its blobs, so that
/// the new index can list it unchanged.
pub(super) async fn carry_over(
    src: &Endpoint,
    dst: &Endpoint,
    d: &Descriptor,
) -> Result<(), IndexError> {
    let (data, _, _) = src.manifest(Some(&d.digest)).await?;
    if data.len() as u64 != d.size {
        return Err(IndexError::Manifest(format!(
            "manifest {} is {} bytes, its descriptor says {}",
            d.digest,
            data.len(),
            d.size
        )));
    }
    let m = parse_manifest(&data)?;
    dst.copy_blob_from(src, &m.config.digest).await?;
    for l in &m.layers {
        dst.copy_blob_from(src, &l.digest).await?;
    }
    dst.put_manifest(data, &d.media_type, None).await?;
    Ok(())
}

pub(super) fn record(store: Option<&ArtifactStore>, rec: IndexRecord, blobs: &[&[u8]]) {
    if let Some(s) = store {
        for b in blobs {
            if let Err(e) = s.put(b) {
                tracing::warn!("artifact store: {e}");
            }
        }
        if let Err(e) = s.record_index(&rec) {
            tracing::warn!("artifact store: {e}");
        }
    }
}

/// `convert SRC DST`: the SOCI index manifest v2 flow (formats.md §2.2).
pub async fn convert(
    src: &Endpoint,
    dst: &Endpoint,
    opts: &ConvertOptions,
    store: Option<&ArtifactStore>,
    progress: &dyn Progress,
) -> Result<ConvertReport, IndexError> {
    let mut image_descs = Vec::new();
    let mut soci_descs = Vec::new();
    let mut reports = Vec::new();
    let (selected, others) = platform_manifests(src, opts).await?;
    for d in &others {
        carry_over(src, dst, d).await?;
    }
    for (platform, data, _) in selected {
        let mut image = parse_manifest(&data)?;
        check_image(src, &image).await?;
        let rewritten =
            super::rewrite::rewrite_layers(src, dst, &mut image, opts.zstd_chunked, progress)
                .await?;
        for (old, new) in &rewritten {
            progress.layer_done(&LayerReport {
                digest: old.clone(),
                size: 0,
                ztoc: None,
                spans: 0,
                note: format!(
                    "rewritten as zstd:chunked {new} (a new digest; same content and diff ID)"
                ),
            });
        }
        let layers = index_layers(src, dst, &image, opts, true, progress).await?;
        let (ztocs, blobs) = push_ztocs(dst, &layers).await?;
        let index = soci_index(IndexKind::V2, ztocs.clone(), None);
        let index_bytes = Bytes::from(to_json(&index));
        let index_digest = dst
            .put_manifest(index_bytes.clone(), MT_OCI_MANIFEST, None)
            .await?;

        // The image manifest, as OCI, pointing at its index; layers unchanged.
        image.media_type = Some(MT_OCI_MANIFEST.into());
        image.config.media_type = oci_media_type(&image.config.media_type);
        for l in &mut image.layers {
            l.media_type = oci_media_type(&l.media_type);
            if opts.podman_annotations {
                if let Some(z) = ztocs.iter().find(|z| {
                    z.media_type == MT_ZTOC
                        && z.annotations.get(ANN_LAYER_DIGEST).map(String::as_str)
                            == Some(l.digest.as_str())
                }) {
                    l.annotations
                        .insert(ANN_STARGZ_TOC.into(), z.digest.to_string());
                }
            }
        }
        image
            .annotations
            .insert(ANN_INDEX_DIGEST.into(), index_digest.to_string());
        let image_bytes = Bytes::from(to_json(&image));
        let image_digest = dst
            .put_manifest(image_bytes.clone(), MT_OCI_MANIFEST, None)
            .await?;

        let mut idesc = Descriptor::new(MT_OCI_MANIFEST, &image_digest, image_bytes.len() as u64);
        idesc.platform = Some(platform.clone());
        image_descs.push(idesc);
        let mut sdesc = Descriptor::new(MT_OCI_MANIFEST, &index_digest, index_bytes.len() as u64);
        sdesc.artifact_type = Some(MT_SOCI_INDEX_V2.into());
        sdesc.platform = Some(platform.clone());
        sdesc
            .annotations
            .insert(ANN_IMAGE_MANIFEST_DIGEST.into(), image_digest.to_string());
        soci_descs.push(sdesc);

        let mut all: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
        all.push(&index_bytes);
        record(
            store,
            IndexRecord {
                digest: index_digest.clone(),
                kind: "v2".into(),
                image: dst.image.to_string(),
                image_manifest: image_digest.clone(),
                platform: platform.to_string(),
                ztocs: ztocs.iter().filter(|z| z.media_type == MT_ZTOC).count(),
                origin: "built".into(),
            },
            &all,
        );
        reports.push(PlatformReport {
            platform: platform.to_string(),
            image_manifest: image_digest,
            soci_index: index_digest,
            layers: layers.into_iter().map(|(r, _)| r).collect(),
        });
    }
    // Image manifests first: clients pick the first entry matching their platform.
    let index = Index {
        schema_version: 2,
        media_type: Some(MT_OCI_INDEX.into()),
        manifests: image_descs
            .into_iter()
            .chain(others)
            .chain(soci_descs)
            .collect(),
        annotations: BTreeMap::new(),
    };
    let tag = dst.tag().unwrap_or("latest").to_string();
    let digest = dst
        .put_manifest(Bytes::from(to_json(&index)), MT_OCI_INDEX, Some(&tag))
        .await?;
    Ok(ConvertReport {
        index: Some(digest),
        platforms: reports,
    })
}
