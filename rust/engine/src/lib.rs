//! leanclip engine: exact vector index, SIMD kernels, top-k, mining, file format.
//! Pure Rust; the Python binding lives in `rust/python`.

pub mod error;
mod fault_guard;
mod file_io;
pub mod format;
pub mod index;
pub mod ivf;
pub mod kernels;
pub mod key_map;
pub mod matmul;
pub mod mining;
pub mod search;
#[doc(hidden)]
pub mod testutil;
pub mod topk;
pub mod types;

pub use error::{Error, Result, VectorFault};
pub use index::Index;
pub use mining::{mine_hard_negatives, Mining};
pub use search::{Queries, Rows, ScanPrecision};
pub use types::{DType, Metric};
