//! The one place with `unsafe`: small safe wrappers over what the standard library and our
//! dependencies do not expose.
//!
//! - [`zlib`]: inflate that resumes at checkpoints (`inflatePrime`, `Z_BLOCK`);
//! - [`fuse`]: FUSE passthrough backing IDs by number (kept across daemon restarts);
//! - [`mem`]: returning freed heap memory to the kernel (`malloc_trim`);
//! - [`fd`]: passing a file descriptor between processes and re-pointing one at another file,
//!   which a FUSE session needs to survive a daemon restart.

// The crate denies `unsafe` everywhere else.
#![allow(unsafe_code)]

#[cfg(feature = "daemon")]
pub mod fd;
#[cfg(feature = "daemon")]
pub mod fuse;
#[cfg(feature = "daemon")]
pub mod mem;
pub mod zlib;
