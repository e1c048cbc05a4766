//! soci-store: lazily serve SOCI-indexed container images to podman.
//!
//! - [`ztoc`]: the zTOC engine (format, builder, verified span reader);
//! - [`fetch`]: where compressed bytes come from (registry, S3, OCI layout, plugins);
//! - [`cache`]: verified span bytes kept in memory and on disk;
//! - [`spans`]: the cache + fetchers stack that feeds the span reader;
//! - [`config`] and [`backends`]: the config file and the named backend factories;
//! - [`store`]: the podman additional layer store (FUSE); [`trace`]: its start breakdown;
//! - [`cli`]: the `soci-store` command line.

pub mod backends;
pub mod cache;
pub mod cli;
pub mod config;
pub mod fetch;
pub mod index;
pub mod reference;
pub mod spans;
pub mod store;
mod sys;
pub mod trace;
pub mod ztoc;
