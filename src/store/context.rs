//! What the store holds, and resolving what podman asks for: an image reference and a digest (the
//! compressed layer digest, or the zTOC digest from the layer's TOC annotation) → a lazily served
//! [`Layer`]. Resolutions are memoized; one layer's resolution starts the image's others and the
//! layer's background fetch (`background`).

use std::collections::HashMap;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::OnceCell;

use super::layers::Layer;
use super::tree::LayerTree;
use crate::digest::Digest;
use crate::fetch::BlobLocator;
use crate::index::discover::{self, fetch_table, fetch_ztoc, Discovered};
use crate::index::{ArtifactStore, Descriptor, IndexError, Platform, MT_ZTOC, MT_ZTOC_TABLE};
use crate::reference::Reference;
use crate::spans::{RemoteLayer, SpanStore};
use crate::ztoc::{LayerReader, Ztoc};

/// Inflated spans kept in memory for all layers: a start reads clustered parts of many files
/// (page faults of mapped libraries), and re-inflating a span per read costs more than its fetch.
const INFLATED_SPANS_BYTES: usize = 48 << 20;

/// Resolutions computed once per key (see [`memoized`]).
type Memo<K, T> = Mutex<HashMap<K, Arc<OnceCell<Lookup<T>>>>>;

/// Why a layer cannot be served lazily (podman is then told to pull it itself).
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    #[error(transparent)]
    Reference(#[from] crate::reference::ReferenceError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
    /// The image, its index, its zTOCs or a journal record do not fit together.
    #[error("{0}")]
    Mismatch(String),
    #[error("{what}: {source}")]
    Json {
        what: String,
        source: serde_json::Error,
    },
}

impl LookupError {
    /// A failure to reach or read from a backend (or the artifact store), which may go away.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            LookupError::Fetch(_) | LookupError::Index(IndexError::Fetch(_) | IndexError::Store(_))
        )
    }
}

/// A lookup's outcome: shared by concurrent askers, so errors are `Arc`s.
pub type Lookup<T> = Result<T, Arc<LookupError>>;

pub(super) fn mismatch(why: String) -> Arc<LookupError> {
    Arc::new(LookupError::Mismatch(why))
}

/// What the store needs to resolve and serve layers.
pub struct StoreContext {
    /// Every byte the store reads comes through here: manifests, configs, indexes and zTOCs
    /// from its fetcher chain, spans from its cache and fetcher chain.
    pub spans: Arc<SpanStore>,
    pub artifacts: Option<ArtifactStore>,
    pub runtime: tokio::runtime::Handle,
    pub platform: Platform,
    /// Bound on one lookup (podman holds a lock while it asks).
    pub lookup_timeout: Duration,
    /// Fetch every layer completely in the background once it is resolved.
    pub background_fetch: bool,
    /// Bytes per second for background fetching; unlimited when None.
    pub background_rate: Option<u64>,
    /// Spans fetched ahead of a file read that misses (see `LayerReader::read_ahead`).
    pub read_ahead: usize,
    /// Decompressed copies of the files of fully local layers (off when None).
    pub local: Option<Arc<super::local::LocalFiles>>,
    /// Serve local copies with FUSE passthrough when the kernel allows it.
    pub passthrough: bool,
    pub stats: Arc<super::metrics::StoreStats>,
    /// The user namespace's id maps when the store runs in one (rootless podman).
    pub(super) id_maps: Option<crate::paths::IdMaps>,
    images: Memo<String, Arc<ImageInfo>>,
    /// Served layers by (reference, compressed layer digest): one resolution per layer whichever
    /// digest podman asks by.
    layers: Memo<(String, Digest), Option<Arc<Layer>>>,
    /// (reference, digest podman asked for) → compressed layer digest.
    aliases: Mutex<HashMap<(String, String), Digest>>,
    /// zTOCs by digest: fetched once however many layers or references share one.
    pub(super) ztocs: Memo<Digest, Arc<Ztoc>>,
    /// Resolutions under way (the background fetcher waits for them: they are the start's).
    pub(super) resolving: std::sync::atomic::AtomicUsize,
    /// When a resolution last finished (ms since the Unix epoch).
    pub(super) last_resolution_ms: std::sync::atomic::AtomicU64,
    pub(super) inflated: Arc<crate::ztoc::reader::InflatedSpans>,
}

/// An image's manifest for this platform, its diff IDs and its SOCI index (if any).
pub struct ImageInfo {
    pub reference: Reference,
    /// The image manifest for this platform.
    pub manifest: crate::index::Manifest,
    pub discovered: Option<Discovered>,
    /// Empty when no layer can be served lazily (the config is not fetched then).
    pub diff_ids: Vec<Digest>,
}

fn cell<K: std::hash::Hash + Eq + Clone, T>(
    m: &Mutex<HashMap<K, Arc<OnceCell<T>>>>,
    k: &K,
) -> Arc<OnceCell<T>> {
    m.lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(k.clone())
        .or_default()
        .clone()
}

/// The value of `k` in `m`, computed once by `init` for every concurrent asker. A failure to
/// fetch (registry down, credentials not handed over yet, a timeout) is answered to those
/// askers and then forgotten, so the next lookup tries again; any other failure (an index or
/// zTOC that does not fit) is kept, as the same bytes would fail the same way.
pub(super) async fn memoized<K, T, F>(m: &Memo<K, T>, k: &K, init: F) -> Lookup<T>
where
    K: std::hash::Hash + Eq + Clone,
    T: Clone,
    F: std::future::Future<Output = Lookup<T>>,
{
    let c = cell(m, k);
    let found = c.get_or_init(|| init).await.clone();
    if let Err(e) = &found {
        if e.is_transient() {
            let mut map = m.lock().unwrap_or_else(|p| p.into_inner());
            if map.get(k).is_some_and(|cur| Arc::ptr_eq(cur, &c)) {
                map.remove(k);
            }
        }
    }
    found
}

impl StoreContext {
    pub fn new(
        spans: Arc<SpanStore>,
        artifacts: Option<ArtifactStore>,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        StoreContext {
            spans,
            artifacts,
            runtime,
            platform: Platform::host(),
            lookup_timeout: Duration::from_secs(30),
            background_fetch: true,
            background_rate: None,
            read_ahead: crate::ztoc::reader::READ_AHEAD_SPANS,
            local: None,
            passthrough: true,
            stats: Arc::default(),
            id_maps: crate::paths::IdMaps::current(),
            images: Mutex::default(),
            layers: Mutex::default(),
            aliases: Mutex::default(),
            ztocs: Mutex::default(),
            resolving: Default::default(),
            last_resolution_ms: Default::default(),
            inflated: Arc::new(crate::ztoc::reader::InflatedSpans::new(
                INFLATED_SPANS_BYTES,
            )),
        }
    }

    /// The fetcher chain everything is read through.
    pub fn fetchers(&self) -> &crate::fetch::FetcherChain {
        self.spans.fetchers()
    }

    pub(super) async fn image(&self, reference: &str) -> Lookup<Arc<ImageInfo>> {
        memoized(&self.images, &reference.to_string(), async {
            self.image_uncached(reference).await.map_err(Arc::new)
        })
        .await
    }

    async fn image_uncached(&self, reference: &str) -> Result<Arc<ImageInfo>, LookupError> {
        {
            let r = Reference::parse(reference)?;
            let (_, manifest_digest, manifest) =
                discover::resolve_image(self.fetchers(), &r, &self.platform).await?;
            let found = discover::discover_for(
                self.fetchers(),
                self.artifacts.as_ref(),
                &r,
                &self.platform,
                &manifest_digest,
                &manifest,
            )
            .await?;
            let chunked = manifest
                .layers
                .iter()
                .any(|l| l.annotations.contains_key(crate::chunked::ANN_TOC_DIGEST));
            let diff_ids = if found.is_some() || chunked {
                let cfg = &manifest.config;
                if cfg.size > crate::fetch::registry::MAX_MANIFEST_BYTES as u64 {
                    return Err(LookupError::Mismatch(format!(
                        "{r}: image config of {} bytes",
                        cfg.size
                    )));
                }
                let bytes = self
                    .fetchers()
                    .read_blob(&BlobLocator::new(r.clone(), &cfg.digest), cfg.size)
                    .await?;
                let cfg: crate::index::ImageConfig =
                    serde_json::from_slice(&bytes).map_err(|source| LookupError::Json {
                        what: format!("{r}: image config"),
                        source,
                    })?;
                cfg.rootfs.diff_ids
            } else {
                Vec::new()
            };
            Ok(Arc::new(ImageInfo {
                reference: r,
                manifest,
                discovered: found,
                diff_ids,
            }))
        }
    }

    /// The layer `digest` of `reference` (its compressed digest or its zTOC digest), or None
    /// when it cannot be served lazily. Both digests of a layer give the same [`Layer`].
    pub async fn layer(
        self: &Arc<Self>,
        reference: &str,
        digest: &str,
    ) -> Lookup<Option<Arc<Layer>>> {
        let started = std::time::Instant::now();
        let found = self.layer_untraced(reference, digest).await;
        let outcome = match &found {
            Ok(Some(_)) => "",
            Ok(None) => "not-lazy",
            Err(_) => "error",
        };
        self.spans.trace().record(
            started,
            crate::trace::Event {
                ev: "lookup".into(),
                what: digest.to_string(),
                outcome: outcome.into(),
                ..Default::default()
            },
        );
        found
    }

    async fn layer_untraced(
        self: &Arc<Self>,
        reference: &str,
        digest: &str,
    ) -> Lookup<Option<Arc<Layer>>> {
        let asked = (reference.to_string(), digest.to_string());
        let known = self.lock_aliases().get(&asked).cloned();
        let blob = match known {
            Some(b) => b,
            None => {
                let _busy = Busy::new(self);
                let image = self.image(reference).await?;
                let Some(pos) = image.position(digest) else {
                    return Ok(None);
                };
                let blob = image.layer_digests()[pos].clone();
                self.lock_aliases().insert(asked, blob.clone());
                blob
            }
        };
        let key = (reference.to_string(), blob.clone());
        memoized(&self.layers, &key, async {
            let _busy = Busy::new(self);
            self.resolve(reference, &blob).await
        })
        .await
    }

    fn lock_aliases(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Digest>> {
        self.aliases.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The zTOC (or zTOC table, `is_table`) `desc` names: from the artifact store or the
    /// network, once per digest.
    async fn ztoc(&self, r: &Reference, desc: &Descriptor, is_table: bool) -> Lookup<Arc<Ztoc>> {
        memoized(&self.ztocs, &desc.digest, async {
            let started = std::time::Instant::now();
            let store = self.artifacts.as_ref();
            let z = if is_table {
                fetch_table(self.fetchers(), store, r, desc).await
            } else {
                fetch_ztoc(self.fetchers(), store, r, desc).await
            };
            let z = z.map(Arc::new).map_err(|e| Arc::new(LookupError::from(e)));
            let event = crate::trace::Event {
                ev: "artifact".into(),
                what: desc.digest.to_string(),
                bytes: desc.size,
                outcome: if z.is_ok() { "" } else { "error" }.into(),
                ..Default::default()
            };
            self.spans.trace().record(started, event);
            z
        })
        .await
    }

    /// Rebuilds a layer a previous daemon served from its journal record: the zTOC from the
    /// artifact store (or the registry), nothing else from the network.
    pub async fn restore_layer(
        self: &Arc<Self>,
        rec: &super::journal::LayerRecord,
    ) -> Lookup<Arc<Layer>> {
        let reference = Reference::parse(&rec.reference).map_err(|e| Arc::new(e.into()))?;
        let ztoc = if rec.chunked {
            self.restore_chunked_table(&reference, rec).await?
        } else {
            let (zdesc, is_table) = match &rec.table {
                Some((d, size)) => (Descriptor::new(MT_ZTOC_TABLE, d.clone(), *size), true),
                None => (
                    Descriptor::new(MT_ZTOC, rec.ztoc.clone(), rec.ztoc_size),
                    false,
                ),
            };
            self.ztoc(&reference, &zdesc, is_table).await?
        };
        if ztoc.compressed_size != rec.blob_size {
            return Err(mismatch(format!(
                "zTOC {} does not fit blob {}",
                rec.ztoc, rec.blob
            )));
        }
        let tree = LayerTree::build(&ztoc);
        if tree.nodes.len() as u64 != rec.nodes {
            return Err(mismatch(format!(
                "zTOC {} gives {} nodes, the journal says {}",
                rec.ztoc,
                tree.nodes.len(),
                rec.nodes
            )));
        }
        let blob = BlobLocator::new(reference.clone(), &rec.blob);
        let windows = rec
            .windows
            .as_ref()
            .map(|w| BlobLocator::new(reference.clone(), w));
        let layer = Layer {
            reference,
            reader: self.reader_for(&ztoc, &blob, windows),
            table: rec.table.clone(),
            blob,
            ztoc_digest: rec.ztoc.clone(),
            ztoc_size: rec.ztoc_size,
            ztoc,
            tree,
            info: rec.info.clone().into_bytes(),
            blob_size: rec.blob_size,
            uses: AtomicI64::new(0),
        };
        Ok(self.start(layer, Vec::new()))
    }

    pub(super) fn reader_for(
        &self,
        ztoc: &Arc<Ztoc>,
        blob: &BlobLocator,
        windows: Option<BlobLocator>,
    ) -> LayerReader<RemoteLayer> {
        LayerReader::new(
            ztoc.clone(),
            RemoteLayer::new(self.spans.clone(), blob.clone(), self.runtime.clone())
                .with_windows(windows),
        )
        .with_shared_span_cache(self.inflated.clone())
        .read_ahead(self.read_ahead)
    }

    /// Serves `layer`: counts it and starts its background fetch (`first` spans first).
    pub(super) fn start(self: &Arc<Self>, layer: Layer, first: Vec<usize>) -> Arc<Layer> {
        let layer = Arc::new(layer);
        self.stats
            .layers_served
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.background_fetch {
            let (ctx, l) = (self.clone(), layer.clone());
            self.runtime.spawn(ctx.complete(l, first));
        }
        layer
    }

    /// Makes later lookups of `digest` in `reference` answer `layer` (a restored layer keeps
    /// its inode numbers).
    pub fn remember_layer(&self, reference: &str, digest: &str, layer: Arc<Layer>) {
        let blob = layer.blob.digest.clone();
        self.lock_aliases()
            .insert((reference.to_string(), digest.to_string()), blob.clone());
        let c = cell(&self.layers, &(reference.to_string(), blob));
        let _ = c.set(Ok(Some(layer)));
    }

    /// [`Self::layer`] as a boxed `Send` future (resolutions spawn resolutions).
    fn layer_boxed(
        self: Arc<Self>,
        reference: String,
        digest: String,
    ) -> futures::future::BoxFuture<'static, ()> {
        Box::pin(async move {
            let _ = self.layer(&reference, &digest).await;
        })
    }

    /// Builds the served layer for the compressed layer `blob` of `reference`.
    async fn resolve(self: &Arc<Self>, reference: &str, blob: &str) -> Lookup<Option<Arc<Layer>>> {
        let image = self.image(reference).await?;
        let layers = &image.manifest.layers;
        let Some(pos) = layers.iter().position(|l| l.digest == blob) else {
            return Ok(None);
        };
        let layer_desc = &layers[pos];
        let found = image.discovered.as_ref();
        let zdesc = found.and_then(|f| f.ztoc_for(&layer_desc.digest));
        // A layer with a zTOC is served from it; else a zstd:chunked one from its own TOC.
        let chunked = match zdesc {
            Some(_) => None,
            None => crate::chunked::ChunkedLayer::from_annotations(
                &layer_desc.annotations,
                layer_desc.size,
            )
            .map_err(|e| mismatch(format!("layer {}: {e}", layer_desc.digest)))?,
        };
        let (Some(found), Some(zdesc)) = (found, zdesc) else {
            if chunked.is_none() {
                return Ok(None);
            }
            self.resolve_others(reference, layers, layer_desc);
            let diff_id = image.diff_id(pos)?;
            let chunked = chunked.as_ref().expect("checked above");
            return self
                .resolve_chunked(&image, layer_desc, &diff_id, chunked)
                .await
                .map(Some);
        };
        let diff_id = image.diff_id(pos)?;
        self.resolve_others(reference, layers, layer_desc);
        // The table when the index has one (a fraction of the zTOC; windows come per span).
        let (ztoc, table, windows) = match found.table_for(&layer_desc.digest) {
            Some((t, Some(w))) => {
                let z = self.ztoc(&image.reference, t, true).await?;
                let w = BlobLocator::new(image.reference.clone(), &w.digest);
                (z, Some((t.digest.clone(), t.size)), Some(w))
            }
            _ => (self.ztoc(&image.reference, zdesc, false).await?, None, None),
        };
        if ztoc.compressed_size != layer_desc.size {
            return Err(mismatch(format!(
                "zTOC {} is for a {}-byte blob, the layer has {}",
                zdesc.digest, ztoc.compressed_size, layer_desc.size
            )));
        }
        let tree = LayerTree::build(&ztoc);
        if let Some(maps) = &self.id_maps {
            maps.check(tree.nodes.iter().map(|n| (n.uid, n.gid)))
                .map_err(|why| mismatch(format!("layer {}: {why}", layer_desc.digest)))?;
        }
        let blob = BlobLocator::new(image.reference.clone(), &layer_desc.digest);
        let diff_size = self.diff_size(&blob, &ztoc).await;
        let info =
            super::layers::podman_info(layer_desc, &diff_id, diff_size, &ztoc, &zdesc.digest);
        let layer = Layer {
            reference: image.reference.clone(),
            reader: self.reader_for(&ztoc, &blob, windows),
            table,
            blob,
            ztoc_digest: zdesc.digest.clone(),
            ztoc_size: zdesc.size,
            tree,
            ztoc,
            info,
            blob_size: layer_desc.size,
            uses: AtomicI64::new(0),
        };
        let prefetch = match found.prefetch_for(&layer_desc.digest) {
            Some(d) if self.background_fetch => {
                self.prefetch_spans(&image.reference, d, &layer.ztoc).await
            }
            _ => Vec::new(),
        };
        Ok(Some(self.start(layer, prefetch)))
    }

    /// Podman asks one layer at a time under a lock: the image's other layers are resolved
    /// meanwhile.
    fn resolve_others(self: &Arc<Self>, reference: &str, layers: &[Descriptor], this: &Descriptor) {
        for other in layers.iter().filter(|l| l.digest != this.digest) {
            let (ctx, r, d) = (
                self.clone(),
                reference.to_string(),
                other.digest.to_string(),
            );
            self.runtime.spawn(ctx.layer_boxed(r, d));
        }
    }
}

/// Counts a resolution under way for as long as it lives.
struct Busy<'a>(&'a StoreContext);

impl<'a> Busy<'a> {
    fn new(ctx: &'a StoreContext) -> Self {
        ctx.resolving
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Busy(ctx)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0
            .last_resolution_ms
            .store(crate::spans::now_ms(), std::sync::atomic::Ordering::Relaxed);
        self.0
            .resolving
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl ImageInfo {
    /// The diff ID (uncompressed digest) of layer `pos`.
    fn diff_id(&self, pos: usize) -> Lookup<Digest> {
        self.diff_ids.get(pos).cloned().ok_or_else(|| {
            mismatch(format!(
                "{}: the image config has no diff ID for layer {pos}",
                self.reference
            ))
        })
    }

    /// Compressed digests of the image's layers, in order.
    pub fn layer_digests(&self) -> Vec<Digest> {
        self.manifest
            .layers
            .iter()
            .map(|l| l.digest.clone())
            .collect()
    }

    /// The position of the layer podman named by its compressed digest, its zTOC digest, or
    /// its zstd:chunked TOC digest.
    pub fn position(&self, digest: &str) -> Option<usize> {
        self.manifest.layers.iter().position(|l| {
            l.digest == digest
                || l.annotations
                    .get(crate::chunked::ANN_TOC_DIGEST)
                    .is_some_and(|t| t == digest)
                || self
                    .discovered
                    .as_ref()
                    .and_then(|found| found.ztoc_for(&l.digest))
                    .is_some_and(|z| z.digest == digest)
        })
    }
}
