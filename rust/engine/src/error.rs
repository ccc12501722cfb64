//! Engine errors. The Python layer maps each variant to one exception class.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad argument (shape, dim, NaN/inf, k, unknown metric or dtype). Python: ValueError.
    #[error("{0}")]
    Invalid(String),
    /// A key given to `add` is already present. Python: KeyError.
    #[error("key {0} is already in the index")]
    DuplicateKey(u64),
    /// A key given to `get` is absent. Python: KeyError.
    #[error("key {0} is not in the index")]
    MissingKey(u64),
    /// A mutating call on an index opened with mmap. Python: RuntimeError.
    #[error("index is read-only (opened with mmap=True); load it with mmap=False to modify it")]
    ReadOnly,
    /// A bad, corrupt, truncated, foreign or other-version index file. Python: IndexFileError.
    #[error("{path}: {reason}", path = .path.as_ref().map_or("<bytes>".to_string(), |p| p.display().to_string()))]
    File {
        path: Option<PathBuf>,
        reason: String,
    },
    /// An operating-system error reading or writing a file. Python: OSError.
    #[error("{path}: {source}", path = .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Invalid(msg.into()))
}
