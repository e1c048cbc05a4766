//! soci-store: lazily serve SOCI-indexed container images to podman.
//!
//! The library holds the zTOC engine ([`ztoc`]); [`cli`] is the `soci-store` command line.

pub mod cli;
pub mod ztoc;
