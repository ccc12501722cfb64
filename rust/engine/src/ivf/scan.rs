//! The IVF scanner: one list scanned for the queries probing it, with each query's best
//! candidates kept (faiss's `InvertedListScanner`). The driver (`search.rs`) decides which
//! lists each query probes, in which rounds, and what happens to the candidates after.
//!
//! A list takes one of three scans ([`ScanInputs::scan_list`]):
//! - few queries: the single-query SIMD kernels, exact scores;
//! - a batch's f32 product over the rows as stored, a tile of (queries x rows) scores at a
//!   time;
//! - a batch's low-precision product (i8 with VNNI, bf16 with AVX512-BF16) or reduced scan
//!   (`scan_dims`): the list's rows packed once ([`super::list::PackCache`], kept until the list changes)
//!   as the left operand, the queries as the right; the i8 product itself drops scores below
//!   each query's floor and marks the rest.
//!
//! Scores are internal (higher is better). A single list's 4-bit codes are summed through a
//! query's lookup table by [`push_codes`]; a single query scanning as a batch does
//! ([`super::SingleScan::Product`]) scores a list's packed copy by [`push_product`]. Nothing here allocates per list or per (query,
//! list) pair: buffers live per thread ([`Scratch`]).

use super::list::{List, PackCache};
use super::project;
use crate::kernels;
use crate::matmul::{self, Marks, PackedQueries, Product, Src, Workspace};
use crate::search::{self, Plan, Rows};
use crate::topk::{Ranked, TopK};
use crate::types::{DType, Metric};
use rustc_hash::FxHashSet;
use std::cell::RefCell;

/// Queries per product block within one list.
const QUERY_BLOCK: usize = 256;
/// Target size of a (queries x rows) score tile.
const TILE_BYTES: usize = 256 * 1024;
/// Queries an L2 block tests a row against at once (one vectorizable comparison).
const LANES: usize = 16;
/// Rows per single-query kernel chunk.
const KERNEL_CHUNK: usize = 256;

/// A candidate of one query: internal score (higher is better), key, and where its row lies.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cand {
    pub score: f32,
    pub list: u32,
    pub slot: u32,
    pub key: u64,
}

impl Ranked for Cand {
    #[inline]
    fn score(&self) -> f32 {
        self.score
    }

    /// Ties rank by key, as everywhere.
    #[inline]
    fn id(&self) -> u64 {
        self.key
    }
}

/// The best candidates of one (query, list) pair or one query.
pub(crate) type Select = TopK<Cand>;

/// How the lists of one search are scanned.
#[derive(Clone, Copy)]
pub(crate) struct ScanSpec {
    pub metric: Metric,
    pub dim: usize,
    /// Dimensions of the product's operands: `dim`, or `scan_dims` when a batch ranks by the
    /// principal directions.
    pub pdim: usize,
    /// The product a batch runs (its scores are the candidate scores).
    pub product: Product,
    /// Candidates kept per (query, list) pair and per query.
    pub kc: usize,
    /// Run list scans in parallel (a batch) or all on the calling thread (few queries).
    pub parallel: bool,
    /// Lists may be scanned by the product (see `SearchPlan::by_product`).
    pub by_product: bool,
    /// Every probed list by the product, however few queries probe it (see
    /// `SearchPlan::all_by_product`).
    pub all_by_product: bool,
}

/// The product a batch over lists of `dtype` runs on this CPU.
///
/// f16 lists scan in i8 too where the CPU has VNNI: the batch re-scores every query's best
/// candidates from the f16 rows anyway, so the product only has to rank them, and an i8
/// product runs twice as many values per instruction as bf16 and keeps a packed copy half
/// the size.
pub(crate) fn batch_product(dtype: DType) -> Product {
    let level = kernels::level();
    match dtype {
        DType::I8 | DType::F16 if matmul::has_i8_product(level) => Product::I8,
        DType::F16 if matmul::has_bf16_product(level) => Product::Bf16,
        _ => Product::F32,
    }
}

fn pack_rows(
    list: &List,
    spec: ScanSpec,
    directions: Option<&[f32]>,
    s: &mut Scratch,
) -> PackedQueries {
    let (dim, level, n) = (spec.dim, kernels::level(), list.len());
    // i8 rows dequantized and quantized again give back the same integers (the largest
    // |value| of a row is 127) and the scale to an ulp.
    match directions {
        Some(d) => {
            let rows = list.rows().to_f32(dim, &mut s.conv);
            project::project_rows(rows, dim, d, spec.pdim, &mut s.proj, &mut s.ws);
            PackedQueries::new(spec.product, level, n, spec.pdim, &s.proj)
        }
        // Converted a row at a time as they are packed (no f32 copy of the list).
        None => {
            let rows = match list.rows() {
                Rows::F32(v) => Src::F32(v),
                Rows::F16(v) => Src::F16(v),
                Rows::I8 { data, scales } => Src::I8 { data, scales },
            };
            PackedQueries::of_rows(spec.product, level, n, dim, rows)
        }
    }
}

/// `queries` (`dim` values each) projected onto the first `pdim` of `directions`: by the
/// product for a batch; one dot product per direction for fewer queries (the product would
/// pack every direction for them).
pub(crate) fn project_queries(
    queries: &[f32],
    dim: usize,
    directions: &[f32],
    pdim: usize,
) -> Vec<f32> {
    let nq = queries.len() / dim;
    let mut out = Vec::with_capacity(nq * pdim);
    if nq < crate::search::GEMM_MIN_QUERIES {
        let level = kernels::level();
        for q in queries.chunks_exact(dim) {
            out.extend(
                directions[..pdim * dim]
                    .chunks_exact(dim)
                    .map(|d| kernels::dot_f32_with(level, q, d)),
            );
        }
    } else {
        project::project(
            queries,
            dim,
            directions,
            pdim,
            &mut out,
            &mut Default::default(),
        );
    }
    out
}

/// What a batch's product multiplies: the queries as they are (`directions` None), or
/// projected onto the first `pdim` principal directions (`scan_dims`), with the rows packed
/// the same way. `queries` holds `spec.pdim` values per query.
#[derive(Clone, Copy)]
pub(crate) struct Reduced<'a> {
    pub directions: Option<&'a [f32]>,
    pub queries: &'a [f32],
}

/// Queries quantized for the i8 product (as stored rows are: one i8 copy and scale each).
pub(crate) struct Q8 {
    pub data: Vec<i8>,
    pub scales: Vec<f32>,
}

impl Q8 {
    pub fn new(queries: &[f32], dim: usize) -> Q8 {
        let mut data = vec![0i8; queries.len()];
        let scales = queries
            .chunks_exact(dim)
            .zip(data.chunks_exact_mut(dim))
            .map(|(q, o)| kernels::quantize_row_i8(q, o))
            .collect();
        Q8 { data, scales }
    }
}

/// Queries quantized for the i8 single-query kernels (one i16 copy and scale each).
pub(crate) struct Q16 {
    pub data: Vec<i16>,
    pub scales: Vec<f32>,
}

impl Q16 {
    pub fn new(queries: &[f32], dim: usize) -> Q16 {
        let mut data = Vec::with_capacity(queries.len());
        let mut scales = Vec::with_capacity(queries.len() / dim.max(1));
        let mut one = Vec::with_capacity(dim);
        for q in queries.chunks_exact(dim) {
            scales.push(kernels::quantize_query_i16(q, &mut one));
            data.extend_from_slice(&one);
        }
        Q16 { data, scales }
    }

    pub fn query(&self, q: usize, dim: usize) -> (&[i16], f32) {
        (&self.data[q * dim..(q + 1) * dim], self.scales[q])
    }
}

thread_local! {
    /// Each thread's scan buffers, kept across lists and searches: once grown, scanning a
    /// list allocates nothing but its output. (A list scan makes no rayon calls, so it never
    /// re-enters this on the same thread.)
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Buffers a thread reuses across the lists it scans.
#[derive(Default)]
struct Scratch {
    qbuf: Vec<f32>,
    qnorms: Vec<f32>,
    rnorms: Vec<f32>,
    tile: Vec<f32>,
    ints: Vec<i64>,
    conv: Vec<f32>,
    proj: Vec<f32>,
    ws: Workspace,
    sels: Vec<Select>,
    qi8: Vec<i8>,
    qsc: Vec<f32>,
    thr: Vec<f32>,
    masks: Vec<u32>,
    passing: Vec<u32>,
}

/// The exact internal score of row `slot` of `list` for query `q` (as the single-query
/// kernels give it: the scores a Q=1 search reports). `q16` (the i16 query and its scale) is
/// needed for i8 rows.
#[inline]
pub(crate) fn exact_score(
    list: &List,
    slot: usize,
    metric: Metric,
    dim: usize,
    q: &[f32],
    q16: Option<(&[i16], f32)>,
    conv: &mut Vec<f32>,
) -> f32 {
    let plan = Plan {
        dim,
        metric,
        normalize_queries: false,
        normalize_rows: false,
    };
    let (q16, scale) = q16.unwrap_or((&[], 0.0));
    search::exact_score(plan, list.rows(), slot, q, q16, scale, conv)
}

/// Pushes the scores of rows `[r0, r0 + scores.len())` of list `list` (`at`: (list, r0)),
/// skipping excluded keys.
#[inline(always)]
fn push_scores(
    sel: &mut Select,
    (list, r0): (u32, usize),
    scores: &[f32],
    keys: &[u64],
    excluded: Option<&FxHashSet<u64>>,
    passing: &mut Vec<u32>,
) {
    // One SIMD pass lists the scores reaching the threshold now; it only rises, so each is
    // checked again as it is pushed (as `search` does).
    passing.clear();
    kernels::at_least_with(kernels::level(), scores, sel.threshold(), passing);
    for &j in passing.iter() {
        let (slot, s) = (r0 + j as usize, scores[j as usize]);
        let key = keys[slot];
        if s < sel.threshold() || excluded.is_some_and(|e| e.contains(&key)) {
            continue;
        }
        sel.push(Cand {
            score: s,
            list,
            slot: slot as u32,
            key,
        });
    }
}

/// Pushes the code sums of list `list`'s rows (as scores), skipping excluded keys; as
/// [`push_scores`], one SIMD pass first lists the sums reaching the threshold.
#[inline]
fn push_sums(
    sel: &mut Select,
    list: u32,
    sums: &[u16],
    keys: &[u64],
    excluded: Option<&FxHashSet<u64>>,
    passing: &mut Vec<u32>,
) {
    // Sums are integers: the threshold as one (never above the true one) finds the same rows.
    let floor = sel.threshold().clamp(0.0, 65536.0) as u32;
    passing.clear();
    if floor > u16::MAX as u32 {
        return;
    }
    kernels::at_least_u16_with(kernels::level(), sums, floor as u16, passing);
    for &j in passing.iter() {
        let (slot, sum) = (j as usize, sums[j as usize] as f32);
        let key = keys[slot];
        if sum < sel.threshold() || excluded.is_some_and(|e| e.contains(&key)) {
            continue;
        }
        sel.push(Cand {
            score: sum,
            list,
            slot: slot as u32,
            key,
        });
    }
}

/// `|row|^2` of every row of `rows`, as the exact scores see them (converted a chunk at a
/// time).
fn row_sqnorms(rows: Rows<'_>, dim: usize, out: &mut Vec<f32>, conv: &mut Vec<f32>) {
    let n = rows.count(dim);
    out.clear();
    out.resize(n, 0.0);
    for r0 in (0..n).step_by(KERNEL_CHUNK) {
        let r1 = (r0 + KERNEL_CHUNK).min(n);
        search::row_sqnorms(rows.range(r0, r1, dim), dim, &mut out[r0..r1], conv);
    }
}

/// What every list scan of one search reads: how to scan, the queries (normalized, `spec.dim`
/// values each) and as the product multiplies them, and their quantized copies (`q16` for i8
/// rows, `q8` for the i8 product).
#[derive(Clone, Copy)]
pub(crate) struct ScanInputs<'a> {
    pub spec: ScanSpec,
    pub queries: &'a [f32],
    pub reduced: Reduced<'a>,
    pub q16: Option<&'a Q16>,
    pub q8: Option<&'a Q8>,
    /// The lists' packed copies this search keeps apart from the lists' own (one a list),
    /// where it scans them otherwise than the index's batches.
    pub packs: Option<&'a [PackCache]>,
    /// Scores each query's final candidates are known to reach (none: every score).
    pub floors: Option<&'a [f32]>,
}

/// One list's scan in a round: the queries probing it (indices into the search's queries),
/// every query's floor, whether the list takes the product, and the excluded keys where the
/// list holds any.
pub(crate) struct ListScan<'a> {
    pub list: &'a List,
    /// Where the list's packed copy is (built by the first scan that needs it): the list's
    /// own, or the search's (see `IvfIndex::search_exact`).
    pub packed: &'a PackCache,
    pub qs: &'a [u32],
    pub floors: &'a [f32],
    pub by_product: bool,
    pub excluded: Option<&'a FxHashSet<u64>>,
}

impl ScanInputs<'_> {
    /// Scans one list for the queries `job.qs`: returns each query's best `spec.kc` with
    /// scores >= its floor (list-local slots, unsorted), pair after pair, and puts their number
    /// in `counts[j]`.
    pub fn scan_list(&self, job: &ListScan<'_>, counts: &mut [u32]) -> Vec<Cand> {
        let mut out = Vec::new();
        SCRATCH.with_borrow_mut(|s| {
            let want = QUERY_BLOCK.min(job.qs.len().max(1));
            if s.sels.len() < want {
                s.sels.resize_with(want, Select::default);
            }
            // A product pays packing and setup per call: lists probed by fewer than
            // PRODUCT_MIN_QUERIES queries of the batch (both rounds) run the single-query
            // kernels.
            let product = self.spec.by_product && job.by_product;
            if product && (self.spec.product != Product::F32 || self.reduced.directions.is_some()) {
                self.scan_packed(job, &mut out, counts, s);
            } else if product {
                self.scan_f32_product(job, &mut out, counts, s);
            } else {
                self.scan_kernels(job, &mut out, counts, s);
            }
        });
        out
    }

    /// Few queries: the single-query kernels, exact scores.
    fn scan_kernels(
        &self,
        job: &ListScan<'_>,
        out: &mut Vec<Cand>,
        counts: &mut [u32],
        s: &mut Scratch,
    ) {
        let (dim, list) = (self.spec.dim, job.list);
        let (n, rows, keys) = (list.len(), list.rows(), list.keys.as_slice());
        let l2 = self.spec.metric == Metric::L2;
        if s.tile.len() < KERNEL_CHUNK {
            s.tile.resize(KERNEL_CHUNK, 0.0);
        }
        if s.ints.len() < KERNEL_CHUNK {
            s.ints.resize(KERNEL_CHUNK, 0);
        }
        for (j, &q) in job.qs.iter().enumerate() {
            let qv = &self.queries[q as usize * dim..(q as usize + 1) * dim];
            let sel = &mut s.sels[0];
            sel.reset(self.spec.kc, job.floors[q as usize]);
            let mut r0 = 0;
            while r0 < n {
                let r1 = (r0 + KERNEL_CHUNK).min(n);
                let chunk = rows.range(r0, r1, dim);
                let dequant: &[f32] = if l2 && matches!(chunk, Rows::I8 { .. }) {
                    chunk.to_f32(dim, &mut s.conv)
                } else {
                    &[]
                };
                let scores = &mut s.tile[..r1 - r0];
                let q16 = self.q16.map(|x| x.query(q as usize, dim));
                search::score_chunk(
                    self.spec.metric,
                    qv,
                    q16,
                    chunk,
                    dequant,
                    &mut s.ints,
                    scores,
                );
                push_scores(sel, (0, r0), scores, keys, job.excluded, &mut s.passing);
                r0 = r1;
            }
            let kept = sel.kept();
            out.extend_from_slice(kept);
            counts[j] = kept.len() as u32;
        }
    }

    /// A batch's f32 product over the rows as stored: blocks of queries against tiles of rows.
    fn scan_f32_product(
        &self,
        job: &ListScan<'_>,
        out: &mut Vec<Cand>,
        counts: &mut [u32],
        s: &mut Scratch,
    ) {
        let (spec, list, qs) = (self.spec, job.list, job.qs);
        let (dim, kc, m) = (spec.dim, spec.kc, qs.len());
        let (n, rows, keys) = (list.len(), list.rows(), list.keys.as_slice());
        let l2 = spec.metric == Metric::L2;
        let level = kernels::level();
        if l2 {
            row_sqnorms(rows, dim, &mut s.rnorms, &mut s.conv);
        }
        for b0 in (0..m).step_by(QUERY_BLOCK) {
            let b1 = (b0 + QUERY_BLOCK).min(m);
            let mb = b1 - b0;
            s.qbuf.clear();
            s.qnorms.clear();
            for &q in &qs[b0..b1] {
                let q = &self.queries[q as usize * dim..(q as usize + 1) * dim];
                s.qbuf.extend_from_slice(q);
                if l2 {
                    s.qnorms.push(kernels::sqnorm_f32(q));
                }
            }
            let packed = PackedQueries::new(spec.product, level, mb, dim, &s.qbuf);
            for (sel, &q) in s.sels[..mb].iter_mut().zip(&qs[b0..b1]) {
                sel.reset(kc, job.floors[q as usize]);
            }
            let rb = ((TILE_BYTES / 4 / mb).clamp(64, 1024) / 32 * 32).min(n.max(1));
            if s.tile.len() < mb * rb {
                s.tile.resize(mb * rb, 0.0);
            }
            let mut r0 = 0;
            while r0 < n {
                let r1 = (r0 + rb).min(n);
                let nb = r1 - r0;
                let src = rows.range(r0, r1, dim).into();
                let tile = &mut s.tile[..mb * nb];
                packed.scores(src, nb, tile, nb, &mut s.ws);
                for (i, sel) in s.sels[..mb].iter_mut().enumerate() {
                    let scores = &mut tile[i * nb..(i + 1) * nb];
                    if l2 {
                        let qn = s.qnorms[i];
                        for (v, &xn) in scores.iter_mut().zip(&s.rnorms[r0..r1]) {
                            *v = -(qn + xn - 2.0 * *v).max(0.0);
                        }
                    }
                    push_scores(sel, (0, r0), scores, keys, job.excluded, &mut s.passing);
                }
                r0 = r1;
            }
            for (i, sel) in s.sels[..mb].iter_mut().enumerate() {
                let kept = sel.kept();
                out.extend_from_slice(kept);
                counts[b0 + i] = kept.len() as u32;
            }
        }
    }

    /// The batch scan of one list with its rows packed (cached) as the left operand: the tile
    /// is rows x queries, scanned a row at a time against every query's running threshold.
    fn scan_packed(
        &self,
        job: &ListScan<'_>,
        out: &mut Vec<Cand>,
        counts: &mut [u32],
        s: &mut Scratch,
    ) {
        let (spec, list, qs) = (self.spec, job.list, job.qs);
        let (dim, kc, m) = (spec.dim, spec.kc, qs.len());
        let (n, keys) = (list.len(), list.keys.as_slice());
        let l2 = spec.metric == Metric::L2;
        let packed = job
            .packed
            .get_or_init(|| pack_rows(list, spec, self.reduced.directions, s));
        if l2 {
            row_sqnorms(list.rows(), dim, &mut s.rnorms, &mut s.conv);
        }
        // Queries per product: the (rows x queries) tile stays within TILE_BYTES.
        let qb = (TILE_BYTES / 4 / n.max(1)).clamp(LANES, QUERY_BLOCK);
        if s.sels.len() < qb.min(m) {
            s.sels.resize_with(qb.min(m), Select::default);
        }
        for b0 in (0..m).step_by(qb) {
            let b1 = (b0 + qb).min(m);
            let mb = b1 - b0;
            s.qnorms.clear();
            s.thr.clear();
            let src = self.block_operand(&qs[b0..b1], &mut s.qi8, &mut s.qsc, &mut s.qbuf);
            if l2 {
                for &q in &qs[b0..b1] {
                    let q = &self.queries[q as usize * dim..(q as usize + 1) * dim];
                    s.qnorms.push(kernels::sqnorm_f32(q));
                }
            }
            for (sel, &q) in s.sels[..mb].iter_mut().zip(&qs[b0..b1]) {
                sel.reset(kc, job.floors[q as usize]);
                s.thr.push(sel.threshold());
            }
            if s.tile.len() < n * mb {
                s.tile.resize(n * mb, 0.0);
            }
            let tile = &mut s.tile[..n * mb];
            if !l2 {
                // The product keeps only the scores reaching the queries' floors (most rows of
                // a far list reach none) and marks them: the scan visits the marked scores only.
                let words = mb.div_ceil(32);
                s.masks.resize(n * words, 0);
                let marks = Marks {
                    thr: &s.thr,
                    masks: &mut s.masks,
                };
                packed.scores_above(src, mb, tile, mb, marks, &mut s.ws);
                push_marked(&s.masks, words, tile, mb, keys, job.excluded, &mut s.sels);
            } else {
                packed.scores(src, mb, tile, mb, &mut s.ws);
                let norms = (s.rnorms.as_slice(), s.qnorms.as_slice());
                push_l2(tile, mb, norms, keys, job.excluded, &mut s.thr, &mut s.sels);
            }
            for (i, sel) in s.sels[..mb].iter_mut().enumerate() {
                let kept = sel.kept();
                out.extend_from_slice(kept);
                counts[b0 + i] = kept.len() as u32;
            }
        }
    }

    /// The right operand of a packed list's product for the queries `qs`: their i8 copies
    /// (the i8 product), else their values as the product multiplies them.
    fn block_operand<'s>(
        &self,
        qs: &[u32],
        qi8: &'s mut Vec<i8>,
        qsc: &'s mut Vec<f32>,
        qbuf: &'s mut Vec<f32>,
    ) -> Src<'s> {
        let pdim = self.spec.pdim;
        match (self.spec.product, self.q8) {
            (Product::I8, Some(q8)) => {
                qi8.clear();
                qsc.clear();
                for &q in qs {
                    let q = q as usize;
                    qi8.extend_from_slice(&q8.data[q * pdim..(q + 1) * pdim]);
                    qsc.push(q8.scales[q]);
                }
                Src::I8 {
                    data: qi8,
                    scales: qsc,
                }
            }
            _ => {
                qbuf.clear();
                let queries = self.reduced.queries;
                for &q in qs {
                    qbuf.extend_from_slice(&queries[q as usize * pdim..(q as usize + 1) * pdim]);
                }
                Src::F32(qbuf)
            }
        }
    }
}

/// One query's scan of one list by the product over the list's packed copy (built on first
/// use, as a batch builds it), its scores pushed into `sel` (list `l`), excluded keys skipped:
/// the scores a batch's product gives this query, for a single query that scans as batches do
/// ([`super::SingleScan::Product`]). `q8` is the query as the i8 product reads it; other
/// products read the reduced query `q` (`spec.pdim` values).
pub(crate) fn push_product(
    inputs: &ScanInputs<'_>,
    (list, l): (&List, u32),
    (q, q8): (&[f32], Option<(&[i8], f32)>),
    sel: &mut Select,
    excluded: Option<&FxHashSet<u64>>,
) {
    let spec = inputs.spec;
    debug_assert!(
        spec.metric != Metric::L2,
        "the single product scan ranks by inner product"
    );
    SCRATCH.with_borrow_mut(|s| {
        let n = list.len();
        let packed = list
            .packed
            .get_or_init(|| pack_rows(list, spec, inputs.reduced.directions, s));
        if s.tile.len() < n {
            s.tile.resize(n, 0.0);
        }
        let scores = &mut s.tile[..n];
        match q8 {
            Some((q8, scale)) => packed.scores_one_i8(q8, scale, scores, &mut s.ws),
            // bf16 / f32 products: the product of one column (the tile is rows x 1).
            None => packed.scores(Src::F32(q), 1, scores, 1, &mut s.ws),
        }
        let keys = list.keys.as_slice();
        push_scores(sel, (l, 0), scores, keys, excluded, &mut s.passing);
    });
}

/// Pushes the scores the product marked (`masks`: `words` words per row of `tile`, one bit per
/// query) into the queries' selections, skipping excluded keys.
fn push_marked(
    masks: &[u32],
    words: usize,
    tile: &[f32],
    mb: usize,
    keys: &[u64],
    excluded: Option<&FxHashSet<u64>>,
    sels: &mut [Select],
) {
    for (r, marks) in masks.chunks_exact(words).enumerate() {
        let key = keys[r];
        if marks.iter().all(|&w| w == 0) || excluded.is_some_and(|e| e.contains(&key)) {
            continue;
        }
        for (w, &word) in marks.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let j = w * 32 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let (v, sel) = (tile[r * mb + j], &mut sels[j]);
                if v >= sel.threshold() {
                    sel.push(Cand {
                        score: v,
                        list: 0,
                        slot: r as u32,
                        key,
                    });
                }
            }
        }
    }
}

/// Turns an L2 block's products (`tile`: rows x `mb` queries) into scores by the norms
/// (`norms`: the rows', the queries') and pushes those reaching each query's threshold
/// (`thr`, kept up to date) into its selection, skipping excluded keys.
fn push_l2(
    tile: &mut [f32],
    mb: usize,
    norms: (&[f32], &[f32]),
    keys: &[u64],
    excluded: Option<&FxHashSet<u64>>,
    thr: &mut [f32],
    sels: &mut [Select],
) {
    let (rnorms, qnorms) = norms;
    for (r, row) in tile.chunks_exact_mut(mb).enumerate() {
        let xn = rnorms[r];
        for (v, &qn) in row.iter_mut().zip(qnorms) {
            *v = -(qn + xn - 2.0 * *v).max(0.0);
        }
        let key = keys[r];
        for (c, (vals, thr)) in row.chunks(LANES).zip(thr.chunks_mut(LANES)).enumerate() {
            // One vectorizable test per 16 queries: most rows reach no query's threshold.
            if !vals
                .iter()
                .zip(thr.iter())
                .fold(false, |acc, (&v, &t)| acc | (v >= t))
            {
                continue;
            }
            if excluded.is_some_and(|e| e.contains(&key)) {
                break;
            }
            for (j, (&v, t)) in vals.iter().zip(thr.iter_mut()).enumerate() {
                if v >= *t {
                    let sel = &mut sels[c * LANES + j];
                    sel.push(Cand {
                        score: v,
                        list: 0,
                        slot: r as u32,
                        key,
                    });
                    *t = sel.threshold();
                }
            }
        }
    }
}

/// Buffers of one thread's code scans.
#[derive(Default)]
pub(crate) struct CodeScratch {
    pub table: Vec<f32>,
    pub lut: Vec<u8>,
    pub tables: kernels::PqTables,
    sums: Vec<u16>,
    passing: Vec<u32>,
    pub sel: Select,
}

/// Sums list `l`'s 4-bit codes through the query's tables (`s.tables`) and pushes the sums (as
/// scores) into `s.sel`, skipping excluded keys.
pub(crate) fn push_codes(
    s: &mut CodeScratch,
    list: &List,
    l: u32,
    codes: &[u8],
    excluded: Option<&FxHashSet<u64>>,
) {
    let bufs = (&mut s.sums, &mut s.passing);
    sum_codes((&s.tables, &mut s.sel), bufs, (list, l, codes), excluded);
}

/// [`push_codes`] for a query with its own tables and selection (`query`): several queries
/// scanned list-major.
pub(crate) fn push_codes_of(
    s: &mut CodeScratch,
    query: (&kernels::PqTables, &mut Select),
    (list, l, codes): (&List, u32, &[u8]),
    excluded: Option<&FxHashSet<u64>>,
) {
    sum_codes(
        query,
        (&mut s.sums, &mut s.passing),
        (list, l, codes),
        excluded,
    );
}

fn sum_codes(
    (tables, sel): (&kernels::PqTables, &mut Select),
    (sums, passing): (&mut Vec<u16>, &mut Vec<u32>),
    (list, l, codes): (&List, u32, &[u8]),
    excluded: Option<&FxHashSet<u64>>,
) {
    let level = kernels::level();
    let n = list.len();
    let rows = n.div_ceil(kernels::PQ_BLOCK) * kernels::PQ_BLOCK;
    sums.resize(rows, 0);
    kernels::pq_scan_with(level, tables, codes, &mut sums[..rows]);
    let keys = list.keys.as_slice();
    push_sums(sel, l, &sums[..n], keys, excluded, passing);
}
