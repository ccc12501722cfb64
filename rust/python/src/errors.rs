//! Engine errors as Python exceptions: ValueError, KeyError, RuntimeError, IndexFileError
//! (defined in Python, in leanclip.errors, under LeanclipError), OSError and its subclasses.

use leanclip_engine::Error;
use pyo3::exceptions::{
    PyFileNotFoundError, PyIsADirectoryError, PyKeyError, PyOSError, PyPermissionError,
    PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;

// The class lives in leanclip/errors.py (a LeanclipError); the binding imports it, so
// `leanclip._engine.IndexFileError is leanclip.errors.IndexFileError`.
pyo3::import_exception!(leanclip.errors, IndexFileError);

pub(crate) fn to_py_err(err: Error) -> PyErr {
    let msg = err.to_string();
    match err {
        Error::Invalid(_) | Error::InvalidVector { .. } => PyValueError::new_err(msg),
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

/// Runs an engine call with the GIL released. An engine panic (a bug: the engine answers every
/// input with an `Error`) becomes a RuntimeError naming it, never a PanicException, which
/// `except Exception` does not catch.
pub(crate) fn engine<T: Send>(
    py: Python<'_>,
    call: impl FnOnce() -> leanclip_engine::Result<T> + Send,
) -> PyResult<T> {
    match py.detach(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(call))) {
        Ok(result) => result.map_err(to_py_err),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(PyRuntimeError::new_err(format!(
                "internal error in the leanclip engine ({what}); please report it"
            )))
        }
    }
}

pub(crate) fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("IndexFileError", m.py().get_type::<IndexFileError>())
}
