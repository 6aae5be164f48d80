//! Native core of monofast.
//!
//! The core modules below are plain Rust with no knowledge of Python; `cargo test`
//! exercises them directly. The `python` module is the only one that touches PyO3:
//! it extracts owned values, releases the GIL for the work, and converts errors.

pub mod buffer;
pub mod checksum;
pub mod error;
pub mod format;
pub mod rng;
pub mod shuffle;
pub mod sparse;
pub mod store;
pub mod stream;
pub mod writer;

#[cfg(feature = "python")]
mod python;
