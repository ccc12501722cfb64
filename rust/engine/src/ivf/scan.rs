//! The IVF search core: probing, list-major scans and the per-query merge.
//!
//! A batch (at least [`GEMM_MIN_QUERIES`] queries) groups its queries by list and scans each
//! probed list once for all of them as one matrix product at a scan precision: i8 and f16
//! lists with VNNI (rows packed to i8 once, queries quantized to i8), f16 lists with
//! AVX512-BF16 where VNNI is missing (both rounded to bf16), f32 lists (and CPUs without those
//! instructions) in f32. The product's scores are the candidate scores: each (query, list)
//! pair keeps its best `kc` (the product itself drops scores below the query's floor), a query
//! merges its pairs, and only then are its best candidates re-scored once, with the
//! single-query kernels (f16 / i8 lists) or from the float32 copies (`rerank`). Few queries
//! scan with the single-query kernels and need no re-score. Nothing here allocates per list or
//! per (query, list) pair: buffers live per rayon task, and results go to one flat array
//! indexed by pair.

use super::pq::Pq;
use super::{project, IvfIndex, List};
use crate::kernels;
use crate::matmul::{self, PackedQueries, Product, Src, Workspace};
use crate::search::{self, Plan, Rows};
use crate::topk::{Ranked, TopK};
use crate::types::{DType, Metric};
use rayon::prelude::*;
use rustc_hash::FxHashSet;
use std::cell::RefCell;

/// Queries per product block within one list.
const QUERY_BLOCK: usize = 256;
/// Target size of a (queries x rows) score tile.
const TILE_BYTES: usize = 256 * 1024;
/// Fewer queries of one list than this scan it with the single-query kernels.
const PRODUCT_MIN_QUERIES: usize = 8;
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

/// A list's rows packed as the left operand of the batch product (i8 or bf16), built once and
/// reused by every batch until the list changes. The queries are then the product's right
/// operand: a list costs a copy of its queries per batch, not a quantization and packing.
pub(crate) type PackCache = std::sync::OnceLock<PackedQueries>;

fn pack_rows(
    list: &List,
    spec: ScanSpec,
    directions: Option<&[f32]>,
    s: &mut Scratch,
) -> PackedQueries {
    let (dim, level, n) = (spec.dim, kernels::level(), list.len());
    // i8 rows dequantized and quantized again give back the same integers (the largest
    // |value| of a row is 127) and the scale to an ulp.
    let rows = list.rows().to_f32(dim, &mut s.conv);
    match directions {
        Some(d) => {
            project::project(rows, dim, d, spec.pdim, &mut s.proj, &mut s.ws);
            PackedQueries::new(spec.product, level, n, spec.pdim, &s.proj)
        }
        None => PackedQueries::new(spec.product, level, n, dim, rows),
    }
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

/// Pushes the scores of rows `[r0, r0 + scores.len())` of a list, skipping excluded keys.
#[inline(always)]
fn push_scores(
    sel: &mut Select,
    scores: &[f32],
    r0: usize,
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
            list: 0,
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

/// Scans one list for the queries `qs` (indices into `queries`); appends each query's best
/// `spec.kc` with scores >= its floor (list-local slots, unsorted) to `out`, pair after pair,
/// and their number to `counts[j]`.
#[allow(clippy::too_many_arguments)]
fn scan_list(
    spec: ScanSpec,
    list: &List,
    by_product: bool,
    qs: &[u32],
    queries: &[f32],
    reduced: Reduced<'_>,
    floors: &[f32],
    q16: Option<&Q16>,
    q8: Option<&Q8>,
    excluded: Option<&FxHashSet<u64>>,
    out: &mut Vec<Cand>,
    counts: &mut [u32],
    s: &mut Scratch,
) {
    let dim = spec.dim;
    let kc = spec.kc;
    let n = list.len();
    let rows = list.rows();
    let keys = list.keys.as_slice();
    let m = qs.len();
    if s.sels.len() < QUERY_BLOCK.min(m.max(1)) {
        s.sels
            .resize_with(QUERY_BLOCK.min(m.max(1)), Select::default);
    }
    let l2 = spec.metric == Metric::L2;
    // A product pays packing and setup per call: lists probed by fewer than
    // PRODUCT_MIN_QUERIES queries of the batch (both rounds) run the single-query kernels.
    let product = spec.parallel && by_product;
    if product && (spec.product != Product::F32 || reduced.directions.is_some()) {
        scan_list_packed(
            spec, list, qs, reduced, floors, q8, excluded, out, counts, s,
        );
        return;
    }
    if product {
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
                let q = &queries[q as usize * dim..(q as usize + 1) * dim];
                s.qbuf.extend_from_slice(q);
                if l2 {
                    s.qnorms.push(kernels::sqnorm_f32(q));
                }
            }
            let packed = PackedQueries::new(spec.product, level, mb, dim, &s.qbuf);
            for (sel, &q) in s.sels[..mb].iter_mut().zip(&qs[b0..b1]) {
                sel.reset(kc, floors[q as usize]);
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
                    push_scores(sel, scores, r0, keys, excluded, &mut s.passing);
                }
                r0 = r1;
            }
            for (i, sel) in s.sels[..mb].iter_mut().enumerate() {
                let kept = sel.kept();
                out.extend_from_slice(kept);
                counts[b0 + i] = kept.len() as u32;
            }
        }
        return;
    }
    // Few queries: the single-query kernels, exact scores.
    if s.tile.len() < KERNEL_CHUNK {
        s.tile.resize(KERNEL_CHUNK, 0.0);
    }
    if s.ints.len() < KERNEL_CHUNK {
        s.ints.resize(KERNEL_CHUNK, 0);
    }
    for (j, &q) in qs.iter().enumerate() {
        let qv = &queries[q as usize * dim..(q as usize + 1) * dim];
        let sel = &mut s.sels[0];
        sel.reset(kc, floors[q as usize]);
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
            let q16 = q16.map(|x| x.query(q as usize, dim));
            search::score_chunk(spec.metric, qv, q16, chunk, dequant, &mut s.ints, scores);
            push_scores(sel, scores, r0, keys, excluded, &mut s.passing);
            r0 = r1;
        }
        let kept = sel.kept();
        out.extend_from_slice(kept);
        counts[j] = kept.len() as u32;
    }
}

/// The batch scan of one list with its rows packed (cached) as the left operand: the tile is
/// rows x queries, scanned a row at a time against every query's running threshold.
#[allow(clippy::too_many_arguments)]
fn scan_list_packed(
    spec: ScanSpec,
    list: &List,
    qs: &[u32],
    reduced: Reduced<'_>,
    floors: &[f32],
    q8: Option<&Q8>,
    excluded: Option<&FxHashSet<u64>>,
    out: &mut Vec<Cand>,
    counts: &mut [u32],
    s: &mut Scratch,
) {
    const LANES: usize = 16;
    let (dim, pdim) = (spec.dim, spec.pdim);
    let queries = reduced.queries;
    let kc = spec.kc;
    let n = list.len();
    let keys = list.keys.as_slice();
    let m = qs.len();
    let l2 = spec.metric == Metric::L2;
    let packed = list
        .packed
        .get_or_init(|| pack_rows(list, spec, reduced.directions, s));
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
        let src = match (spec.product, q8) {
            (Product::I8, Some(q8)) => {
                s.qi8.clear();
                s.qsc.clear();
                for &q in &qs[b0..b1] {
                    let q = q as usize;
                    s.qi8.extend_from_slice(&q8.data[q * pdim..(q + 1) * pdim]);
                    s.qsc.push(q8.scales[q]);
                }
                Src::I8 {
                    data: &s.qi8,
                    scales: &s.qsc,
                }
            }
            _ => {
                s.qbuf.clear();
                for &q in &qs[b0..b1] {
                    s.qbuf
                        .extend_from_slice(&queries[q as usize * pdim..(q as usize + 1) * pdim]);
                }
                Src::F32(&s.qbuf)
            }
        };
        if l2 {
            for &q in &qs[b0..b1] {
                let q = &queries[q as usize * dim..(q as usize + 1) * dim];
                s.qnorms.push(kernels::sqnorm_f32(q));
            }
        }
        for (sel, &q) in s.sels[..mb].iter_mut().zip(&qs[b0..b1]) {
            sel.reset(kc, floors[q as usize]);
            s.thr.push(sel.threshold());
        }
        if s.tile.len() < n * mb {
            s.tile.resize(n * mb, 0.0);
        }
        let tile = &mut s.tile[..n * mb];
        if !l2 {
            // The product keeps only the scores reaching the queries' floors (most rows of a
            // far list reach none) and marks them: the scan visits the marked scores only.
            let words = mb.div_ceil(32);
            s.masks.resize(n * words, 0);
            packed.scores_above(src, mb, &s.thr, tile, mb, &mut s.masks, &mut s.ws);
            for (r, marks) in s.masks.chunks_exact(words).enumerate() {
                let key = keys[r];
                if marks.iter().all(|&w| w == 0) || excluded.is_some_and(|e| e.contains(&key)) {
                    continue;
                }
                for (w, &word) in marks.iter().enumerate() {
                    let mut bits = word;
                    while bits != 0 {
                        let j = w * 32 + bits.trailing_zeros() as usize;
                        bits &= bits - 1;
                        let (v, sel) = (tile[r * mb + j], &mut s.sels[j]);
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
        } else {
            // L2 scores need both norms: turn each row into scores, then test it.
            packed.scores(src, mb, tile, mb, &mut s.ws);
            for (r, row) in tile.chunks_exact_mut(mb).enumerate() {
                let xn = s.rnorms[r];
                for (v, &qn) in row.iter_mut().zip(&s.qnorms) {
                    *v = -(qn + xn - 2.0 * *v).max(0.0);
                }
                let key = keys[r];
                for (c, (vals, thr)) in row.chunks(LANES).zip(s.thr.chunks_mut(LANES)).enumerate() {
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
                            let sel = &mut s.sels[c * LANES + j];
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
        for (i, sel) in s.sels[..mb].iter_mut().enumerate() {
            let kept = sel.kept();
            out.extend_from_slice(kept);
            counts[b0 + i] = kept.len() as u32;
        }
    }
}

/// The candidates of scanned (query, list) pairs: one vector per list scanned, and for pair
/// `i` its list and range there.
struct PairHits {
    by_list: Vec<Vec<Cand>>,
    ranges: Vec<(u32, u32, u32)>,
}

impl PairHits {
    /// Pair `i`'s candidates (list-local slots) and its list.
    fn get(&self, i: usize) -> (&[Cand], u32) {
        let (l, a, b) = self.ranges[i];
        (&self.by_list[l as usize][a as usize..b as usize], l)
    }
}

/// Probes per query scanned in the first round (they set the floors of the second).
const ROUND1_PROBES: usize = 4;

impl IvfIndex {
    /// Scans every probed list once for all the queries probing it (list-major) and merges
    /// each query's candidates: its best `spec.kc` by scan score, best first.
    ///
    /// Two rounds: first each query's nearest lists only (up to [`ROUND1_PROBES`]), which give
    /// every query a floor (its `kc`-th best score there; the final `kc`-th best can only be
    /// higher), then the other probed lists, where a (query, list) pair keeps only scores at or
    /// above the floor: most rows of a far list are dropped by one comparison, not sorted.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn scan_lists_into(
        &self,
        spec: ScanSpec,
        queries: &[f32],
        reduced: Reduced<'_>,
        probes: &(Vec<usize>, Vec<u32>),
        q16: Option<&Q16>,
        q8: Option<&Q8>,
        excluded: &FxHashSet<u64>,
        excluded_per_list: &[usize],
    ) -> Vec<Vec<Cand>> {
        let dim = self.dim;
        let nq = queries.len() / dim;
        let kc = spec.kc;
        let (offsets, flat) = probes;
        // Both rounds are query-major: query q's pairs are [r_start[q], r_start[q + 1]).
        let split = |q: usize| (offsets[q + 1] - offsets[q]).min(ROUND1_PROBES);
        let mut r1_start = Vec::with_capacity(nq + 1);
        let mut r2_start = Vec::with_capacity(nq + 1);
        let mut round1 = Vec::new();
        let mut round2 = Vec::new();
        r1_start.push(0);
        r2_start.push(0);
        for q in 0..nq {
            let mine = &flat[offsets[q]..offsets[q + 1]];
            let (near, far) = mine.split_at(split(q));
            round1.extend(near.iter().map(|&l| (q as u32, l)));
            round2.extend(far.iter().map(|&l| (q as u32, l)));
            r1_start.push(round1.len());
            r2_start.push(round2.len());
        }
        // Each list is scanned the same way in both rounds (so a query's scores from one list
        // do not depend on the round): by the product if the batch probes it often enough.
        let mut probed = vec![0usize; self.lists.len()];
        for &l in flat.iter() {
            probed[l as usize] += 1;
        }
        // A reduced scan's scores are not the exact ones: every list takes the product then.
        let reduced_scan = reduced.directions.is_some();
        let by_product: Vec<bool> = probed
            .iter()
            .map(|&c| c >= PRODUCT_MIN_QUERIES || reduced_scan)
            .collect();
        let mut floors = vec![f32::NEG_INFINITY; nq];
        let h1 = self.scan_pairs(
            spec,
            &by_product,
            queries,
            reduced,
            &round1,
            &floors,
            q16,
            q8,
            excluded,
            excluded_per_list,
        );
        let merge_round1 = |sel: &mut Select, q: usize| {
            sel.reset(kc, f32::NEG_INFINITY);
            for i in r1_start[q]..r1_start[q + 1] {
                let (cands, l) = h1.get(i);
                for c in cands {
                    sel.push(Cand { list: l, ..*c });
                }
            }
        };
        let floor_of = |sel: &mut Select, q: usize| -> f32 {
            merge_round1(sel, q);
            let best = sel.sorted();
            if best.len() >= kc {
                best[kc - 1].score
            } else {
                f32::NEG_INFINITY
            }
        };
        if spec.parallel {
            floors
                .par_iter_mut()
                .enumerate()
                .for_each_init(Select::default, |sel, (q, f)| *f = floor_of(sel, q));
        } else {
            let mut sel = Select::default();
            for (q, f) in floors.iter_mut().enumerate() {
                *f = floor_of(&mut sel, q);
            }
        }
        let h2 = self.scan_pairs(
            spec,
            &by_product,
            queries,
            reduced,
            &round2,
            &floors,
            q16,
            q8,
            excluded,
            excluded_per_list,
        );
        let merge = |sel: &mut Select, q: usize| -> Vec<Cand> {
            merge_round1(sel, q);
            for i in r2_start[q]..r2_start[q + 1] {
                let (cands, l) = h2.get(i);
                for c in cands {
                    if c.score >= sel.threshold() {
                        sel.push(Cand { list: l, ..*c });
                    }
                }
            }
            sel.sorted().to_vec()
        };
        if spec.parallel {
            (0..nq)
                .into_par_iter()
                .map_init(Select::default, merge)
                .collect()
        } else {
            let mut sel = Select::default();
            (0..nq).map(|q| merge(&mut sel, q)).collect()
        }
    }

    /// Scans the (query, list) `pairs`, list-major: each list once for all its queries.
    #[allow(clippy::too_many_arguments)]
    fn scan_pairs(
        &self,
        spec: ScanSpec,
        by_product: &[bool],
        queries: &[f32],
        reduced: Reduced<'_>,
        pairs: &[(u32, u32)],
        floors: &[f32],
        q16: Option<&Q16>,
        q8: Option<&Q8>,
        excluded: &FxHashSet<u64>,
        excluded_per_list: &[usize],
    ) -> PairHits {
        let nlist = self.lists.len();
        // Pairs grouped by list (CSR), remembering each pair's place.
        let mut start = vec![0usize; nlist + 1];
        for &(_, l) in pairs {
            start[l as usize + 1] += 1;
        }
        for l in 0..nlist {
            start[l + 1] += start[l];
        }
        let mut fill = start.clone();
        let mut list_queries = vec![0u32; pairs.len()];
        let mut place = vec![0u32; pairs.len()];
        for (i, &(q, l)) in pairs.iter().enumerate() {
            let at = fill[l as usize];
            list_queries[at] = q;
            place[i] = at as u32;
            fill[l as usize] += 1;
        }
        drop(fill);
        let mut counts = vec![0u32; pairs.len()];
        let mut jobs = Vec::new();
        {
            let mut rest: &mut [u32] = &mut counts;
            for l in 0..nlist {
                let len = start[l + 1] - start[l];
                let (n, rn) = std::mem::take(&mut rest).split_at_mut(len);
                rest = rn;
                if len > 0 && self.lists[l].len() > 0 {
                    jobs.push((l, n));
                }
            }
        }
        let run = |(l, n): (usize, &mut [u32])| -> (usize, Vec<Cand>) {
            let ex = (excluded_per_list[l] > 0).then_some(excluded);
            let mut out = Vec::new();
            SCRATCH.with_borrow_mut(|s| {
                scan_list(
                    spec,
                    &self.lists[l],
                    by_product[l],
                    &list_queries[start[l]..start[l + 1]],
                    queries,
                    reduced,
                    floors,
                    q16,
                    q8,
                    ex,
                    &mut out,
                    n,
                    s,
                )
            });
            (l, out)
        };
        let outs: Vec<(usize, Vec<Cand>)> = if spec.parallel {
            // Most work first, so no long list is left to the end.
            let work = |l: usize| self.lists[l].len() * (start[l + 1] - start[l]);
            jobs.sort_by_key(|(l, _)| std::cmp::Reverse(work(*l)));
            jobs.into_par_iter().with_max_len(1).map(run).collect()
        } else {
            jobs.into_iter().map(run).collect()
        };
        let mut by_list: Vec<Vec<Cand>> = (0..nlist).map(|_| Vec::new()).collect();
        for (l, out) in outs {
            by_list[l] = out;
        }
        // Slot `at` (list-major) -> (list, range in that list's output).
        let mut slot_range = vec![(0u32, 0u32, 0u32); pairs.len()];
        for l in 0..nlist {
            let mut off = 0u32;
            for at in start[l]..start[l + 1] {
                slot_range[at] = (l as u32, off, off + counts[at]);
                off += counts[at];
            }
        }
        let ranges = place.iter().map(|&at| slot_range[at as usize]).collect();
        PairHits { by_list, ranges }
    }
}

/// Buffers of one thread's code scans.
#[derive(Default)]
struct CodeScratch {
    table: Vec<f32>,
    lut: Vec<u8>,
    tables: kernels::PqTables,
    sums: Vec<u16>,
    passing: Vec<u32>,
    sel: Select,
}

impl IvfIndex {
    /// Each query's best `spec.kc` candidates by its 4-bit codes (see `pq.rs`): the probed
    /// lists' codes are summed through the query's lookup table, one list after another.
    /// Candidate scores are those sums (to be re-scored).
    pub(crate) fn scan_codes(
        &self,
        book: &Pq,
        spec: ScanSpec,
        queries: &[f32],
        probes: &(Vec<usize>, Vec<u32>),
        excluded: &FxHashSet<u64>,
    ) -> Vec<Vec<Cand>> {
        let dim = spec.dim;
        let (offsets, flat) = probes;
        let level = kernels::level();
        let l2 = spec.metric == Metric::L2;
        let one = |s: &mut CodeScratch, q: usize| -> Vec<Cand> {
            let qv = &queries[q * dim..(q + 1) * dim];
            book.lut(qv, l2, &mut s.table, &mut s.lut);
            s.tables.set(level, &s.lut);
            s.sel.reset(spec.kc, f32::NEG_INFINITY);
            let mine = &flat[offsets[q]..offsets[q + 1]];
            for (i, &l) in mine.iter().enumerate() {
                let list = &self.lists[l as usize];
                let n = list.len();
                let Some(codes) = list.codes.as_ref().filter(|_| n > 0) else {
                    continue;
                };
                // Lists lie apart in memory: start loading the next one while this one is
                // scanned.
                if let Some(next) = mine
                    .get(i + 1)
                    .and_then(|&m| self.lists[m as usize].codes.as_ref())
                {
                    kernels::prefetch(next.as_slice());
                }
                let rows = n.div_ceil(kernels::PQ_BLOCK) * kernels::PQ_BLOCK;
                s.sums.resize(rows, 0);
                kernels::pq_scan_with(level, &s.tables, codes.as_slice(), &mut s.sums[..rows]);
                let ex = (!excluded.is_empty()).then_some(excluded);
                let keys = list.keys.as_slice();
                push_sums(&mut s.sel, l, &s.sums[..n], keys, ex, &mut s.passing);
            }
            s.sel.kept().to_vec()
        };
        // Few queries (a batch scans the lists themselves): on the calling thread.
        let mut s = CodeScratch::default();
        (0..queries.len() / dim).map(|q| one(&mut s, q)).collect()
    }
}
