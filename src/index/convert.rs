//! Making SOCI indexes: `convert` (v2: a SOCI-enabled image index) and `create` (v1: an index
//! with `subject`, pushed beside the image). Each layer is streamed once from the source into the
//! zTOC builder (and, only when the destination is another registry or a layout, on to it).

use std::collections::BTreeMap;
use std::io::Read;

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

use super::discover::IndexKind;
use super::image::{Endpoint, ImageRef};
use super::store::{ArtifactStore, IndexRecord};
use super::*;
use crate::digest::Digest;
use crate::fetch::FetchError;
use crate::reference::Reference;
use crate::ztoc::{self, format, BuildOptions, Ztoc};

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

/// A blocking reader over chunks sent by the async side.
struct ChannelReader {
    rx: mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(c) => self.cur = c,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        let _ = self.cur.split_to(n);
        Ok(n)
    }
}

fn indexable(media_type: &str) -> Result<(), &'static str> {
    if media_type.contains("zstd") {
        Err("zstd layers are not indexed (pulled normally)")
    } else if media_type.ends_with("tar+gzip")
        || media_type.ends_with("tar.gzip")
        || media_type.ends_with(".tar")
        || media_type.ends_with("diff.tar")
    {
        Ok(())
    } else {
        Err("not a gzip or tar layer")
    }
}

/// Streams one layer from `src` once: into the zTOC builder when `build`, and to `dst` when
/// `upload`. The stream is checked against the layer digest.
async fn process_layer(
    src: &Endpoint,
    dst: &Endpoint,
    layer: &Descriptor,
    build: Option<BuildOptions>,
    upload: bool,
    progress: &dyn Progress,
) -> Result<Option<(Ztoc, Vec<u8>)>, IndexError> {
    let mut stream = src.blob_stream(&layer.digest).await?;
    let (ztx, zrx) = mpsc::channel::<Bytes>(8);
    let builder = build.map(|opts| {
        tokio::task::spawn_blocking(move || {
            let reader = ChannelReader {
                rx: zrx,
                cur: Bytes::new(),
            };
            ztoc::build(
                std::io::BufReader::with_capacity(256 << 10, reader),
                &opts,
                &mut |_| {},
            )
        })
    });
    let (utx, urx) = mpsc::channel::<Result<Bytes, FetchError>>(8);
    let uploader = upload.then(|| {
        let dst = dst.clone();
        let digest = layer.digest.clone();
        let chunks: BoxStream<'static, Result<Bytes, FetchError>> = futures::stream::unfold(
            urx,
            |mut rx| async move { rx.recv().await.map(|c| (c, rx)) },
        )
        .boxed();
        tokio::spawn(async move { dst.put_blob_stream(&digest, chunks).await })
    });
    let mut hasher = Sha256::new();
    let mut done = 0u64;
    let mut feed_err = None;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                feed_err = Some(IndexError::from(e));
                break;
            }
        };
        hasher.update(&chunk);
        done += chunk.len() as u64;
        progress.layer_bytes(&layer.digest, done);
        if builder.is_some() && ztx.send(chunk.clone()).await.is_err() {
            // The builder stopped early (an error it will report); keep feeding the upload.
        }
        if uploader.is_some() && utx.send(Ok(chunk)).await.is_err() {
            break;
        }
    }
    let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
    if feed_err.is_none() && actual != layer.digest {
        feed_err = Some(IndexError::Other(format!(
            "layer {} arrived with digest {actual}",
            layer.digest
        )));
    }
    if feed_err.is_none() && done != layer.size {
        feed_err = Some(IndexError::Manifest(format!(
            "layer {} is {done} bytes, its descriptor says {}",
            layer.digest, layer.size
        )));
    }
    if let Some(e) = &feed_err {
        // Make the upload fail rather than complete a wrong blob.
        let _ = utx.send(Err(FetchError::Integrity(e.to_string()))).await;
    }
    drop(ztx);
    drop(utx);
    if let Some(u) = uploader {
        u.await.map_err(|e| IndexError::Other(e.to_string()))??;
    }
    if let Some(e) = feed_err {
        return Err(e);
    }
    match builder {
        None => Ok(None),
        Some(b) => {
            let z = b.await.map_err(|e| IndexError::Other(e.to_string()))??;
            let bytes = format::encode(&z)?;
            Ok(Some((z, bytes)))
        }
    }
}

/// The zTOC layer descriptor for an indexed image layer.
fn ztoc_descriptor(layer: &Descriptor, z: &Ztoc, bytes: &[u8]) -> Descriptor {
    let mut d = Descriptor::new(MT_ZTOC, sha256_digest(bytes), bytes.len() as u64);
    d.annotations
        .insert(ANN_LAYER_DIGEST.into(), layer.digest.to_string());
    d.annotations
        .insert(ANN_LAYER_MEDIA_TYPE.into(), layer.media_type.clone());
    d.annotations
        .insert(ANN_SPAN_SIZE.into(), z.span_size.to_string());
    let has_xattrs = z.entries.iter().any(|e| e.xattrs().next().is_some());
    let has_opaque = z.entries.iter().any(|e| e.name.ends_with(b".wh..wh..opq"));
    if !has_xattrs && !has_opaque {
        d.annotations
            .insert(ANN_DISABLE_XATTRS.into(), "true".into());
    }
    d
}

/// The split form of a layer's zTOC as index blobs: its table, and its windows (gzip layers).
fn table_artifacts(
    layer: &Descriptor,
    zdesc: &Descriptor,
    z: &Ztoc,
) -> Result<Vec<(Descriptor, Vec<u8>)>, IndexError> {
    let split = ztoc::table::split(z)?;
    let mut out = Vec::new();
    for (mt, bytes) in [
        (MT_ZTOC_TABLE, split.table),
        (MT_ZTOC_WINDOWS, split.windows),
    ] {
        if bytes.is_empty() {
            continue;
        }
        let mut d = Descriptor::new(mt, sha256_digest(&bytes), bytes.len() as u64);
        d.annotations
            .insert(ANN_TABLE_LAYER_DIGEST.into(), layer.digest.to_string());
        d.annotations
            .insert(ANN_TABLE_ZTOC_DIGEST.into(), zdesc.digest.to_string());
        out.push((d, bytes));
    }
    Ok(out)
}

/// The SOCI prefetch artifact (formats.md §2.1) for the `files` of one layer: the spans holding
/// their data, priority by position in `files` (0 first). None when the layer holds none of them.
pub fn prefetch_artifact(z: &Ztoc, files: &[String]) -> Option<Vec<u8>> {
    fn norm(p: &[u8]) -> &[u8] {
        let p = p.strip_prefix(b".").unwrap_or(p);
        let start = p.iter().position(|&b| b != b'/').unwrap_or(p.len());
        &p[start..]
    }
    let mut ranges = Vec::new();
    for (priority, f) in files.iter().enumerate() {
        let want = norm(f.as_bytes());
        // The last copy of a name listed twice is the file (tar semantics).
        let found = z
            .entries
            .iter()
            .rev()
            .find(|e| norm(&e.name) == want)
            .filter(|e| e.kind == crate::ztoc::EntryType::Reg && e.size > 0);
        if let Some(e) = found {
            ranges.push(serde_json::json!({
                "start_span": z.span_for_offset(e.offset),
                "end_span": z.span_for_offset(e.offset + e.size - 1),
                "priority": priority,
            }));
        }
    }
    (!ranges.is_empty()).then(|| {
        serde_json::to_vec(&serde_json::json!({"version": "1.0", "prefetch_spans": ranges}))
            .expect("json")
    })
}

fn oci_media_type(mt: &str) -> String {
    match mt {
        MT_DOCKER_CONFIG => MT_OCI_CONFIG.into(),
        MT_DOCKER_LAYER_GZIP => MT_OCI_LAYER_GZIP.into(),
        "application/vnd.docker.image.rootfs.diff.tar" => MT_OCI_LAYER_TAR.into(),
        other => other.into(),
    }
}

/// Whether a media type is an image layer's (OCI or Docker; any compression, foreign or
/// non-distributable layers included).
fn is_layer_type(mt: &str) -> bool {
    mt.starts_with("application/vnd.oci.image.layer.")
        || mt.starts_with("application/vnd.docker.image.rootfs.")
}

/// Checks what the converted manifest will carry over from the source: the config's and the
/// layers' media types, and the config's size (layers are sized as they stream).
async fn check_image(src: &Endpoint, image: &Manifest) -> Result<(), IndexError> {
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

/// zTOCs for the image's eligible layers; copies config and layers to `dst` when `copy`.
async fn index_layers(
    src: &Endpoint,
    dst: &Endpoint,
    image: &Manifest,
    opts: &ConvertOptions,
    copy: bool,
    progress: &dyn Progress,
) -> Result<Vec<(LayerReport, Vec<(Descriptor, Vec<u8>)>)>, IndexError> {
    if copy {
        dst.copy_blob_from(src, &image.config.digest).await?;
    }
    let build_opts = BuildOptions {
        span_size: opts.span_size,
        min_layer_size: opts.min_layer_size,
        ..Default::default()
    };
    // Images repeat layers (empty layers, identical steps): each distinct layer is copied and
    // indexed once, its later places get its report (and no second set of artifacts).
    let mut distinct: Vec<&Descriptor> = Vec::new();
    for layer in &image.layers {
        if !distinct.iter().any(|d| d.digest == layer.digest) {
            distinct.push(layer);
        }
    }
    let jobs = distinct.iter().map(|&layer| {
        let build_opts = build_opts.clone();
        async move {
            progress.layer_started(&layer.digest, layer.size);
            let eligible = match indexable(&layer.media_type) {
                Ok(()) if layer.size < opts.min_layer_size => {
                    Err("smaller than the minimum layer size (pulled normally)")
                }
                other => other,
            };
            let mut note = match eligible {
                Ok(()) => String::new(),
                Err(n) => n.to_string(),
            };
            let mut upload = false;
            if copy {
                // Within a registry: already there, or mounted; otherwise streamed with the build.
                upload = !dst.has_blob(&layer.digest).await?;
                if upload {
                    if let (ImageRef::Registry(d), ImageRef::Registry(s)) = (&dst.image, &src.image)
                    {
                        if d.registry == s.registry
                            && dst
                                .client
                                .mount_blob(d, &layer.digest, &s.repository)
                                .await?
                        {
                            upload = false;
                            note_push(&mut note, "mounted");
                        }
                    }
                }
            }
            let build = eligible.is_ok().then_some(build_opts);
            let built = if build.is_some() || upload {
                process_layer(src, dst, layer, build, upload, progress).await?
            } else {
                None
            };
            if upload {
                note_push(&mut note, "copied");
            }
            let mut artifacts = Vec::new();
            if let Some((z, bytes)) = &built {
                let zdesc = ztoc_descriptor(layer, z, bytes);
                if opts.ztoc_tables {
                    artifacts.extend(table_artifacts(layer, &zdesc, z)?);
                }
                artifacts.insert(0, (zdesc, bytes.clone()));
                if let Some(p) = prefetch_artifact(z, &opts.prefetch_files) {
                    let mut d =
                        Descriptor::new(MT_SOCI_PREFETCH, sha256_digest(&p), p.len() as u64);
                    d.annotations
                        .insert(ANN_LAYER_DIGEST.into(), layer.digest.to_string());
                    artifacts.push((d, p));
                    note_push(&mut note, "prefetch artifact");
                }
            }
            let report = LayerReport {
                digest: layer.digest.clone(),
                size: layer.size,
                ztoc: built.as_ref().map(|(_, b)| sha256_digest(b)),
                spans: built.as_ref().map_or(0, |(z, _)| z.span_count()),
                note,
            };
            progress.layer_done(&report);
            Ok::<_, IndexError>((report, artifacts))
        }
    });
    let results: Vec<_> = futures::stream::iter(jobs)
        .buffered(opts.concurrency.max(1))
        .collect()
        .await;
    let mut built = results
        .into_iter()
        .map(|r| r.map(Some))
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::with_capacity(image.layers.len());
    for (i, layer) in image.layers.iter().enumerate() {
        let first = image
            .layers
            .iter()
            .position(|l| l.digest == layer.digest)
            .expect("the layer itself");
        if first == i {
            let at = distinct
                .iter()
                .position(|d| d.digest == layer.digest)
                .expect("listed");
            out.push(built[at].take().expect("each distinct layer once"));
        } else {
            let report = out[first].0.clone();
            let note = format!("same layer as layer {first}");
            out.push((LayerReport { note, ..report }, Vec::new()));
        }
    }
    Ok(out)
}

fn note_push(note: &mut String, what: &str) {
    if !note.is_empty() {
        note.push_str("; ");
    }
    note.push_str(what);
}

/// Each layer's report and index artifacts (its zTOC, then its prefetch artifact).
type BuiltLayers = [(LayerReport, Vec<(Descriptor, Vec<u8>)>)];

/// Uploads the built zTOCs, prefetch artifacts and the index config blob; returns their
/// descriptors and bytes.
async fn push_ztocs(
    dst: &Endpoint,
    layers: &BuiltLayers,
) -> Result<(Vec<Descriptor>, Vec<Vec<u8>>), IndexError> {
    let mut ztocs = Vec::new();
    let mut blobs = Vec::new();
    for (desc, bytes) in layers.iter().flat_map(|(_, built)| built) {
        dst.put_blob(&desc.digest, Bytes::from(bytes.clone()))
            .await?;
        blobs.push(bytes.clone());
        ztocs.push(desc.clone());
    }
    dst.put_blob(&empty_json_digest(), Bytes::from_static(EMPTY_JSON))
        .await?;
    Ok((ztocs, blobs))
}

/// The SOCI index manifest for these zTOCs (v1 with a subject, or v2).
fn soci_index(kind: IndexKind, ztocs: Vec<Descriptor>, subject: Option<Descriptor>) -> Manifest {
    let config_type = match kind {
        IndexKind::V1 => MT_SOCI_INDEX_V1,
        IndexKind::V2 => MT_SOCI_INDEX_V2,
    };
    Manifest {
        schema_version: 2,
        media_type: Some(MT_OCI_MANIFEST.into()),
        artifact_type: None,
        config: Descriptor::new(config_type, empty_json_digest(), EMPTY_JSON.len() as u64),
        layers: ztocs,
        subject,
        annotations: BTreeMap::from([(ANN_BUILD_TOOL.to_string(), ztoc::BUILD_TOOL.to_string())]),
    }
}

/// The image manifests to convert: (platform, manifest bytes, digest).
/// The image manifests to convert (platform, bytes, digest), and the descriptors of the platforms
/// left as they are.
type Selection = (Vec<(Platform, Bytes, Digest)>, Vec<Descriptor>);

async fn platform_manifests(
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
async fn carry_over(src: &Endpoint, dst: &Endpoint, d: &Descriptor) -> Result<(), IndexError> {
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

fn record(store: Option<&ArtifactStore>, rec: IndexRecord, blobs: &[&[u8]]) {
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

/// `create IMAGE`: the v1 flow (formats.md §2.1): an index with `subject`, pushed to the image's
/// repository, listed by the referrers API or in the fallback tag.
pub async fn create(
    image: &Endpoint,
    opts: &ConvertOptions,
    store: Option<&ArtifactStore>,
    progress: &dyn Progress,
) -> Result<ConvertReport, IndexError> {
    let ImageRef::Registry(r) = &image.image else {
        return Err(IndexError::Other(
            "create works on registry images (use convert for OCI layouts)".into(),
        ));
    };
    let mut reports = Vec::new();
    let mut fallback_digest = None;
    for (platform, data, digest) in platform_manifests(image, opts).await?.0 {
        let manifest = parse_manifest(&data)?;
        let layers = index_layers(image, image, &manifest, opts, false, progress).await?;
        let (ztocs, blobs) = push_ztocs(image, &layers).await?;
        let mt = declared_media_type(&data, MT_OCI_MANIFEST);
        let subject = Descriptor::new(&mt, &digest, data.len() as u64);
        let index = soci_index(IndexKind::V1, ztocs.clone(), Some(subject));
        let index_bytes = Bytes::from(to_json(&index));
        let index_digest = image
            .put_manifest(index_bytes.clone(), MT_OCI_MANIFEST, None)
            .await?;

        // Registries with the referrers API list the index by its subject; others need the
        // fallback tag, merged with what it already lists.
        if image
            .client
            .referrers(r, &digest, MT_SOCI_INDEX_V1)
            .await?
            .is_none()
        {
            let tag = format!("sha256-{}", digest.trim_start_matches("sha256:"));
            let fallback = Reference {
                tag: Some(tag.clone()),
                digest: None,
                ..r.clone()
            };
            let mut listing = match image.client.manifest(&fallback, &[MT_OCI_INDEX]).await {
                Ok((b, _, _)) => parse_index(&b)?,
                Err(FetchError::NotFound(_)) => Index {
                    schema_version: 2,
                    media_type: Some(MT_OCI_INDEX.into()),
                    manifests: Vec::new(),
                    annotations: BTreeMap::new(),
                },
                Err(e) => return Err(e.into()),
            };
            if !listing.manifests.iter().any(|d| d.digest == index_digest) {
                let mut d =
                    Descriptor::new(MT_OCI_MANIFEST, &index_digest, index_bytes.len() as u64);
                d.artifact_type = Some(MT_SOCI_INDEX_V1.into());
                listing.manifests.push(d);
            }
            fallback_digest = Some(
                image
                    .put_manifest(Bytes::from(to_json(&listing)), MT_OCI_INDEX, Some(&tag))
                    .await?,
            );
        }
        let mut all: Vec<&[u8]> = blobs.iter().map(Vec::as_slice).collect();
        all.push(&index_bytes);
        record(
            store,
            IndexRecord {
                digest: index_digest.clone(),
                kind: "v1".into(),
                image: r.to_string(),
                image_manifest: digest.clone(),
                platform: platform.to_string(),
                ztocs: ztocs.iter().filter(|z| z.media_type == MT_ZTOC).count(),
                origin: "built".into(),
            },
            &all,
        );
        reports.push(PlatformReport {
            platform: platform.to_string(),
            image_manifest: digest,
            soci_index: index_digest,
            layers: layers.into_iter().map(|(r, _)| r).collect(),
        });
    }
    Ok(ConvertReport {
        index: fallback_digest,
        platforms: reports,
    })
}
