//! leanclip engine: exact vector index, SIMD kernels, top-k, mining, file format.
//! Pure Rust; the Python binding lives in `rust/python`.
