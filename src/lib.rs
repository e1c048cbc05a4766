//! soci-store: lazily serve SOCI-indexed container images to podman.
//!
//! - [`ztoc`]: the zTOC engine (format, builder, verified span reader);
//! - [`fetch`]: where compressed bytes come from (registry, S3, OCI layout, plugins);
//! - [`cache`]: verified span bytes kept in memory and on disk;
//! - [`spans`]: the cache + fetchers stack that feeds the span reader;
//! - [`config`] and [`backends`]: the config file and the named backend factories;
//! - [`store`]: the podman additional layer store (FUSE); [`trace`]: its start breakdown;
//! - [`cli`]: the `soci-store` command line.
//!
//! The `daemon` feature (default) adds [`cli`] and [`store`]; a backend crate depends on this one
//! with `default-features = false` and implements [`fetch::Fetcher`] or [`cache::SpanCache`] with
//! the re-exported [`async_trait`] and [`bytes`].

#![deny(unsafe_code)]

pub use async_trait::async_trait;
pub use bytes;

pub mod backends;
pub mod cache;
pub mod chunked;
#[cfg(feature = "daemon")]
pub mod cli;
pub mod config;
pub mod digest;
pub mod fetch;
pub mod index;
pub mod paths;
pub mod reference;
pub mod report;
pub mod spans;
#[cfg(feature = "daemon")]
pub(crate) mod store;
mod sys;
pub mod trace;
pub mod ztoc;
