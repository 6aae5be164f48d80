//! The one module that knows about Python.
//!
//! Each function extracts owned Rust values from its arguments, runs the core with the
//! GIL released, and converts the core's `Error` through `to_py_err`, the single error
//! conversion path: unreadable files become `OSError`, bad contents `CorruptFileError`
//! (a `ValueError` subclass).

use std::path::PathBuf;

use pyo3::create_exception;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

use crate::checksum;
use crate::error::Error;

create_exception!(
    monofast._native,
    CorruptFileError,
    PyValueError,
    "A file was read but its contents are invalid (truncated, bad header, checksum mismatch)."
);

fn to_py_err(err: Error) -> PyErr {
    match &err {
        Error::Io { source, .. } => {
            let errno = source.raw_os_error().unwrap_or(0);
            PyOSError::new_err((errno, err.to_string()))
        }
        Error::Corrupt { .. } => CorruptFileError::new_err(err.to_string()),
    }
}

/// XXH3-128 hex digest of a file's contents, computed with the GIL released.
#[pyfunction]
fn hash_file(py: Python<'_>, path: PathBuf) -> PyResult<String> {
    py.detach(|| checksum::hash_file(&path)).map_err(to_py_err)
}

/// XXH3-128 hex digest of a bytes-like object.
#[pyfunction]
fn hash_bytes(data: &[u8]) -> String {
    checksum::hash_bytes(data)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("CorruptFileError", m.py().get_type::<CorruptFileError>())?;
    m.add_function(wrap_pyfunction!(hash_file, m)?)?;
    m.add_function(wrap_pyfunction!(hash_bytes, m)?)?;
    Ok(())
}
