//! leanclip._engine.Index: the exact index, with the GIL released around every call.

use crate::convert::{f32_array, key_vec, Count};
use crate::errors::{to_py_err, value_error};
use leanclip_engine::{DType, Index, Metric};
use numpy::{PyArray1, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
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

    /// Vectors as a contiguous (n, dim) float32 array, with the shape checked.
    /// add / upsert: converts keys and vectors, then runs `op` under the write lock, GIL released.
    fn write_batch(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        vectors: &Bound<'_, PyAny>,
        op: fn(&mut Index, &[u64], &[f32]) -> leanclip_engine::Result<()>,
    ) -> PyResult<()> {
        let keys = key_vec(py, keys, "keys")?;
        let vectors = self.vectors(py, vectors, keys.len())?;
        let vectors = vectors.as_slice()?;
        py.detach(|| op(&mut self.inner.write(), &keys, vectors))
            .map_err(to_py_err)
    }

    fn vectors<'py>(
        &self,
        py: Python<'py>,
        obj: &Bound<'py, PyAny>,
        n: usize,
    ) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
        let arr = f32_array(py, obj, "vectors")?;
        let shape = arr.shape().to_vec();
        // (n, dim) exactly; an empty list (shape (0,)) also passes for n = 0, but not a
        // (0, d) array of another dimension.
        let ok =
            (shape.len() == 2 && shape[0] == n && shape[1] == self.dim) || (n == 0 && shape == [0]);
        if !ok {
            return Err(value_error(format!(
                "vectors must have shape ({n}, {dim}) (len(keys), dim), got {shape:?}",
                dim = self.dim
            )));
        }
        Ok(arr.readonly())
    }
}

#[pymethods]
impl PyIndex {
    #[new]
    #[pyo3(signature = (dim, metric = "cos", dtype = "f32"))]
    fn new(dim: i64, metric: &str, dtype: &str) -> PyResult<Self> {
        let metric = Metric::parse(metric).map_err(to_py_err)?;
        let dtype = DType::parse(dtype).map_err(to_py_err)?;
        let dim = usize::try_from(dim)
            .map_err(|_| value_error(format!("dim must be positive, got {dim}")))?;
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
            Ok(key) => py
                .detach(|| self.inner.read().contains(key))
                .map_err(to_py_err),
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
        py.detach(|| self.inner.write().remove(&keys))
            .map_err(to_py_err)
    }

    fn get<'py>(&self, py: Python<'py>, keys: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
        let keys = key_vec(py, keys, "keys")?;
        let n = keys.len();
        let values = py
            .detach(|| self.inner.read().get(&keys))
            .map_err(to_py_err)?;
        Ok(PyArray1::from_vec(py, values)
            .reshape([n, self.dim])?
            .into_any())
    }

    #[pyo3(signature = (queries, k = Count(10), exclude = None), text_signature = "(self, queries, k=10, exclude=None)")]
    fn search<'py>(
        &self,
        py: Python<'py>,
        queries: &Bound<'py, PyAny>,
        k: Count,
        exclude: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
        let k = k.0;
        let arr = f32_array(py, queries, "queries")?;
        let shape = arr.shape().to_vec();
        let single = shape.len() == 1;
        let shape_ok = match shape.as_slice() {
            [d] => *d == self.dim,
            [_, d] => *d == self.dim,
            _ => false,
        };
        if !shape_ok {
            return Err(value_error(format!(
                "queries must have shape ({dim},) or (q, {dim}), got {shape:?}",
                dim = self.dim
            )));
        }
        let nq = if single { 1 } else { shape[0] };
        let exclude = exclude.map(|e| key_vec(py, e, "exclude")).transpose()?;
        let arr = arr.readonly();
        let q = arr.as_slice()?;
        let (ids, scores, kp) = py
            .detach(|| self.inner.read().search(q, k, exclude.as_deref()))
            .map_err(to_py_err)?;
        let ids = PyArray1::from_vec(py, ids);
        let scores = PyArray1::from_vec(py, scores);
        if single {
            Ok((ids.into_any(), scores.into_any()))
        } else {
            Ok((
                ids.reshape([nq, kp])?.into_any(),
                scores.reshape([nq, kp])?.into_any(),
            ))
        }
    }

    /// A new in-memory index with the same keys, dim and metric, stored as `dtype`.
    fn astype(&self, py: Python<'_>, dtype: &str) -> PyResult<Self> {
        let dtype = DType::parse(dtype).map_err(to_py_err)?;
        let index = py
            .detach(|| self.inner.read().astype(dtype))
            .map_err(to_py_err)?;
        Ok(Self::wrap(index))
    }

    /// Writes the index atomically (temporary file, fsync, rename, fsync of the directory).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.inner.read().save(&path))
            .map_err(to_py_err)
    }

    /// Opens a saved index. mmap=True maps it read-only; verify=False skips checking the
    /// vectors' checksum at load (header, keys and scales are always checked).
    #[staticmethod]
    #[pyo3(signature = (path, mmap = false, verify = true))]
    fn load(py: Python<'_>, path: PathBuf, mmap: bool, verify: bool) -> PyResult<Self> {
        let index = py
            .detach(|| Index::load(&path, mmap, verify))
            .map_err(to_py_err)?;
        Ok(Self::wrap(index))
    }

    /// Checks the vectors of an mmap-opened index against the file's checksum
    /// (IndexFileError on mismatch); a no-op for an index held in memory.
    fn verify(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.read().verify()).map_err(to_py_err)
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyIndex>()
}
