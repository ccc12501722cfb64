//! The inverted-file (IVF) index: approximate search over u64 keys.
//!
//! Vectors are split into `nlist` lists by a k-means coarse quantizer; a search scores the
//! query against the centroids and scans only the `nprobe` nearest lists. Each list stores its
//! rows contiguously as f32, f16 or i8 (as [`crate::Index`] does).
//!
//! Search (the driver, `search.rs`; the scanner, `scan.rs`): fewer than 8 queries scan their
//! lists with the single-query SIMD kernels on the calling thread. A batch groups its queries by list and scans each probed
//! list once for all the queries probing it, as one matrix product: i8 lists with VNNI, f16
//! lists with AVX512-BF16 (each list's rows packed once and cached until the list changes),
//! f32 lists in f32; that is where an IVF outruns a graph index. The product's scores rank the
//! candidates; each query then re-scores its best `k + margin` once.
//!
//! Score contract: a search reports, for every key it returns, the score the single-query
//! kernels give (the scores of [`crate::Index`] searched one query at a time), except f32
//! batches, which report the f32 product's (within ~1e-6 relative). So a key's score is the
//! same bits alone or in a batch, and results are ranked by those scores, ties by key. A
//! batch's low-precision ranking only chooses which `k + margin` candidates are re-scored
//! (margin as `Index` batches keep: max(k, 32) for i8, max(k, 16) for f16).
//!
//! - Until it is trained the index holds one list and every search is exact. It trains itself
//!   once it holds `train_threshold` vectors (default 64 x nlist), or on [`IvfIndex::train`];
//!   [`IvfIndex::retrain`] recomputes the centroids from the current contents and
//!   redistributes every vector (for lists grown skewed).
//! - Under "cos" and "ip" the centroids are unit length and lists are chosen by inner product
//!   (spherical k-means, as faiss does for inner-product IVF); under "l2" by L2 distance.
//! - Removal swaps the list's last row into the hole: O(1), no tombstones.
//! - With `rerank > 0` (f16 / i8 storage) float32 copies are kept next to the lists; a search
//!   takes the best `max(k, rerank)` candidates by the scan's scores and re-scores them from
//!   the copies: 4 more bytes per dimension per vector for the recall quantization loses.
//! - With `pq > 0` each vector also has a 4-bit product-quantization code (`pq.rs`): single
//!   queries scan the codes and re-score their best `shortlist` candidates from the rows
//!   (`search.rs`, `scan_codes`); batches scan the rows as above.
//! - With `single_scan` "product" (`auto.rs`, set by `tune` where it reads fewer bytes)
//!   single queries scan as batches do: each probed list's packed i8 copy (and `scan_dims`),
//!   one query against it, then the best `k + margin` re-scored from the rows.
//! - With `scan_dims > 0` (f16 / i8, cos / ip) a batch's product ranks by the rows and queries
//!   projected onto their top principal directions (`project.rs`) before the re-score.
//! - With nprobe >= nlist a search is exact (the same results as [`crate::Index`]); with codes,
//!   also `shortlist >= len`; batches with `scan_dims`, only where the data has that rank.
//!
//! Files, faiss's split of storage, scanner and driver: `list.rs` (the inverted lists),
//! `params.rs` (the parameters and their rules), `search.rs` (the search driver and its plan),
//! `scan.rs` (one list scanned for its queries), `kmeans.rs` (the coarse quantizer), `pq.rs`
//! (4-bit codes), `project.rs` (principal directions), `file.rs` (the file format); here the
//! index itself: adding, removing, training.

mod auto;
mod file;
pub(crate) mod kmeans;
mod list;
mod params;
mod pq;
mod probe;
mod project;
mod scan;
mod search;
mod tune;

pub use auto::{AutoKnobs, IvfConfig, Preference, SingleScan, AUTO_TRAIN_THRESHOLD};
pub use file::{IVF_FORMAT_VERSION, IVF_MAGIC};
pub use params::IvfParams;
pub use pq::MAX_PQ;
pub use project::MAX_SCAN_DIMS_DIM;
pub use tune::TuneReport;

pub(crate) use list::{Data, List, Seg};
use list::{EncData, Encoded};

use crate::error::{invalid, Error, Result};
use crate::index::{check_batch_keys, check_rows, check_stored_rows};
use crate::kernels;
use crate::search::{Rows, GEMM_MIN_QUERIES};
use crate::types::{DType, Metric};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use std::borrow::Cow;

/// Largest supported dimension (as for `Index`).
pub const MAX_DIM: usize = 1 << 16;
/// Vectors are addressed by (list, slot) with u32 parts; the whole index holds at most this.
pub const MAX_VECTORS: usize = u32::MAX as usize;
/// Most lists an index may have.
pub const MAX_LISTS: usize = 1 << 20;
/// Lloyd iterations of the k-means training.
pub const KMEANS_ITERS: usize = 10;
/// k-means trains on at most this many vectors per list (a seeded sample of the data).
pub const SAMPLE_PER_LIST: usize = 64;
/// Default `train_threshold` per list: the index trains itself at 64 x nlist vectors.
pub const DEFAULT_TRAIN_PER_LIST: usize = 64;
/// Rows converted at a time when redistributing lists.
const MOVE_CHUNK: usize = 16 * 1024;
/// Rows encoded at a time by `add` / `upsert`.
const INSERT_CHUNK: usize = 4096;
/// Default `shortlist`: candidates of the code scan re-scored from the stored rows.
pub const DEFAULT_SHORTLIST: usize = 100;

/// The IVF index. See the module documentation.
pub struct IvfIndex {
    pub(crate) dim: usize,
    pub(crate) metric: Metric,
    pub(crate) dtype: DType,
    pub(crate) params: IvfParams,
    /// `nlist x dim` once trained (unit length under cos / ip); empty before.
    pub(crate) centroids: Vec<f32>,
    /// Under cos / ip, the centroids quantized to i8 (one scale each) that searches score to
    /// choose lists: a quarter of the bytes a single query reads every time (1.5 MB in float32
    /// at 1,024 x 384; reading them was half of a one-probe query), and for batches the VNNI
    /// product's operand (float32 without VNNI). Adds and training use the float32 centroids.
    /// Single queries round the query to i16, batches to i8: a list at the nprobe boundary can
    /// differ between a query alone and in a batch, as any two roundings can.
    pub(crate) probe_centroids: Option<(Vec<i8>, Vec<f32>)>,
    /// One list before training, `nlist` after.
    pub(crate) lists: Vec<List>,
    /// key -> (list, slot).
    pub(crate) map: FxHashMap<u64, (u32, u32)>,
    /// The product-quantization codebooks, once trained with `params.pq > 0`.
    pub(crate) codebooks: Option<pq::Pq>,
    /// With `scan_dims > 0`: the principal directions batches rank by (`dim x dim`, see
    /// `project.rs`): trained with the centroids (saved), or else computed by the first batch
    /// from a sample of the contents; kept until the index is trained again.
    pub(crate) directions: project::Directions,
    /// Set when opened with mmap: the mapped file, checked around every read of the map.
    pub(crate) mapped: Option<crate::file_io::MappedFile>,
    /// The knobs chosen at training, and why (auto.rs); the single queries' nprobe and the
    /// target recall and k of the last `tune` (tune.rs).
    pub(crate) auto: auto::AutoState,
}

impl std::fmt::Debug for IvfIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IvfIndex")
            .field("dim", &self.dim)
            .field("metric", &self.metric.name())
            .field("dtype", &self.dtype.name())
            .field("params", &self.params)
            .field("trained", &self.is_trained())
            .field("len", &self.len())
            .finish()
    }
}

impl IvfIndex {
    pub fn new(dim: usize, metric: Metric, dtype: DType, params: IvfParams) -> Result<Self> {
        if dim == 0 || dim > MAX_DIM {
            return invalid(format!("dim must be between 1 and {MAX_DIM}, got {dim}"));
        }
        params.check(dim, dtype, metric)?;
        Ok(IvfIndex {
            dim,
            metric,
            dtype,
            params,
            centroids: Vec::new(),
            lists: vec![List::empty(dtype, params.rerank > 0)],
            map: FxHashMap::default(),
            codebooks: None,
            probe_centroids: None,
            directions: Default::default(),
            mapped: None,
            auto: Default::default(),
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
    pub fn params(&self) -> IvfParams {
        self.params
    }
    pub fn len(&self) -> usize {
        self.map.len()
    }
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
    pub fn is_trained(&self) -> bool {
        !self.centroids.is_empty()
    }
    pub fn is_read_only(&self) -> bool {
        self.mapped.is_some()
    }
    pub fn contains(&self, key: u64) -> bool {
        self.map.contains_key(&key)
    }
    /// Whether float32 copies are kept for re-ranking.
    pub fn keeps_exact(&self) -> bool {
        self.lists[0].exact.is_some()
    }
    /// Vectors per list (one list before training).
    pub fn list_sizes(&self) -> Vec<usize> {
        self.lists.iter().map(List::len).collect()
    }
    /// The centroids (`nlist x dim`, empty before training).
    pub fn centroids(&self) -> &[f32] {
        &self.centroids
    }

    /// Sets the centroids and their quantized copy for probing.
    pub(crate) fn set_centroids(&mut self, centroids: Vec<f32>) {
        let dim = self.dim;
        self.probe_centroids =
            (self.coarse_metric() == Metric::Ip && !centroids.is_empty()).then(|| {
                let mut data = vec![0i8; centroids.len()];
                let scales = data
                    .chunks_exact_mut(dim)
                    .zip(centroids.chunks_exact(dim))
                    .map(|(o, c)| kernels::quantize_row_i8(c, o))
                    .collect();
                (data, scales)
            });
        self.centroids = centroids;
    }

    /// The rows single queries score to choose lists.
    fn probe_rows(&self) -> Rows<'_> {
        match &self.probe_centroids {
            Some((data, scales)) => Rows::I8 { data, scales },
            None => Rows::F32(&self.centroids),
        }
    }

    /// All keys, list by list in slot order.
    pub fn keys(&self) -> Result<Vec<u64>> {
        self.check_file()?;
        let mut out = Vec::with_capacity(self.len());
        for l in &self.lists {
            out.extend_from_slice(l.keys.as_slice());
        }
        self.check_file()?;
        Ok(out)
    }

    /// For an index opened with mmap: `Error::File` if its file changed since it was opened, or
    /// a read of the map faulted (one fstat). Called before and after every read of the map,
    /// so a truncated or rewritten file is an error instead of a SIGBUS or other bytes.
    pub(crate) fn check_file(&self) -> Result<()> {
        match &self.mapped {
            Some(m) => m.check_unchanged(),
            None => Ok(()),
        }
    }

    pub fn set_nprobe(&mut self, nprobe: usize) -> Result<()> {
        params::check_nprobe(nprobe)?;
        self.params.nprobe = nprobe;
        self.auto.nprobe_single = 0; // single queries follow
        Ok(())
    }

    /// Changes the re-ranking depth; needs the float32 copies (an index created with
    /// rerank > 0) for any value above 0.
    pub fn set_rerank(&mut self, rerank: usize) -> Result<()> {
        if rerank > 0 && !self.keeps_exact() {
            return invalid(
                "rerank > 0 needs the float32 copies, which only an index created with \
                 rerank > 0 (dtype \"f16\" or \"i8\") keeps",
            );
        }
        params::check_rerank(self.dtype, rerank)?;
        self.params.rerank = rerank;
        Ok(())
    }

    /// Changes how many candidates of the code scan are re-scored (an index with `pq > 0`
    /// only, as in the constructor).
    pub fn set_shortlist(&mut self, shortlist: usize) -> Result<()> {
        self.params.set_shortlist(shortlist)
    }

    /// Changes how many principal directions batches rank by (0: all dimensions). The
    /// lists' packed copies are rebuilt by the next batch.
    pub fn set_scan_dims(&mut self, scan_dims: usize) -> Result<()> {
        params::check_scan_dims(self.dim, self.dtype, self.metric, scan_dims)?;
        if scan_dims != self.params.scan_dims {
            self.params.scan_dims = scan_dims;
            for list in &mut self.lists {
                list.packed = Default::default();
            }
        }
        Ok(())
    }

    /// Whether searches scan 4-bit codes (`pq > 0` and trained).
    pub fn has_codes(&self) -> bool {
        self.codebooks.is_some()
    }

    fn check_writable(&self) -> Result<()> {
        if self.is_read_only() {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// The exact index's checks (one implementation, `index::check_stored_rows`): finite
    /// values, a squared norm at most `MAX_SQNORM`, under cos at least `MIN_COS_SQNORM`, and
    /// for `storage` (rows to add or train on) values within the float16 range for f16
    /// storage under ip / l2.
    fn check_vectors(&self, vectors: &[f32], what: &'static str, storage: bool) -> Result<()> {
        if storage {
            check_stored_rows(vectors, self.dim, self.metric, self.dtype, what)
        } else {
            check_rows(vectors, self.dim, self.metric, what)
        }
    }

    fn check_batch(&self, keys: &[u64], vectors: &[f32]) -> Result<()> {
        check_batch_keys(keys, vectors, self.dim)?;
        self.check_vectors(vectors, "vectors", true)
    }

    /// Unit-normalized under cos (as stored), else borrowed as is.
    fn normalized<'a>(&self, vectors: &'a [f32]) -> Cow<'a, [f32]> {
        self.normalize(vectors, false)
    }

    /// Rows are scaled by 1 / |x| (as `Index` stores them), queries divided by |q| (as the
    /// search core does), so scores match `Index`'s bit for bit.
    fn normalize<'a>(&self, vectors: &'a [f32], queries: bool) -> Cow<'a, [f32]> {
        if self.metric != Metric::Cos {
            return Cow::Borrowed(vectors);
        }
        let mut v = vectors.to_vec();
        let one = |row: &mut [f32]| {
            let norm = kernels::sqnorm_f32(row).sqrt();
            if queries {
                row.iter_mut().for_each(|x| *x /= norm);
            } else {
                let inv = 1.0 / norm;
                row.iter_mut().for_each(|x| *x *= inv);
            }
        };
        if vectors.len() < GEMM_MIN_QUERIES * self.dim {
            v.chunks_mut(self.dim).for_each(one);
        } else {
            v.par_chunks_mut(self.dim).for_each(one);
        }
        Cow::Owned(v)
    }

    /// Encodes (already normalized) rows for storage, like `Index` does, and their codes when
    /// the index has codebooks.
    fn encode(&self, rows: &[f32]) -> Encoded {
        let dim = self.dim;
        let data = match self.dtype {
            DType::F32 => EncData::F32(rows.to_vec()),
            DType::F16 => {
                let mut out = vec![f16::ZERO; rows.len()];
                out.par_chunks_mut(dim * 256)
                    .zip(rows.par_chunks(dim * 256))
                    .for_each(|(o, r)| o.convert_from_f32_slice(r));
                EncData::F16(out)
            }
            DType::I8 => {
                let mut out = vec![0i8; rows.len()];
                let mut scales = vec![0f32; rows.len() / dim];
                out.par_chunks_mut(dim)
                    .zip(scales.par_iter_mut())
                    .zip(rows.par_chunks(dim))
                    .for_each(|((o, s), r)| *s = kernels::quantize_row_i8(r, o));
                EncData::I8(out, scales)
            }
        };
        let codes = self.codebooks.as_ref().map(|book| {
            let mut codes = vec![0u8; rows.len() / dim * book.m];
            codes
                .par_chunks_mut(book.m)
                .zip(rows.par_chunks(dim))
                .enumerate()
                .for_each_init(
                    || vec![0f32; dim],
                    |row, (i, (c, r))| {
                        // Codes encode the row as stored (what a retraining re-encodes).
                        match &data {
                            EncData::F32(_) => row.copy_from_slice(r),
                            EncData::F16(v) => v[i * dim..(i + 1) * dim].convert_to_f32_slice(row),
                            EncData::I8(v, sc) => row
                                .iter_mut()
                                .zip(&v[i * dim..(i + 1) * dim])
                                .for_each(|(o, &x)| *o = sc[i] * x as f32),
                        }
                        book.encode(row, c)
                    },
                );
            (codes, book.m)
        });
        Encoded {
            data,
            exact: self.keeps_exact().then(|| rows.to_vec()),
            codes,
        }
    }

    /// The coarse metric: inner product with unit centroids (cos, ip) or L2.
    fn coarse_metric(&self) -> Metric {
        match self.metric {
            Metric::L2 => Metric::L2,
            _ => Metric::Ip,
        }
    }

    /// The list each (normalized) row belongs to.
    fn assign(&self, rows: &[f32]) -> Vec<u32> {
        if !self.is_trained() {
            return vec![0; rows.len() / self.dim];
        }
        kmeans::assign(rows, &self.centroids, self.dim, self.coarse_metric())
    }

    fn check_capacity(&self, extra: usize) -> Result<()> {
        if self.len() + extra > MAX_VECTORS {
            return invalid(format!("an index holds at most {MAX_VECTORS} vectors"));
        }
        Ok(())
    }

    /// Appends validated, normalized rows under keys absent from the index.
    fn insert(&mut self, keys: &[u64], rows: &[f32]) -> Result<()> {
        let dim = self.dim;
        let labels = self.assign(rows);
        // Room for what comes (`grow`: at most 1/8 unused), and the batch is
        // encoded a chunk at a time: the peak is the lists plus one chunk, not twice the data.
        let mut counts = vec![0usize; self.lists.len()];
        for &l in &labels {
            counts[l as usize] += 1;
        }
        for (list, &c) in self.lists.iter_mut().zip(&counts) {
            if c > 0 {
                list.reserve(c, dim)?;
            }
        }
        self.map.reserve(keys.len());
        for (c, chunk) in rows.chunks(INSERT_CHUNK * dim).enumerate() {
            let first = c * INSERT_CHUNK;
            let enc = self.encode(chunk);
            for i in 0..chunk.len() / dim {
                let (key, l) = (keys[first + i], labels[first + i]);
                let list = &mut self.lists[l as usize];
                let slot = list.len() as u32;
                list.push(key, &enc, i, dim)?;
                self.map.insert(key, (l, slot));
            }
        }
        self.maybe_auto_train()
    }

    fn maybe_auto_train(&mut self) -> Result<()> {
        let t = self.params.train_threshold;
        if !self.is_trained() && t > 0 && self.len() >= t {
            self.retrain()?;
        }
        Ok(())
    }

    /// Adds new keys; all-or-nothing (KeyError-style `DuplicateKey` if one is present).
    pub fn add(&mut self, keys: &[u64], vectors: &[f32]) -> Result<()> {
        self.check_writable()?;
        self.check_batch(keys, vectors)?;
        if let Some(&key) = keys.iter().find(|k| self.map.contains_key(k)) {
            return Err(Error::DuplicateKey(key));
        }
        self.check_capacity(keys.len())?;
        let rows = self.normalized(vectors);
        self.insert(keys, &rows)
    }

    /// Inserts new keys and replaces the vectors of present ones (which may change list).
    pub fn upsert(&mut self, keys: &[u64], vectors: &[f32]) -> Result<()> {
        self.check_writable()?;
        self.check_batch(keys, vectors)?;
        let new = keys.iter().filter(|k| !self.map.contains_key(k)).count();
        self.check_capacity(new)?;
        let rows = self.normalized(vectors);
        self.remove(keys)?;
        self.insert(keys, &rows)
    }

    /// Removes present keys (absent ones are ignored); returns how many were removed. O(1)
    /// per key: the list's last row moves into the hole.
    pub fn remove(&mut self, keys: &[u64]) -> Result<usize> {
        self.check_writable()?;
        let mut removed = 0;
        for key in keys {
            if let Some((l, slot)) = self.map.remove(key) {
                if let Some(moved) = self.lists[l as usize].swap_remove(slot as usize, self.dim)? {
                    self.map.insert(moved, (l, slot));
                }
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The stored vectors of `keys` as float32 (`n x dim`): the float32 copies when kept,
    /// else the stored rows dequantized. `MissingKey` for an absent key.
    pub fn get(&self, keys: &[u64]) -> Result<Vec<f32>> {
        let dim = self.dim;
        let mut out = vec![0f32; keys.len() * dim];
        self.check_file()?;
        for (dst, key) in out.chunks_exact_mut(dim).zip(keys) {
            let &(l, slot) = self.map.get(key).ok_or(Error::MissingKey(*key))?;
            self.lists[l as usize].row_f32(slot as usize, dim, dst);
        }
        self.check_file()?;
        Ok(out)
    }

    /// Trains the coarse quantizer on `vectors` (at least nlist rows, a seeded sample of at
    /// most 64 x nlist is used) and redistributes the vectors already stored.
    pub fn train(&mut self, vectors: &[f32]) -> Result<()> {
        self.check_writable()?;
        if !vectors.len().is_multiple_of(self.dim) {
            return invalid(format!(
                "training vectors must have shape (n, {}); got {} values",
                self.dim,
                vectors.len()
            ));
        }
        let n = vectors.len() / self.dim;
        self.choose_nlist(n);
        if n < self.params.nlist {
            return invalid(format!(
                "training needs at least nlist = {} vectors, got {n}",
                self.params.nlist
            ));
        }
        // What add refuses, train refuses too (the same rows would be stored by add).
        self.check_vectors(vectors, "vectors", true)?;
        let m = self.params.nlist.saturating_mul(SAMPLE_PER_LIST);
        let dtype = self.dtype;
        let sample = self.sample_rows(
            n,
            m,
            |i, out| out.copy_from_slice(&vectors[i * self.dim..(i + 1) * self.dim]),
            |_, row| tune::held_out(&tune::stored_bytes(dtype, row)),
        );
        self.train_on(sample)
    }

    /// Trains the principal directions batches with `scan_dims` rank by from `vectors` (rows
    /// of `dim` values, normalized under cos), instead of the training sample or the
    /// contents: e.g. a sample across the shards of a manifest, for an index trained without
    /// `scan_dims`. They are saved with the index and kept until it is trained again.
    pub fn train_directions(&mut self, vectors: &[f32]) -> Result<()> {
        self.check_writable()?;
        // The directions serve scan_dims only: refused where scan_dims is.
        params::check_scan_dims(self.dim, self.dtype, self.metric, 1)
            .map_err(|e| Error::Invalid(format!("train_directions: {e}")))?;
        if vectors.is_empty() || !vectors.len().is_multiple_of(self.dim) {
            return invalid(format!(
                "train_directions needs vectors of shape (n, {}) with n >= 1; got {} values",
                self.dim,
                vectors.len()
            ));
        }
        self.check_vectors(vectors, "vectors", true)?;
        let rows = self.normalized(vectors);
        self.directions = project::Directions::train(&rows, self.dim);
        for list in &mut self.lists {
            list.packed = Default::default();
        }
        Ok(())
    }

    /// The principal directions trained with the index or by `train_directions` (`dim x dim`,
    /// row c the c-th by decreasing variance), or None.
    pub fn trained_directions(&self) -> Option<&[f32]> {
        self.directions.saved()
    }

    /// Recomputes the centroids from the current contents (a seeded sample) and moves every
    /// vector to its nearest list. Use it when lists have grown skewed.
    pub fn retrain(&mut self) -> Result<()> {
        self.check_writable()?;
        let n = self.len();
        self.choose_nlist(n);
        if n < self.params.nlist {
            return invalid(format!(
                "training needs at least nlist = {} vectors, the index holds {n}",
                self.params.nlist
            ));
        }
        let sample = self.sample_contents(self.params.nlist.saturating_mul(SAMPLE_PER_LIST));
        self.train_on(sample)
    }

    /// A seeded sample of at most `m` of the stored rows (as float32), normalized under cos.
    fn sample_contents(&self, m: usize) -> Vec<f32> {
        // Global position -> (list, slot), lists in order.
        let starts: Vec<usize> = self
            .lists
            .iter()
            .scan(0, |acc, l| {
                let s = *acc;
                *acc += l.len();
                Some(s)
            })
            .collect();
        let dim = self.dim;
        let lists = &self.lists;
        let at = |i: usize| {
            let l = starts.partition_point(|&s| s <= i) - 1;
            (&lists[l], i - starts[l])
        };
        self.sample_rows(
            self.len(),
            m,
            |i, out| {
                let (list, slot) = at(i);
                list.row_f32(slot, dim, out);
            },
            |i, _| {
                let (list, slot) = at(i);
                tune::held_out(list.row_bytes(slot, dim))
            },
        )
    }

    /// A seeded sample (at most `m`) of `n` rows read by `row`, normalized under cos, less
    /// the rows `tune` may hold out as queries (`held_out(i, normalized row)`; see tune.rs):
    /// a vector the centroids were trained on is easier to answer than a new query.
    fn sample_rows(
        &self,
        n: usize,
        m: usize,
        row: impl Fn(usize, &mut [f32]) + Sync,
        held_out: impl Fn(usize, &[f32]) -> bool + Sync,
    ) -> Vec<f32> {
        let dim = self.dim;
        let m = n.min(m);
        let picked = kmeans::Rng::new(self.params.seed).sample(n, m);
        let mut out = vec![0f32; m * dim];
        out.par_chunks_mut(dim)
            .zip(picked.par_iter())
            .for_each(|(o, &i)| row(i, o));
        if self.metric == Metric::Cos {
            out = self.normalized(&out).into_owned();
        }
        let keep: Vec<bool> = out
            .par_chunks(dim)
            .zip(picked.par_iter())
            .map(|(r, &i)| !held_out(i, r))
            .collect();
        let kept = keep.iter().filter(|&&k| k).count();
        if kept == m || kept < self.params.nlist {
            return out;
        }
        out.chunks_exact(dim)
            .zip(&keep)
            .filter(|(_, &k)| k)
            .flat_map(|(r, _)| r.iter().copied())
            .collect()
    }

    fn train_on(&mut self, sample: Vec<f32>) -> Result<()> {
        self.choose_from_spectrum(&sample);
        let spherical = self.coarse_metric() == Metric::Ip;
        let seed = self.params.seed.wrapping_add(1);
        let centroids = kmeans::kmeans(
            &sample,
            self.dim,
            self.params.nlist,
            KMEANS_ITERS,
            spherical,
            seed,
        );
        self.set_centroids(centroids);
        // Trained from the same sample as the centroids: copies of this quantizer (the
        // shards of a manifest) rank batches by the same directions.
        self.directions = if self.params.scan_dims > 0 {
            project::Directions::train(&sample, self.dim)
        } else {
            Default::default()
        };
        self.codebooks = (self.params.pq > 0).then(|| {
            let seed = self.params.seed.wrapping_add(2);
            pq::Pq::train(&sample, self.dim, self.params.pq, seed)
        });
        self.redistribute()?;
        self.encode_lists();
        Ok(())
    }

    /// Computes every list's codes from its stored rows.
    fn encode_lists(&mut self) {
        let Some(book) = &self.codebooks else {
            return;
        };
        let dim = self.dim;
        self.lists.par_iter_mut().for_each(|list| {
            let n = list.len();
            let mut codes = vec![0u8; pq::code_bytes(n, book.m)];
            let (mut conv, mut c) = (Vec::new(), vec![0u8; book.m]);
            let rows = list.rows();
            for slot in 0..n {
                // The stored row (not the float32 copy): what `add` encodes too.
                let row = rows.range(slot, slot + 1, dim).to_f32(dim, &mut conv);
                book.encode(row, &mut c);
                pq::set_row(&mut codes, slot, &c);
            }
            list.codes = Some(Seg::Owned(codes));
        });
    }

    /// Moves every stored row to its nearest list (encoded bytes are copied, not re-encoded).
    fn redistribute(&mut self) -> Result<()> {
        let dim = self.dim;
        let exact = self.keeps_exact();
        let old = std::mem::take(&mut self.lists);
        let mut lists: Vec<List> = (0..self.params.nlist)
            .map(|_| List::empty(self.dtype, exact))
            .collect();
        let mut buf = Vec::new();
        // Labels first, so that every new list is allocated once at its final size.
        let mut labels: Vec<Vec<u32>> = Vec::with_capacity(old.len());
        let mut counts = vec![0usize; lists.len()];
        for list in &old {
            let n = list.len();
            let mut mine = Vec::with_capacity(n);
            let mut s0 = 0;
            while s0 < n {
                let s1 = (s0 + MOVE_CHUNK).min(n);
                let rows: &[f32] = match &list.exact {
                    Some(e) => &e.as_slice()[s0 * dim..s1 * dim],
                    None => list.rows().range(s0, s1, dim).to_f32(dim, &mut buf),
                };
                mine.extend(kmeans::assign(
                    rows,
                    &self.centroids,
                    dim,
                    self.coarse_metric(),
                ));
                s0 = s1;
            }
            for &l in &mine {
                counts[l as usize] += 1;
            }
            labels.push(mine);
        }
        for (list, &c) in lists.iter_mut().zip(&counts) {
            list.reserve(c, dim)?;
        }
        for (list, mine) in old.iter().zip(&labels) {
            for (slot, &l) in mine.iter().enumerate() {
                lists[l as usize].push_from(list, slot, dim)?;
            }
        }
        self.lists = lists;
        self.rebuild_map();
        Ok(())
    }

    pub(crate) fn rebuild_map(&mut self) {
        let mut map = FxHashMap::with_capacity_and_hasher(self.len().max(1), Default::default());
        for (l, list) in self.lists.iter().enumerate() {
            for (slot, &key) in list.keys.as_slice().iter().enumerate() {
                map.insert(key, (l as u32, slot as u32));
            }
        }
        self.map = map;
    }
}

#[cfg(test)]
mod tests;
