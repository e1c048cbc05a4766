//! `create IMAGE`: a SOCI index v1 (formats.md §2.1) for an image in a registry, pushed beside it
//! and listed through the referrers API or the fallback tag.

use std::collections::BTreeMap;

use bytes::Bytes;

use super::build::{index_layers, push_ztocs, soci_index};
use super::convert::{
    platform_manifests, record, ConvertOptions, ConvertReport, PlatformReport, Progress,
};
use super::discover::IndexKind;
use super::image::{Endpoint, ImageRef};
use super::store::{ArtifactStore, IndexRecord};
use super::*;
use crate::fetch::FetchError;
use crate::reference::Reference;

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
