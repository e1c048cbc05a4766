//! SOCI indexes: the manifests that tie zTOCs to an image's layers (formats.md §2), making them
//! (`convert`: v2, `create`: v1) and finding them for any image reference.

// Making and pushing indexes is the command line's job (`convert`, `create`).
#[cfg(feature = "daemon")]
mod build;
#[cfg(feature = "daemon")]
pub(crate) mod convert;
#[cfg(feature = "daemon")]
pub(crate) mod create;
pub mod discover;
#[cfg(feature = "daemon")]
pub mod image;
#[cfg(feature = "daemon")]
pub(crate) mod rewrite;
pub mod store;

use std::collections::BTreeMap;

use crate::digest::Digest;
use serde::{Deserialize, Serialize};

pub use discover::{discover, Discovered};
pub use store::ArtifactStore;

pub const MT_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MT_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MT_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const MT_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const MT_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MT_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const MT_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MT_OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MT_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const MT_SOCI_INDEX_V1: &str = "application/vnd.amazon.soci.index.v1+json";
pub const MT_SOCI_INDEX_V2: &str = "application/vnd.amazon.soci.index.v2+json";
pub const MT_ZTOC: &str = "application/octet-stream";
pub const MT_SOCI_PREFETCH: &str = "application/vnd.amazon.soci.prefetch.v1+json";
/// A zTOC's compact table (ours, beside the zTOC; see `ztoc::table`).
pub const MT_ZTOC_TABLE: &str = "application/vnd.soci-store.ztoc-table.v1+gzip";
/// A zTOC's checkpoint windows, compressed, fetched per span (ours; see `ztoc::table`).
pub const MT_ZTOC_WINDOWS: &str = "application/vnd.soci-store.ztoc-windows.v1";

pub const ANN_INDEX_DIGEST: &str = "com.amazon.soci.index-digest";
pub const ANN_IMAGE_MANIFEST_DIGEST: &str = "com.amazon.soci.image-manifest-digest";
pub const ANN_LAYER_DIGEST: &str = "com.amazon.soci.image-layer-digest";
pub const ANN_LAYER_MEDIA_TYPE: &str = "com.amazon.soci.image-layer-mediaType";
pub const ANN_SPAN_SIZE: &str = "com.amazon.soci.span-size";
pub const ANN_DISABLE_XATTRS: &str = "com.amazon.soci.disable-xattrs";
pub const ANN_BUILD_TOOL: &str = "com.amazon.soci.build-tool-identifier";
/// The image layer a table or windows blob belongs to. Our own key, so that upstream tools, which
/// look zTOCs up by `ANN_LAYER_DIGEST`, never mistake these blobs for zTOCs.
pub const ANN_TABLE_LAYER_DIGEST: &str = "io.github.soci-store.image-layer-digest";
/// The zTOC a table or windows blob was made from.
pub const ANN_TABLE_ZTOC_DIGEST: &str = "io.github.soci-store.ztoc-digest";
/// The layer annotation podman ≥ 5.1 needs to consult an additional layer store.
pub const ANN_STARGZ_TOC: &str = "containerd.io/snapshot/stargz/toc.digest";

/// The empty JSON object `{}` used as the SOCI index config blob.
pub const EMPTY_JSON: &[u8] = b"{}";
pub const EMPTY_JSON_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";

/// [`EMPTY_JSON_DIGEST`] as a [`Digest`].
pub fn empty_json_digest() -> Digest {
    Digest::of(EMPTY_JSON)
}

/// Accept header values for manifests of any kind.
pub const MANIFEST_TYPES: &[&str] = &[
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
];

/// Errors about indexes and image manifests.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Fetch(#[from] crate::fetch::FetchError),
    #[error("invalid manifest: {0}")]
    Manifest(String),
    #[error("invalid SOCI index {digest}: {why}")]
    Index { digest: String, why: String },
    #[error("no manifest for platform {0}")]
    NoPlatform(String),
    #[error(transparent)]
    Ztoc(#[from] crate::ztoc::ZtocError),
    #[error("artifact store: {0}")]
    Store(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// A platform, as in OCI descriptors.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// The machine's own platform, in Go's spelling.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            architecture: arch.into(),
            os: "linux".into(),
            variant: (arch == "arm64").then(|| "v8".to_string()),
        }
    }

    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Result<Platform, IndexError> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts[..] {
            [os, arch] => Ok(Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: None,
            }),
            [os, arch, v] => Ok(Platform {
                os: os.into(),
                architecture: arch.into(),
                variant: Some(v.into()),
            }),
            _ => Err(IndexError::Other(format!(
                "platform {s:?} is not os/arch[/variant]"
            ))),
        }
    }

    /// Whether a descriptor's platform matches (a missing variant matches any).
    pub fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && (self.variant.is_none() || other.variant.is_none() || self.variant == other.variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// An OCI content descriptor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Fields this program does not know, kept as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: impl Into<Digest>, size: u64) -> Self {
        Descriptor {
            media_type: media_type.into(),
            digest: digest.into(),
            size,
            artifact_type: None,
            platform: None,
            annotations: BTreeMap::new(),
            extra: BTreeMap::new(),
        }
    }
}

/// An image manifest (OCI or Docker schema 2) or a SOCI index manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image index / manifest list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// What the store and `convert` read of an image config (fields they do not need are ignored).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub variant: Option<String>,
    #[serde(default)]
    pub rootfs: RootFs,
}

/// An image config's `rootfs`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

pub fn sha256_digest(data: &[u8]) -> Digest {
    Digest::of(data)
}

/// Whether a manifest media type is an index/list.
pub fn is_index_type(mt: &str) -> bool {
    mt == MT_OCI_INDEX || mt == MT_DOCKER_LIST
}

/// The media type a manifest document declares (or the one its server said).
pub fn declared_media_type(doc: &[u8], served: &str) -> String {
    serde_json::from_slice::<serde_json::Value>(doc)
        .ok()
        .and_then(|v| {
            v.get("mediaType")
                .and_then(|m| m.as_str())
                .map(String::from)
        })
        .unwrap_or_else(|| served.to_string())
}

pub fn parse_manifest(doc: &[u8]) -> Result<Manifest, IndexError> {
    let m: Manifest =
        serde_json::from_slice(doc).map_err(|e| IndexError::Manifest(e.to_string()))?;
    if m.schema_version != 2 {
        return Err(IndexError::Manifest(format!(
            "schemaVersion {}",
            m.schema_version
        )));
    }
    Ok(m)
}

pub fn parse_index(doc: &[u8]) -> Result<Index, IndexError> {
    let i: Index = serde_json::from_slice(doc).map_err(|e| IndexError::Manifest(e.to_string()))?;
    if i.schema_version != 2 {
        return Err(IndexError::Manifest(format!(
            "schemaVersion {}",
            i.schema_version
        )));
    }
    Ok(i)
}

/// Serializes a document the way it is pushed (its digest is over these bytes).
pub fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("manifests always serialize")
}
