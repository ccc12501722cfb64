//! leanclip._engine: the thin PyO3 layer over leanclip-engine, one module per topic:
//! `errors` (engine errors -> Python exceptions), `convert` (numpy arguments), `index`
//! (the Index class), `ivf` (the IVFIndex class), `mining` (mine_hard_negatives). Each topic registers itself below.

mod convert;
mod errors;
mod index;
mod ivf;
mod mining;

use leanclip_engine::{self as engine, DType, Metric};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

/// The SIMD instruction set the kernels dispatch to on this CPU ("amx", "avx512", "avx2",
/// "neon", "scalar").
#[pyfunction]
fn simd_level() -> &'static str {
    engine::kernels::level().name()
}

#[pymodule]
fn _engine(m: &Bound<'_, PyModule>) -> PyResult<()> {
    errors::register(m)?;
    index::register(m)?;
    ivf::register(m)?;
    mining::register(m)?;
    m.add_function(wrap_pyfunction!(simd_level, m)?)?;
    m.add("FORMAT_VERSION", engine::format::FORMAT_VERSION)?;
    m.add("DTYPES", PyTuple::new(m.py(), DType::ALL.map(DType::name))?)?;
    m.add(
        "METRICS",
        PyTuple::new(m.py(), Metric::ALL.map(Metric::name))?,
    )?;
    Ok(())
}
