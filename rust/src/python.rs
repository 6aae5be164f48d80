//! The one module that knows about Python.
//!
//! Each function extracts owned Rust values (or read-only views of numpy input) from its
//! arguments, runs the core with the GIL released, and converts the core's `Error`
//! through `to_py_err`, the single error conversion path: unreadable files become
//! `OSError`, bad contents `CorruptFileError` (a `ValueError` subclass), bad arguments
//! `ValueError`, rows out of range `IndexError`.
//!
//! Batches leave as numpy arrays that own their memory: the activation array's base is a
//! `_BatchBuffer` whose buffer goes back to the stream's pool when the array dies, so
//! `torch.from_numpy` wraps it with no copy and the next batch reuses warm pages.
//!
//! `ShardWriter`, `Store` and `Stream` are the bases of the Python classes in
//! `monofast.activations.store`, which inherit their getters as they are and add what only
//! Python knows (the `Batch` tuple, the parsed index, stream states with their identity).
//! The methods whose results those classes reshape carry names of their own (`finish_json`,
//! `gather`, `next_batch`, `position`, `seek`), so that no Python method overrides one with
//! another signature.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use half::f16;
use numpy::ndarray::{ArrayView2, Dimension};
use numpy::{
    IntoPyArray, PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray, PyReadonlyArray1,
    PyReadonlyArray2, PyReadwriteArray1, PyReadwriteArray2, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyIndexError, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use serde_json::{Map, Value};

use crate::buffer::{AlignedBuf, Pool};
use crate::checksum;
use crate::error::Error;
use crate::format::DType;
use crate::rng;
use crate::shuffle::Mode;
use crate::sparse;
use crate::store::{self, MetaColumns};
use crate::stream::{self, Position, StreamConfig};
use crate::writer::{self, Part, Rows, WriterSpec};

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
        Error::Invalid(_) => PyValueError::new_err(err.to_string()),
        Error::OutOfRange(_) => PyIndexError::new_err(err.to_string()),
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

/// Check every shard of the store in `path` (structure and checksum), in order; raise
/// `CorruptFileError` naming the first bad one. Returns (shards, rows, bytes).
#[pyfunction]
fn verify(py: Python<'_>, path: PathBuf) -> PyResult<(u64, u64, u64)> {
    let report = py.detach(|| store::verify(&path)).map_err(to_py_err)?;
    Ok((report.shards, report.rows, report.bytes))
}

/// Join the finished parts of a store written by several processes (the parts starting
/// at shards `starts`, in order) into `index.json` with the JSON object `extra` merged in;
/// returns the index as JSON text.
#[pyfunction]
#[pyo3(signature = (path, starts, extra = "{}"))]
fn merge_parts(py: Python<'_>, path: PathBuf, starts: Vec<u64>, extra: &str) -> PyResult<String> {
    let extra: Map<String, Value> = serde_json::from_str(extra)
        .map_err(|e| PyValueError::new_err(format!("extra must be a JSON object ({e})")))?;
    let index = py
        .detach(|| writer::merge_parts(&path, &starts, extra))
        .map_err(to_py_err)?;
    Ok(String::from_utf8(index.to_json()).expect("serde_json writes UTF-8"))
}

/// (len(context_ids), count) int64: for each context, the `count` positions of
/// `[skip, length)` with the smallest SplitMix64 keys of (seed, context id, position), in
/// increasing order; computed with the GIL released.
#[pyfunction]
fn sample_positions<'py>(
    py: Python<'py>,
    seed: u64,
    context_ids: PyReadonlyArray1<'py, u64>,
    length: u64,
    count: u64,
    skip: u64,
) -> PyResult<Bound<'py, PyArray2<i64>>> {
    let ids = column(&context_ids, "context_ids")?;
    let sample = py
        .detach(|| rng::sample_positions(seed, ids, length, count, skip))
        .map_err(to_py_err)?;
    // (rows * width,) -> (rows, width): a view of the same memory.
    PyArray1::from_vec(py, sample.positions).reshape([ids.len(), sample.width])
}

fn parse_dtype(name: &str) -> PyResult<DType> {
    DType::parse(name)
        .ok_or_else(|| PyValueError::new_err(format!("dtype={name:?}; choose fp32, fp16 or bf16")))
}

// ---------------------------------------------------------------------------------------
// Writer

/// Read-only view of the activations handed to `append`, whatever numpy dtype carries them.
enum ActivationView<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    F16(PyReadonlyArray2<'py, f16>),
    /// bf16 travels as its raw 16 bits (numpy has no bfloat16).
    U16(PyReadonlyArray2<'py, u16>),
    I16(PyReadonlyArray2<'py, i16>),
}

impl<'py> ActivationView<'py> {
    fn extract(obj: &Bound<'py, PyAny>, dtype: DType) -> PyResult<Self> {
        let view = match dtype {
            DType::F32 => obj.extract().map(ActivationView::F32).ok(),
            DType::F16 => obj.extract().map(ActivationView::F16).ok(),
            DType::BF16 => obj
                .extract()
                .map(ActivationView::U16)
                .or_else(|_| obj.extract().map(ActivationView::I16))
                .ok(),
        };
        view.ok_or_else(|| {
            let wanted = match dtype {
                DType::F32 => "float32",
                DType::F16 => "float16",
                DType::BF16 => "uint16 or int16 holding bfloat16 bits",
            };
            PyValueError::new_err(format!(
                "activations must be a 2-D numpy array of {wanted} for a {} store",
                dtype.name()
            ))
        })
    }

    fn shape(&self) -> &[usize] {
        match self {
            ActivationView::F32(a) => a.shape(),
            ActivationView::F16(a) => a.shape(),
            ActivationView::U16(a) => a.shape(),
            ActivationView::I16(a) => a.shape(),
        }
    }

    fn bytes(&self) -> PyResult<&[u8]> {
        fn raw<T>(s: &[T]) -> &[u8] {
            // SAFETY: plain numeric elements, viewed as their bytes for as long as `s` lives.
            unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
        }
        let not_contiguous =
            |_| PyValueError::new_err("activations must be C-contiguous (np.ascontiguousarray)");
        Ok(match self {
            ActivationView::F32(a) => raw(a.as_slice().map_err(not_contiguous)?),
            ActivationView::F16(a) => raw(a.as_slice().map_err(not_contiguous)?),
            ActivationView::U16(a) => raw(a.as_slice().map_err(not_contiguous)?),
            ActivationView::I16(a) => raw(a.as_slice().map_err(not_contiguous)?),
        })
    }
}

fn column<'a, T: numpy::Element>(
    array: &'a PyReadonlyArray1<'_, T>,
    name: &str,
) -> PyResult<&'a [T]> {
    array
        .as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be a contiguous 1-D array")))
}

/// Writes an activation store on a background thread (see `monofast.activations.store`).
#[pyclass(module = "monofast._native", subclass)]
struct ShardWriter {
    inner: writer::Writer,
}

#[pymethods]
impl ShardWriter {
    #[new]
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword signature
    #[pyo3(signature = (
        path, dim, dtype, rows_per_shard, fingerprint = String::new(), resume = false, queue = 2,
        part = None,
    ))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        dim: u64,
        dtype: &str,
        rows_per_shard: u64,
        fingerprint: String,
        resume: bool,
        queue: usize,
        part: Option<(u64, u64)>,
    ) -> PyResult<Self> {
        let spec = WriterSpec {
            dim,
            dtype: parse_dtype(dtype)?,
            rows_per_shard,
            fingerprint,
        };
        let part = part.map(|(start, end)| Part { start, end });
        let inner = py
            .detach(|| writer::Writer::open_part(&path, spec, part, resume, queue))
            .map_err(to_py_err)?;
        Ok(ShardWriter { inner })
    }

    /// Rows on disk or queued: the global index the next appended row gets.
    #[getter]
    fn rows(&self) -> u64 {
        self.inner.rows()
    }

    /// Rows kept from an interrupted earlier writer.
    #[getter]
    fn resumed_rows(&self) -> u64 {
        self.inner.resumed_rows()
    }

    #[getter]
    fn dim(&self) -> u64 {
        self.inner.spec().dim
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.spec().dtype.name()
    }

    #[getter]
    fn rows_per_shard(&self) -> u64 {
        self.inner.spec().rows_per_shard
    }

    #[getter]
    fn closed(&self) -> bool {
        !self.inner.is_open()
    }

    /// Queue rows: activations (rows, dim) and four (rows,) metadata columns. Copies the
    /// input and returns once it is queued; blocks (GIL released) while the queue is full.
    fn append<'py>(
        &mut self,
        py: Python<'py>,
        activations: &Bound<'py, PyAny>,
        token_id: PyReadonlyArray1<'py, i32>,
        source_id: PyReadonlyArray1<'py, u8>,
        context_id: PyReadonlyArray1<'py, i32>,
        position: PyReadonlyArray1<'py, i32>,
    ) -> PyResult<()> {
        let spec = self.inner.spec();
        let view = ActivationView::extract(activations, spec.dtype)?;
        if view.shape()[1] as u64 != spec.dim {
            return Err(PyValueError::new_err(format!(
                "activations have {} columns; this store's rows have dim {}",
                view.shape()[1],
                spec.dim
            )));
        }
        let rows = Rows {
            activations: view.bytes()?,
            token_id: column(&token_id, "token_id")?,
            source_id: column(&source_id, "source_id")?,
            context_id: column(&context_id, "context_id")?,
            position: column(&position, "position")?,
        };
        // The copy out of the arrays runs with the GIL released. Another Python thread
        // writing to the same arrays meanwhile would only change which bytes get stored;
        // the Python front always hands over arrays it has just made.
        let inner = &mut self.inner;
        py.detach(move || inner.append(rows)).map_err(to_py_err)
    }

    /// Write the last shard and `index.json` (with the JSON object `extra` merged in), or
    /// for a part its record for `merge_parts`; returns it as JSON text.
    #[pyo3(signature = (extra = "{}"))]
    fn finish_json(&mut self, py: Python<'_>, extra: &str) -> PyResult<String> {
        let extra: Map<String, Value> = serde_json::from_str(extra)
            .map_err(|e| PyValueError::new_err(format!("extra must be a JSON object ({e})")))?;
        let inner = &mut self.inner;
        let index = py.detach(move || inner.finish(extra)).map_err(to_py_err)?;
        Ok(String::from_utf8(index.to_json()).expect("serde_json writes UTF-8"))
    }

    /// Stop without finishing: delete the open temporary shard, keep finished ones.
    fn abort(&mut self, py: Python<'_>) {
        let inner = &mut self.inner;
        py.detach(move || inner.abort());
    }
}

// ---------------------------------------------------------------------------------------
// Store, stream, batches

/// Owns a batch's activation memory; the numpy array's base. Returns it to the pool on drop.
#[pyclass(module = "monofast._native", frozen)]
struct _BatchBuffer {
    buf: Mutex<Option<AlignedBuf>>,
    pool: Option<Arc<Pool>>,
}

impl Drop for _BatchBuffer {
    fn drop(&mut self) {
        let buf = self.buf.get_mut().ok().and_then(Option::take);
        if let (Some(buf), Some(pool)) = (buf, &self.pool) {
            pool.put(buf);
        }
    }
}

/// A 2-D numpy array over `buf` (rows x dim) whose lifetime holds the buffer.
fn activation_array<'py>(
    py: Python<'py>,
    buf: AlignedBuf,
    pool: Option<Arc<Pool>>,
    rows: usize,
    dim: usize,
    dtype: DType,
    to_f32: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let ptr = buf.as_ptr();
    let owner = Bound::new(
        py,
        _BatchBuffer {
            buf: Mutex::new(Some(buf)),
            pool,
        },
    )?
    .into_any();
    // SAFETY: `ptr` points at rows x dim elements of the chosen type (the gather wrote
    // them), 64-byte aligned; the memory lives inside `owner`, which becomes the array's
    // base object and is never mutated or moved while the array exists.
    unsafe {
        Ok(if to_f32 || dtype == DType::F32 {
            let view = ArrayView2::from_shape_ptr((rows, dim), ptr.cast::<f32>());
            PyArray2::borrow_from_array(&view, owner).into_any()
        } else if dtype == DType::F16 {
            let view = ArrayView2::from_shape_ptr((rows, dim), ptr.cast::<f16>());
            PyArray2::borrow_from_array(&view, owner).into_any()
        } else {
            let view = ArrayView2::from_shape_ptr((rows, dim), ptr.cast::<u16>());
            PyArray2::borrow_from_array(&view, owner).into_any()
        })
    }
}

fn batch_tuple<'py>(
    py: Python<'py>,
    activations: Bound<'py, PyAny>,
    meta: MetaColumns,
) -> PyResult<Bound<'py, PyTuple>> {
    PyTuple::new(
        py,
        [
            activations,
            meta.token_id.into_pyarray(py).into_any(),
            meta.source_id.into_pyarray(py).into_any(),
            meta.context_id.into_pyarray(py).into_any(),
            meta.position.into_pyarray(py).into_any(),
            meta.row.into_pyarray(py).into_any(),
        ],
    )
}

/// An opened activation store: memory-mapped, checked shards (checksums: `verify`).
#[pyclass(module = "monofast._native", frozen, subclass)]
struct Store {
    inner: Arc<store::Store>,
}

#[pymethods]
impl Store {
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inner = py.detach(|| store::Store::open(&path)).map_err(to_py_err)?;
        Ok(Store {
            inner: Arc::new(inner),
        })
    }

    #[getter]
    fn rows(&self) -> u64 {
        self.inner.rows()
    }

    #[getter]
    fn dim(&self) -> usize {
        self.inner.dim()
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        self.inner.dtype.name()
    }

    #[getter]
    fn rows_per_shard(&self) -> u64 {
        self.inner.index.rows_per_shard
    }

    #[getter]
    fn shards(&self) -> Vec<String> {
        self.inner
            .shards()
            .iter()
            .map(|s| s.path.display().to_string())
            .collect()
    }

    /// The parsed `index.json`, re-serialised.
    #[getter]
    fn index_json(&self) -> String {
        String::from_utf8(self.inner.index.to_json()).expect("serde_json writes UTF-8")
    }

    fn __len__(&self) -> usize {
        self.inner.rows() as usize
    }

    /// Rows at global indices: (activations, token_id, source_id, context_id, position, row).
    #[pyo3(signature = (indices, to_float32 = false))]
    fn gather<'py>(
        &self,
        py: Python<'py>,
        indices: PyReadonlyArray1<'py, i64>,
        to_float32: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let rows = indices.as_array().to_vec();
        let store = &self.inner;
        let (buf, meta) = py
            .detach(|| stream::Stream::take(store, &rows, to_float32))
            .map_err(to_py_err)?;
        let acts = activation_array(
            py,
            buf,
            None,
            rows.len(),
            store.dim(),
            store.dtype,
            to_float32,
        )?;
        batch_tuple(py, acts, meta)
    }
}

/// Batches of a store in a seeded order, prefetched on Rust threads; with `verify`, each
/// shard's checksum is checked before the first batch holding its rows is handed out.
#[pyclass(module = "monofast._native", frozen, subclass)]
struct Stream {
    inner: Mutex<stream::Stream>,
    /// What the activation arrays hold; fixed, so reading it never waits for the lock.
    dtype: DType,
}

impl Stream {
    fn lock(&self) -> PyResult<MutexGuard<'_, stream::Stream>> {
        self.inner
            .try_lock()
            .map_err(|_| PyRuntimeError::new_err("the stream is in use by another thread"))
    }
}

#[pymethods]
impl Stream {
    #[new]
    #[allow(clippy::too_many_arguments)] // mirrors the Python keyword signature
    #[pyo3(signature = (
        store, batch_size, shuffle = "exact", seed = 0, rank = 0, world_size = 1, drop_last = false,
        epochs = Some(1), to_float32 = false, threads = 2, prefetch = 4, block_rows = 4096,
        window_blocks = 64, rows = None, verify = true,
    ))]
    fn new(
        store: &Store,
        batch_size: u64,
        shuffle: &str,
        seed: u64,
        rank: u64,
        world_size: u64,
        drop_last: bool,
        epochs: Option<u64>,
        to_float32: bool,
        threads: usize,
        prefetch: usize,
        block_rows: u64,
        window_blocks: u64,
        rows: Option<u64>,
        verify: bool,
    ) -> PyResult<Self> {
        let mode = Mode::parse(shuffle, block_rows, window_blocks).map_err(to_py_err)?;
        let cfg = StreamConfig {
            batch_size,
            mode,
            seed,
            rank,
            world_size,
            rows,
            drop_last,
            epochs,
            to_f32: to_float32,
            threads,
            prefetch,
            verify,
        };
        let dtype = if to_float32 {
            DType::F32
        } else {
            store.inner.dtype
        };
        let inner = stream::Stream::new(Arc::clone(&store.inner), cfg).map_err(to_py_err)?;
        Ok(Stream {
            inner: Mutex::new(inner),
            dtype,
        })
    }

    /// Batches in one whole epoch for this rank.
    fn __len__(&self) -> PyResult<usize> {
        Ok(self.lock()?.batches_per_epoch() as usize)
    }

    /// Rows of one epoch for this rank.
    #[getter]
    fn rows_per_epoch(&self) -> PyResult<u64> {
        Ok(self.lock()?.rows_per_epoch())
    }

    /// What the activation arrays hold: fp32 when converting, else the store's dtype.
    #[getter]
    fn dtype(&self) -> &'static str {
        self.dtype.name()
    }

    /// The next batch (as `Store.gather`), or None once the last epoch is done.
    fn next_batch<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyTuple>>> {
        let mut guard = self.lock()?;
        let stream: &mut stream::Stream = &mut guard;
        let Some(batch) = py.detach(|| stream.next_batch()).map_err(to_py_err)? else {
            return Ok(None);
        };
        let (store, cfg) = (stream.store(), stream.config());
        let acts = activation_array(
            py,
            batch.data,
            Some(Arc::clone(stream.pool())),
            batch.rows,
            store.dim(),
            store.dtype,
            cfg.to_f32,
        )?;
        batch_tuple(py, acts, batch.meta).map(Some)
    }

    /// (epoch, rows of this rank's part of that epoch already consumed).
    fn position(&self) -> PyResult<(u64, u64)> {
        let pos = self.lock()?.state();
        Ok((pos.epoch, pos.row))
    }

    /// Continue from a `position()`; the next batch starts at exactly that row.
    fn seek(&self, py: Python<'_>, epoch: u64, row: u64) -> PyResult<()> {
        let mut guard = self.lock()?;
        let stream: &mut stream::Stream = &mut guard;
        py.detach(|| stream.restore(Position { epoch, row }))
            .map_err(to_py_err)
    }

    /// Stop the prefetch threads now (iteration restarts them).
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let mut guard = self.lock()?;
        let stream: &mut stream::Stream = &mut guard;
        py.detach(|| stream.shutdown());
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Sparse SAE kernels (`kernels/native_sparse.py` checks the tensors and allocates outputs)

/// A read-only 2-D matrix of f32, or of bf16 as its raw bits (uint16 or int16).
enum Matrix<'py> {
    F32(PyReadonlyArray2<'py, f32>),
    U16(PyReadonlyArray2<'py, u16>),
    I16(PyReadonlyArray2<'py, i16>),
}

/// The elements of a `Matrix`.
enum Elements<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl<'py> Matrix<'py> {
    fn extract(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Self> {
        obj.extract()
            .map(Matrix::F32)
            .or_else(|_| obj.extract().map(Matrix::U16))
            .or_else(|_| obj.extract().map(Matrix::I16))
            .map_err(|_| {
                PyValueError::new_err(format!(
                    "{name} must be a 2-D numpy array of float32, or of uint16 or int16 holding bfloat16 bits"
                ))
            })
    }

    fn shape(&self) -> [usize; 2] {
        let shape = match self {
            Matrix::F32(a) => a.shape(),
            Matrix::U16(a) => a.shape(),
            Matrix::I16(a) => a.shape(),
        };
        [shape[0], shape[1]]
    }

    fn elements(&self, name: &str) -> PyResult<Elements<'_>> {
        Ok(match self {
            Matrix::F32(a) => Elements::F32(contiguous(a, name)?),
            Matrix::U16(a) => Elements::Bf16(contiguous(a, name)?),
            Matrix::I16(a) => {
                let bits = contiguous(a, name)?;
                // SAFETY: i16 and u16 have one size and alignment; the same bits, reread.
                Elements::Bf16(unsafe {
                    std::slice::from_raw_parts(bits.as_ptr().cast(), bits.len())
                })
            }
        })
    }
}

fn contiguous<'a, T: numpy::Element, D: Dimension>(
    array: &'a PyReadonlyArray<'_, T, D>,
    name: &str,
) -> PyResult<&'a [T]> {
    array
        .as_slice()
        .map_err(|_| PyValueError::new_err(format!("{name} must be C-contiguous")))
}

/// (row_ptr [B + 1] int64, col [nnz] int64, val [nnz]) of the entries of feats [B, F] that
/// are positive or NaN, row-major; val is float32, or uint16 bf16 bits for bf16 input.
/// Scanned on `threads` threads with the GIL released.
#[pyfunction]
#[pyo3(signature = (feats, threads = 1))]
fn positive_entries<'py>(
    py: Python<'py>,
    feats: &Bound<'py, PyAny>,
    threads: usize,
) -> PyResult<Bound<'py, PyTuple>> {
    let matrix = Matrix::extract(feats, "feats")?;
    let [rows, cols] = matrix.shape();
    let (row_ptr, col, val) = match matrix.elements("feats")? {
        Elements::F32(m) => {
            let e = py
                .detach(|| sparse::positive_entries(m, rows, cols, threads))
                .map_err(to_py_err)?;
            (e.row_ptr, e.col, e.val.into_pyarray(py).into_any())
        }
        Elements::Bf16(m) => {
            let e = py
                .detach(|| sparse::positive_entries(m, rows, cols, threads))
                .map_err(to_py_err)?;
            (e.row_ptr, e.col, e.val.into_pyarray(py).into_any())
        }
    };
    PyTuple::new(
        py,
        [
            row_ptr.into_pyarray(py).into_any(),
            col.into_pyarray(py).into_any(),
            val,
        ],
    )
}

/// out[j] = a[r] . b[col[j]] for each entry j of row r: a [B, D] float32, b [F, D] float32
/// or bf16 bits, row_ptr [B + 1], col [nnz], out [nnz] float32 (written). Summed in
/// float32 on `threads` threads with the GIL released.
#[pyfunction]
#[pyo3(signature = (a, b, row_ptr, col, out, threads = 1))]
fn sampled_dot<'py>(
    py: Python<'py>,
    a: PyReadonlyArray2<'py, f32>,
    b: &Bound<'py, PyAny>,
    row_ptr: PyReadonlyArray1<'py, i64>,
    col: PyReadonlyArray1<'py, i64>,
    mut out: PyReadwriteArray1<'py, f32>,
    threads: usize,
) -> PyResult<()> {
    let b = Matrix::extract(b, "b")?;
    let [n_b, dim] = b.shape();
    if a.shape()[1] != dim {
        return Err(PyValueError::new_err(format!(
            "a has {} columns and b {dim}; they must match",
            a.shape()[1]
        )));
    }
    let (a, row_ptr, col) = (
        contiguous(&a, "a")?,
        column(&row_ptr, "row_ptr")?,
        column(&col, "col")?,
    );
    let out = out
        .as_slice_mut()
        .map_err(|_| PyValueError::new_err("out must be a contiguous 1-D array"))?;
    let result = match b.elements("b")? {
        Elements::F32(b) => {
            py.detach(|| sparse::sampled_dot(a, b, n_b, dim, row_ptr, col, out, threads))
        }
        Elements::Bf16(b) => {
            py.detach(|| sparse::sampled_dot(a, b, n_b, dim, row_ptr, col, out, threads))
        }
    };
    result.map_err(to_py_err)
}

/// A writable 2-D matrix of f32, or of bf16 as its raw bits (uint16 or int16).
enum MatrixMut<'py> {
    F32(PyReadwriteArray2<'py, f32>),
    U16(PyReadwriteArray2<'py, u16>),
    I16(PyReadwriteArray2<'py, i16>),
}

/// The elements of a `MatrixMut`.
enum ElementsMut<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [u16]),
}

impl<'py> MatrixMut<'py> {
    fn extract(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Self> {
        obj.extract()
            .map(MatrixMut::F32)
            .or_else(|_| obj.extract().map(MatrixMut::U16))
            .or_else(|_| obj.extract().map(MatrixMut::I16))
            .map_err(|_| {
                PyValueError::new_err(format!(
                    "{name} must be a writable 2-D numpy array of float32, or of uint16 or int16 for bfloat16 bits"
                ))
            })
    }

    fn elements(&mut self, name: &str) -> PyResult<ElementsMut<'_>> {
        let not_contiguous = |_| PyValueError::new_err(format!("{name} must be C-contiguous"));
        Ok(match self {
            MatrixMut::F32(a) => ElementsMut::F32(a.as_slice_mut().map_err(not_contiguous)?),
            MatrixMut::U16(a) => ElementsMut::Bf16(a.as_slice_mut().map_err(not_contiguous)?),
            MatrixMut::I16(a) => {
                let bits = a.as_slice_mut().map_err(not_contiguous)?;
                // SAFETY: i16 and u16 have one size and alignment; the same bits, rewritten.
                ElementsMut::Bf16(unsafe {
                    std::slice::from_raw_parts_mut(bits.as_mut_ptr().cast(), bits.len())
                })
            }
        })
    }
}

/// The k largest entries of each row of pre [B, F] (float32 or bf16 bits), ranked as a
/// stable descending sort ranks them (ties to the lower column, NaN above all), written to
/// values [B, k] (pre's dtype) and indices [B, k] int64 by increasing column. Runs on
/// `threads` threads with the GIL released.
#[pyfunction]
#[pyo3(signature = (pre, k, values, indices, threads = 1))]
fn top_k<'py>(
    py: Python<'py>,
    pre: &Bound<'py, PyAny>,
    k: usize,
    values: &Bound<'py, PyAny>,
    mut indices: PyReadwriteArray2<'py, i64>,
    threads: usize,
) -> PyResult<()> {
    let pre = Matrix::extract(pre, "pre")?;
    let [rows, cols] = pre.shape();
    let mut values = MatrixMut::extract(values, "values")?;
    let indices = indices
        .as_slice_mut()
        .map_err(|_| PyValueError::new_err("indices must be C-contiguous"))?;
    let result = match (pre.elements("pre")?, values.elements("values")?) {
        (Elements::F32(m), ElementsMut::F32(v)) => {
            py.detach(|| sparse::top_k(m, rows, cols, k, v, indices, threads))
        }
        (Elements::Bf16(m), ElementsMut::Bf16(v)) => {
            py.detach(|| sparse::top_k(m, rows, cols, k, v, indices, threads))
        }
        _ => {
            return Err(PyValueError::new_err(
                "values must have pre's dtype (float32, or bf16 bits)",
            ))
        }
    };
    result.map_err(to_py_err)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("CorruptFileError", m.py().get_type::<CorruptFileError>())?;
    m.add_function(wrap_pyfunction!(hash_file, m)?)?;
    m.add_function(wrap_pyfunction!(hash_bytes, m)?)?;
    m.add_function(wrap_pyfunction!(verify, m)?)?;
    m.add_function(wrap_pyfunction!(merge_parts, m)?)?;
    m.add_function(wrap_pyfunction!(sample_positions, m)?)?;
    m.add_function(wrap_pyfunction!(positive_entries, m)?)?;
    m.add_function(wrap_pyfunction!(sampled_dot, m)?)?;
    m.add_function(wrap_pyfunction!(top_k, m)?)?;
    m.add_class::<ShardWriter>()?;
    m.add_class::<Store>()?;
    m.add_class::<Stream>()?;
    m.add_class::<_BatchBuffer>()?;
    Ok(())
}
