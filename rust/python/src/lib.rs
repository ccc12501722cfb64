//! leanclip._engine: the thin PyO3 layer over leanclip-engine. It converts numpy arrays,
//! releases the GIL around every call that touches the index, and maps engine errors to
//! Python exceptions (ValueError, KeyError, RuntimeError, IndexFileError, OSError).

use half::f16;
use leanclip_engine::{self as engine, DType, Error, Index, Metric, Queries, Rows};
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use parking_lot::RwLock;
use pyo3::create_exception;
use pyo3::exceptions::{
    PyException, PyFileNotFoundError, PyIsADirectoryError, PyKeyError, PyOSError,
    PyPermissionError, PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;
use std::path::PathBuf;

create_exception!(
    leanclip._engine,
    IndexFileError,
    PyException,
    "A bad, truncated, corrupted, foreign or other-version index file."
);

fn to_py_err(err: Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::Invalid(_) => PyValueError::new_err(msg),
        Error::DuplicateKey(_) | Error::MissingKey(_) => PyKeyError::new_err(msg),
        Error::ReadOnly => PyRuntimeError::new_err(msg),
        Error::File { .. } => IndexFileError::new_err(msg),
        Error::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg),
            std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg),
            std::io::ErrorKind::IsADirectory => PyIsADirectoryError::new_err(msg),
            _ => PyOSError::new_err(msg),
        },
    }
}

fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

// ---------------------------------------------------------------------------------------------
// numpy conversion

fn asarray<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<Bound<'py, PyAny>> {
    py.import("numpy")?
        .call_method1("asarray", (obj,))
        .map_err(|e| value_error(format!("{what} must be an array of numbers: {e}")))
}

fn dtype_of(arr: &Bound<'_, PyAny>) -> PyResult<(String, usize, String)> {
    let dt = arr.getattr("dtype")?;
    Ok((
        dt.getattr("kind")?.extract()?,
        dt.getattr("itemsize")?.extract()?,
        dt.str()?.to_string(),
    ))
}

fn shape_of(arr: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
    arr.getattr("shape")?.extract()
}

/// A float array as C-contiguous float32 (float64 and integers are converted).
fn f32_array<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let arr = asarray(py, obj, what)?;
    let (kind, _, name) = dtype_of(&arr)?;
    if !matches!(kind.as_str(), "f" | "i" | "u") {
        return Err(value_error(format!(
            "{what} must be float32 or float64, got dtype {name}"
        )));
    }
    let out = py
        .import("numpy")?
        .call_method1("ascontiguousarray", (arr, "float32"))?;
    Ok(out.cast_into::<PyArrayDyn<f32>>()?)
}

/// Float input that may stay float16 (mining reads f16 without a copy).
enum FloatInput<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F16(PyReadonlyArrayDyn<'py, f16>),
}

impl FloatInput<'_> {
    fn shape(&self) -> Vec<usize> {
        match self {
            FloatInput::F32(a) => a.shape().to_vec(),
            FloatInput::F16(a) => a.shape().to_vec(),
        }
    }
}

fn f32_or_f16_array<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<FloatInput<'py>> {
    let arr = asarray(py, obj, what)?;
    let (kind, size, _) = dtype_of(&arr)?;
    if kind == "f" && size == 2 {
        let out = py
            .import("numpy")?
            .call_method1("ascontiguousarray", (arr,))?;
        return Ok(FloatInput::F16(
            out.cast_into::<PyArrayDyn<f16>>()?.readonly(),
        ));
    }
    Ok(FloatInput::F32(f32_array(py, obj, what)?.readonly()))
}

/// A 1-D array-like of non-negative integers that fit in uint64.
fn key_vec(py: Python<'_>, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u64>> {
    let arr = asarray(py, obj, what).map_err(|_| {
        value_error(format!(
            "{what} must be a 1-D array of integers that fit in uint64"
        ))
    })?;
    let shape = shape_of(&arr)?;
    if shape.len() != 1 {
        return Err(value_error(format!(
            "{what} must be a 1-D array of integers, got shape {shape:?}"
        )));
    }
    if shape[0] == 0 {
        return Ok(Vec::new());
    }
    let (kind, _, name) = dtype_of(&arr)?;
    let np = py.import("numpy")?;
    // numpy turns [2**64 - 1, 0] into float64: read Python sequences element by element.
    let from_sequence = kind == "f" && !obj.is_instance(&np.getattr("ndarray")?)?;
    match kind.as_str() {
        "u" | "i" => {
            if kind == "i" {
                let min: i64 = arr.call_method0("min")?.extract()?;
                if min < 0 {
                    return Err(value_error(format!(
                        "{what} must be non-negative, got {min}"
                    )));
                }
            }
            let u = np.call_method1("ascontiguousarray", (arr, "uint64"))?;
            Ok(u.cast_into::<PyArrayDyn<u64>>()?
                .readonly()
                .as_slice()?
                .to_vec())
        }
        "O" | "f" if kind == "O" || from_sequence => {
            (if from_sequence { obj.clone() } else { arr })
                .try_iter()?
                .map(|item| {
                    let item = item?;
                    item.extract::<u64>().map_err(|_| {
                        value_error(format!(
                            "{what} must be non-negative integers that fit in uint64, got {item}"
                        ))
                    })
                })
                .collect()
        }
        _ => Err(value_error(format!(
            "{what} must be integers, got dtype {name}"
        ))),
    }
}

fn group_vec(py: Python<'_>, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<i64>> {
    let arr = asarray(py, obj, what)?;
    let shape = shape_of(&arr)?;
    if shape.len() != 1 {
        return Err(value_error(format!(
            "{what} must be a 1-D array of integers, got shape {shape:?}"
        )));
    }
    let (kind, _, name) = dtype_of(&arr)?;
    if !matches!(kind.as_str(), "i" | "u") && shape[0] > 0 {
        return Err(value_error(format!(
            "{what} must be integers, got dtype {name}"
        )));
    }
    let v = py
        .import("numpy")?
        .call_method1("ascontiguousarray", (arr, "int64"))?;
    Ok(v.cast_into::<PyArrayDyn<i64>>()?
        .readonly()
        .as_slice()?
        .to_vec())
}

/// The `k` argument: an int >= 1 (ValueError otherwise).
struct Count(usize);

impl<'a, 'py> FromPyObject<'a, 'py> for Count {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        check_k(&obj).map(Count)
    }
}

/// k as a count: an int >= 1; ints beyond 64 bits mean "all" (results are capped anyway).
fn check_k(k: &Bound<'_, PyAny>) -> PyResult<usize> {
    let value = match k.extract::<i64>() {
        Ok(v) => v,
        Err(_) => {
            let index = k
                .call_method0("__index__")
                .map_err(|_| value_error(format!("k must be an integer, got {k}")))?;
            if index.lt(0)? {
                i64::MIN
            } else {
                i64::MAX
            }
        }
    };
    if value < 1 {
        return Err(value_error(format!("k must be at least 1, got {k}")));
    }
    Ok(usize::try_from(value).unwrap_or(usize::MAX))
}

// ---------------------------------------------------------------------------------------------
// Index

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
        let ok = (shape.len() == 2 && shape[0] == n && shape[1] == self.dim)
            || (n == 0 && arr.len() == 0);
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

// ---------------------------------------------------------------------------------------------
// Mining

/// Top-k corpus rows per query outside the query's group; see leanclip._engine.pyi.
#[pyfunction]
#[pyo3(signature = (queries, corpus, k, query_groups = None, corpus_groups = None, metric = "ip", dtype = "f32", precision = "f32"))]
#[allow(clippy::too_many_arguments)]
fn mine_hard_negatives<'py>(
    py: Python<'py>,
    queries: &Bound<'py, PyAny>,
    corpus: &Bound<'py, PyAny>,
    k: Count,
    query_groups: Option<&Bound<'py, PyAny>>,
    corpus_groups: Option<&Bound<'py, PyAny>>,
    metric: &str,
    dtype: &str,
    precision: &str,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let metric = Metric::parse(metric).map_err(to_py_err)?;
    let dtype = DType::parse(dtype).map_err(to_py_err)?;
    let precision = engine::ScanPrecision::parse(precision).map_err(to_py_err)?;
    let k = k.0;
    let queries = f32_or_f16_array(py, queries, "queries")?;
    let corpus = f32_or_f16_array(py, corpus, "corpus")?;
    let (qs, cs) = (queries.shape(), corpus.shape());
    if qs.len() != 2 || qs[1] == 0 {
        return Err(value_error(format!(
            "queries must have shape (q, dim), got {qs:?}"
        )));
    }
    if cs.len() != 2 || cs[1] != qs[1] {
        return Err(value_error(format!(
            "corpus must have shape (n, {}) like queries, got {cs:?}",
            qs[1]
        )));
    }
    let (nq, dim) = (qs[0], qs[1]);
    let query_groups = query_groups
        .map(|g| group_vec(py, g, "query_groups"))
        .transpose()?;
    let corpus_groups = corpus_groups
        .map(|g| group_vec(py, g, "corpus_groups"))
        .transpose()?;
    let q = match &queries {
        FloatInput::F32(a) => Queries::F32(a.as_slice()?),
        FloatInput::F16(a) => Queries::F16(a.as_slice()?),
    };
    let c = match &corpus {
        FloatInput::F32(a) => Rows::F32(a.as_slice()?),
        FloatInput::F16(a) => Rows::F16(a.as_slice()?),
    };
    let (ids, scores) = py
        .detach(|| {
            engine::mine_hard_negatives(
                q,
                c,
                dim,
                k,
                query_groups.as_deref(),
                corpus_groups.as_deref(),
                metric,
                dtype,
                precision,
            )
        })
        .map_err(to_py_err)?;
    Ok((
        PyArray1::from_vec(py, ids).reshape([nq, k])?.into_any(),
        PyArray1::from_vec(py, scores).reshape([nq, k])?.into_any(),
    ))
}

/// The SIMD instruction set the kernels dispatch to on this CPU ("avx512", "avx2", "neon",
/// "scalar").
#[pyfunction]
fn simd_level() -> &'static str {
    engine::kernels::level().name()
}

#[pymodule]
fn _engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyIndex>()?;
    m.add_function(wrap_pyfunction!(mine_hard_negatives, m)?)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add("IndexFileError", m.py().get_type::<IndexFileError>())?;
    m.add("FORMAT_VERSION", engine::format::FORMAT_VERSION)?;
    Ok(())
}
