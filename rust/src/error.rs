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
    /// An argument is invalid (zero batch size, rank outside the world, wrong shape).
    Invalid(String),
    /// A row index past the end of the data.
    OutOfRange(String),
}

impl Error {
    pub fn io(path: &Path, source: io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn corrupt(path: &Path, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Error::Invalid(message.into())
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io { path, source } => {
                // Python adds "[Errno N]" itself; drop Rust's " (os error N)" suffix.
                let text = source.to_string();
                let text = match source.raw_os_error() {
                    Some(code) => text
                        .trim_end_matches(&format!(" (os error {code})"))
                        .to_string(),
                    None => text,
                };
                write!(f, "{}: {}", path.display(), text)
            }
            Error::Corrupt { path, reason } => write!(f, "{}: {}", path.display(), reason),
            Error::Invalid(message) | Error::OutOfRange(message) => f.write_str(message),
        }
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;
