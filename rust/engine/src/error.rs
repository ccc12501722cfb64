//! Engine errors. The Python layer maps each variant to one exception class.

use std::path::PathBuf;

/// Largest squared norm a vector may have under "ip" and "l2": f32::MAX / 4 (about 8.5e37), so
/// that no inner product, squared norm or squared distance between two accepted vectors
/// overflows float32 (|q - x|^2 <= 2|q|^2 + 2|x|^2 <= f32::MAX), whatever path computes it.
pub const MAX_SQNORM: f64 = f32::MAX as f64 / 4.0;
/// Smallest squared norm a vector may have under "cos": 2^-100 (about 7.9e-31). Below it the
/// float32 squared norm underflows (all components 1e-30 give exactly 0) and normalizing
/// would divide by zero.
pub const MIN_COS_SQNORM: f64 = 7.888_609_052_210_118e-31;

/// Why a row of a batch of vectors, queries or corpus rows was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VectorFault {
    /// A NaN or an infinity.
    NonFinite,
    /// All zeros under "cos" (no direction).
    Zero,
    /// A value beyond the float16 range where the vectors are stored or scored as float16.
    F16Overflow,
    /// A squared norm above [`MAX_SQNORM`].
    TooLarge,
    /// A squared norm below [`MIN_COS_SQNORM`] under "cos".
    TooSmall,
}

impl std::fmt::Display for VectorFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VectorFault::NonFinite => f.write_str("contains NaN or inf; expected finite values"),
            VectorFault::Zero => f.write_str(
                "is a zero vector, which has no direction under metric \"cos\"; \
                 expected a non-zero vector",
            ),
            VectorFault::F16Overflow => f.write_str(
                "has a value beyond the float16 range (|x| <= 65504); \
                 expected values that fit dtype \"f16\"",
            ),
            VectorFault::TooLarge => write!(
                f,
                "has a squared norm beyond {MAX_SQNORM:.3e} (float32 max / 4), so its scores \
                 could overflow float32; expected smaller values"
            ),
            VectorFault::TooSmall => write!(
                f,
                "has a squared norm below {MIN_COS_SQNORM:.3e} (2^-100), too small to normalize \
                 in float32 under metric \"cos\"; scale it up (only its direction matters)"
            ),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad argument (shape, dim, k, unknown metric or dtype). Python: ValueError.
    #[error("{0}")]
    Invalid(String),
    /// One row of an input array is unusable (`what` names the array: "vectors", "queries",
    /// "corpus"; `row` is its 0-based row). Python: ValueError.
    #[error("{what}[{row}] {fault}")]
    InvalidVector {
        what: &'static str,
        row: usize,
        fault: VectorFault,
    },
    /// A key given to `add` is already present. Python: KeyError.
    #[error("key {0} is already in the index")]
    DuplicateKey(u64),
    /// A key given to `get` is absent. Python: KeyError.
    #[error("key {0} is not in the index")]
    MissingKey(u64),
    /// A mutating call on an index opened with mmap. Python: RuntimeError.
    #[error("index is read-only (opened with mmap=True); load it with mmap=False to modify it")]
    ReadOnly,
    /// A bad, corrupt, truncated, foreign or other-version index file, or a mapped file that
    /// changed under the index. Python: IndexFileError.
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

impl Error {
    /// This error with its row moved by `offset` (for checks run on a slice of a larger array);
    /// other errors unchanged.
    pub fn offset_row(self, offset: usize) -> Error {
        match self {
            Error::InvalidVector { what, row, fault } => Error::InvalidVector {
                what,
                row: row + offset,
                fault,
            },
            other => other,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Invalid(msg.into()))
}

pub(crate) fn invalid_vector<T>(what: &'static str, row: usize, fault: VectorFault) -> Result<T> {
    Err(Error::InvalidVector { what, row, fault })
}
