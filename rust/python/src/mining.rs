//! leanclip._engine.mine_hard_negatives.

use crate::convert::{f32_or_f16_array, group_vec, Count, FloatInput};
use crate::errors::{engine, to_py_err, value_error};
use leanclip_engine::{self as engine, DType, Metric, Queries, Rows};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::prelude::*;

/// Top-k corpus rows per query outside the query's group; see leanclip._engine.pyi.
#[pyfunction]
#[pyo3(signature = (queries, corpus, k, query_groups = None, corpus_groups = None, metric = "ip", dtype = "f32", precision = "f32"))]
// One argument per keyword of the Python function (pyo3 maps them by name).
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
    let (ids, scores) = engine(py, || {
        engine::mine_hard_negatives(engine::Mining {
            queries: q,
            corpus: c,
            dim,
            k,
            query_groups: query_groups.as_deref(),
            corpus_groups: corpus_groups.as_deref(),
            metric,
            dtype,
            precision,
        })
    })?;
    Ok((
        PyArray1::from_vec(py, ids).reshape([nq, k])?.into_any(),
        PyArray1::from_vec(py, scores).reshape([nq, k])?.into_any(),
    ))
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(mine_hard_negatives, m)?)
}
