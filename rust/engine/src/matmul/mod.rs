//! Register-blocked matrix products for batched scoring: `c[i][j] = a_i . b_j` for `m` query
//! rows `a` against `n` stored rows `b`, `k` values each (both row-major, `k` contiguous).
//!
//! The products run on packed panels (BLIS-style): the queries are packed once per batch into
//! panels of `MR` rows ([`PackedQueries`]), each block of stored rows is packed `k`-major into
//! panels of `NR` rows, and a micro-kernel keeps an `MR x NR` tile of scores in registers while
//! it walks `k`. Stored f16 rows are converted and i8 rows dequantized while packing, so no f32
//! copy of a block is kept.
//!
//! Three products ([`Product`]):
//! - f32: AVX-512 12x32, AVX2 6x16 (FMA), any other level one dot product per pair.
//! - i8 (AVX512-VNNI `vpdpbusd`): queries are quantized per row to i8 and offset by +128 to u8
//!   (the instruction multiplies u8 by i8); the offset is removed exactly with a per-row
//!   correction `128 * sum(b_j)`. The integer dot products are exact.
//! - bf16 (AVX512-BF16 `vdpbf16ps`): both sides rounded to bf16 (nearest even) while packing,
//!   products summed in f32.
//!
//! At `Level::Amx` the bf16 and i8 products run on AMX tiles instead (`tdpbf16ps`,
//! `tdpbusd`; 32x32, `amx`), with the same operands and sums: on Intel's cores `vdpbf16ps`
//! and `vpdpbusd` issue on fewer ports than FMAs, so the vector bf16 product loses to f32
//! there, while the tiles do 16x the vector's work per instruction.
//!
//! The low-precision products are scans: callers re-score their candidates exactly (see
//! `search`). Each product has a portable reference with the same arithmetic, which is the
//! path where the instructions are absent and what the tests compare every compiled path with.
//!
//! Here: the operands ([`Src`], [`Product`]), the [`Workspace`], the blocking and the packing
//! both sides share. [`PackedQueries`] (`queries`) packs a batch's queries and drives every
//! product; [`PackedRows`] (`rows`) packs stored rows once for a whole scan; `x86` holds the
//! vector micro-kernels and the packing intrinsics, `amx` the tile kernels.

// The micro-kernels are x86-64 only: elsewhere every product runs its reference loop.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

use crate::kernels::{self, Level};
use half::f16;
use half::slice::HalfFloatSliceExt;

#[cfg(target_arch = "x86_64")]
mod amx;
mod queries;
mod rows;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use queries::{Marks, PackedQueries};
pub use rows::PackedRows;

#[cfg(test)]
mod tests;

/// Stored rows a product reads.
#[derive(Clone, Copy)]
pub enum Src<'a> {
    F32(&'a [f32]),
    /// Converted to f32 (or bf16) while packing.
    F16(&'a [f16]),
    /// Row `r` is `scales[r] * data[r]`; the f32 and bf16 products dequantize while packing.
    I8 {
        data: &'a [i8],
        scales: &'a [f32],
    },
}

impl Src<'_> {
    fn rows(&self, k: usize) -> usize {
        match self {
            Src::F32(v) => v.len() / k.max(1),
            Src::F16(v) => v.len() / k.max(1),
            Src::I8 { scales, .. } => scales.len(),
        }
    }

    /// Values `[p0, p0 + out.len())` of row `r` as f32.
    #[inline]
    fn read(&self, r: usize, k: usize, p0: usize, out: &mut [f32]) {
        let s = r * k + p0;
        match self {
            Src::F32(v) => out.copy_from_slice(&v[s..s + out.len()]),
            Src::F16(v) => v[s..s + out.len()].convert_to_f32_slice(out),
            Src::I8 { data, scales } => {
                let (sc, len) = (scales[r], out.len());
                for (o, &x) in out.iter_mut().zip(&data[s..s + len]) {
                    *o = x as f32 * sc;
                }
            }
        }
    }
}

/// Which product a batch runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Product {
    F32,
    Bf16,
    I8,
}

/// Packing buffers for stored rows, reused across calls (one per task).
#[derive(Default)]
pub struct Workspace {
    b: Vec<u8>,
    ints: Vec<i32>,
    row: Vec<f32>,
    corr: Vec<i32>,
    /// Rows padded to the lane step, on their way into the panels.
    stage: Vec<u8>,
}

/// A 64-byte aligned `&mut [T]` of `len` elements inside `buf` (contents unspecified).
fn aligned<T: bytemuck::Pod>(buf: &mut Vec<u8>, len: usize) -> &mut [T] {
    let bytes = len * std::mem::size_of::<T>();
    if buf.len() < bytes + 64 {
        buf.resize(bytes + 64, 0);
    }
    let off = buf.as_ptr().align_offset(64);
    bytemuck::cast_slice_mut(&mut buf[off..off + bytes])
}

/// Whether the i8 product runs on VNNI or AMX tiles at this level (else it runs the
/// reference loop).
pub fn has_i8_product(level: Level) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        level == Level::Amx || level == Level::Avx512 && kernels::has_avx512_vnni()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = level;
        false
    }
}

/// Whether the bf16 product runs on AVX512-BF16 or AMX tiles at this level.
pub fn has_bf16_product(level: Level) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        level == Level::Amx || level == Level::Avx512 && kernels::has_avx512_bf16()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = level;
        false
    }
}

/// Largest `k` for which the i8 product's 32-bit sums cannot overflow (|u8 * i8| <= 32,640).
pub const I8_MAX_K: usize = 65_536;

// ---------------------------------------------------------------------------------------------
// Blocking.

/// Shape of one micro-kernel: an `MR x NR` tile, `G` values of `k` per lane step of the
/// kernel (and of the packed queries; slices are padded to it), `GB` values per lane step of
/// the packed stored rows (`G` but for the AMX tiles), `KC` values of `k` per packed slice,
/// `NC` stored rows per packed block.
#[derive(Clone, Copy, Debug)]
struct Shape {
    mr: usize,
    nr: usize,
    g: usize,
    gb: usize,
    kc: usize,
    nc: usize,
}

impl Shape {
    /// The micro-kernel for a product at a level, or None for the reference loop.
    fn of(product: Product, level: Level) -> Option<Shape> {
        let s = |mr, nr, g, kc| Shape {
            mr,
            nr,
            g,
            gb: g,
            kc,
            nc: 512,
        };
        // AMX: a tile row of queries is 64 bytes of one query's values; stored rows keep the
        // vector kernels' bf16 pairs / 4-byte steps (the tile's B layout).
        let tiles = |g, gb, kc| Shape {
            gb,
            ..s(32, 32, g, kc)
        };
        match (product, level) {
            #[cfg(target_arch = "x86_64")]
            (Product::F32, Level::Avx512 | Level::Amx) => Some(s(12, 32, 1, 256)),
            #[cfg(target_arch = "x86_64")]
            (Product::Bf16, Level::Amx) => Some(tiles(32, 2, 512)),
            #[cfg(target_arch = "x86_64")]
            (Product::I8, Level::Amx) => Some(tiles(64, 4, 1024)),
            #[cfg(target_arch = "x86_64")]
            (Product::F32, Level::Avx2) => Some(s(6, 16, 1, 256)),
            (Product::Bf16, l) if has_bf16_product(l) => Some(s(12, 32, 2, 512)),
            (Product::I8, l) if has_i8_product(l) => Some(s(12, 32, 4, 1024)),
            _ => None,
        }
    }

    /// Values of `k` a packed slice starting at `p0` holds (its length rounded up to `g`).
    fn padded(&self, k: usize, p0: usize) -> usize {
        self.kc.min(k - p0).div_ceil(self.g) * self.g
    }
}

/// One micro-kernel call: for queries `i0..i0 + mr_valid` and rows `j0..j0 + nr_valid`, the
/// packed panels of one `k` slice start at `a` and `b`.
struct Tile<TA, TB> {
    a: *const TA,
    b: *const TB,
    /// Lane steps in the slice.
    steps: usize,
    i0: usize,
    j0: usize,
    mr_valid: usize,
    nr_valid: usize,
    first: bool,
    last: bool,
}

/// Stored rows to pack: rows `r0..r0 + rows` of a matrix, values `[p0, p0 + kc)` of each.
#[derive(Clone, Copy, Debug)]
struct Block {
    r0: usize,
    rows: usize,
    p0: usize,
    kc: usize,
}

/// Values stored rows hold that the f32 product packs as f32: f32 as they are, f16
/// converted (exactly) as the panels are written.
trait F32Value: Copy {
    fn to_f32(self) -> f32;
    /// 8 values from `p` as f32.
    ///
    /// # Safety
    /// AVX2 and F16C; `p` points at 8 readable values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl F32Value for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        x86::load8_f32(p)
    }
}

impl F32Value for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f16) -> std::arch::x86_64::__m256 {
        x86::load8_f16(p)
    }
}

/// Pack `block` of the rows `src` (f32 or f16, row stride `ld`) into f32 panels of `w` rows
/// (g = 1), transposing 8 x 8 blocks with AVX where the CPU has it.
fn pack_f32_rows<T: F32Value>(
    level: Level,
    dst: &mut [f32],
    src: &[T],
    ld: usize,
    block: Block,
    w: usize,
) {
    let Block { r0, rows, p0, kc } = block;
    #[cfg(target_arch = "x86_64")]
    if level != Level::Scalar && w.is_multiple_of(8) {
        assert!(dst.len() >= rows.div_ceil(w) * w * kc && src.len() >= (r0 + rows) * ld);
        // SAFETY: AVX2 and F16C are implied by any non-scalar x86 level (checked by
        // available_levels); the assert above bounds every read (rows r0..r0+rows, values
        // p0..p0+kc <= ld) and every write (rows.div_ceil(w) panels of w * kc values).
        unsafe { x86::pack_f32_avx(dst.as_mut_ptr(), src.as_ptr(), ld, block, w) };
        return;
    }
    let _ = level;
    for panel in 0..rows.div_ceil(w) {
        let base = &mut dst[panel * w * kc..(panel + 1) * w * kc];
        for lane in 0..w {
            let i = panel * w + lane;
            if i < rows {
                let row = &src[(r0 + i) * ld + p0..(r0 + i) * ld + p0 + kc];
                (0..kc).for_each(|s| base[s * w + lane] = row[s].to_f32());
            } else {
                (0..kc).for_each(|s| base[s * w + lane] = 0.0);
            }
        }
    }
}

/// Write one row's lane steps (`G` values each) into its lane of a panel `w` rows wide.
#[inline(always)]
fn scatter<T: Copy, const G: usize>(panel: &mut [T], row: &[T], w: usize, lane: usize) {
    for (s, v) in row.chunks_exact(G).enumerate() {
        let d = (s * w + lane) * G;
        panel[d..d + G].copy_from_slice(v);
    }
}

/// Values `[p0, p0 + out.len())` of row `r` of `src` as bf16 bits (rounded to nearest even):
/// 16 lanes at a time where the bf16 product runs, a plain loop elsewhere.
fn read_bf16(
    src: Src<'_>,
    level: Level,
    r: usize,
    k: usize,
    p0: usize,
    out: &mut [u16],
    tmp: &mut Vec<f32>,
) {
    let s = r * k + p0;
    #[cfg(target_arch = "x86_64")]
    if has_bf16_product(level) {
        // SAFETY: the bf16 product runs at the AVX-512 levels (F, BW and VL), checked by
        // `has_bf16_product`; the slices have out.len() values.
        match src {
            Src::F32(v) => return unsafe { x86::f32_to_bf16(&v[s..s + out.len()], out) },
            Src::F16(v) => return unsafe { x86::f16_to_bf16(&v[s..s + out.len()], out) },
            Src::I8 { .. } => {
                tmp.resize(out.len(), 0.0);
                src.read(r, k, p0, tmp);
                return unsafe { x86::f32_to_bf16(tmp, out) };
            }
        }
    }
    let _ = level;
    tmp.resize(out.len(), 0.0);
    src.read(r, k, p0, tmp);
    for (o, &v) in out.iter_mut().zip(tmp.iter()) {
        *o = bf16_bits(v);
    }
}

/// bf16 bits of `v`, rounded to nearest even (NaN stays NaN); a plain loop of these vectorizes.
#[inline(always)]
fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        ((b >> 16) | 0x40) as u16
    } else {
        ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
    }
}

/// Quantize a query row to i8 for the i8 product: `q ~= scale * out`, |out| <= 127.
pub fn quantize_query_i8(q: &[f32], out: &mut [i8]) -> f32 {
    kernels::quantize_row_i8(q, out)
}
