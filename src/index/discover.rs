//! Finding the SOCI index of an image: the v2 annotation on the image manifest, else a v1 index
//! through the referrers API, else through the referrers fallback tag, else none (the image is
//! pulled normally). Everything fetched is checked against its digest and kept in the store.

use bytes::Bytes;

use super::store::{ArtifactStore, IndexRecord};
use super::{
    is_index_type, parse_index, parse_manifest, Descriptor, IndexError, Manifest, Platform,
    ANN_INDEX_DIGEST, ANN_LAYER_DIGEST, ANN_TABLE_LAYER_DIGEST, ANN_TABLE_ZTOC_DIGEST,
    MANIFEST_TYPES, MT_OCI_MANIFEST, MT_SOCI_INDEX_V1, MT_SOCI_INDEX_V2, MT_ZTOC_TABLE,
    MT_ZTOC_WINDOWS,
};
use crate::digest::Digest;
use crate::fetch::{BlobLocator, FetchError, FetcherChain};
use crate::reference::Reference;
use crate::report::Chain;
use crate::ztoc::{format, Ztoc};

/// Largest zTOC fetched (a 100 GiB layer at 4 MiB spans needs about 1 GiB): what the zTOC
/// decoder accepts.
pub const MAX_ZTOC_BYTES: u64 = crate::ztoc::MAX_ZTOC_BYTES;

/// Which flow made the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexKind {
    V1,
    V2,
}

/// An image manifest for one platform and its SOCI index.
#[derive(Clone, Debug)]
pub struct Discovered {
    pub image_manifest_digest: Digest,
    pub image_manifest: Manifest,
    pub index_digest: Digest,
    pub index: Manifest,
    pub kind: IndexKind,
}

impl Discovered {
    /// The zTOC descriptor for an image layer, if the layer is indexed.
    pub fn ztoc_for(&self, layer_digest: &str) -> Option<&Descriptor> {
        self.for_layer(layer_digest, super::MT_ZTOC)
    }

    /// The SOCI prefetch artifact for an image layer, if the index has one.
    pub fn prefetch_for(&self, layer_digest: &str) -> Option<&Descriptor> {
        self.for_layer(layer_digest, super::MT_SOCI_PREFETCH)
    }

    /// The table and windows blobs (`ztoc::table`) made from the layer's zTOC, when the index
    /// has them (indexes made by `convert`; upstream tools write none).
    pub fn table_for(&self, layer_digest: &str) -> Option<(&Descriptor, Option<&Descriptor>)> {
        let ztoc = self.ztoc_for(layer_digest)?;
        let find = |mt: &str| {
            self.index.layers.iter().find(|d| {
                d.media_type == mt
                    && d.annotations
                        .get(ANN_TABLE_LAYER_DIGEST)
                        .map(String::as_str)
                        == Some(layer_digest)
                    && d.annotations.get(ANN_TABLE_ZTOC_DIGEST).map(String::as_str)
                        == Some(ztoc.digest.as_str())
            })
        };
        Some((find(MT_ZTOC_TABLE)?, find(MT_ZTOC_WINDOWS)))
    }

    fn for_layer(&self, layer_digest: &str, media_type: &str) -> Option<&Descriptor> {
        self.index.layers.iter().find(|d| {
            d.media_type == media_type
                && d.annotations.get(ANN_LAYER_DIGEST).map(String::as_str) == Some(layer_digest)
        })
    }
}

/// The image manifest the reference names for `platform` (choosing from an index), as bytes,
/// digest and parsed form.
pub async fn resolve_image(
    fetchers: &FetcherChain,
    r: &Reference,
    platform: &Platform,
) -> Result<(Bytes, Digest, Manifest), IndexError> {
    let m = fetchers.manifest(r, MANIFEST_TYPES).await?;
    let (data, digest) = (m.data, m.digest);
    let media_type = super::declared_media_type(&data, &m.media_type);
    if !is_index_type(&media_type) {
        let m = parse_manifest(&data)?;
        return Ok((data, digest, m));
    }
    let index = parse_index(&data)?;
    let pick = index
        .manifests
        .iter()
        .filter(|d| d.artifact_type.is_none())
        .find(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)))
        .ok_or_else(|| IndexError::NoPlatform(format!("{platform} in {r}")))?;
    let m = fetchers
        .manifest(&r.with_digest(&pick.digest), MANIFEST_TYPES)
        .await?;
    let parsed = parse_manifest(&m.data)?;
    Ok((m.data, m.digest, parsed))
}

/// Checks that a SOCI index manifest is well formed, of the expected kind, and for this image.
pub fn validate_index(
    data: &[u8],
    digest: &str,
    kind: IndexKind,
    image_digest: &str,
    image: &Manifest,
) -> Result<Manifest, IndexError> {
    let bad = |why: String| IndexError::Index {
        digest: digest.to_string(),
        why,
    };
    let m = parse_manifest(data).map_err(|e| bad(e.to_string()))?;
    let want = match kind {
        IndexKind::V1 => MT_SOCI_INDEX_V1,
        IndexKind::V2 => MT_SOCI_INDEX_V2,
    };
    if m.config.media_type != want {
        return Err(bad(format!(
            "config media type {} is not {want}",
            m.config.media_type
        )));
    }
    if kind == IndexKind::V1 {
        match &m.subject {
            Some(s) if s.digest == image_digest => {}
            Some(s) => return Err(bad(format!("it indexes another image ({})", s.digest))),
            None => return Err(bad("a v1 index without subject".into())),
        }
    }
    for z in &m.layers {
        let layer = z
            .annotations
            .get(ANN_LAYER_DIGEST)
            .or_else(|| z.annotations.get(ANN_TABLE_LAYER_DIGEST))
            .ok_or_else(|| bad(format!("blob {} names no image layer", z.digest)))?;
        if !image.layers.iter().any(|l| &l.digest == layer) {
            return Err(bad(format!(
                "it indexes layer {layer}, which this image does not have"
            )));
        }
    }
    Ok(m)
}

async fn fetch_manifest_bytes(
    fetchers: &FetcherChain,
    store: Option<&ArtifactStore>,
    r: &Reference,
    digest: &Digest,
) -> Result<Bytes, IndexError> {
    if let Some(s) = store {
        if let Some(b) = s.get(digest)? {
            return Ok(Bytes::from(b));
        }
    }
    let data = fetchers
        .manifest(&r.with_digest(digest), &[MT_OCI_MANIFEST])
        .await?
        .data;
    if let Some(s) = store {
        s.put(&data)?;
    }
    Ok(data)
}

/// Finds the SOCI index for `r` on `platform`; `Ok(None)` means there is none. A malformed or
/// mismatched index is an error (callers log it and pull normally).
pub async fn discover(
    fetchers: &FetcherChain,
    store: Option<&ArtifactStore>,
    r: &Reference,
    platform: &Platform,
) -> Result<Option<Discovered>, IndexError> {
    let (_, image_digest, image) = resolve_image(fetchers, r, platform).await?;
    discover_for(fetchers, store, r, platform, &image_digest, &image).await
}

/// [`discover`] for an image whose manifest (for `platform`) is known already.
pub async fn discover_for(
    fetchers: &FetcherChain,
    store: Option<&ArtifactStore>,
    r: &Reference,
    platform: &Platform,
    image_digest: &Digest,
    image: &Manifest,
) -> Result<Option<Discovered>, IndexError> {
    let (image_digest, image) = (image_digest.clone(), image.clone());
    let found = |index_digest: Digest, index: Manifest, kind| {
        // A record of an index built here stays as it is.
        if let Some(s) = store.filter(|s| matches!(s.index_record(&index_digest), Ok(None))) {
            let rec = IndexRecord {
                digest: index_digest.clone(),
                kind: if kind == IndexKind::V1 { "v1" } else { "v2" }.into(),
                image: r.to_string(),
                image_manifest: image_digest.clone(),
                platform: platform.to_string(),
                ztocs: index.layers.len(),
                origin: "fetched".into(),
            };
            if let Err(e) = s.record_index(&rec) {
                tracing::warn!("recording index {index_digest}: {e}");
            }
        }
        Some(Discovered {
            image_manifest_digest: image_digest.clone(),
            image_manifest: image.clone(),
            index_digest,
            index,
            kind,
        })
    };

    if let Some(d) = image.annotations.get(ANN_INDEX_DIGEST) {
        let d = Digest::parse(d).map_err(|e| {
            IndexError::Manifest(format!("{r}: annotation {ANN_INDEX_DIGEST}: {e}"))
        })?;
        let d = &d;
        let data = fetch_manifest_bytes(fetchers, store, r, d).await?;
        let index = validate_index(&data, d, IndexKind::V2, &image_digest, &image)?;
        return Ok(found(d.clone(), index, IndexKind::V2));
    }

    // v1: the referrers API, else the fallback tag.
    let listing = match fetchers
        .referrers(r, &image_digest, MT_SOCI_INDEX_V1)
        .await?
    {
        Some(b) => Some(b),
        None => {
            let tag = format!("sha256-{}", image_digest.trim_start_matches("sha256:"));
            let fallback = Reference {
                tag: Some(tag),
                digest: None,
                ..r.clone()
            };
            match fetchers.manifest(&fallback, &[super::MT_OCI_INDEX]).await {
                Ok(m) => Some(m.data),
                Err(FetchError::NotFound(_)) => None,
                Err(e) => return Err(e.into()),
            }
        }
    };
    let Some(listing) = listing else {
        return Ok(None);
    };
    let listing = parse_index(&listing)?;
    let mut last_err = None;
    // The newest index is listed last.
    for d in listing.manifests.iter().rev() {
        let is_soci = d.artifact_type.as_deref() == Some(MT_SOCI_INDEX_V1);
        if !is_soci {
            continue;
        }
        let data = fetch_manifest_bytes(fetchers, store, r, &d.digest).await?;
        match validate_index(&data, &d.digest, IndexKind::V1, &image_digest, &image) {
            Ok(index) => return Ok(found(d.digest.clone(), index, IndexKind::V1)),
            Err(e) => {
                tracing::warn!("{r}: skipping SOCI index {}: {}", d.digest, Chain(&e));
                last_err = Some(e);
            }
        }
    }
    match last_err {
        Some(e) => Err(e),
        None => Ok(None),
    }
}

/// A zTOC named by an index: from the store, or fetched from the image's repository, checked
/// against its digest, kept, and parsed.
pub async fn fetch_ztoc(
    fetchers: &FetcherChain,
    store: Option<&ArtifactStore>,
    r: &Reference,
    desc: &Descriptor,
) -> Result<Ztoc, IndexError> {
    fetch_decoded(fetchers, store, r, desc, format::decode).await
}

/// A zTOC table (`ztoc::table`) named by an index, like [`fetch_ztoc`]: a zTOC whose windows
/// are fetched per span from the windows blob.
pub async fn fetch_table(
    fetchers: &FetcherChain,
    store: Option<&ArtifactStore>,
    r: &Reference,
    desc: &Descriptor,
) -> Result<Ztoc, IndexError> {
    fetch_decoded(fetchers, store, r, desc, crate::ztoc::table::decode_table).await
}

/// An index artifact from the store, or fetched, verified, decoded and then kept.
async fn fetch_decoded(
    fetchers: &FetcherChain,
    store: Option<&ArtifactStore>,
    r: &Reference,
    desc: &Descriptor,
    decode: impl Fn(&[u8]) -> Result<Ztoc, crate::ztoc::ZtocError>,
) -> Result<Ztoc, IndexError> {
    if let Some(s) = store {
        if let Some(b) = s.get(&desc.digest)? {
            return Ok(decode(&b)?);
        }
    }
    if desc.size > MAX_ZTOC_BYTES {
        return Err(IndexError::Other(format!(
            "{} {} claims {} bytes",
            desc.media_type, desc.digest, desc.size
        )));
    }
    let data = fetchers
        .read_blob(&BlobLocator::new(r.clone(), &desc.digest), desc.size)
        .await?;
    let z = decode(&data)?;
    if let Some(s) = store {
        s.put(&data)?;
    }
    Ok(z)
}
