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

/// Where `encode_into` writes.
enum EncodeTarget<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    I8(&'a mut [i8], &'a mut [f32]),
}

/// Grows `v` by `extra` zeroed elements (zeroed in parallel, so the page faults of a large
/// batch are spread over the threads too) and returns the new tail.
fn grow<T: Pod + Send>(v: &mut Vec<T>, extra: usize) -> &mut [T] {
    let old = v.len();
    v.reserve(extra);
    advise_huge_pages(&mut v.spare_capacity_mut()[..extra]);
    v.spare_capacity_mut()[..extra]
        .par_chunks_mut(1 << 16)
        .for_each(|c| c.fill(std::mem::MaybeUninit::new(T::zeroed())));
    // SAFETY: `reserve` made room for `extra` more elements and the loop above initialized
    // every one of them (spare_capacity_mut()[..extra] covers exactly old..old + extra).
    unsafe { v.set_len(old + extra) };
    &mut v[old..]
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

/// Checks every row of `vectors` (`dim` values each) is finite, and non-zero under cosine.
pub(crate) fn check_rows(vectors: &[f32], dim: usize, metric: Metric, what: &str) -> Result<()> {
    let bad = vectors
        .par_chunks(dim * ENCODE_CHUNK)
        .enumerate()
        .find_map_first(|(chunk, block)| {
            block.chunks_exact(dim).enumerate().find_map(|(i, row)| {
                let r = chunk * ENCODE_CHUNK + i;
                if row.iter().any(|v| !v.is_finite()) {
                    Some(format!(
                        "{what}[{r}] contains NaN or inf; expected finite values"
                    ))
                } else if metric == Metric::Cos && row.iter().all(|&v| v == 0.0) {
                    Some(format!(
                    "{what}[{r}] is a zero vector, which has no direction under metric \"cos\"; \
                     expected a non-zero vector"
                ))
                } else {
                    None
                }
            })
        });
    match bad {
        Some(msg) => invalid(msg),
        None => Ok(()),
    }
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

    /// Validates `vectors` (n x dim): finite, non-zero under cos, within range of f16 storage.
    fn validate(&self, vectors: &[f32]) -> Result<()> {
        check_rows(vectors, self.dim, self.metric, "vectors")?;
        // Under cos the stored values are unit-normalized, so only ip / l2 can overflow f16.
        if self.dtype == DType::F16 && self.metric != Metric::Cos {
            let dim = self.dim;
            let bad = vectors
                .par_chunks(dim * ENCODE_CHUNK)
                .enumerate()
                .find_map_first(|(chunk, block)| {
                    block
                        .chunks_exact(dim)
                        .position(|row| row.iter().any(|v| v.abs() > F16_MAX))
                        .map(|i| chunk * ENCODE_CHUNK + i)
                });
            if let Some(r) = bad {
                return invalid(format!(
                    "vectors[{r}] has a value beyond the float16 range (|x| <= {F16_MAX}); \
                     expected values that fit dtype \"f16\""
                ));
            }
        }
        Ok(())
    }

    /// Converts validated vectors to the stored form, writing `dst` (and `dst_scales` for i8)
    /// in parallel. `dst` holds exactly `vectors.len()` elements.
    fn encode_into(&self, vectors: &[f32], dst: EncodeTarget<'_>) {
        let dim = self.dim;
        let normalize = self.metric == Metric::Cos;
        let chunk = dim * ENCODE_CHUNK;
        // Writes the row to encode (normalized under cos) into `scratch`, or borrows it.
        let prepared = move |row: &[f32], scratch: &mut Vec<f32>| {
            if normalize {
                let inv = 1.0 / kernels::sqnorm_f32(row).sqrt();
                scratch.clear();
                scratch.extend(row.iter().map(|v| v * inv));
            }
        };
        match dst {
            EncodeTarget::F32(out) => {
                out.par_chunks_mut(chunk)
                    .zip(vectors.par_chunks(chunk))
                    .for_each(|(d, s)| {
                        d.copy_from_slice(s);
                        if normalize {
                            for row in d.chunks_exact_mut(dim) {
                                let inv = 1.0 / kernels::sqnorm_f32(row).sqrt();
                                row.iter_mut().for_each(|v| *v *= inv);
                            }
                        }
                    });
            }
            EncodeTarget::F16(out) => {
                out.par_chunks_mut(chunk)
                    .zip(vectors.par_chunks(chunk))
                    .for_each(|(d, s)| {
                        if !normalize {
                            d.convert_from_f32_slice(s);
                            return;
                        }
                        let mut scratch = Vec::with_capacity(dim);
                        for (dr, sr) in d.chunks_exact_mut(dim).zip(s.chunks_exact(dim)) {
                            prepared(sr, &mut scratch);
                            dr.convert_from_f32_slice(&scratch);
                        }
                    });
            }
            EncodeTarget::I8(out, scales) => {
                out.par_chunks_mut(chunk)
                    .zip(scales.par_chunks_mut(ENCODE_CHUNK))
                    .zip(vectors.par_chunks(chunk))
                    .for_each(|((d, sc), s)| {
                        let mut scratch = Vec::with_capacity(dim);
                        for ((dr, sr), scale) in
                            d.chunks_exact_mut(dim).zip(s.chunks_exact(dim)).zip(sc)
                        {
                            let row = if normalize {
                                prepared(sr, &mut scratch);
                                &scratch[..]
                            } else {
                                sr
                            };
                            *scale = kernels::quantize_row_i8(row, dr);
                        }
                    });
            }
        }
    }

    /// Validates and converts `vectors` into new buffers (for upsert).
    fn encode(&self, vectors: &[f32]) -> Result<Encoded> {
        self.validate(vectors)?;
        let n = vectors.len() / self.dim;
        Ok(match self.dtype {
            DType::F32 => {
                let mut out = vec![0f32; vectors.len()];
                self.encode_into(vectors, EncodeTarget::F32(&mut out));
                Encoded::F32(out)
            }
            DType::F16 => {
                let mut out = vec![f16::ZERO; vectors.len()];
                self.encode_into(vectors, EncodeTarget::F16(&mut out));
                Encoded::F16(out)
            }
            DType::I8 => {
                let mut out = vec![0i8; vectors.len()];
                let mut scales = vec![0f32; n];
                self.encode_into(vectors, EncodeTarget::I8(&mut out, &mut scales));
                Encoded::I8(out, scales)
            }
        })
    }

    /// Validates and converts `vectors`, appending them straight to storage (for add).
    fn append_encoded(&mut self, vectors: &[f32]) -> Result<()> {
        self.validate(vectors)?;
        let n = vectors.len() / self.dim;
        let mut store = std::mem::replace(&mut self.store, Store::empty(self.dtype));
        let result = (|| {
            match &mut store {
                Store::F32(b) => self.encode_into(
                    vectors,
                    EncodeTarget::F32(grow(b.owned_mut()?, vectors.len())),
                ),
                Store::F16(b) => self.encode_into(
                    vectors,
                    EncodeTarget::F16(grow(b.owned_mut()?, vectors.len())),
                ),
                Store::I8 { data, scales } => {
                    let d = grow(data.owned_mut()?, vectors.len());
                    let s = grow(scales.owned_mut()?, n);
                    self.encode_into(vectors, EncodeTarget::I8(d, s))
                }
            }
            Ok(())
        })();
        self.store = store;
        result
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
