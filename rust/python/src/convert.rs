//! numpy <-> Rust conversion of the arguments (arrays, keys, groups, k) and of the results
//! shared by the index classes.

use crate::errors::value_error;
use half::f16;
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::prelude::*;

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

pub(crate) fn shape_of(arr: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
    arr.getattr("shape")?.extract()
}

/// A float array as C-contiguous float32 (float64 and float16 are converted). A numpy array of
/// integers is refused: an embedding is floats, and an int array is most often a mistake (keys
/// passed as vectors, an image's uint8 pixels). A Python list of numbers is converted
/// (`[[1, 0, 0]]` means what it says), as is any empty array.
pub(crate) fn f32_array<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    what: &str,
) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let arr = asarray(py, obj, what)?;
    let (kind, _, name) = dtype_of(&arr)?;
    let int = matches!(kind.as_str(), "i" | "u");
    let int_array = int
        && obj.is_instance(&py.import("numpy")?.getattr("ndarray")?)?
        && !shape_of(&arr)?.contains(&0);
    if !(kind == "f" || int) || int_array {
        return Err(value_error(format!(
            "{what} must be float32 or float64, got dtype {name}"
        )));
    }
    let out = py
        .import("numpy")?
        .call_method1("ascontiguousarray", (arr, "float32"))?;
    Ok(out.cast_into::<PyArrayDyn<f32>>()?)
}

/// `vectors` of an index of dimension `dim` as a contiguous float32 array of shape (n, dim):
/// exactly `n` rows (len(keys)) when `n` is given, any number otherwise. An empty list
/// (shape (0,)) also passes for n = 0, but not a (0, d) array of another dimension.
pub(crate) fn vectors_arg<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    dim: usize,
    n: Option<usize>,
) -> PyResult<PyReadonlyArrayDyn<'py, f32>> {
    let arr = f32_array(py, obj, "vectors")?;
    let shape = arr.shape().to_vec();
    let ok = (shape.len() == 2 && n.is_none_or(|n| shape[0] == n) && shape[1] == dim)
        || (n == Some(0) && shape == [0]);
    if !ok {
        let rows = n.map_or("n".to_string(), |n| n.to_string());
        let why = if n.is_some() { " (len(keys), dim)" } else { "" };
        return Err(value_error(format!(
            "vectors must have shape ({rows}, {dim}){why}, got {shape:?}"
        )));
    }
    Ok(arr.readonly())
}

/// add / upsert's arguments: the keys and their (len(keys), dim) vectors.
pub(crate) fn batch_args<'py>(
    py: Python<'py>,
    keys: &Bound<'py, PyAny>,
    vectors: &Bound<'py, PyAny>,
    dim: usize,
) -> PyResult<(Vec<u64>, PyReadonlyArrayDyn<'py, f32>)> {
    let keys = key_vec(py, keys, "keys")?;
    let vectors = vectors_arg(py, vectors, dim, Some(keys.len()))?;
    Ok((keys, vectors))
}

/// `queries` of an index of dimension `dim`: shape (dim,) or (q, dim), as contiguous float32,
/// with q (None for a single query).
pub(crate) fn queries_arg<'py>(
    py: Python<'py>,
    obj: &Bound<'py, PyAny>,
    dim: usize,
) -> PyResult<(PyReadonlyArrayDyn<'py, f32>, Option<usize>)> {
    let arr = f32_array(py, obj, "queries")?;
    let shape = arr.shape().to_vec();
    let batch = match shape.as_slice() {
        [d] if *d == dim => None,
        [q, d] if *d == dim => Some(*q),
        _ => {
            return Err(value_error(format!(
                "queries must have shape ({dim},) or (q, {dim}), got {shape:?}"
            )))
        }
    };
    Ok((arr.readonly(), batch))
}

/// A search's keys and scores as numpy: shape (k',) for a single query, (q, k') for a batch
/// of q queries (`batch` as returned by `queries_arg`).
pub(crate) fn search_result<'py>(
    py: Python<'py>,
    (ids, scores, kp): (Vec<u64>, Vec<f32>, usize),
    batch: Option<usize>,
) -> PyResult<(Bound<'py, PyAny>, Bound<'py, PyAny>)> {
    let ids = PyArray1::from_vec(py, ids);
    let scores = PyArray1::from_vec(py, scores);
    Ok(match batch {
        None => (ids.into_any(), scores.into_any()),
        Some(nq) => (
            ids.reshape([nq, kp])?.into_any(),
            scores.reshape([nq, kp])?.into_any(),
        ),
    })
}

/// The stored vectors of `n` keys (row-major) as an (n, dim) float32 array.
pub(crate) fn rows_result<'py>(
    py: Python<'py>,
    values: Vec<f32>,
    n: usize,
    dim: usize,
) -> PyResult<Bound<'py, PyAny>> {
    Ok(PyArray1::from_vec(py, values).reshape([n, dim])?.into_any())
}

/// Float input that may stay float16 (mining reads f16 without a copy).
pub(crate) enum FloatInput<'py> {
    F32(PyReadonlyArrayDyn<'py, f32>),
    F16(PyReadonlyArrayDyn<'py, f16>),
}

impl FloatInput<'_> {
    pub(crate) fn shape(&self) -> Vec<usize> {
        match self {
            FloatInput::F32(a) => a.shape().to_vec(),
            FloatInput::F16(a) => a.shape().to_vec(),
        }
    }
}

pub(crate) fn f32_or_f16_array<'py>(
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
pub(crate) fn key_vec(py: Python<'_>, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u64>> {
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

pub(crate) fn group_vec(py: Python<'_>, obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<i64>> {
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
pub(crate) struct Count(pub(crate) usize);

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

/// An integer argument as Python gave it (any size): a value out of range is then a ValueError
/// naming the argument (`count_arg`, `seed_arg`), never an OverflowError. Not an integer at all
/// stays a TypeError, as for any other argument of the wrong type.
pub(crate) struct Int(pub(crate) i128);

impl<'a, 'py> FromPyObject<'a, 'py> for Int {
    type Error = PyErr;

    fn extract(obj: pyo3::Borrowed<'a, 'py, PyAny>) -> PyResult<Self> {
        match obj.extract::<i128>() {
            Ok(v) => Ok(Int(v)),
            Err(e) => {
                // An int beyond 128 bits: only its sign matters for the range checks.
                let index = obj.call_method0("__index__").map_err(|_| e)?;
                Ok(Int(if index.lt(0)? { i128::MIN } else { i128::MAX }))
            }
        }
    }
}

/// `value` as a count of at least `min` (ValueError otherwise, whatever the size).
pub(crate) fn count_arg(value: Int, what: &str, min: usize) -> PyResult<usize> {
    let Int(v) = value;
    if v < min as i128 {
        return Err(value_error(format!(
            "{what} must be at least {min}, got {v}"
        )));
    }
    usize::try_from(v)
        .map_err(|_| value_error(format!("{what} must be at most {}, got {v}", usize::MAX)))
}

/// `value` as a u64 seed: 0 to 2**64 - 1 (ValueError otherwise).
pub(crate) fn seed_arg(value: Int, what: &str) -> PyResult<u64> {
    let Int(v) = value;
    u64::try_from(v)
        .map_err(|_| value_error(format!("{what} must be between 0 and 2**64 - 1, got {v}")))
}
