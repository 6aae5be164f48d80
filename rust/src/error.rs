//! One error type for the core. The binding layer maps each variant to one Python
//! exception class, so no panic or ad-hoc string crosses the boundary.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub enum Error {
    /// The file could not be opened or read (missing, permissions, I/O failure).
    Io { path: PathBuf, source: io::Error },
    /// The file was read but its contents are wrong (truncated, bad header, checksum).
    Corrupt { path: PathBuf, reason: String },
}

impl Error {
    pub fn io(path: &Path, source: io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }

    pub fn corrupt(path: &Path, reason: impl Into<String>) -> Self {
        Error::Corrupt { path: path.to_path_buf(), reason: reason.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => write!(f, "{}: {}", path.display(), source),
            Error::Corrupt { path, reason } => write!(f, "{}: {}", path.display(), reason),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
