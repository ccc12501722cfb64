//! The exact index: uint64 keys -> vectors stored densely as f32, f16 or i8.
//!
//! Removal keeps storage dense (swap-remove plus a key -> row map). Under "cos" vectors are
//! stored unit-normalized, so a search is a plain inner product. Every mutating call validates
//! its whole batch before changing anything.
//!
//! Layout: this file is the API (`Index`); `storage` holds where the data lives (owned or
//! mapped buffers, the mapped file and its change check); `encoding` validates input rows and
//! converts them to the stored type. Reading and writing files is `crate::format`.

mod encoding;
mod storage;

pub(crate) use crate::file_io::MappedFile;
pub(crate) use encoding::{check_rows, check_stored_rows, encode_append, Buffers};
pub(crate) use storage::{swap_remove_rows, Buf, Store};

use crate::error::{invalid, Error, Result};
use crate::search::{Plan, Queries, Search};
use crate::types::{DType, Metric};
use rustc_hash::{FxHashMap, FxHashSet};
use std::sync::OnceLock;
use storage::Encoded;

/// Largest supported dimension (keeps offsets and per-row work sane).
pub const MAX_DIM: usize = 1 << 16;
/// Rows are addressed with u32.
pub const MAX_ROWS: usize = u32::MAX as usize;

pub struct Index {
    pub(crate) dim: usize,
    pub(crate) metric: Metric,
    pub(crate) dtype: DType,
    pub(crate) keys: Buf<u64>,
    pub(crate) store: Store,
    /// key -> row. Always built for an index in memory; an index opened with mmap and
    /// verify=False builds it on first use (see `key_rows`).
    pub(crate) rows: OnceLock<FxHashMap<u64, u32>>,
    /// Set for an index opened with mmap: the mapped file (checked before every read of the
    /// vectors) and the vectors' checksum.
    pub(crate) mapped: Option<MappedFile>,
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

/// `search`'s arguments: `queries` holds whole rows of `dim` values and k >= 1. Returns the
/// number of queries.
pub(crate) fn check_search_args(queries: &[f32], dim: usize, k: usize) -> Result<usize> {
    if !queries.len().is_multiple_of(dim) {
        return invalid(format!(
            "queries must have shape (dim,) or (q, dim) with dim = {dim}; got {} values",
            queries.len()
        ));
    }
    if k < 1 {
        return invalid(format!("k must be at least 1, got {k}"));
    }
    Ok(queries.len() / dim)
}

/// `add` / `upsert`'s batch: one row of `dim` values per key, no key twice.
pub(crate) fn check_batch_keys(keys: &[u64], vectors: &[f32], dim: usize) -> Result<()> {
    if vectors.len() != keys.len() * dim {
        return invalid(format!(
            "vectors must have shape (n, {dim}) with n = len(keys) = {n}; got {m} values",
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
            mapped: None,
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
        let map = crate::key_map::key_map(self.keys.as_slice())
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
        self.mapped.is_some()
    }

    /// For an index opened with mmap: `Error::File` if its file changed since it was opened
    /// (one fstat). Called before every read of the mapped vectors, so a truncated or
    /// rewritten file is an error instead of a SIGBUS or garbage (see docs/reliability.md,
    /// "Engine", for the race that remains).
    pub(crate) fn check_file(&self) -> Result<()> {
        match &self.mapped {
            Some(m) => m.check_unchanged(),
            None => Ok(()),
        }
    }

    fn check_writable(&self) -> Result<()> {
        if self.is_read_only() {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn check_batch(&self, keys: &[u64], vectors: &[f32]) -> Result<()> {
        check_batch_keys(keys, vectors, self.dim)
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
        match &mut self.store {
            Store::F32(b) => swap_remove_rows(b.owned_mut()?, row, last, dim),
            Store::F16(b) => swap_remove_rows(b.owned_mut()?, row, last, dim),
            Store::I8 { data, scales } => {
                swap_remove_rows(data.owned_mut()?, row, last, dim);
                swap_remove_rows(scales.owned_mut()?, row, last, 1);
            }
        }
        let keys = self.keys.owned_mut()?;
        swap_remove_rows(keys, row, last, 1);
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
        self.check_file()?;
        let mut out = vec![0.0f32; keys.len() * dim];
        let stored = self.store.rows();
        let mut buf = Vec::new();
        for (dst, &row) in out.chunks_exact_mut(dim).zip(&rows) {
            dst.copy_from_slice(stored.range(row, row + 1, dim).to_f32(dim, &mut buf));
        }
        Ok(out)
    }

    /// A new in-memory index with the same keys (in storage order), dim and metric, its
    /// vectors converted to `dtype` from the stored values (f16 or i8 to f32 does not bring
    /// back precision; under "cos" the stored unit vectors are normalized again). Works on a
    /// read-only (mmap) index too; the result is writable. A stored vector that does not fit
    /// `dtype` (a value beyond the float16 range under "ip" / "l2") is `Error::Invalid`
    /// naming its key.
    pub fn astype(&self, dtype: DType) -> Result<Index> {
        const CHUNK: usize = 16 * 1024;
        self.key_rows()?; // an unverified mmap index: refuse repeated keys first
        let mut out = Index::new(self.dim, self.metric, dtype)?;
        let keys = self.keys.as_slice();
        let rows = self.store.rows();
        let mut buf = Vec::new();
        for start in (0..keys.len()).step_by(CHUNK) {
            self.check_file()?;
            let end = (start + CHUNK).min(keys.len());
            let vectors = rows.range(start, end, self.dim).to_f32(self.dim, &mut buf);
            out.add(&keys[start..end], vectors).map_err(|e| match e {
                Error::InvalidVector { row, fault, .. } => Error::Invalid(format!(
                    "cannot convert to dtype \"{}\": the vector of key {} {fault}",
                    dtype.name(),
                    keys[start + row]
                )),
                other => other,
            })?;
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
        let nq = check_search_args(queries, dim, k)?;
        check_rows(queries, dim, self.metric, "queries")?;
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
        self.check_file()?;
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
        let bits = &excluded_rows;
        let eligible = |row: usize| excluded == 0 || bits[row / 64] & (1 << (row % 64)) == 0;
        // Without exclusions the filter is a constant the compiler drops from the scan.
        if excluded == 0 {
            let search = Search {
                plan,
                rows,
                queries,
                k: kp,
                eligible: &|_: usize, _: usize| true,
                row_id: &row_id,
            };
            search.run(&mut ids, &mut scores);
        } else {
            let search = Search {
                plan,
                rows,
                queries,
                k: kp,
                eligible: &|_: usize, row: usize| eligible(row),
                row_id: &row_id,
            };
            search.run(&mut ids, &mut scores);
        }
        // A file changed during the search may have given other bytes than were checked.
        self.check_file()?;
        self.fill_unscored(&mut ids, &mut scores, kp, eligible);
        Ok((ids, scores, kp))
    }

    /// The search leaves a slot empty (id `u64::MAX`, the metric's missing score) only where
    /// rows scored NaN, which takes stored vectors holding NaN, inf or huge values: only a
    /// crafted file can hold them (`add` and `upsert` refuse them). So that every key returned
    /// was added, such slots are filled with those rows' keys, ascending, with score NaN.
    fn fill_unscored(
        &self,
        ids: &mut [u64],
        scores: &mut [f32],
        kp: usize,
        eligible: impl Fn(usize) -> bool,
    ) {
        let missing = self.metric.missing_score().to_bits();
        let keys = self.keys.as_slice();
        for (id_row, score_row) in ids.chunks_exact_mut(kp).zip(scores.chunks_exact_mut(kp)) {
            let mut filled = kp;
            while filled > 0
                && id_row[filled - 1] == u64::MAX
                && score_row[filled - 1].to_bits() == missing
            {
                filled -= 1;
            }
            if filled == kp {
                continue;
            }
            let taken: FxHashSet<u64> = id_row[..filled].iter().copied().collect();
            let mut rest: Vec<u64> = (0..keys.len())
                .filter(|&row| eligible(row) && !taken.contains(&keys[row]))
                .map(|row| keys[row])
                .collect();
            rest.sort_unstable();
            for (j, key) in (filled..kp).zip(rest) {
                id_row[j] = key;
                score_row[j] = f32::NAN;
            }
        }
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
    use super::encoding::F16_MAX;
    use super::*;
    use crate::error::{MAX_SQNORM, MIN_COS_SQNORM};
    use crate::kernels;
    use half::f16;

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
                    // Leave out the rows the index refuses: a squared norm beyond MAX_SQNORM
                    // (the huge row), below MIN_COS_SQNORM under cos (the tiny rows), values
                    // beyond the f16 range for f16 under ip / l2.
                    let usable: Vec<f32> = rows
                        .chunks_exact(dim)
                        .filter(|r| {
                            let sq: f64 = r.iter().map(|&v| v as f64 * v as f64).sum();
                            sq <= MAX_SQNORM
                                && (metric != Metric::Cos || sq >= MIN_COS_SQNORM)
                                && (dtype != DType::F16
                                    || metric == Metric::Cos
                                    || r.iter().all(|v| v.abs() <= F16_MAX))
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

#[cfg(test)]
mod fault_tests {
    use super::*;
    use crate::search::Rows;

    /// A read of a mapped page past the end of a file truncated after it was mapped, as a
    /// search in progress would do, made in a process of its own: without the SIGBUS guard
    /// the process dies.
    #[test]
    fn a_read_past_a_truncation_reads_zeros_and_the_call_fails_cleanly() {
        if std::env::var_os("LEANCLIP_FAULT_CHILD").is_some() {
            return child();
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "index::fault_tests::a_read_past_a_truncation_reads_zeros_and_the_call_fails_cleanly",
                "--exact",
                "--nocapture",
            ])
            .env("LEANCLIP_FAULT_CHILD", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("read zeros past the truncation"));
    }

    fn child() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.lci");
        let dim = 256;
        let n = 4096; // 4 MiB of vectors, many pages
        let mut index = Index::new(dim, Metric::Ip, DType::F32).unwrap();
        let keys: Vec<u64> = (0..n as u64).collect();
        index.add(&keys, &vec![1.0f32; n * dim]).unwrap();
        index.save(&path).unwrap();
        let mapped = Index::load(&path, true, false).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        // Bypass check_file, as a search already past it would.
        let Rows::F32(v) = mapped.store.rows() else {
            unreachable!()
        };
        let tail = v[v.len() - 1];
        assert_eq!(tail, 0.0);
        println!("read zeros past the truncation");
        assert!(matches!(mapped.check_file(), Err(Error::File { .. })));
        assert!(mapped
            .mapped
            .as_ref()
            .unwrap()
            .guard
            .as_ref()
            .unwrap()
            .poisoned());
    }
}
