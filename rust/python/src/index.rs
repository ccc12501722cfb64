//! leanclip._engine.Index: the exact index, with the GIL released around every call.

use crate::convert::{
    batch_args, count_arg, key_vec, queries_arg, rows_result, search_result, Count, Int,
};
use crate::errors::{engine, to_py_err};
use leanclip_engine::{DType, Index, Metric};
use numpy::PyArray1;
use parking_lot::RwLock;
use pyo3::prelude::*;
use std::path::PathBuf;

/// An exact vector index keyed by uint64 ids (see leanclip._engine.pyi for the full contract).
#[pyclass(module = "leanclip._engine", name = "Index", frozen)]
struct PyIndex {
    inner: RwLock<Index>,
    dim: usize,
    metric: Metric,
    dtype: DType,
}

impl PyIndex {
    fn wrap(index: Index) -> Self {
        PyIndex {
            dim: index.dim(),
            metric: index.metric(),
            dtype: index.dtype(),
            inner: RwLock::new(index),
        }
    }

    /// add / upsert: converts keys and vectors, then runs `op` under the write lock, GIL released.
    fn write_batch(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        vectors: &Bound<'_, PyAny>,
        op: fn(&mut Index, &[u64], &[f32]) -> leanclip_engine::Result<()>,
    ) -> PyResult<()> {
        let (keys, vectors) = batch_args(py, keys, vectors, self.dim)?;
        let vectors = vectors.as_slice()?;
        engine(py, || op(&mut self.inner.write(), &keys, vectors))
    }
}

#[pymethods]
impl PyIndex {
    #[new]
    #[pyo3(signature = (dim, metric = "cos", dtype = "f32"))]
    fn new(dim: Int, metric: &str, dtype: &str) -> PyResult<Self> {
        let metric = Metric::parse(metric).map_err(to_py_err)?;
        let dtype = DType::parse(dtype).map_err(to_py_err)?;
        let dim = count_arg(dim, "dim", 1)?;
        Ok(Self::wrap(
            Index::new(dim, metric, dtype).map_err(to_py_err)?,
        ))
    }

    #[getter]
    fn dim(&self) -> usize {
        self.dim
    }

    #[getter]
    fn metric(&self) -> &'static str {
        self.metric.name()
    }

    #[getter]
    fn dtype(&self) -> &'static str {
        self.dtype.name()
    }

    /// True for an index opened with mmap=True.
    #[getter]
    fn read_only(&self, py: Python<'_>) -> bool {
        py.detach(|| self.inner.read().is_read_only())
    }

    fn __len__(&self, py: Python<'_>) -> usize {
        py.detach(|| self.inner.read().len())
    }

    fn __contains__(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> PyResult<bool> {
        match key.extract::<u64>() {
            Ok(key) => engine(py, || self.inner.read().contains(key)),
            Err(_) => Ok(false),
        }
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let (len, ro) = py.detach(|| {
            let g = self.inner.read();
            (g.len(), g.is_read_only())
        });
        let ro = if ro { ", read_only=True" } else { "" };
        format!(
            "Index(dim={}, metric='{}', dtype='{}', len={len}{ro})",
            self.dim,
            self.metric.name(),
            self.dtype.name()
        )
    }

    /// All keys, in storage order, as uint64.
    fn keys<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        let keys = py.detach(|| self.inner.read().keys().to_vec());
        PyArray1::from_vec(py, keys)
    }

    fn add(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        vectors: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.write_batch(py, keys, vectors, Index::add)
    }

    fn upsert(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        vectors: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.write_batch(py, keys, vectors, Index::upsert)
    }

    fn remove(&self, py: Python<'_>, keys: &Bound<'_, PyAny>) -> PyResult<usize> {
        let keys = key_vec(py, keys, "keys")?;
        engine(py, || self.inner.write().remove(&keys))
    }

    fn get<'py>(&self, py: Python<'py>, keys: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let keys = key_vec(py, keys, "keys")?;
        let n = keys.len();
        let values = engine(py, || self.inner.read().get(&keys))?;
        rows_result(py, values, n, self.dim)
    }

    #[pyo3(signature = (queries, k = Count(10), exclude = None), text_signature = "(self, queries, k=10, exclude=None)")]
    fn search<'py>(
        &self,
        py: Python<'py>,
        queries: &Bound<'py, PyAny>,
        k: Count,
        exclude: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let (queries, batch) = queries_arg(py, queries, self.dim)?;
        let exclude = exclude.map(|e| key_vec(py, e, "exclude")).transpose()?;
        let q = queries.as_slice()?;
        let found = engine(py, || self.inner.read().search(q, k.0, exclude.as_deref()))?;
        search_result(py, found, batch)
    }

    /// A new in-memory index with the same keys, dim and metric, stored as `dtype`.
    fn astype(&self, py: Python<'_>, dtype: &str) -> PyResult<Self> {
        let dtype = DType::parse(dtype).map_err(to_py_err)?;
        let index = engine(py, || self.inner.read().astype(dtype))?;
        Ok(Self::wrap(index))
    }

    /// Writes the index atomically (temporary file, fsync, rename, fsync of the directory).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        engine(py, || self.inner.read().save(&path))
    }

    /// Opens a saved index. mmap=True maps it read-only; verify=False skips checking the
    /// vectors' checksum at load (header, keys and scales are always checked).
    #[staticmethod]
    #[pyo3(signature = (path, mmap = false, verify = true))]
    fn load(py: Python<'_>, path: PathBuf, mmap: bool, verify: bool) -> PyResult<Self> {
        let index = engine(py, || Index::load(&path, mmap, verify))?;
        Ok(Self::wrap(index))
    }

    /// Checks the vectors of an mmap-opened index against the file's checksum
    /// (IndexFileError on mismatch); a no-op for an index held in memory.
    fn verify(&self, py: Python<'_>) -> PyResult<()> {
        engine(py, || self.inner.read().verify())
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyIndex>()
}
