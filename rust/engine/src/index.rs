//! The exact index: uint64 keys -> vectors stored densely as f32, f16 or i8.
//!
//! Removal keeps storage dense (swap-remove plus a key -> row map). Under "cos" vectors are
//! stored unit-normalized, so a search is a plain inner product. Every mutating call validates
//! its whole batch before changing anything.

use crate::error::{invalid, Error, Result};
use crate::kernels;
use crate::search::{self, Plan, Queries, Rows};
use crate::types::{DType, Metric};
use bytemuck::Pod;
use half::f16;
use half::slice::HalfFloatSliceExt;
use memmap2::Mmap;
use rayon::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};
use std::mem::MaybeUninit;
use std::sync::{Arc, OnceLock};

/// Largest supported dimension (keeps offsets and per-row work sane).
pub const MAX_DIM: usize = 1 << 16;
/// Rows are addressed with u32.
pub const MAX_ROWS: usize = u32::MAX as usize;
/// Largest finite value a float16 can hold.
const F16_MAX: f32 = 65504.0;
/// Rows per parallel encoding / validation chunk.
const ENCODE_CHUNK: usize = 512;

/// A buffer that is either owned or a read-only view into a memory-mapped file.
pub(crate) enum Buf<T: Pod> {
    Owned(Vec<T>),
    Mapped {
        map: Arc<Mmap>,
        offset: usize,
        len: usize,
    },
}

impl<T: Pod> Buf<T> {
    pub(crate) fn as_slice(&self) -> &[T] {
        match self {
            Buf::Owned(v) => v,
            Buf::Mapped { map, offset, len } => {
                // The file layout puts every section at an offset aligned for its type and the
                // map itself is page-aligned, so this cast cannot fail (format.rs checks it).
                bytemuck::cast_slice(&map[*offset..*offset + *len * std::mem::size_of::<T>()])
            }
        }
    }

    fn owned_mut(&mut self) -> Result<&mut Vec<T>> {
        match self {
            Buf::Owned(v) => Ok(v),
            Buf::Mapped { .. } => Err(Error::ReadOnly),
        }
    }
}

/// The stored vectors.
pub(crate) enum Store {
    F32(Buf<f32>),
    F16(Buf<f16>),
    /// Row r is `scales[r] * data[r]`, |data| <= 127.
    I8 {
        data: Buf<i8>,
        scales: Buf<f32>,
    },
}

impl Store {
    fn empty(dtype: DType) -> Store {
        match dtype {
            DType::F32 => Store::F32(Buf::Owned(Vec::new())),
            DType::F16 => Store::F16(Buf::Owned(Vec::new())),
            DType::I8 => Store::I8 {
                data: Buf::Owned(Vec::new()),
                scales: Buf::Owned(Vec::new()),
            },
        }
    }

    pub(crate) fn rows(&self) -> Rows<'_> {
        match self {
            Store::F32(b) => Rows::F32(b.as_slice()),
            Store::F16(b) => Rows::F16(b.as_slice()),
            Store::I8 { data, scales } => Rows::I8 {
                data: data.as_slice(),
                scales: scales.as_slice(),
            },
        }
    }
}

/// Where `encode_into` writes: not yet initialized storage (spare capacity of a Vec).
enum EncodeTarget<'a> {
    F32(&'a mut [MaybeUninit<f32>]),
    F16(&'a mut [MaybeUninit<f16>]),
    I8(&'a mut [MaybeUninit<i8>], &'a mut [MaybeUninit<f32>]),
}

/// Reserves room for `extra` more elements in `v` and returns that spare capacity, not yet
/// initialized (so not yet touched: the encoding pass that fills it also faults its pages in,
/// spread over the threads). Commit it with `commit` once every element is written.
fn spare<T>(v: &mut Vec<T>, extra: usize) -> &mut [MaybeUninit<T>] {
    v.reserve(extra);
    let tail = &mut v.spare_capacity_mut()[..extra];
    advise_huge_pages(tail);
    tail
}

/// Marks the `extra` elements after `v.len()` as part of `v`.
///
/// # Safety
/// Every one of those elements (`v.spare_capacity_mut()[..extra]`) must have been initialized.
unsafe fn commit<T>(v: &mut Vec<T>, extra: usize) {
    debug_assert!(v.capacity() - v.len() >= extra);
    // SAFETY: the caller guarantees the `extra` elements past the length are initialized, and
    // they lie within the capacity (they came from `spare`).
    unsafe { v.set_len(v.len() + extra) };
}

/// Copies `src` into the not yet initialized `dst` (same length).
#[inline(always)]
fn write_copy<T: Copy>(dst: &mut [MaybeUninit<T>], src: &[T]) {
    assert_eq!(dst.len(), src.len());
    // SAFETY: both slices hold `src.len()` elements (checked above), `MaybeUninit<T>` has the
    // layout of `T`, and a `&mut` slice cannot overlap a `&` slice.
    unsafe {
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast::<T>(), src.len());
    }
}

/// Asks Linux to back a large, not yet touched buffer with transparent huge pages: a batch of
/// 100k x 512 f32 would otherwise take 50,000 page faults, most of the cost of `add`.
fn advise_huge_pages<T>(buf: &mut [std::mem::MaybeUninit<T>]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(buf);
        if bytes < 4 * HUGE {
            return;
        }
        let start = (buf.as_mut_ptr() as usize).next_multiple_of(HUGE);
        let end = (buf.as_mut_ptr() as usize + bytes) / HUGE * HUGE;
        if end > start {
            // SAFETY: [start, end) lies inside `buf`, memory this Vec owns; MADV_HUGEPAGE only
            // changes how the kernel backs the pages, never their contents. Errors (e.g. THP
            // disabled) are ignored: the advice is optional.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = buf;
}

/// The growable buffers of one dtype that `encode_append` writes to.
enum Buffers<'a> {
    F32(&'a mut Vec<f32>),
    F16(&'a mut Vec<f16>),
    I8(&'a mut Vec<i8>, &'a mut Vec<f32>),
}

/// Validates and converts `vectors` (rows of `dim`) into the spare capacity of `dst`, and makes
/// them part of it only if every row passed: on error `dst` is unchanged.
fn encode_append(vectors: &[f32], dim: usize, metric: Metric, dst: Buffers) -> Result<()> {
    let (len, n) = (vectors.len(), vectors.len() / dim);
    match dst {
        Buffers::F32(v) => {
            encode_into(vectors, dim, metric, EncodeTarget::F32(spare(v, len)))?;
            // SAFETY: encode_into returned Ok, so it initialized all of the spare elements.
            unsafe { commit(v, len) };
        }
        Buffers::F16(v) => {
            encode_into(vectors, dim, metric, EncodeTarget::F16(spare(v, len)))?;
            // SAFETY: as above.
            unsafe { commit(v, len) };
        }
        Buffers::I8(d, s) => {
            encode_into(vectors, dim, metric, EncodeTarget::I8(spare(d, len), spare(s, n)))?;
            // SAFETY: encode_into returned Ok, so it initialized all of the spare elements of
            // both (`n` scales, one per row).
            unsafe {
                commit(d, len);
                commit(s, n);
            }
        }
    }
    Ok(())
}

/// Vectors validated and converted to the stored type, not yet part of an index.
enum Encoded {
    F32(Vec<f32>),
    F16(Vec<f16>),
    I8(Vec<i8>, Vec<f32>),
}

pub struct Index {
    pub(crate) dim: usize,
    pub(crate) metric: Metric,
    pub(crate) dtype: DType,
    pub(crate) keys: Buf<u64>,
    pub(crate) store: Store,
    /// key -> row. Always built for an index in memory; an index opened with mmap and
    /// verify=False builds it on first use (see `key_rows`).
    pub(crate) rows: OnceLock<FxHashMap<u64, u32>>,
    /// Set for an index opened with mmap: checksum of the mapped vectors, and whether it has
    /// been checked yet.
    pub(crate) mapped_vectors: Option<MappedVectors>,
}

pub(crate) struct MappedVectors {
    pub(crate) checksum: u64,
    pub(crate) offset: usize,
    pub(crate) len: usize,
    pub(crate) map: Arc<Mmap>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("dim", &self.dim)
            .field("metric", &self.metric.name())
            .field("dtype", &self.dtype.name())
            .field("len", &self.len())
            .field("read_only", &self.is_read_only())
            .finish()
    }
}

pub(crate) fn check_dim(dim: usize) -> Result<()> {
    if dim == 0 || dim > MAX_DIM {
        return invalid(format!("dim must be between 1 and {MAX_DIM}, got {dim}"));
    }
    Ok(())
}

/// The largest `|x|` of a row as raw bits (sign cleared). For non-negative floats the bit
/// patterns order like the values, so one integer max answers "any NaN or inf?"
/// (`>= INF_BITS`), "all zero?" (`== 0`) and "any value beyond the float16 range?".
#[inline(always)]
fn max_abs_bits(row: &[f32]) -> u32 {
    const LANES: usize = 16;
    let mut acc = [0u32; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = (*a).max(v.to_bits() & 0x7fff_ffff);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(0, |m, v| m.max(v.to_bits() & 0x7fff_ffff));
    acc.iter().fold(tail, |m, &a| m.max(a))
}

/// Bits of +inf: `max_abs_bits(row) >= INF_BITS` means the row holds a NaN or an inf.
const INF_BITS: u32 = 0x7f80_0000;

/// The first failing row of a batch, by kind (the kinds are reported in this order).
#[derive(Clone, Copy, Default)]
struct Faults {
    /// NaN or inf, or a zero vector under cos.
    bad: Option<usize>,
    /// A value beyond the float16 range (f16 storage under ip / l2 only).
    f16_overflow: Option<usize>,
}

impl Faults {
    fn first(a: Option<usize>, b: Option<usize>) -> Option<usize> {
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
    fn merge(self, other: Faults) -> Faults {
        Faults {
            bad: Self::first(self.bad, other.bad),
            f16_overflow: Self::first(self.f16_overflow, other.f16_overflow),
        }
    }
    /// Records row `r` given its `max_abs_bits`.
    #[inline(always)]
    fn note(&mut self, r: usize, bits: u32, metric: Metric, f16_range: bool) {
        if self.bad.is_none() && (bits >= INF_BITS || (metric == Metric::Cos && bits == 0)) {
            self.bad = Some(r);
        }
        if f16_range && self.f16_overflow.is_none() && bits > F16_MAX.to_bits() {
            self.f16_overflow = Some(r);
        }
    }
    /// The error for the first failing row: NaN / inf / zero anywhere first, then f16 range.
    fn check(self, vectors: &[f32], dim: usize, metric: Metric, what: &str) -> Result<()> {
        if let Some(r) = self.bad {
            let row = &vectors[r * dim..(r + 1) * dim];
            return if max_abs_bits(row) >= INF_BITS {
                invalid(format!(
                    "{what}[{r}] contains NaN or inf; expected finite values"
                ))
            } else {
                debug_assert!(metric == Metric::Cos);
                invalid(format!(
                    "{what}[{r}] is a zero vector, which has no direction under metric \"cos\"; \
                     expected a non-zero vector"
                ))
            };
        }
        if let Some(r) = self.f16_overflow {
            return invalid(format!(
                "{what}[{r}] has a value beyond the float16 range (|x| <= {F16_MAX}); \
                 expected values that fit dtype \"f16\""
            ));
        }
        Ok(())
    }
}

/// Checks every row of `vectors` (`dim` values each) is finite, and non-zero under cosine.
pub(crate) fn check_rows(vectors: &[f32], dim: usize, metric: Metric, what: &str) -> Result<()> {
    let bad = vectors
        .par_chunks(dim * ENCODE_CHUNK)
        .enumerate()
        .find_map_first(|(chunk, block)| {
            let mut faults = Faults::default();
            for (i, row) in block.chunks_exact(dim).enumerate() {
                faults.note(chunk * ENCODE_CHUNK + i, max_abs_bits(row), metric, false);
                if faults.bad.is_some() {
                    return faults.bad;
                }
            }
            None
        });
    Faults {
        bad,
        f16_overflow: None,
    }
    .check(vectors, dim, metric, what)
}

/// `kernels::quantize_row_i8`'s `round_small(x.clamp(-127.0, 127.0)) as i8` (round to nearest,
/// ties to even; NaN -> 0) without a float -> int conversion, which does not vectorize: for
/// |x| <= 127, x + 1.5 * 2^23 lies in a binade where one unit is one ulp, so its bits minus
/// those of 1.5 * 2^23 are the rounded integer.
#[inline(always)]
fn round_clamp_i8(x: f32) -> i8 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23: adding it leaves no fraction bits
    let y = x.clamp(-127.0, 127.0) + MAGIC;
    if y.is_nan() {
        0
    } else {
        (y.to_bits() as i32 - MAGIC.to_bits() as i32) as i8
    }
}

/// `kernels::quantize_row_i8` of the row `x * norm` (`norm` = 1 for no normalization), given
/// `max_abs` = max |x|, writing `out`; returns the scale. Bit for bit the same result:
/// rounding is monotonic, so max |fl(x * norm)| = fl(max |x| * norm).
#[inline(always)]
fn quantize_i8_into(
    x: &[f32],
    norm: Option<f32>,
    max_abs: f32,
    out: &mut [MaybeUninit<i8>],
) -> f32 {
    let max_abs = match norm {
        Some(n) => max_abs * n,
        None => max_abs,
    };
    if max_abs == 0.0 {
        out.iter_mut().for_each(|o| {
            o.write(0);
        });
        return 0.0;
    }
    let inv = 127.0 / max_abs;
    match norm {
        Some(n) => {
            for (o, &v) in out.iter_mut().zip(x) {
                o.write(round_clamp_i8(v * n * inv));
            }
        }
        None => {
            for (o, &v) in out.iter_mut().zip(x) {
                o.write(round_clamp_i8(v * inv));
            }
        }
    }
    max_abs / 127.0
}

/// Validates and encodes one chunk of rows (`src`, `dim` values each, the first being row
/// `first_row`) into `dst` in one pass: every element of `dst` is written, whatever the input
/// (a failing row is encoded as garbage that the caller never commits). `scratch` holds `dim`
/// values.
#[inline(always)]
fn encode_chunk(
    src: &[f32],
    dst: ChunkTarget<'_>,
    first_row: usize,
    dim: usize,
    metric: Metric,
    scratch: &mut [f16],
) -> Faults {
    let cos = metric == Metric::Cos;
    let mut faults = Faults::default();
    let f16_range = matches!(dst, ChunkTarget::F16(_)) && !cos;
    let mut note = |i: usize, row: &[f32]| {
        let bits = max_abs_bits(row);
        faults.note(first_row + i, bits, metric, f16_range);
        bits
    };
    // 1 / |row| under cos (the stored row is `row * inv`).
    let inv_norm = |row: &[f32]| 1.0 / kernels::sqnorm_f32(row).sqrt();
    match dst {
        ChunkTarget::F32(d) => {
            for (i, (dr, sr)) in d
                .chunks_exact_mut(dim)
                .zip(src.chunks_exact(dim))
                .enumerate()
            {
                note(i, sr);
                if cos {
                    let inv = inv_norm(sr);
                    for (o, &v) in dr.iter_mut().zip(sr) {
                        o.write(v * inv);
                    }
                } else {
                    write_copy(dr, sr);
                }
            }
        }
        ChunkTarget::F16(d) => {
            let mut normalized = Vec::new();
            for (i, (dr, sr)) in d
                .chunks_exact_mut(dim)
                .zip(src.chunks_exact(dim))
                .enumerate()
            {
                note(i, sr);
                let row = if cos {
                    let inv = inv_norm(sr);
                    normalized.clear();
                    normalized.extend(sr.iter().map(|v| v * inv));
                    &normalized[..]
                } else {
                    sr
                };
                scratch.convert_from_f32_slice(row);
                write_copy(dr, scratch);
            }
        }
        ChunkTarget::I8(d, scales) => {
            for (i, ((dr, sr), scale)) in d
                .chunks_exact_mut(dim)
                .zip(src.chunks_exact(dim))
                .zip(scales)
                .enumerate()
            {
                let bits = note(i, sr);
                let norm = cos.then(|| inv_norm(sr));
                scale.write(quantize_i8_into(sr, norm, f32::from_bits(bits), dr));
            }
        }
    }
    faults
}

/// One chunk's share of an [`EncodeTarget`].
enum ChunkTarget<'a> {
    F32(&'a mut [MaybeUninit<f32>]),
    F16(&'a mut [MaybeUninit<f16>]),
    I8(&'a mut [MaybeUninit<i8>], &'a mut [MaybeUninit<f32>]),
}

/// `encode_chunk` compiled for AVX2 (same operations, wider vectors: results are identical).
///
/// # Safety
/// The CPU must support AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn encode_chunk_avx2(
    src: &[f32],
    dst: ChunkTarget<'_>,
    first_row: usize,
    dim: usize,
    metric: Metric,
    scratch: &mut [f16],
) -> Faults {
    encode_chunk(src, dst, first_row, dim, metric, scratch)
}

/// Validates `vectors` (n x dim: finite, non-zero under cos, within the float16 range for f16
/// storage under ip / l2) and encodes them into `dst` in one parallel pass. On `Ok` every
/// element of `dst` is initialized; on `Err` (the first failing row, NaN / inf / zero before
/// f16 range) its contents are unspecified and must not be committed.
fn encode_into(vectors: &[f32], dim: usize, metric: Metric, dst: EncodeTarget<'_>) -> Result<()> {
    // Callers commit `dst` on Ok, so it must be covered exactly: chunk i of `vectors` pairs
    // with chunk i of `dst`, and `encode_chunk` writes every element of the chunk it gets.
    assert!(vectors.len().is_multiple_of(dim));
    let n = vectors.len() / dim;
    match &dst {
        EncodeTarget::F32(out) => assert_eq!(out.len(), vectors.len()),
        EncodeTarget::F16(out) => assert_eq!(out.len(), vectors.len()),
        EncodeTarget::I8(out, scales) => {
            assert_eq!(out.len(), vectors.len());
            assert_eq!(scales.len(), n);
        }
    }
    let chunk = dim * ENCODE_CHUNK;
    #[cfg(target_arch = "x86_64")]
    let avx2 = kernels::level() != kernels::Level::Scalar;
    let run = |(c, (src, dst)): (usize, (&[f32], ChunkTarget<'_>))| {
        let mut scratch = vec![f16::ZERO; dim];
        let first = c * ENCODE_CHUNK;
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: every level above Scalar on x86-64 requires AVX2 (kernels::available_levels).
            return unsafe { encode_chunk_avx2(src, dst, first, dim, metric, &mut scratch) };
        }
        encode_chunk(src, dst, first, dim, metric, &mut scratch)
    };
    let faults = match dst {
        EncodeTarget::F32(out) => vectors
            .par_chunks(chunk)
            .zip(out.par_chunks_mut(chunk).map(ChunkTarget::F32))
            .enumerate()
            .map(run)
            .reduce(Faults::default, Faults::merge),
        EncodeTarget::F16(out) => vectors
            .par_chunks(chunk)
            .zip(out.par_chunks_mut(chunk).map(ChunkTarget::F16))
            .enumerate()
            .map(run)
            .reduce(Faults::default, Faults::merge),
        EncodeTarget::I8(out, scales) => vectors
            .par_chunks(chunk)
            .zip(
                out.par_chunks_mut(chunk)
                    .zip(scales.par_chunks_mut(ENCODE_CHUNK))
                    .map(|(d, s)| ChunkTarget::I8(d, s)),
            )
            .enumerate()
            .map(run)
            .reduce(Faults::default, Faults::merge),
    };
    faults.check(vectors, dim, metric, "vectors")
}

impl Index {
    pub fn new(dim: usize, metric: Metric, dtype: DType) -> Result<Self> {
        check_dim(dim)?;
        Ok(Index {
            dim,
            metric,
            dtype,
            keys: Buf::Owned(Vec::new()),
            store: Store::empty(dtype),
            rows: OnceLock::from(FxHashMap::default()),
            mapped_vectors: None,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn metric(&self) -> Metric {
        self.metric
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn len(&self) -> usize {
        self.keys.as_slice().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether `key` is present. Fails only for an mmap-opened file whose keys repeat.
    pub fn contains(&self, key: u64) -> Result<bool> {
        Ok(self.key_rows()?.contains_key(&key))
    }

    /// The key -> row map, built now if the index was opened lazily.
    pub(crate) fn key_rows(&self) -> Result<&FxHashMap<u64, u32>> {
        if let Some(map) = self.rows.get() {
            return Ok(map);
        }
        let map = crate::format::key_map(self.keys.as_slice())
            .map_err(|reason| Error::File { path: None, reason })?;
        Ok(self.rows.get_or_init(|| map))
    }

    /// The map of a writable index (always built: only mmap-opened indexes defer it).
    fn key_rows_mut(&mut self) -> &mut FxHashMap<u64, u32> {
        self.rows
            .get_mut()
            .expect("a writable index always has its key map")
    }
    /// Keys in storage order.
    pub fn keys(&self) -> &[u64] {
        self.keys.as_slice()
    }
    /// True for an index opened with mmap (every mutating call fails with `Error::ReadOnly`).
    pub fn is_read_only(&self) -> bool {
        self.mapped_vectors.is_some()
    }

    fn check_writable(&self) -> Result<()> {
        if self.is_read_only() {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn check_batch(&self, keys: &[u64], vectors: &[f32]) -> Result<()> {
        if vectors.len() != keys.len() * self.dim {
            return invalid(format!(
                "vectors must have shape (n, {dim}) with n = len(keys) = {n}; got {m} values",
                dim = self.dim,
                n = keys.len(),
                m = vectors.len()
            ));
        }
        let mut seen = FxHashSet::with_capacity_and_hasher(keys.len(), Default::default());
        for &key in keys {
            if !seen.insert(key) {
                return invalid(format!(
                    "key {key} appears more than once in the batch; keys must be unique"
                ));
            }
        }
        Ok(())
    }

    /// Validates and converts `vectors` into new buffers (for upsert).
    fn encode(&self, vectors: &[f32]) -> Result<Encoded> {
        let mut out = match self.dtype {
            DType::F32 => Encoded::F32(Vec::new()),
            DType::F16 => Encoded::F16(Vec::new()),
            DType::I8 => Encoded::I8(Vec::new(), Vec::new()),
        };
        let buffers = match &mut out {
            Encoded::F32(v) => Buffers::F32(v),
            Encoded::F16(v) => Buffers::F16(v),
            Encoded::I8(d, s) => Buffers::I8(d, s),
        };
        encode_append(vectors, self.dim, self.metric, buffers)?;
        Ok(out)
    }

    /// Validates and converts `vectors`, writing them straight into storage's spare capacity and
    /// committing them only if every row passed (for add): a failing call changes nothing.
    fn append_encoded(&mut self, vectors: &[f32]) -> Result<()> {
        let buffers = match &mut self.store {
            Store::F32(b) => Buffers::F32(b.owned_mut()?),
            Store::F16(b) => Buffers::F16(b.owned_mut()?),
            Store::I8 { data, scales } => Buffers::I8(data.owned_mut()?, scales.owned_mut()?),
        };
        encode_append(vectors, self.dim, self.metric, buffers)
    }

    fn push_rows(&mut self, keys: &[u64], encoded: Encoded) -> Result<()> {
        match (&mut self.store, encoded) {
            (Store::F32(b), Encoded::F32(v)) => b.owned_mut()?.extend_from_slice(&v),
            (Store::F16(b), Encoded::F16(v)) => b.owned_mut()?.extend_from_slice(&v),
            (Store::I8 { data, scales }, Encoded::I8(d, s)) => {
                data.owned_mut()?.extend_from_slice(&d);
                scales.owned_mut()?.extend_from_slice(&s);
            }
            _ => unreachable!("encoded with the index's own dtype"),
        }
        self.push_keys(keys)
    }

    fn push_keys(&mut self, keys: &[u64]) -> Result<()> {
        let start = self.len();
        self.keys.owned_mut()?.extend_from_slice(keys);
        let rows = self.key_rows_mut();
        rows.reserve(keys.len());
        for (i, &key) in keys.iter().enumerate() {
            rows.insert(key, (start + i) as u32);
        }
        Ok(())
    }

    fn check_capacity(&self, extra: usize) -> Result<()> {
        if self.len() + extra > MAX_ROWS {
            return invalid(format!("an index holds at most {MAX_ROWS} vectors"));
        }
        Ok(())
    }

    /// Adds a batch; all-or-nothing. A key already present: `Error::DuplicateKey`.
    pub fn add(&mut self, keys: &[u64], vectors: &[f32]) -> Result<()> {
        self.check_writable()?;
        self.check_batch(keys, vectors)?;
        if let Some(&key) = keys.iter().find(|k| self.key_rows_mut().contains_key(k)) {
            return Err(Error::DuplicateKey(key));
        }
        self.check_capacity(keys.len())?;
        self.append_encoded(vectors)?;
        self.push_keys(keys)
    }

    /// Inserts new keys and replaces the vectors of present ones; all-or-nothing.
    pub fn upsert(&mut self, keys: &[u64], vectors: &[f32]) -> Result<()> {
        self.check_writable()?;
        self.check_batch(keys, vectors)?;
        let new_count = keys
            .iter()
            .filter(|k| !self.key_rows_mut().contains_key(k))
            .count();
        self.check_capacity(new_count)?;
        let encoded = self.encode(vectors)?;
        let dim = self.dim;
        let mut new_keys = Vec::with_capacity(new_count);
        let mut new_rows = Vec::with_capacity(new_count);
        for (i, &key) in keys.iter().enumerate() {
            match self.key_rows_mut().get(&key).copied() {
                Some(row) => {
                    let (dst, src) = (row as usize * dim, i * dim);
                    match (&mut self.store, &encoded) {
                        (Store::F32(b), Encoded::F32(v)) => {
                            b.owned_mut()?[dst..dst + dim].copy_from_slice(&v[src..src + dim])
                        }
                        (Store::F16(b), Encoded::F16(v)) => {
                            b.owned_mut()?[dst..dst + dim].copy_from_slice(&v[src..src + dim])
                        }
                        (Store::I8 { data, scales }, Encoded::I8(d, s)) => {
                            data.owned_mut()?[dst..dst + dim].copy_from_slice(&d[src..src + dim]);
                            scales.owned_mut()?[row as usize] = s[i];
                        }
                        _ => unreachable!("encoded with the index's own dtype"),
                    }
                }
                None => {
                    new_keys.push(key);
                    new_rows.push(i);
                }
            }
        }
        let fresh = match encoded {
            Encoded::F32(v) => Encoded::F32(gather(&v, &new_rows, dim)),
            Encoded::F16(v) => Encoded::F16(gather(&v, &new_rows, dim)),
            Encoded::I8(d, s) => Encoded::I8(gather(&d, &new_rows, dim), gather(&s, &new_rows, 1)),
        };
        self.push_rows(&new_keys, fresh)
    }

    /// Removes the keys that are present; returns how many were.
    pub fn remove(&mut self, keys: &[u64]) -> Result<usize> {
        self.check_writable()?;
        let mut removed = 0;
        for key in keys {
            if let Some(row) = self.key_rows_mut().remove(key) {
                self.swap_remove_row(row as usize)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    fn swap_remove_row(&mut self, row: usize) -> Result<()> {
        let dim = self.dim;
        let last = self.keys.as_slice().len() - 1;
        fn swap_remove_chunk<T: Pod>(v: &mut Vec<T>, row: usize, last: usize, width: usize) {
            if row != last {
                v.copy_within(last * width..(last + 1) * width, row * width);
            }
            v.truncate(last * width);
        }
        match &mut self.store {
            Store::F32(b) => swap_remove_chunk(b.owned_mut()?, row, last, dim),
            Store::F16(b) => swap_remove_chunk(b.owned_mut()?, row, last, dim),
            Store::I8 { data, scales } => {
                swap_remove_chunk(data.owned_mut()?, row, last, dim);
                swap_remove_chunk(scales.owned_mut()?, row, last, 1);
            }
        }
        let keys = self.keys.owned_mut()?;
        swap_remove_chunk(keys, row, last, 1);
        if row != last {
            let moved = keys[row];
            self.key_rows_mut().insert(moved, row as u32);
        }
        Ok(())
    }

    /// The stored vectors of `keys` as f32 (dequantized for f16 / i8; unit length under cos).
    pub fn get(&self, keys: &[u64]) -> Result<Vec<f32>> {
        let dim = self.dim;
        let mut rows = Vec::with_capacity(keys.len());
        for &key in keys {
            rows.push(*self.key_rows()?.get(&key).ok_or(Error::MissingKey(key))? as usize);
        }
        let mut out = vec![0.0f32; keys.len() * dim];
        let stored = self.store.rows();
        let mut buf = Vec::new();
        for (dst, &row) in out.chunks_exact_mut(dim).zip(&rows) {
            dst.copy_from_slice(stored.range(row, row + 1, dim).to_f32(dim, &mut buf));
        }
        Ok(out)
    }

    /// Exact top-k of each query (row-major `queries`, `dim` values each). Returns keys and
    /// scores, `nq * k'` each, with `k' = min(k, len - excluded keys present)` (also returned).
    pub fn search(
        &self,
        queries: &[f32],
        k: usize,
        exclude: Option<&[u64]>,
    ) -> Result<(Vec<u64>, Vec<f32>, usize)> {
        let dim = self.dim;
        if !queries.len().is_multiple_of(dim) {
            return invalid(format!(
                "queries must have shape (dim,) or (q, dim) with dim = {dim}; got {} values",
                queries.len()
            ));
        }
        if k < 1 {
            return invalid(format!("k must be at least 1, got {k}"));
        }
        check_rows(queries, dim, self.metric, "queries")?;
        let nq = queries.len() / dim;
        let n = self.len();
        let mut excluded_rows: Vec<u64> = Vec::new();
        let mut excluded = 0usize;
        if let Some(exclude) = exclude {
            for key in exclude {
                if let Some(&row) = self.key_rows()?.get(key) {
                    if excluded_rows.is_empty() {
                        excluded_rows = vec![0u64; n.div_ceil(64)];
                    }
                    let (word, bit) = (row as usize / 64, row as usize % 64);
                    if excluded_rows[word] & (1 << bit) == 0 {
                        excluded_rows[word] |= 1 << bit;
                        excluded += 1;
                    }
                }
            }
        }
        let kp = k.min(n - excluded);
        let mut ids = vec![0u64; nq * kp];
        let mut scores = vec![0f32; nq * kp];
        if kp == 0 {
            return Ok((ids, scores, 0));
        }
        let plan = Plan {
            dim,
            metric: self.metric,
            normalize_queries: self.metric == Metric::Cos,
            normalize_rows: false,
        };
        let keys = self.keys.as_slice();
        let row_id = |row: usize| keys[row];
        let rows = self.store.rows();
        let queries = Queries::F32(queries);
        if excluded == 0 {
            search::search_into(
                plan,
                rows,
                queries,
                kp,
                &|_, _| true,
                &row_id,
                &mut ids,
                &mut scores,
            );
        } else {
            let bits = &excluded_rows;
            let eligible = |_: usize, row: usize| bits[row / 64] & (1 << (row % 64)) == 0;
            search::search_into(
                plan,
                rows,
                queries,
                kp,
                &eligible,
                &row_id,
                &mut ids,
                &mut scores,
            );
        }
        Ok((ids, scores, kp))
    }
}

fn gather<T: Copy>(v: &[T], rows: &[usize], width: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(rows.len() * width);
    for &r in rows {
        out.extend_from_slice(&v[r * width..(r + 1) * width]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows that exercise the encoders' edge cases: random, tiny (denormal maximum, where
    /// 127 / max overflows), huge, ties, signed zeros, a single non-zero.
    fn edge_rows(dim: usize) -> Vec<f32> {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut rnd = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut rows = Vec::new();
        for r in 0..40 {
            for i in 0..dim {
                let v = rnd();
                rows.push(match r {
                    0 => f32::from_bits(1) * (i % 3 + 1) as f32,
                    1 => v * 1e-40,
                    2 => v * 3e38,
                    3 => (i as f32 - dim as f32 / 2.0) * 0.5,
                    4 => {
                        if i == 7 % dim {
                            -2.5
                        } else {
                            -0.0
                        }
                    }
                    5 => v * 60000.0,
                    _ => v * (r as f32),
                });
            }
        }
        rows
    }

    /// The encoding as it was done before it was fused with validation: normalize a copy
    /// under cos, then convert / quantize with the kernels' routine.
    fn reference(rows: &[f32], dim: usize, metric: Metric, dtype: DType) -> (Vec<u32>, Vec<f32>) {
        let mut bits = Vec::new();
        let mut scales = Vec::new();
        for row in rows.chunks_exact(dim) {
            let row: Vec<f32> = if metric == Metric::Cos {
                let inv = 1.0 / kernels::sqnorm_f32(row).sqrt();
                row.iter().map(|v| v * inv).collect()
            } else {
                row.to_vec()
            };
            match dtype {
                DType::F32 => bits.extend(row.iter().map(|v| v.to_bits())),
                DType::F16 => bits.extend(row.iter().map(|&v| f16::from_f32(v).to_bits() as u32)),
                DType::I8 => {
                    let mut q = vec![0i8; dim];
                    scales.push(kernels::quantize_row_i8(&row, &mut q));
                    bits.extend(q.iter().map(|&v| v as u8 as u32));
                }
            }
        }
        (bits, scales)
    }

    #[test]
    fn fused_encoding_matches_the_reference_bit_for_bit() {
        for dim in [1usize, 7, 16, 37, 512] {
            let rows = edge_rows(dim);
            let n = rows.len() / dim;
            let keys: Vec<u64> = (0..n as u64).collect();
            for metric in [Metric::Cos, Metric::Ip, Metric::L2] {
                for dtype in [DType::F32, DType::F16, DType::I8] {
                    let mut index = Index::new(dim, metric, dtype).unwrap();
                    // f16 under ip / l2 rejects the huge row: leave it out there.
                    let usable: Vec<f32> = rows
                        .chunks_exact(dim)
                        .filter(|r| {
                            dtype != DType::F16
                                || metric == Metric::Cos
                                || r.iter().all(|v| v.abs() <= F16_MAX)
                        })
                        .flatten()
                        .copied()
                        .collect();
                    let m = usable.len() / dim;
                    index.add(&keys[..m], &usable).unwrap();
                    let (want, want_scales) = reference(&usable, dim, metric, dtype);
                    let (got, got_scales): (Vec<u32>, Vec<f32>) = match &index.store {
                        Store::F32(b) => {
                            (b.as_slice().iter().map(|v| v.to_bits()).collect(), vec![])
                        }
                        Store::F16(b) => (
                            b.as_slice().iter().map(|v| v.to_bits() as u32).collect(),
                            vec![],
                        ),
                        Store::I8 { data, scales } => (
                            data.as_slice().iter().map(|&v| v as u8 as u32).collect(),
                            scales.as_slice().to_vec(),
                        ),
                    };
                    assert_eq!(got, want, "{dim} {metric:?} {dtype:?}");
                    let bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got_scales),
                        bits(&want_scales),
                        "{dim} {metric:?} {dtype:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn rounding_matches_the_kernels_for_every_input_kind() {
        let mut values: Vec<f32> = (-600..=600).map(|i| i as f32 * 0.25).collect();
        values.extend([
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            0.0,
        ]);
        values.extend([126.5, -126.5, 127.49, 1e30, -1e30, f32::from_bits(1)]);
        for &v in &values {
            let want = ((v.clamp(-127.0, 127.0) + 12_582_912.0) - 12_582_912.0) as i32 as i8;
            assert_eq!(round_clamp_i8(v), want, "{v}");
        }
    }

    #[test]
    fn a_failing_batch_reports_the_first_bad_row_and_changes_nothing() {
        let dim = 8;
        for dtype in [DType::F32, DType::F16, DType::I8] {
            for metric in [Metric::Cos, Metric::Ip] {
                let mut index = Index::new(dim, metric, dtype).unwrap();
                index.add(&[1 << 40], &[1.0; 8]).unwrap();
                let before = index.get(&[1 << 40]).unwrap();
                let n = 3000;
                let mut rows = vec![0.5f32; n * dim];
                rows[1500 * dim + 3] = 1e6; // beyond f16 range (f16 ip only)
                rows[2900 * dim] = f32::NAN;
                rows[2000 * dim..2001 * dim].fill(0.0); // zero (cos only)
                let keys: Vec<u64> = (0..n as u64).collect();
                let err = index.add(&keys, &rows).unwrap_err().to_string();
                let want = if metric == Metric::Cos {
                    "vectors[2000] is a zero"
                } else {
                    "vectors[2900] contains NaN"
                };
                assert!(err.contains(want), "{err}");
                rows[2900 * dim] = 0.5;
                rows[2000 * dim] = 0.5;
                match index.add(&keys, &rows) {
                    Err(e) => {
                        assert!(dtype == DType::F16 && metric == Metric::Ip);
                        assert!(
                            e.to_string().contains("vectors[1500] has a value beyond"),
                            "{e}"
                        );
                    }
                    Ok(()) => assert_eq!(index.len(), n + 1),
                }
                if index.len() == 1 {
                    let stored = match &index.store {
                        Store::F32(b) => b.as_slice().len(),
                        Store::F16(b) => b.as_slice().len(),
                        Store::I8 { data, scales } => {
                            assert_eq!(scales.as_slice().len(), 1);
                            data.as_slice().len()
                        }
                    };
                    assert_eq!(stored, dim);
                    assert_eq!(index.get(&[1 << 40]).unwrap(), before);
                }
            }
        }
    }
}
