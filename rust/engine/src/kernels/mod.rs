//! Distance kernels: one query against a run of stored rows, for f32, f16 and i8 storage.
//!
//! Every kernel has a portable scalar version (the reference the tests compare against) and
//! SIMD versions chosen once at run time: AVX-512 (F + BW) and AVX2 + FMA + F16C on x86-64,
//! NEON on aarch64. The public functions dispatch on [`level()`]; the `*_with` variants take an
//! explicit level so that tests can compare every compiled path with the scalar one.
//!
//! One file per instruction set: `scalar` (the reference), `avx2`, `avx512`, `neon`, and
//! `dispatch` (levels, `LEANCLIP_SIMD`, the public kernels, the quantizers), re-exported here.

mod dispatch;
pub mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "aarch64")]
mod neon;

pub use dispatch::*;

/// Elements the i8 kernels accumulate in 32-bit lanes before spilling to 64 bits (see
/// [`I16_QUERY_MAX`]). Here, not in `dispatch`, so that the instruction-set files depend on
/// this module alone and `dispatch` depends on them.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
const I8_BLOCK: usize = 4096;

#[cfg(test)]
mod tests;
