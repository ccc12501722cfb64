//! The inverted-file (IVF) index: approximate search over u64 keys.
//!
//! Vectors are split into `nlist` lists by a k-means coarse quantizer; a search scores the
//! query against the centroids and scans only the `nprobe` nearest lists. Each list stores its
//! rows contiguously as f32, f16 or i8 (as [`crate::Index`] does).
//!
//! Search (see `scan.rs`): fewer than 8 queries scan their lists with the single-query SIMD
//! kernels on the calling thread. A batch groups its queries by list and scans each probed
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
//!   (`scan.rs`, `scan_codes`); batches scan the rows as above.
//! - With `scan_dims > 0` (f16 / i8, cos / ip) a batch's product ranks by the rows and queries
//!   projected onto their top principal directions (`project.rs`) before the re-score.
//! - With nprobe >= nlist a search is exact (the same results as [`crate::Index`]); with codes,
//!   also `shortlist >= len`; batches with `scan_dims`, only where the data has that rank.

mod file;
pub(crate) mod kmeans;
mod pq;
mod project;
mod scan;

pub use file::{IVF_FORMAT_VERSION, IVF_MAGIC};
pub use pq::MAX_PQ;
pub use project::MAX_SCAN_DIMS_DIM;

use crate::error::{invalid, Error, Result};
use crate::index::{
    check_batch_keys, check_rows, check_search_args, check_stored_rows, swap_remove_rows,
};
use crate::kernels;
use crate::matmul::{self, PackedQueries, Product, Src, Workspace};
use crate::search::{self, Plan, Queries, Rows};
use crate::topk::{self, Hit, TopK};
use crate::types::{DType, Metric};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use rustc_hash::{FxHashMap, FxHashSet};
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
/// Candidates beyond k (at least k) a batch with `scan_dims` re-scores per query. On 200k
/// MiniLM embeddings, 192 of 384 principal directions keep 99.96% of the true top 10 among
/// the best 64 by the reduced score.
const SCAN_DIMS_MARGIN: usize = 64;

/// The tunable parameters of an [`IvfIndex`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IvfParams {
    /// Lists once trained.
    pub nlist: usize,
    /// Lists scanned per query.
    pub nprobe: usize,
    /// Candidates re-scored from float32 copies (0: none kept, no re-ranking).
    pub rerank: usize,
    /// Seed of the k-means sampling and initialization.
    pub seed: u64,
    /// The index trains itself when it reaches this many vectors (0: only on `train`).
    pub train_threshold: usize,
    /// 4-bit product-quantization sub-quantizers (0: no codes; see `pq.rs`).
    pub pq: usize,
    /// With codes: candidates of the code scan re-scored from the stored rows, per query.
    pub shortlist: usize,
    /// Batches rank by the rows projected onto their top `scan_dims` principal directions
    /// (0: all dimensions; see `project.rs`). f16 / i8 under cos / ip only.
    pub scan_dims: usize,
}

impl IvfParams {
    /// Defaults for a given `nlist`: nprobe = max(1, nlist / 32), no re-ranking, seed 0,
    /// automatic training at 64 x nlist vectors.
    pub fn with_nlist(nlist: usize) -> Self {
        IvfParams {
            nlist,
            nprobe: (nlist / 32).max(1),
            rerank: 0,
            seed: 0,
            train_threshold: nlist.saturating_mul(DEFAULT_TRAIN_PER_LIST),
            pq: 0,
            shortlist: DEFAULT_SHORTLIST,
            scan_dims: 0,
        }
    }
}

/// A buffer that is owned or a read-only view into a memory-mapped file.
pub(crate) use crate::index::Buf as Seg;

/// Stored rows of one list.
pub(crate) enum Data {
    F32(Seg<f32>),
    F16(Seg<f16>),
    /// Row r is `scales[r] * data[r]`.
    I8 {
        data: Seg<i8>,
        scales: Seg<f32>,
    },
}

/// One inverted list: keys, rows, (with re-ranking) float32 copies and (with `pq`, once
/// trained) 4-bit codes, all in slot order.
pub(crate) struct List {
    pub(crate) keys: Seg<u64>,
    pub(crate) data: Data,
    pub(crate) exact: Option<Seg<f32>>,
    /// `pq::code_bytes(len, m)` bytes in the fast-scan block layout.
    pub(crate) codes: Option<Seg<u8>>,
    /// The rows packed for batched low-precision scans (built by the first batch that scans
    /// the list, dropped by every change to it).
    pub(crate) packed: scan::PackCache,
}

impl List {
    fn empty(dtype: DType, exact: bool) -> List {
        List {
            keys: Seg::Owned(Vec::new()),
            data: match dtype {
                DType::F32 => Data::F32(Seg::Owned(Vec::new())),
                DType::F16 => Data::F16(Seg::Owned(Vec::new())),
                DType::I8 => Data::I8 {
                    data: Seg::Owned(Vec::new()),
                    scales: Seg::Owned(Vec::new()),
                },
            },
            exact: exact.then(|| Seg::Owned(Vec::new())),
            codes: None,
            packed: Default::default(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.as_slice().len()
    }

    /// Room for `n` more rows.
    fn reserve(&mut self, n: usize, dim: usize) -> Result<()> {
        grow(self.keys.owned_mut()?, n);
        match &mut self.data {
            Data::F32(s) => grow(s.owned_mut()?, n * dim),
            Data::F16(s) => grow(s.owned_mut()?, n * dim),
            Data::I8 { data, scales } => {
                grow(data.owned_mut()?, n * dim);
                grow(scales.owned_mut()?, n);
            }
        }
        if let Some(e) = &mut self.exact {
            grow(e.owned_mut()?, n * dim);
        }
        Ok(())
    }

    pub(crate) fn rows(&self) -> Rows<'_> {
        match &self.data {
            Data::F32(s) => Rows::F32(s.as_slice()),
            Data::F16(s) => Rows::F16(s.as_slice()),
            Data::I8 { data, scales } => Rows::I8 {
                data: data.as_slice(),
                scales: scales.as_slice(),
            },
        }
    }

    /// Appends row `i` of `enc`.
    fn push(&mut self, key: u64, enc: &Encoded, i: usize, dim: usize) -> Result<()> {
        self.packed = Default::default();
        let r = i * dim..(i + 1) * dim;
        match (&mut self.data, &enc.data) {
            (Data::F32(s), EncData::F32(v)) => s.owned_mut()?.extend_from_slice(&v[r.clone()]),
            (Data::F16(s), EncData::F16(v)) => s.owned_mut()?.extend_from_slice(&v[r.clone()]),
            (Data::I8 { data, scales }, EncData::I8(d, sc)) => {
                data.owned_mut()?.extend_from_slice(&d[r.clone()]);
                scales.owned_mut()?.push(sc[i]);
            }
            _ => unreachable!("encoded with the index's own dtype"),
        }
        if let (Some(dst), Some(src)) = (&mut self.exact, &enc.exact) {
            dst.owned_mut()?.extend_from_slice(&src[r]);
        }
        if let (Some(dst), Some((src, m))) = (&mut self.codes, &enc.codes) {
            let m = *m;
            let slot = self.keys.as_slice().len();
            let dst = dst.owned_mut()?;
            dst.resize(pq::code_bytes(slot + 1, m), 0);
            pq::set_row(dst, slot, &src[i * m..(i + 1) * m]);
        }
        self.keys.owned_mut()?.push(key);
        Ok(())
    }

    /// Appends slot `slot` of `other` (the encoded bytes, no re-encoding).
    fn push_from(&mut self, other: &List, slot: usize, dim: usize) -> Result<()> {
        self.packed = Default::default();
        let r = slot * dim..(slot + 1) * dim;
        match (&mut self.data, &other.data) {
            (Data::F32(d), Data::F32(s)) => {
                d.owned_mut()?.extend_from_slice(&s.as_slice()[r.clone()])
            }
            (Data::F16(d), Data::F16(s)) => {
                d.owned_mut()?.extend_from_slice(&s.as_slice()[r.clone()])
            }
            (
                Data::I8 { data, scales },
                Data::I8 {
                    data: sd,
                    scales: ss,
                },
            ) => {
                data.owned_mut()?
                    .extend_from_slice(&sd.as_slice()[r.clone()]);
                scales.owned_mut()?.push(ss.as_slice()[slot]);
            }
            _ => unreachable!("lists of one index share its dtype"),
        }
        if let (Some(dst), Some(src)) = (&mut self.exact, &other.exact) {
            dst.owned_mut()?.extend_from_slice(&src.as_slice()[r]);
        }
        self.keys.owned_mut()?.push(other.keys.as_slice()[slot]);
        Ok(())
    }

    /// Removes `slot` by moving the last row into it; returns the key moved (if any).
    fn swap_remove(&mut self, slot: usize, dim: usize) -> Result<Option<u64>> {
        self.packed = Default::default();
        let last = self.len() - 1;
        match &mut self.data {
            Data::F32(s) => swap_remove_rows(s.owned_mut()?, slot, last, dim),
            Data::F16(s) => swap_remove_rows(s.owned_mut()?, slot, last, dim),
            Data::I8 { data, scales } => {
                swap_remove_rows(data.owned_mut()?, slot, last, dim);
                swap_remove_rows(scales.owned_mut()?, slot, last, 1);
            }
        }
        if let Some(e) = &mut self.exact {
            swap_remove_rows(e.owned_mut()?, slot, last, dim);
        }
        if let Some(c) = &mut self.codes {
            let c = c.owned_mut()?;
            let m = c.len() / (last + 1).div_ceil(kernels::PQ_BLOCK) / kernels::PQ_BLOCK * 2;
            let mut row = vec![0u8; m];
            pq::get_row(c, last, &mut row);
            pq::set_row(c, slot, &row);
            row.fill(0);
            pq::set_row(c, last, &row);
            c.truncate(pq::code_bytes(last, m));
        }
        let keys = self.keys.owned_mut()?;
        swap_remove_rows(keys, slot, last, 1);
        Ok((slot != last).then(|| keys[slot]))
    }

    /// The bytes of stored row `slot` (for prefetching).
    fn row_bytes(&self, slot: usize, dim: usize) -> &[u8] {
        let r = slot * dim..(slot + 1) * dim;
        match &self.data {
            Data::F32(s) => bytemuck::cast_slice(&s.as_slice()[r]),
            Data::F16(s) => bytemuck::cast_slice(&s.as_slice()[r]),
            Data::I8 { data, .. } => bytemuck::cast_slice(&data.as_slice()[r]),
        }
    }

    /// Row `slot` as float32 (the exact copy when kept, else the stored row dequantized).
    fn row_f32(&self, slot: usize, dim: usize, out: &mut [f32]) {
        if let Some(e) = &self.exact {
            out.copy_from_slice(&e.as_slice()[slot * dim..(slot + 1) * dim]);
            return;
        }
        let mut buf = Vec::new();
        out.copy_from_slice(self.rows().range(slot, slot + 1, dim).to_f32(dim, &mut buf));
    }
}

/// Room for `extra` more elements in a list's buffer: exactly what comes, or an eighth of what
/// it holds if that is more. Growth stays amortized (geometric, x1.125) with at most 12.5%
/// unused, where `Vec::reserve` doubles: adds spread over many lists left ~1.7x the data
/// allocated (a 1M x 512 i8 index built by `add` held 799 MiB for 488 MiB of rows).
fn grow<T>(v: &mut Vec<T>, extra: usize) {
    if v.capacity() - v.len() < extra {
        v.reserve_exact(extra.max(v.len() / 8));
    }
}

/// A batch encoded for storage (row-major, `dim` values per row).
struct Encoded {
    data: EncData,
    exact: Option<Vec<f32>>,
    /// With trained codebooks: `m` codes per row, and `m`.
    codes: Option<(Vec<u8>, usize)>,
}

enum EncData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    I8(Vec<i8>, Vec<f32>),
}

/// One query's output slots and candidates, as the search's last step receives them.
type FinishItem<'a> = (usize, ((&'a mut [u64], &'a mut [f32]), Vec<scan::Cand>));

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
    /// With `scan_dims > 0`: the principal directions of the stored vectors (`dim x dim`,
    /// see `project.rs`), computed by the first batch from a sample of the contents and kept
    /// until the index is trained again.
    pub(crate) directions: std::sync::OnceLock<Vec<f32>>,
    /// Set when opened with mmap: the mapped file, checked around every read of the map.
    pub(crate) mapped: Option<crate::file_io::MappedFile>,
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

fn check_params(dim: usize, dtype: DType, metric: Metric, p: &IvfParams) -> Result<()> {
    if p.nlist == 0 || p.nlist > MAX_LISTS {
        return invalid(format!(
            "nlist must be between 1 and {MAX_LISTS}, got {}",
            p.nlist
        ));
    }
    if p.nprobe == 0 {
        return invalid("nprobe must be at least 1, got 0");
    }
    if p.rerank > 0 && dtype == DType::F32 {
        return invalid(
            "rerank needs dtype \"f16\" or \"i8\": with \"f32\" the scan is already exact",
        );
    }
    if let Some(msg) = pq::check_m(p.pq, dim) {
        return invalid(msg);
    }
    if p.shortlist == 0 {
        return invalid("shortlist must be at least 1, got 0");
    }
    check_scan_dims(dim, dtype, metric, p.scan_dims)?;
    if p.train_threshold > 0 && p.train_threshold < p.nlist {
        return invalid(format!(
            "train_threshold must be 0 (train only on request) or at least nlist = {}, got {}",
            p.nlist, p.train_threshold
        ));
    }
    Ok(())
}

/// `scan_dims` is 0 (all dimensions) or fewer than `dim`, and only where batches re-score
/// their candidates from the rows (f16 / i8) by inner product (cos / ip).
fn check_scan_dims(dim: usize, dtype: DType, metric: Metric, scan_dims: usize) -> Result<()> {
    if scan_dims == 0 {
        return Ok(());
    }
    if scan_dims >= dim {
        return invalid(format!(
            "scan_dims must be 0 (all dimensions) or below dim = {dim}, got {scan_dims}"
        ));
    }
    if dim > project::MAX_SCAN_DIMS_DIM {
        return invalid(format!(
            "scan_dims needs dim <= {}, got dim = {dim}: the principal directions take a \
             dim x dim eigendecomposition (memory ~24 * dim^2 bytes, time ~dim^3); use \
             scan_dims=0",
            project::MAX_SCAN_DIMS_DIM
        ));
    }
    if dtype == DType::F32 {
        return invalid(
            "scan_dims needs dtype \"f16\" or \"i8\": their batches re-score the candidates \
             of the reduced scan from the stored rows; \"f32\" batches report the scan's scores",
        );
    }
    if metric == Metric::L2 {
        return invalid(
            "scan_dims needs metric \"cos\" or \"ip\": the principal directions rank by \
             inner product",
        );
    }
    Ok(())
}

/// (Query, list) pairs one batch scans at most (its buffers take ~50 bytes a pair); larger
/// batches run in chunks of queries.
const MAX_BATCH_PAIRS: usize = 1 << 18;

impl IvfIndex {
    pub fn new(dim: usize, metric: Metric, dtype: DType, params: IvfParams) -> Result<Self> {
        if dim == 0 || dim > MAX_DIM {
            return invalid(format!("dim must be between 1 and {MAX_DIM}, got {dim}"));
        }
        check_params(dim, dtype, metric, &params)?;
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
        if nprobe == 0 {
            return invalid("nprobe must be at least 1, got 0");
        }
        self.params.nprobe = nprobe;
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
        self.params.rerank = rerank;
        Ok(())
    }

    /// Changes how many candidates of the code scan (`pq > 0`) are re-scored.
    pub fn set_shortlist(&mut self, shortlist: usize) -> Result<()> {
        if shortlist == 0 {
            return invalid("shortlist must be at least 1, got 0");
        }
        self.params.shortlist = shortlist;
        Ok(())
    }

    /// Changes how many principal directions batches rank by (0: all dimensions). The
    /// lists' packed copies are rebuilt by the next batch.
    pub fn set_scan_dims(&mut self, scan_dims: usize) -> Result<()> {
        check_scan_dims(self.dim, self.dtype, self.metric, scan_dims)?;
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
        if vectors.len() < search::GEMM_MIN_QUERIES * self.dim {
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
        if n < self.params.nlist {
            return invalid(format!(
                "training needs at least nlist = {} vectors, got {n}",
                self.params.nlist
            ));
        }
        // What add refuses, train refuses too (the same rows would be stored by add).
        self.check_vectors(vectors, "vectors", true)?;
        let m = self.params.nlist.saturating_mul(SAMPLE_PER_LIST);
        let sample = self.sample_rows(n, m, |i, out| {
            out.copy_from_slice(&vectors[i * self.dim..(i + 1) * self.dim])
        });
        self.train_on(sample)
    }

    /// Recomputes the centroids from the current contents (a seeded sample) and moves every
    /// vector to its nearest list. Use it when lists have grown skewed.
    pub fn retrain(&mut self) -> Result<()> {
        self.check_writable()?;
        let n = self.len();
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
        self.sample_rows(self.len(), m, |i, out| {
            let l = starts.partition_point(|&s| s <= i) - 1;
            lists[l].row_f32(i - starts[l], dim, out);
        })
    }

    /// A seeded sample (at most `m`) of `n` rows read by `row`, normalized under cos.
    fn sample_rows(&self, n: usize, m: usize, row: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
        let dim = self.dim;
        let m = n.min(m);
        let picked = kmeans::Rng::new(self.params.seed).sample(n, m);
        let mut out = vec![0f32; m * dim];
        out.par_chunks_mut(dim)
            .zip(picked.par_iter())
            .for_each(|(o, &i)| row(i, o));
        if self.metric == Metric::Cos {
            self.normalized(&out).into_owned()
        } else {
            out
        }
    }

    fn train_on(&mut self, sample: Vec<f32>) -> Result<()> {
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
        self.directions = Default::default();
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

    /// Approximate top-`k` of each query (exact with nprobe >= nlist or before training).
    /// Returns (keys, scores, k') with k' = min(k, len - excluded keys present): every
    /// query gets k' results, lists beyond `nprobe` are scanned when the probed ones hold
    /// too few. Equal scores rank by ascending key.
    pub fn search(
        &self,
        queries: &[f32],
        k: usize,
        exclude: Option<&[u64]>,
    ) -> Result<(Vec<u64>, Vec<f32>, usize)> {
        let dim = self.dim;
        let nq = check_search_args(queries, dim, k)?;
        self.check_vectors(queries, "queries", false)?;
        self.check_file()?;
        let found = self.search_parts(queries, k, exclude, nq)?;
        // A file changed during the search may have given other bytes than were checked.
        self.check_file()?;
        Ok(found)
    }

    /// [`Self::search`] of `nq` checked queries, in parts where the batch is large.
    fn search_parts(
        &self,
        queries: &[f32],
        k: usize,
        exclude: Option<&[u64]>,
        nq: usize,
    ) -> Result<(Vec<u64>, Vec<f32>, usize)> {
        let dim = self.dim;
        // A batch's per-pair buffers grow with queries x probed lists: a large one runs in
        // chunks of queries, balanced so that each stays a batch.
        let probed = if self.is_trained() {
            self.params.nprobe.min(self.lists.len())
        } else {
            self.lists.len()
        };
        let parts = (nq * probed.max(1)).div_ceil(MAX_BATCH_PAIRS).max(1);
        if parts == 1 || nq < 2 * parts * search::GEMM_MIN_QUERIES {
            return self.search_checked(queries, k, exclude);
        }
        let per = nq.div_ceil(parts);
        let (mut ids, mut scores, mut kp) = (Vec::new(), Vec::new(), 0);
        for part in queries.chunks(per * dim) {
            let (i, s, kpart) = self.search_checked(part, k, exclude)?;
            ids.extend_from_slice(&i);
            scores.extend_from_slice(&s);
            kp = kpart;
        }
        Ok((ids, scores, kp))
    }

    /// [`Self::search`] of queries already checked.
    fn search_checked(
        &self,
        queries: &[f32],
        k: usize,
        exclude: Option<&[u64]>,
    ) -> Result<(Vec<u64>, Vec<f32>, usize)> {
        let dim = self.dim;
        let nq = queries.len() / dim;
        // Excluded keys present, and how many fall in each list.
        let mut excluded: FxHashSet<u64> = FxHashSet::default();
        let mut excluded_per_list = vec![0usize; self.lists.len()];
        for key in exclude.unwrap_or(&[]) {
            if let Some(&(l, _)) = self.map.get(key) {
                if excluded.insert(*key) {
                    excluded_per_list[l as usize] += 1;
                }
            }
        }
        let kp = k.min(self.len() - excluded.len());
        if nq == 0 || kp == 0 {
            return Ok((Vec::new(), Vec::new(), kp));
        }
        let queries = self.normalize(queries, true);
        let rerank = if self.keeps_exact() {
            self.params.rerank
        } else {
            0
        };
        let batch = nq >= search::GEMM_MIN_QUERIES;
        let product = scan::batch_product(self.dtype);
        // Codes serve single queries (fewer than GEMM_MIN_QUERIES): a batch's product over the
        // lists themselves is compute-bound and costs less per query than codes plus a
        // shortlist re-scored from rows spread through memory.
        let codes = self.has_codes() && !batch;
        // A batch of f16 / i8 lists re-scores its best candidates with the single-query
        // kernels (so it reports what Q=1 reports); a low-precision scan keeps a margin. So
        // does every search of codes.
        let rescore = rerank == 0 && (codes || (batch && self.dtype != DType::F32));
        // Candidates per query: k plus the margin of the scan's rounding (as `Index` batches
        // keep); an f32 product over f16 / i8 rows keeps the bf16 margin, as its order may
        // differ from the single-query kernels' in the last bits.
        let kc = if codes {
            kp.max(rerank).max(self.params.shortlist)
        } else if rerank > 0 {
            kp.max(rerank)
        } else if rescore {
            let probe = match product {
                Product::I8 => search::Scan::I8 {
                    data: &[],
                    scales: &[],
                },
                _ => search::Scan::Bf16,
            };
            search::scan_candidates(kp, probe)
        } else {
            kp
        };
        // A batch with scan_dims ranks by the principal directions (`project.rs`): its
        // candidates are re-scored from the rows (check_scan_dims allows f16 / i8 only), with
        // a margin for what the dropped dimensions move.
        let reduce = batch && self.params.scan_dims > 0;
        let kc = if reduce {
            kc.max(kp + kp.max(SCAN_DIMS_MARGIN))
        } else {
            kc
        };
        let pdim = if reduce { self.params.scan_dims } else { dim };
        let directions = reduce.then(|| {
            self.directions
                .get_or_init(|| {
                    let sample = self.sample_contents(project::BASIS_SAMPLE);
                    project::principal_directions(&sample, dim)
                })
                .as_slice()
        });
        let reduced_queries = directions.map(|d| {
            let mut out = Vec::new();
            project::project(&queries, dim, d, pdim, &mut out, &mut Default::default());
            out
        });
        let reduced = scan::Reduced {
            directions,
            queries: reduced_queries.as_deref().unwrap_or(&queries),
        };
        let spec = scan::ScanSpec {
            metric: self.metric,
            dim,
            pdim,
            product,
            kc,
            parallel: batch,
        };
        let q16 = (self.dtype == DType::I8 && self.metric != Metric::L2)
            .then(|| scan::Q16::new(&queries, dim));
        let q8 = (batch && product == Product::I8).then(|| scan::Q8::new(reduced.queries, pdim));
        let probes = self.probes(&queries, kp + excluded.len());
        let hits = match &self.codebooks {
            Some(book) if codes => self.scan_codes(book, spec, &queries, &probes, &excluded),
            _ => self.scan_lists_into(
                spec,
                &queries,
                reduced,
                &probes,
                q16.as_ref(),
                q8.as_ref(),
                &excluded,
                &excluded_per_list,
            ),
        };
        let mut ids = vec![0u64; nq * kp];
        let mut scores = vec![0f32; nq * kp];
        let finish = |conv: &mut Vec<f32>, (q, ((ids, scores), mut top)): FinishItem| {
            let qv = &queries[q * dim..(q + 1) * dim];
            if rerank > 0 {
                self.rerank(qv, &mut top);
            } else if rescore {
                let q16 = q16.as_ref().map(|x| x.query(q, dim));
                // Candidates lie anywhere in memory: start loading them all at once.
                for c in top.iter() {
                    let list = &self.lists[c.list as usize];
                    kernels::prefetch(list.row_bytes(c.slot as usize, dim));
                }
                for c in top.iter_mut() {
                    let list = &self.lists[c.list as usize];
                    c.score =
                        scan::exact_score(list, c.slot as usize, self.metric, dim, qv, q16, conv);
                }
                top.sort_unstable_by(topk::rank);
            }
            debug_assert!(top.len() >= kp);
            for (j, h) in top.iter().take(kp).enumerate() {
                ids[j] = h.key;
                scores[j] = self.metric.to_external(h.score);
            }
        };
        if batch {
            ids.par_chunks_mut(kp)
                .zip(scores.par_chunks_mut(kp))
                .zip(hits.into_par_iter())
                .enumerate()
                .for_each_init(Vec::new, finish);
        } else {
            let mut conv = Vec::new();
            ids.chunks_mut(kp)
                .zip(scores.chunks_mut(kp))
                .zip(hits)
                .enumerate()
                .for_each(|item| finish(&mut conv, item));
        }
        Ok((ids, scores, kp))
    }

    /// The lists each query scans (CSR: offsets into a flat list), nearest first. A query
    /// whose probed lists hold fewer than `needed` vectors scans every list.
    fn probes(&self, queries: &[f32], needed: usize) -> (Vec<usize>, Vec<u32>) {
        let dim = self.dim;
        let nq = queries.len() / dim;
        let nlist = self.lists.len();
        if !self.is_trained() {
            let offsets = (0..=nq).map(|q| q * nlist).collect();
            let flat = (0..nq).flat_map(|_| 0..nlist as u32).collect();
            return (offsets, flat);
        }
        // Nearest first even when every list is probed: a batch's first round scans the
        // nearest lists, whose scores bound what the others must keep.
        let np = self.params.nprobe.min(nlist);
        let plan = Plan {
            dim,
            metric: self.coarse_metric(),
            normalize_queries: false,
            normalize_rows: false,
        };
        let mut ids = vec![0u64; nq * np];
        let mut scores = vec![0f32; nq * np];
        if nq < search::GEMM_MIN_QUERIES {
            // Few queries: the same kernels and order as the search core, on this thread
            // (no hand-off to the thread pool for a few microseconds of work).
            let (mut all, mut ints) = (vec![0f32; nlist], vec![0i64; nlist]);
            let mut q16 = Vec::new();
            let mut top = TopK::<Hit>::default();
            let rows = self.probe_rows();
            for (q, qv) in queries.chunks_exact(dim).enumerate() {
                let q16 = matches!(rows, Rows::I8 { .. }).then(|| {
                    let scale = kernels::quantize_query_i16(qv, &mut q16);
                    (q16.as_slice(), scale)
                });
                search::score_chunk(plan.metric, qv, q16, rows, &[], &mut ints, &mut all);
                top.reset(np, f32::NEG_INFINITY);
                for (l, &s) in all.iter().enumerate() {
                    top.push(Hit {
                        score: s,
                        id: l as u64,
                    });
                }
                for (j, c) in top.sorted().iter().enumerate() {
                    ids[q * np + j] = c.id;
                }
            }
        } else if let Some((data, cscales)) = self
            .probe_centroids
            .as_ref()
            .filter(|_| matmul::has_i8_product(kernels::level()))
        {
            // A batch reuses the centroids across its queries (a product, compute-bound): the
            // i8 copy single queries score, by the VNNI product (a quarter of the float32
            // product's time, which was a tenth of a batch at nprobe ~100). Lists are only
            // chosen by these scores, never reported.
            const BLOCK: usize = 256;
            let level = kernels::level();
            let src = Src::I8 {
                data,
                scales: cscales,
            };
            ids.par_chunks_mut(BLOCK * np)
                .zip(queries.par_chunks(BLOCK * dim))
                .for_each_init(
                    || (Vec::new(), Workspace::default(), TopK::<Hit>::default()),
                    |(tile, ws, top), (chosen, qs)| {
                        let m = qs.len() / dim;
                        let packed = PackedQueries::new(Product::I8, level, m, dim, qs);
                        tile.resize(m * nlist, 0.0);
                        packed.scores(src, nlist, tile, nlist, ws);
                        for (row, out) in tile.chunks_exact(nlist).zip(chosen.chunks_exact_mut(np))
                        {
                            top.reset(np, f32::NEG_INFINITY);
                            for (l, &s) in row.iter().enumerate() {
                                top.push(Hit {
                                    score: s,
                                    id: l as u64,
                                });
                            }
                            for (o, c) in out.iter_mut().zip(top.sorted()) {
                                *o = c.id;
                            }
                        }
                    },
                );
        } else {
            // Float32 product (L2, or no VNNI).
            search::search_into(
                plan,
                Rows::F32(&self.centroids),
                Queries::F32(queries),
                np,
                &|_, _| true,
                &|r| r as u64,
                &mut ids,
                &mut scores,
            );
        }
        let mut offsets = Vec::with_capacity(nq + 1);
        let mut flat = Vec::with_capacity(nq * np);
        offsets.push(0);
        for q in 0..nq {
            let mine = &ids[q * np..(q + 1) * np];
            let held: usize = mine.iter().map(|&l| self.lists[l as usize].len()).sum();
            if held >= needed {
                flat.extend(mine.iter().map(|&l| l as u32));
            } else {
                flat.extend(mine.iter().map(|&l| l as u32));
                let seen: FxHashSet<u64> = mine.iter().copied().collect();
                flat.extend(
                    (0..nlist as u64)
                        .filter(|l| !seen.contains(l))
                        .map(|l| l as u32),
                );
            }
            offsets.push(flat.len());
        }
        (offsets, flat)
    }

    /// Re-scores the candidates from their float32 copies, best first.
    fn rerank(&self, q: &[f32], top: &mut [scan::Cand]) {
        let dim = self.dim;
        let level = kernels::level();
        for c in top.iter_mut() {
            let exact = self.lists[c.list as usize]
                .exact
                .as_ref()
                .expect("rerank only with float32 copies");
            let slot = c.slot as usize;
            let row = &exact.as_slice()[slot * dim..(slot + 1) * dim];
            c.score = match self.metric {
                Metric::L2 => -kernels::l2_f32_with(level, q, row),
                _ => kernels::dot_f32_with(level, q, row),
            };
        }
        top.sort_unstable_by(topk::rank);
    }
}

#[cfg(test)]
mod tests;
