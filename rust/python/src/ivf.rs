//! leanclip._engine.IVFIndex: the thin binding of the engine's IVF index (same conversions,
//! errors and GIL handling as `Index`).

use crate::convert::{
    batch_args, count_arg, key_vec, queries_arg, rows_result, search_result, seed_arg, vectors_arg,
    Count, Int,
};
use crate::errors::{engine, to_py_err};
use leanclip_engine::ivf::{IvfConfig, IvfIndex, Preference, SingleScan};
use leanclip_engine::{DType, Metric};
use numpy::PyArray1;
use parking_lot::RwLock;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::path::PathBuf;

/// An approximate (inverted-file) vector index keyed by uint64 ids; see leanclip._engine.pyi.
#[pyclass(module = "leanclip._engine", name = "IVFIndex", frozen)]
pub(crate) struct PyIvfIndex {
    inner: RwLock<IvfIndex>,
    dim: usize,
    metric: Metric,
    dtype: DType,
}

impl PyIvfIndex {
    fn wrap(index: IvfIndex) -> Self {
        PyIvfIndex {
            dim: index.dim(),
            metric: index.metric(),
            dtype: index.dtype(),
            inner: RwLock::new(index),
        }
    }

    fn write_batch(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        vectors: &Bound<'_, PyAny>,
        op: fn(&mut IvfIndex, &[u64], &[f32]) -> leanclip_engine::Result<()>,
    ) -> PyResult<()> {
        let (keys, vectors) = batch_args(py, keys, vectors, self.dim)?;
        let vectors = vectors.as_slice()?;
        engine(py, || op(&mut self.inner.write(), &keys, vectors))
    }
}

#[pymethods]
impl PyIvfIndex {
    #[new]
    #[pyo3(signature = (dim, metric = "cos", dtype = None, nlist = None, nprobe = None, rerank = Int(0), seed = Int(0), train_threshold = None, pq = None, shortlist = None, scan_dims = None, recall = None, memory = None), text_signature = "(dim, metric='cos', dtype=None, nlist=None, nprobe=None, rerank=0, seed=0, train_threshold=None, pq=None, shortlist=None, scan_dims=None, recall=None, memory=None)")]
    // One argument per keyword of the Python constructor (pyo3 maps them by name).
    #[allow(clippy::too_many_arguments)]
    fn new(
        dim: Int,
        metric: &str,
        dtype: Option<&str>,
        nlist: Option<Int>,
        nprobe: Option<Int>,
        rerank: Int,
        seed: Int,
        train_threshold: Option<Int>,
        pq: Option<Int>,
        shortlist: Option<Int>,
        scan_dims: Option<Int>,
        recall: Option<f64>,
        memory: Option<&str>,
    ) -> PyResult<Self> {
        let metric = Metric::parse(metric).map_err(to_py_err)?;
        let dim = count_arg(dim, "dim", 1)?;
        let opt =
            |v: Option<Int>, what: &str, min: usize| v.map(|v| count_arg(v, what, min)).transpose();
        let pref = Preference::parse(recall.map(|r| r as f32), memory).map_err(to_py_err)?;
        let config = IvfConfig {
            dtype: dtype.map(DType::parse).transpose().map_err(to_py_err)?,
            nlist: opt(nlist, "nlist", 1)?,
            nprobe: opt(nprobe, "nprobe", 1)?,
            rerank: count_arg(rerank, "rerank", 0)?,
            seed: seed_arg(seed, "seed")?,
            train_threshold: opt(train_threshold, "train_threshold", 0)?,
            pq: opt(pq, "pq", 0)?,
            shortlist: opt(shortlist, "shortlist", 1)?,
            scan_dims: opt(scan_dims, "scan_dims", 0)?,
            pref,
        };
        Ok(Self::wrap(
            IvfIndex::from_config(dim, metric, config).map_err(to_py_err)?,
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

    #[getter]
    fn nlist(&self, py: Python<'_>) -> usize {
        py.detach(|| self.inner.read().params().nlist)
    }

    #[getter]
    fn nprobe(&self, py: Python<'_>) -> usize {
        py.detach(|| self.inner.read().params().nprobe)
    }

    #[setter]
    fn set_nprobe(&self, py: Python<'_>, value: Int) -> PyResult<()> {
        let value = count_arg(value, "nprobe", 1)?;
        engine(py, || self.inner.write().set_nprobe(value))
    }

    #[getter]
    fn nprobe_single(&self, py: Python<'_>) -> usize {
        py.detach(|| self.inner.read().nprobe_single())
    }

    #[setter]
    fn set_nprobe_single(&self, py: Python<'_>, value: Int) -> PyResult<()> {
        let value = count_arg(value, "nprobe_single", 1)?;
        engine(py, || self.inner.write().set_nprobe_single(value))
    }

    #[getter]
    fn single_scan(&self, py: Python<'_>) -> &'static str {
        py.detach(|| self.inner.read().single_scan()).name()
    }

    #[setter]
    fn set_single_scan(&self, py: Python<'_>, value: &str) -> PyResult<()> {
        let scan = SingleScan::parse(value).map_err(to_py_err)?;
        engine(py, || self.inner.write().set_single_scan(scan))
    }

    #[getter]
    fn tuned(&self, py: Python<'_>) -> Option<(f32, usize)> {
        py.detach(|| self.inner.read().tuned())
    }

    #[getter]
    fn auto(&self, py: Python<'_>) -> Vec<String> {
        py.detach(|| self.inner.read().auto_reasons())
    }

    #[getter]
    fn rerank(&self, py: Python<'_>) -> usize {
        py.detach(|| self.inner.read().params().rerank)
    }

    #[setter]
    fn set_rerank(&self, py: Python<'_>, value: Int) -> PyResult<()> {
        let value = count_arg(value, "rerank", 0)?;
        engine(py, || self.inner.write().set_rerank(value))
    }

    #[getter]
    fn pq(&self, py: Python<'_>) -> usize {
        py.detach(|| self.inner.read().params().pq)
    }

    #[getter]
    fn shortlist(&self, py: Python<'_>) -> usize {
        py.detach(|| self.inner.read().params().shortlist)
    }

    #[setter]
    fn set_shortlist(&self, py: Python<'_>, value: Int) -> PyResult<()> {
        let value = count_arg(value, "shortlist", 1)?;
        engine(py, || self.inner.write().set_shortlist(value))
    }

    #[getter]
    fn scan_dims(&self, py: Python<'_>) -> usize {
        py.detach(|| self.inner.read().params().scan_dims)
    }

    #[setter]
    fn set_scan_dims(&self, py: Python<'_>, value: Int) -> PyResult<()> {
        let value = count_arg(value, "scan_dims", 0)?;
        engine(py, || self.inner.write().set_scan_dims(value))
    }

    #[getter]
    fn seed(&self, py: Python<'_>) -> u64 {
        py.detach(|| self.inner.read().params().seed)
    }

    #[getter]
    fn train_threshold(&self, py: Python<'_>) -> usize {
        py.detach(|| self.inner.read().params().train_threshold)
    }

    #[getter]
    fn is_trained(&self, py: Python<'_>) -> bool {
        py.detach(|| self.inner.read().is_trained())
    }

    #[getter]
    fn read_only(&self, py: Python<'_>) -> bool {
        py.detach(|| self.inner.read().is_read_only())
    }

    fn __len__(&self, py: Python<'_>) -> usize {
        py.detach(|| self.inner.read().len())
    }

    fn __contains__(&self, py: Python<'_>, key: &Bound<'_, PyAny>) -> bool {
        match key.extract::<u64>() {
            Ok(key) => py.detach(|| self.inner.read().contains(key)),
            Err(_) => false,
        }
    }

    fn __repr__(&self, py: Python<'_>) -> String {
        let (len, p, trained, ro, single, tuned, why, scan) = py.detach(|| {
            let g = self.inner.read();
            (
                g.len(),
                g.params(),
                g.is_trained(),
                g.is_read_only(),
                g.nprobe_single(),
                g.tuned(),
                g.auto_reasons(),
                g.single_scan(),
            )
        });
        let ro = if ro { ", read_only=True" } else { "" };
        let mut pq = if p.pq > 0 {
            format!(", pq={}, shortlist={}", p.pq, p.shortlist)
        } else {
            String::new()
        };
        if p.scan_dims > 0 {
            pq += &format!(", scan_dims={}", p.scan_dims);
        }
        if single != p.nprobe {
            pq += &format!(", nprobe_single={single}");
        }
        if scan == SingleScan::Product {
            pq += ", single_scan='product'";
        }
        if let Some((target, k)) = tuned {
            pq += &format!(", tuned=(recall {target}, k {k})");
        }
        let ro = if why.is_empty() {
            ro.to_string()
        } else {
            format!("{ro}; auto: {}", why.join("; "))
        };
        format!(
            "IVFIndex(dim={}, metric='{}', dtype='{}', nlist={}, nprobe={}, rerank={}{pq}, \
             trained={}, len={len}{ro})",
            self.dim,
            self.metric.name(),
            self.dtype.name(),
            p.nlist,
            p.nprobe,
            p.rerank,
            if trained { "True" } else { "False" },
        )
    }

    fn keys<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let keys = engine(py, || self.inner.read().keys())?;
        Ok(PyArray1::from_vec(py, keys))
    }

    fn list_sizes<'py>(&self, py: Python<'py>) -> Bound<'py, PyArray1<u64>> {
        let sizes = py.detach(|| {
            self.inner
                .read()
                .list_sizes()
                .into_iter()
                .map(|s| s as u64)
                .collect()
        });
        PyArray1::from_vec(py, sizes)
    }

    fn add(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        vectors: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.write_batch(py, keys, vectors, IvfIndex::add)
    }

    fn upsert(
        &self,
        py: Python<'_>,
        keys: &Bound<'_, PyAny>,
        vectors: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        self.write_batch(py, keys, vectors, IvfIndex::upsert)
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

    fn train(&self, py: Python<'_>, vectors: &Bound<'_, PyAny>) -> PyResult<()> {
        let vectors = vectors_arg(py, vectors, self.dim, None)?;
        let vectors = vectors.as_slice()?;
        engine(py, || self.inner.write().train(vectors))
    }

    fn train_directions(&self, py: Python<'_>, vectors: &Bound<'_, PyAny>) -> PyResult<()> {
        let vectors = vectors_arg(py, vectors, self.dim, None)?;
        let vectors = vectors.as_slice()?;
        engine(py, || self.inner.write().train_directions(vectors))
    }

    #[getter]
    fn directions<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        let directions = py.detach(|| self.inner.read().trained_directions().map(<[f32]>::to_vec));
        directions
            .map(|d| rows_result(py, d, self.dim, self.dim))
            .transpose()
    }

    fn retrain(&self, py: Python<'_>) -> PyResult<()> {
        engine(py, || self.inner.write().retrain())
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

    #[pyo3(signature = (target_recall = 0.95, k = Count(10), queries = None), text_signature = "(self, target_recall=0.95, k=10, queries=None)")]
    fn tune<'py>(
        &self,
        py: Python<'py>,
        target_recall: f64,
        k: Count,
        queries: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyDict>> {
        let queries = queries.map(|q| queries_arg(py, q, self.dim)).transpose()?;
        let q = queries.as_ref().map(|(a, _)| a.as_slice()).transpose()?;
        let t0 = std::time::Instant::now();
        let r = engine(py, || self.inner.write().tune(target_recall as f32, k.0, q))?;
        let d = PyDict::new(py);
        d.set_item("target_recall", r.target)?;
        d.set_item("k", r.k)?;
        d.set_item("queries", r.queries)?;
        d.set_item("held_out", !r.user_queries)?;
        d.set_item("nprobe", r.nprobe)?;
        d.set_item("recall", r.batch_recall)?;
        d.set_item("spread", r.batch_spread)?;
        d.set_item("nprobe_single", r.nprobe_single)?;
        d.set_item("single_scan", r.single_scan.name())?;
        d.set_item("shortlist", (r.shortlist > 0).then_some(r.shortlist))?;
        d.set_item("recall_single", r.single_recall)?;
        d.set_item("spread_single", r.single_spread)?;
        d.set_item("scan_dims", r.scan_dims)?;
        d.set_item("settings_measured", r.evaluations)?;
        d.set_item("seconds", t0.elapsed().as_secs_f64())?;
        Ok(d)
    }

    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        engine(py, || self.inner.read().save(&path))
    }

    #[staticmethod]
    #[pyo3(signature = (path, mmap = false, verify = true))]
    fn load(py: Python<'_>, path: PathBuf, mmap: bool, verify: bool) -> PyResult<Self> {
        let index = engine(py, || IvfIndex::load(&path, mmap, verify))?;
        Ok(Self::wrap(index))
    }

    fn verify(&self, py: Python<'_>) -> PyResult<()> {
        engine(py, || self.inner.read().verify())
    }
}

/// The Python name of a single-query scan.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyIvfIndex>()
}
