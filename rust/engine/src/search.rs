//! The shared search core: exact top-k of queries against stored rows, used by `Index::search`
//! and by `mine_hard_negatives`.
//!
//! Few queries run the SIMD kernels straight over the stored type (memory-bound: f16 and i8
//! read half and a quarter of the bytes). Batches run as blocked matrix products
//! ([`crate::matmul`]) of a query block against a corpus block, and feed per-query bounded
//! heaps; no q x n score matrix ever exists. Work is split over rayon into (query block, corpus
//! part) tasks, whose heaps are merged per query block.
//!
//! A batch may scan in lower precision ([`Scan`]): i8 products (VNNI) or bf16 products
//! (AVX512-BF16) keep the top `k + margin` candidates per query, which are then re-scored
//! exactly with the per-row kernels (the same scores a single-query search gives) before the
//! top k are kept. Where the CPU lacks the instructions the scan runs f32 products, re-scored
//! the same way ([`Scan::Rescored`]); only f32 rows report the f32 product's scores.

use crate::kernels;
use crate::matmul::{self, PackedQueries, PackedRows, Product, Src, Workspace};
use crate::topk::{Hit, TopK};
use crate::types::Metric;
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;
use std::ops::Range;

/// Below this many queries a search runs the per-row kernels instead of matrix products.
pub const GEMM_MIN_QUERIES: usize = 8;
/// Queries per matrix-product block. 512 x 1,024 tiles measured ~4% less CPU time than
/// 256 x 1,024 (examples/mine_probe.rs): the corpus block is packed and converted half as often.
const QUERY_BLOCK: usize = 512;
/// Corpus rows per matrix-product block, at most: fewer for large query blocks, so that the
/// score tile (queries x rows) stays within [`TILE_BYTES`] (L2) between the product that
/// writes it and the top-k scan that reads it.
const ROW_BLOCK: usize = 1024;
/// Target size of a score tile.
const TILE_BYTES: usize = 512 * 1024;
/// Corpus rows per kernel chunk (fits L1/L2 while every query of the batch scans it).
const KERNEL_CHUNK: usize = 256;
/// A corpus part is not split below this many rows (task overhead would dominate).
const MIN_PART_ROWS: usize = 4096;
/// The re-score prefetches the row of the candidate this many ahead.
const RESCORE_PREFETCH: usize = 4;

/// How a batched search scans before keeping its top k.
#[derive(Clone, Copy)]
pub enum Scan<'a> {
    /// Score the rows at their stored precision (f32 products; f16 converted while packing,
    /// i8 rows dequantized).
    Exact,
    /// bf16 products over the rows rounded to bf16 while packing, then an exact re-score.
    Bf16,
    /// i8 products over this quantized copy of the rows (the rows themselves when they are
    /// stored as i8), then an exact re-score.
    I8 { data: &'a [i8], scales: &'a [f32] },
    /// i8 or bf16 products over a copy of all the rows packed once for the whole search (many
    /// query blocks over the same rows: mining), then an exact re-score.
    Packed(&'a PackedRows),
    /// f32 products over the rows as stored (f16 converted, i8 dequantized), then an exact
    /// re-score with the per-row kernels, so that a batch reports what single queries report.
    /// Over f32 / f16 rows it is certified: a query whose `k`-th score lies within the
    /// product's error bound of the candidates left out is searched again with the per-row
    /// kernels (ties and near-ties beyond the margin cannot change the result).
    Rescored,
}

/// The precision a mining scan runs at (`precision=` in `mine_hard_negatives`). Scores and
/// the returned order are exact f32 (or the `dtype`'s) either way: see [`Scan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanPrecision {
    F32,
    Bf16,
    I8,
}

impl ScanPrecision {
    /// The matrix product a scan at this precision runs.
    pub fn product(self) -> Product {
        match self {
            ScanPrecision::F32 => Product::F32,
            ScanPrecision::Bf16 => Product::Bf16,
            ScanPrecision::I8 => Product::I8,
        }
    }

    pub fn parse(name: &str) -> crate::error::Result<Self> {
        match name {
            "f32" => Ok(ScanPrecision::F32),
            "bf16" => Ok(ScanPrecision::Bf16),
            "i8" => Ok(ScanPrecision::I8),
            other => crate::error::invalid(format!(
                "unknown precision {other:?}: expected one of \"f32\", \"bf16\", \"i8\""
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ScanPrecision::F32 => "f32",
            ScanPrecision::Bf16 => "bf16",
            ScanPrecision::I8 => "i8",
        }
    }

    /// Whether this CPU (at the current SIMD level) runs the scan in this precision; where it
    /// does not, the scan is exact (same results, no speed-up).
    pub fn is_accelerated(self) -> bool {
        match self {
            ScanPrecision::F32 => true,
            ScanPrecision::Bf16 => matmul::has_bf16_product(kernels::level()),
            ScanPrecision::I8 => matmul::has_i8_product(kernels::level()),
        }
    }
}

/// Candidates a low-precision scan keeps per query for the exact re-score: `k + margin(k)`.
/// The margin absorbs the scan's rounding: a true top-k row is lost only if more than
/// `margin` rows overtake it in the scan (see docs/mining.md for the measured agreement).
pub fn scan_candidates(k: usize, scan: Scan<'_>) -> usize {
    if let Scan::Rescored = scan {
        return k + k.max(16);
    }
    match scan.product() {
        Product::F32 => k,
        // bf16 keeps 8 significant bits (~1e-4 of a unit-vector score over dim 512): a
        // smaller margin suffices than for i8 (~1e-3).
        Product::Bf16 => k + k.max(16),
        Product::I8 => k + k.max(32),
    }
}

impl Scan<'_> {
    /// The matrix product the scan runs.
    fn product(&self) -> Product {
        match self {
            Scan::Exact | Scan::Rescored => Product::F32,
            Scan::Bf16 => Product::Bf16,
            Scan::I8 { .. } => Product::I8,
            Scan::Packed(p) => p.product(),
        }
    }

    /// The scan the index uses for a batch over `rows` at this level: the rows' own i8 data
    /// with VNNI, bf16 over f16 rows with AVX512-BF16, else exact.
    pub fn auto(rows: Rows<'_>, level: kernels::Level) -> Scan<'_> {
        match rows {
            Rows::I8 { data, scales } if matmul::has_i8_product(level) => Scan::I8 { data, scales },
            Rows::F16(_) if matmul::has_bf16_product(level) => Scan::Bf16,
            _ => Scan::Exact,
        }
    }

    fn is_exact(&self) -> bool {
        matches!(self, Scan::Exact)
    }
}

/// A borrowed run of stored rows, `dim` values each.
#[derive(Clone, Copy)]
pub enum Rows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    /// Row `r` is `scales[r] * data[r]`.
    I8 {
        data: &'a [i8],
        scales: &'a [f32],
    },
}

impl<'a> From<Rows<'a>> for Src<'a> {
    /// The same rows as a product's operand.
    fn from(rows: Rows<'a>) -> Src<'a> {
        match rows {
            Rows::F32(v) => Src::F32(v),
            Rows::F16(v) => Src::F16(v),
            Rows::I8 { data, scales } => Src::I8 { data, scales },
        }
    }
}

impl<'a> Rows<'a> {
    pub fn count(&self, dim: usize) -> usize {
        match self {
            Rows::F32(v) => v.len() / dim,
            Rows::F16(v) => v.len() / dim,
            Rows::I8 { scales, .. } => scales.len(),
        }
    }

    pub fn range(&self, start: usize, end: usize, dim: usize) -> Rows<'a> {
        match *self {
            Rows::F32(v) => Rows::F32(&v[start * dim..end * dim]),
            Rows::F16(v) => Rows::F16(&v[start * dim..end * dim]),
            Rows::I8 { data, scales } => Rows::I8 {
                data: &data[start * dim..end * dim],
                scales: &scales[start..end],
            },
        }
    }

    /// The stored bytes of row `row` (for prefetching).
    fn row_bytes(&self, row: usize, dim: usize) -> &'a [u8] {
        let r = row * dim..(row + 1) * dim;
        match *self {
            Rows::F32(v) => bytemuck::cast_slice(&v[r]),
            Rows::F16(v) => bytemuck::cast_slice(&v[r]),
            Rows::I8 { data, .. } => bytemuck::cast_slice(&data[r]),
        }
    }

    /// The rows as f32: borrowed when stored as f32, else converted into `buf`.
    pub fn to_f32<'b>(&self, dim: usize, buf: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        match *self {
            Rows::F32(v) => v,
            Rows::F16(v) => {
                buf.resize(v.len(), 0.0);
                kernels::f16_to_f32(v, buf);
                buf
            }
            Rows::I8 { data, scales } => {
                buf.clear();
                for (row, &s) in data.chunks_exact(dim).zip(scales) {
                    buf.extend(row.iter().map(|&x| x as f32 * s));
                }
                buf
            }
        }
    }
}

/// Borrowed queries, `dim` values each.
#[derive(Clone, Copy)]
pub enum Queries<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> Queries<'a> {
    pub fn count(&self, dim: usize) -> usize {
        match self {
            Queries::F32(v) => v.len() / dim,
            Queries::F16(v) => v.len() / dim,
        }
    }

    fn block_to_f32(&self, start: usize, end: usize, dim: usize, buf: &mut Vec<f32>) {
        buf.clear();
        match *self {
            Queries::F32(v) => buf.extend_from_slice(&v[start * dim..end * dim]),
            Queries::F16(v) => {
                buf.resize((end - start) * dim, 0.0);
                v[start * dim..end * dim].convert_to_f32_slice(buf);
            }
        }
    }
}

/// What a search computes.
#[derive(Clone, Copy)]
pub struct Plan {
    pub dim: usize,
    pub metric: Metric,
    /// Scale queries to unit length first (cosine).
    pub normalize_queries: bool,
    /// Divide scores by the row's length (cosine over rows not stored normalized).
    pub normalize_rows: bool,
}

/// One exact top-k search: the best `k` of `rows` for each of `queries`, as `plan` scores
/// them. `eligible(q, row)` filters candidates, `row_id(row)` gives the id reported and used
/// to break ties.
#[derive(Clone, Copy)]
pub struct Search<'a, E, I> {
    pub plan: Plan,
    pub rows: Rows<'a>,
    pub queries: Queries<'a>,
    pub k: usize,
    pub eligible: &'a E,
    pub row_id: &'a I,
}

impl<E, I> Search<'_, E, I>
where
    E: Fn(usize, usize) -> bool + Sync,
    I: Fn(usize) -> u64 + Sync,
{
    /// Top-`k` per query into `out_ids` / `out_scores` (`nq * k` each, best first). Slots
    /// beyond the eligible candidates get id `u64::MAX` and the metric's missing score.
    /// Batches scan as [`Scan::auto`] picks.
    pub fn run(&self, out_ids: &mut [u64], out_scores: &mut [f32]) {
        let scan = match (self.rows, self.plan.metric) {
            // l2 through a product (|q|^2 + |x|^2 - 2 q.x) cancels: its rounding (bf16's
            // above all) reordered rows that single queries tell apart, and its scores were
            // not the single-query ones. f16 rows under l2 re-score and certify instead.
            (Rows::F16(_), Metric::L2) => Scan::Rescored,
            (Rows::F32(_), _) => Scan::Exact,
            // f16 / i8 rows where the CPU lacks the bf16 / i8 product (AVX2, scalar) would
            // otherwise report the exact f32 product's scores: another summation order than
            // the per-row kernels' (f16 "cos" batches at AVX2 ordered tied rows otherwise),
            // and for i8 under "ip" / "cos" not the kernels' i16-quantized query. The same
            // re-score applies, certified where [`Self::certifies`] says the bound holds.
            (rows, _) => match Scan::auto(rows, kernels::level()) {
                Scan::Exact => Scan::Rescored,
                low_precision => low_precision,
            },
        };
        self.run_scan(scan, out_ids, out_scores)
    }

    /// [`Self::run`] with the batch scan chosen by the caller (a [`Scan::I8`] copy must hold
    /// the same rows as `rows`). The reported scores are always the exact ones.
    ///
    /// The work is split into (query block, corpus part) tasks over rayon; each part's heaps
    /// are merged per query block.
    pub fn run_scan(&self, scan: Scan<'_>, out_ids: &mut [u64], out_scores: &mut [f32]) {
        let (dim, k) = (self.plan.dim, self.k);
        let nq = self.queries.count(dim);
        let n = self.rows.count(dim);
        assert_eq!(out_ids.len(), nq * k);
        assert_eq!(out_scores.len(), nq * k);
        if nq == 0 || k == 0 {
            return;
        }
        let use_gemm = self.plan.normalize_rows || nq >= GEMM_MIN_QUERIES;
        // Blocks of equal size (at most QUERY_BLOCK), so no small tail block idles a core.
        let qb = if use_gemm {
            nq.div_ceil(nq.div_ceil(QUERY_BLOCK))
        } else {
            nq
        };
        let n_qblocks = nq.div_ceil(qb);
        // Every query block reads the same rows: their norms are computed once per call.
        let sqnorms = if use_gemm && self.needs_row_norms(scan) {
            all_row_sqnorms(self.rows, dim)
        } else {
            Vec::new()
        };
        let wanted_tasks = rayon::current_num_threads() * 4;
        let parts = wanted_tasks
            .div_ceil(n_qblocks)
            .min((n / MIN_PART_ROWS).max(1));
        // Parts start on multiples of 32 rows: the panel width of rows packed once.
        let split = |part: usize| {
            if part == parts {
                n
            } else {
                n * part / parts / 32 * 32
            }
        };

        out_ids
            .par_chunks_mut(qb * k)
            .zip(out_scores.par_chunks_mut(qb * k))
            .enumerate()
            .for_each(|(block, (ids, scores))| {
                let queries = block * qb..((block + 1) * qb).min(nq);
                let run = |part: usize| {
                    let rows = split(part)..split(part + 1);
                    if use_gemm {
                        self.gemm_task(scan, queries.clone(), rows, &sqnorms)
                    } else {
                        self.kernel_task(queries.clone(), rows)
                    }
                };
                let heaps = if parts == 1 {
                    run(0)
                } else {
                    (0..parts)
                        .into_par_iter()
                        .map(run)
                        .reduce_with(|mut a, b| {
                            for (x, y) in a.iter_mut().zip(b) {
                                x.merge(y);
                            }
                            a
                        })
                        .expect("at least one part")
                };
                self.write_hits(heaps, ids, scores);
            });
    }

    /// Each query's hits, best first, into its `k` slots (the empty ones marked missing).
    fn write_hits(&self, heaps: Vec<TopK>, ids: &mut [u64], scores: &mut [f32]) {
        let (k, metric) = (self.k, self.plan.metric);
        for (i, heap) in heaps.into_iter().enumerate() {
            let hits = heap.into_sorted();
            let id_row = &mut ids[i * k..(i + 1) * k];
            let score_row = &mut scores[i * k..(i + 1) * k];
            for j in 0..k {
                match hits.get(j) {
                    Some(h) => {
                        id_row[j] = h.id;
                        score_row[j] = metric.to_external(h.score);
                    }
                    None => {
                        id_row[j] = u64::MAX;
                        score_row[j] = metric.missing_score();
                    }
                }
            }
        }
    }

    /// Queries `queries` against rows `part` with the per-row kernels (few queries).
    fn kernel_task(&self, queries: Range<usize>, part: Range<usize>) -> Vec<TopK> {
        let (plan, rows, dim) = (self.plan, self.rows, self.plan.dim);
        let mut qbuf = Vec::new();
        prepare_queries(plan, self.queries, queries.clone(), &mut qbuf);
        // i8 dot products run in integers against an i16 copy of each query.
        let mut q16: Vec<Vec<i16>> = Vec::new();
        let mut q16_scale = Vec::new();
        if matches!(rows, Rows::I8 { .. }) && plan.metric != Metric::L2 {
            for q in qbuf.chunks_exact(dim) {
                let mut v = Vec::new();
                q16_scale.push(kernels::quantize_query_i16(q, &mut v));
                q16.push(v);
            }
        }
        let mut heaps: Vec<TopK> = queries.clone().map(|_| TopK::new(self.k)).collect();
        let mut passing = Vec::new();
        let mut scores = vec![0.0f32; KERNEL_CHUNK];
        let mut ints = vec![0i64; KERNEL_CHUNK];
        let mut dequant = Vec::new();
        let mut c0 = part.start;
        while c0 < part.end {
            let c1 = (c0 + KERNEL_CHUNK).min(part.end);
            let chunk = rows.range(c0, c1, dim);
            let out = &mut scores[..c1 - c0];
            // l2 over i8 rows runs on the chunk dequantized once for all queries
            let i8_l2 = matches!(chunk, Rows::I8 { .. }) && plan.metric == Metric::L2;
            if i8_l2 {
                chunk.to_f32(dim, &mut dequant);
            }
            for (i, heap) in heaps.iter_mut().enumerate() {
                let q = &qbuf[i * dim..(i + 1) * dim];
                let q16 = q16.get(i).map(|v| (v.as_slice(), q16_scale[i]));
                score_chunk(plan.metric, q, q16, chunk, &dequant, &mut ints, out);
                let (query, (eligible, row_id)) = (queries.start + i, (self.eligible, self.row_id));
                push_candidates(heap, out, query, c0, eligible, row_id, &mut passing);
            }
            c0 = c1;
        }
        heaps
    }

    /// Queries `queries` against rows `part` as blocked matrix products: a tile of scores per
    /// block of rows feeds the heaps. A low-precision `scan` keeps row indices, re-scored
    /// exactly at the end ([`Self::rescore`]); an exact one keeps the final ids. `sqnorms`
    /// holds every row's `|row|^2` where [`Self::needs_row_norms`] (empty otherwise).
    fn gemm_task(
        &self,
        scan: Scan<'_>,
        queries: Range<usize>,
        part: Range<usize>,
        sqnorms: &[f32],
    ) -> Vec<TopK> {
        let mut qbuf = Vec::new();
        prepare_queries(self.plan, self.queries, queries.clone(), &mut qbuf);
        let mut heaps = self.gemm_scan(scan, &qbuf, queries.start, part.clone(), sqnorms);
        if scan.is_exact() {
            return heaps;
        }
        let left_out = left_out_bounds(&mut heaps, scan_candidates(self.k, scan));
        let mut converted = Vec::new();
        if !self.certifies(scan) {
            return self.rescore(&qbuf, heaps, &[], &mut converted);
        }
        let max_sqnorm = sqnorms[part.clone()].iter().fold(0.0f32, |m, &v| m.max(v));
        let bounds: Vec<f32> = qbuf
            .chunks_exact(self.plan.dim)
            .map(|q| product_error_bound(self.plan.dim, q, max_sqnorm))
            .collect();
        // Cosine over rows not stored normalized divides the scores by the rows' lengths,
        // which the bound does not cover: there every candidate is re-scored.
        let floors = if self.plan.normalize_rows {
            Vec::new()
        } else {
            rescore_floors(&mut heaps, self.k, &bounds)
        };
        let mut best = self.rescore(&qbuf, heaps, &floors, &mut converted);
        self.certify(&mut best, &left_out, &bounds, queries, part);
        best
    }

    /// Whether a batch scan reads the rows' norms: l2 and cosine over rows not stored
    /// normalized finish the products with them, certification bounds by the largest.
    fn needs_row_norms(&self, scan: Scan<'_>) -> bool {
        self.plan.metric == Metric::L2 || self.plan.normalize_rows || self.certifies(scan)
    }

    /// Certification (`Scan::Rescored` over f32 / f16 rows) needs the largest row norm.
    /// (i8 rows only under l2, whose per-row kernel reads the dequantized rows in f32; under
    /// ip / cos it quantizes the query, which the bound does not cover.)
    fn certifies(&self, scan: Scan<'_>) -> bool {
        matches!(scan, Scan::Rescored)
            && (self.plan.metric == Metric::L2 || !matches!(self.rows, Rows::I8 { .. }))
    }

    /// The products of [`Self::gemm_task`]: each query's best candidates in `part` (final ids
    /// for an exact `scan`, row indices otherwise). `qbuf` holds the prepared queries, the
    /// block starting at query `q0`; `sqnorms` every row's `|row|^2` where the scan needs them.
    fn gemm_scan(
        &self,
        scan: Scan<'_>,
        qbuf: &[f32],
        q0: usize,
        part: Range<usize>,
        sqnorms: &[f32],
    ) -> Vec<TopK> {
        let (plan, dim) = (self.plan, self.plan.dim);
        let nq = qbuf.len() / dim;
        let query_norms: Vec<f32> = if plan.metric == Metric::L2 {
            qbuf.chunks_exact(dim).map(kernels::sqnorm_f32).collect()
        } else {
            Vec::new()
        };
        let exact = scan.is_exact();
        let kept = scan_candidates(self.k, scan);
        let by_row = |row: usize| row as u64;
        let mut heaps: Vec<TopK> = (0..nq).map(|_| TopK::new(kept)).collect();
        let mut passing = Vec::new();
        let packed = PackedQueries::new(scan.product(), kernels::level(), nq, dim, qbuf);
        let mut ws = Workspace::default();
        let row_block = (TILE_BYTES / 4 / nq).clamp(64, ROW_BLOCK) / 32 * 32;
        let mut tile = vec![0.0f32; nq * row_block];
        let mut inv_norms = vec![0.0f32; row_block];
        let scale_rows = plan.normalize_rows && plan.metric != Metric::L2;
        let mut b0 = part.start;
        while b0 < part.end {
            let b1 = (b0 + row_block).min(part.end);
            let nb = b1 - b0;
            let block = self.rows.range(b0, b1, dim);
            // What finishes the products: the rows' |x|^2 (l2), their inverse lengths (cosine
            // over rows not stored normalized), or nothing.
            let row_norms: &[f32] = if scale_rows {
                let inv = &mut inv_norms[..nb];
                for (v, &sq) in inv.iter_mut().zip(&sqnorms[b0..b1]) {
                    // Zero rows are rejected before a cosine search; guard anyway.
                    *v = if sq > 0.0 { 1.0 / sq.sqrt() } else { 0.0 };
                }
                inv
            } else if plan.metric == Metric::L2 {
                &sqnorms[b0..b1]
            } else {
                &[]
            };
            let tile = &mut tile[..nq * nb];
            if let Scan::Packed(p) = scan {
                packed.scores_packed(p, b0, nb, tile, nb, &mut ws);
            } else {
                let src = match (scan, block) {
                    (Scan::I8 { data, scales }, _) => Src::I8 {
                        data: &data[b0 * dim..b1 * dim],
                        scales: &scales[b0..b1],
                    },
                    (_, rows) => rows.into(),
                };
                packed.scores(src, nb, tile, nb, &mut ws);
            }
            for (i, heap) in heaps.iter_mut().enumerate() {
                let scores = &mut tile[i * nb..(i + 1) * nb];
                let qn = query_norms.get(i).copied().unwrap_or(0.0);
                finish_product_scores(plan, qn, row_norms, scores);
                let (query, eligible) = (q0 + i, self.eligible);
                if exact {
                    let row_id = self.row_id;
                    push_candidates(heap, scores, query, b0, eligible, row_id, &mut passing);
                } else {
                    push_candidates(heap, scores, query, b0, eligible, &by_row, &mut passing);
                }
            }
            b0 = b1;
        }
        heaps
    }

    /// Searches again, with the per-row kernels, each query of `best` (the re-scored hits of
    /// the queries `queries` over rows `part`) whose `k`-th score is not certainly above
    /// `left_out` (what the scan left out scores at most); `bounds` holds each query's
    /// [`product_error_bound`].
    fn certify(
        &self,
        best: &mut [TopK],
        left_out: &[Option<f32>],
        bounds: &[f32],
        queries: Range<usize>,
        part: Range<usize>,
    ) {
        for (i, top) in best.iter_mut().enumerate() {
            let Some(t) = left_out[i] else { continue };
            let bound = bounds[i];
            let kth = if top.len() >= self.k {
                top.kept()
                    .iter()
                    .map(|h| h.score)
                    .fold(f32::INFINITY, f32::min)
            } else {
                f32::NEG_INFINITY
            };
            // NaN (a crafted file's values) is not certain either.
            let certain = t + bound < kth;
            if !certain {
                let query = queries.start + i;
                *top = self
                    .kernel_task(query..query + 1, part.clone())
                    .pop()
                    .expect("one query");
            }
        }
    }

    /// The top `k` of each query's `candidates` (row indices) re-scored with the per-row
    /// kernels (the single-query scores), in row order: a block of queries has candidates all
    /// over the corpus, which then streams through once, each row read once for every query
    /// that kept it, instead of at random per query. A candidate whose scan score lies below
    /// its query's entry of `floors` (none: every candidate counts) is not re-scored.
    fn rescore(
        &self,
        qbuf: &[f32],
        candidates: Vec<TopK>,
        floors: &[f32],
        converted: &mut Vec<f32>,
    ) -> Vec<TopK> {
        let (plan, rows, dim) = (self.plan, self.rows, self.plan.dim);
        let nq = candidates.len();
        let i8_queries = matches!(rows, Rows::I8 { .. }) && plan.metric != Metric::L2;
        let mut q16 = Vec::new();
        let mut q16_scales = Vec::new();
        if i8_queries {
            let mut one = Vec::new();
            for q in qbuf.chunks_exact(dim) {
                q16_scales.push(kernels::quantize_query_i16(q, &mut one));
                q16.extend_from_slice(&one);
            }
        }
        // (row, query) pairs as one integer, `row << 16 | query`: sorted by row, then query
        // (a block holds at most QUERY_BLOCK < 2^16 queries; rows index a slice, < 2^48).
        const QUERY_BITS: u32 = 16;
        const _: () = assert!(QUERY_BLOCK < 1 << QUERY_BITS);
        let mut pairs: Vec<u64> = Vec::with_capacity(candidates.iter().map(TopK::len).sum());
        for (i, mut heap) in candidates.into_iter().enumerate() {
            let floor = floors.get(i).copied().unwrap_or(f32::NEG_INFINITY);
            let kept = heap
                .kept()
                .iter()
                .filter(|h| h.score >= floor || h.score.is_nan());
            pairs.extend(kept.map(|h| h.id << QUERY_BITS | i as u64));
        }
        pairs.sort_unstable();
        let mut best: Vec<TopK> = (0..nq).map(|_| TopK::new(self.k)).collect();
        for (j, &pair) in pairs.iter().enumerate() {
            // The rows are spread over the corpus: start loading a later pair's row now (once
            // per row: the pairs of a row follow each other).
            if let Some(&ahead) = pairs.get(j + RESCORE_PREFETCH) {
                let row_ahead = ahead >> QUERY_BITS;
                if pairs[j + RESCORE_PREFETCH - 1] >> QUERY_BITS != row_ahead {
                    kernels::prefetch(rows.row_bytes(row_ahead as usize, dim));
                }
            }
            let (row, i) = (
                pair >> QUERY_BITS,
                (pair & ((1 << QUERY_BITS) - 1)) as usize,
            );
            let q = &qbuf[i * dim..(i + 1) * dim];
            let (qi, scale) = match i8_queries {
                true => (&q16[i * dim..(i + 1) * dim], q16_scales[i]),
                false => (&q16[..0], 0.0),
            };
            let s = exact_score(plan, rows, row as usize, q, qi, scale, converted);
            best[i].push(Hit {
                score: s,
                id: (self.row_id)(row as usize),
            });
        }
        best
    }
}

fn prepare_queries(plan: Plan, queries: Queries<'_>, range: Range<usize>, buf: &mut Vec<f32>) {
    queries.block_to_f32(range.start, range.end, plan.dim, buf);
    if plan.normalize_queries {
        for q in buf.chunks_exact_mut(plan.dim) {
            let norm = kernels::sqnorm_f32(q).sqrt();
            if norm > 0.0 {
                q.iter_mut().for_each(|v| *v /= norm);
            }
        }
    }
}

/// How far an f32 product's score of a row may lie from the per-row kernel's, for query `q`
/// over rows of `|x|^2 <= max_sqnorm`: |product - kernel| <= c (|q| + |x|)^2 for the f32
/// product over f32 / f16 rows (dot: dim u |q||x| for each of the two summation orders; l2
/// adds |q|^2 and |x|^2 computed alike), with u = 2^-24 and a factor 4 of slack.
fn product_error_bound(dim: usize, q: &[f32], max_sqnorm: f32) -> f32 {
    let c = (dim as f32 + 16.0) * 2f32.powi(-20);
    c * (kernels::sqnorm_f32(q).sqrt() + max_sqnorm.sqrt()).powi(2)
}

/// Per query, the scan score below which a candidate cannot reach the exact top `k`, so that
/// the re-score may skip it: with `P` the `k`-th best scan score and `b` the query's bound on
/// |scan - exact|, `k` candidates score at least `P - b` exactly, and one scanned below
/// `P - 2b` scores below `P - b`, strictly below the `k`-th exact score (no tie either). A
/// query with fewer than `k` candidates, or a NaN among them, skips none (-inf).
fn rescore_floors(heaps: &mut [TopK], k: usize, bounds: &[f32]) -> Vec<f32> {
    let mut scores = Vec::new();
    heaps
        .iter_mut()
        .zip(bounds)
        .map(|(h, &b)| {
            scores.clear();
            scores.extend(h.kept().iter().map(|c| c.score));
            if scores.len() < k || scores.iter().any(|s| s.is_nan()) {
                return f32::NEG_INFINITY;
            }
            let (_, &mut kth, _) = scores.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
            let floor = kth - 2.0 * b;
            if floor.is_nan() {
                f32::NEG_INFINITY
            } else {
                floor
            }
        })
        .collect()
}

/// Per query, the scan score every candidate left out of its heap is at most: the lowest it
/// kept, once it kept `kept` (None: nothing was left out).
fn left_out_bounds(heaps: &mut [TopK], kept: usize) -> Vec<Option<f32>> {
    heaps
        .iter_mut()
        .map(|h| {
            let kept_hits = h.kept();
            (kept_hits.len() >= kept).then(|| {
                kept_hits
                    .iter()
                    .map(|c| c.score)
                    .fold(f32::INFINITY, f32::min)
            })
        })
        .collect()
}

/// Turns one query's products with a block of rows into internal scores: l2 from
/// `|q|^2 + |x|^2 - 2 q.x` (`qn` is `|q|^2`, `row_norms` the rows' `|x|^2`), cosine over rows
/// not stored normalized scaled by `row_norms` (there the rows' inverse lengths).
#[inline(always)]
fn finish_product_scores(plan: Plan, qn: f32, row_norms: &[f32], scores: &mut [f32]) {
    match plan.metric {
        Metric::L2 => {
            for (s, &xn) in scores.iter_mut().zip(row_norms) {
                *s = -(qn + xn - 2.0 * *s).max(0.0);
            }
        }
        _ if plan.normalize_rows => {
            for (s, &inv) in scores.iter_mut().zip(row_norms) {
                *s *= inv;
            }
        }
        _ => {}
    }
}

#[inline(always)]
fn push_candidates<E, I>(
    heap: &mut TopK,
    scores: &[f32],
    query: usize,
    row0: usize,
    eligible: &E,
    row_id: &I,
    passing: &mut Vec<u32>,
) where
    E: Fn(usize, usize) -> bool,
    I: Fn(usize) -> u64,
{
    // Once the top-k is full most scores fail its threshold: one SIMD pass lists those that
    // pass it now; the threshold only rises, so each is checked again as it is pushed.
    passing.clear();
    kernels::at_least_with(kernels::level(), scores, heap.threshold(), passing);
    for &j in passing.iter() {
        let (j, s) = (j as usize, scores[j as usize]);
        if s >= heap.threshold() && eligible(query, row0 + j) {
            heap.push(Hit {
                score: s,
                id: row_id(row0 + j),
            });
        }
    }
}

/// `|row|^2` of every row (as [`row_sqnorms`] gives them), blocks of rows on all cores.
fn all_row_sqnorms(rows: Rows<'_>, dim: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; rows.count(dim)];
    out.par_chunks_mut(ROW_BLOCK)
        .enumerate()
        .for_each_init(Vec::new, |buf, (b, norms)| {
            let r0 = b * ROW_BLOCK;
            row_sqnorms(rows.range(r0, r0 + norms.len(), dim), dim, norms, buf);
        });
    out
}

/// `|row|^2` of every row of `block` (as the exact scores see the rows).
pub(crate) fn row_sqnorms(block: Rows<'_>, dim: usize, out: &mut [f32], buf: &mut Vec<f32>) {
    match block {
        Rows::F32(v) => {
            for (o, row) in out.iter_mut().zip(v.chunks_exact(dim)) {
                *o = kernels::sqnorm_f32(row);
            }
        }
        _ => {
            let v = block.to_f32(dim, buf);
            for (o, row) in out.iter_mut().zip(v.chunks_exact(dim)) {
                *o = kernels::sqnorm_f32(row);
            }
        }
    }
}

/// The internal scores (higher is better) of one query against a chunk of rows, with the
/// single-query kernels: `q16` (the query quantized to i16, and its scale) serves i8 dot
/// products; i8 rows under l2 read `dequant`, the chunk converted to f32 beforehand (once for
/// every query). `ints` holds at least a chunk's worth of integer dot products.
pub(crate) fn score_chunk(
    metric: Metric,
    q: &[f32],
    q16: Option<(&[i16], f32)>,
    chunk: Rows<'_>,
    dequant: &[f32],
    ints: &mut [i64],
    out: &mut [f32],
) {
    match (chunk, metric) {
        (Rows::F32(v), Metric::L2) => {
            kernels::l2_f32_rows(q, v, out);
            out.iter_mut().for_each(|s| *s = -*s);
        }
        (Rows::F32(v), _) => kernels::dot_f32_rows(q, v, out),
        (Rows::F16(v), Metric::L2) => {
            kernels::l2_f16_rows(q, v, out);
            out.iter_mut().for_each(|s| *s = -*s);
        }
        (Rows::F16(v), _) => kernels::dot_f16_rows(q, v, out),
        (Rows::I8 { .. }, Metric::L2) => {
            kernels::l2_f32_rows(q, dequant, out);
            out.iter_mut().for_each(|s| *s = -*s);
        }
        (Rows::I8 { data, scales }, _) => {
            let (q16, qs) = q16.expect("i8 dot products need the i16 query");
            let ints = &mut ints[..out.len()];
            kernels::dot_i8_rows(q16, data, ints);
            for ((s, &dot), &xs) in out.iter_mut().zip(ints.iter()).zip(scales) {
                *s = dot as f32 * (qs * xs);
            }
        }
    }
}

/// The exact internal score (higher is better) of one row, as the per-row kernels give it.
pub(crate) fn exact_score(
    plan: Plan,
    rows: Rows<'_>,
    row: usize,
    q: &[f32],
    q16: &[i16],
    q16_scale: f32,
    buf: &mut Vec<f32>,
) -> f32 {
    let dim = plan.dim;
    let one = rows.range(row, row + 1, dim);
    let s = match (one, plan.metric) {
        (Rows::F32(x), Metric::L2) => return -kernels::l2_f32_with(kernels::level(), q, x),
        (Rows::F16(x), Metric::L2) => return -kernels::l2_f16_with(kernels::level(), q, x),
        (Rows::I8 { .. }, Metric::L2) => {
            let x = one.to_f32(dim, buf);
            return -kernels::l2_f32_with(kernels::level(), q, x);
        }
        (Rows::F32(x), _) => kernels::dot_f32_with(kernels::level(), q, x),
        (Rows::F16(x), _) => kernels::dot_f16_with(kernels::level(), q, x),
        (Rows::I8 { data, scales }, _) => {
            kernels::dot_i8_with(kernels::level(), q16, data) as f32 * (q16_scale * scales[0])
        }
    };
    if plan.normalize_rows {
        let mut n = [0.0f32];
        row_sqnorms(one, dim, &mut n, buf);
        if n[0] > 0.0 {
            s / n[0].sqrt()
        } else {
            0.0
        }
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heap(k: usize, scores: &[f32]) -> TopK {
        let mut h = TopK::new(k);
        for (id, &score) in scores.iter().enumerate() {
            h.push(Hit {
                score,
                id: id as u64,
            });
        }
        h
    }

    #[test]
    fn rescore_floors_lie_two_bounds_below_the_kth_scan_score() {
        let mut heaps = vec![
            heap(5, &[0.9, 0.1, 0.5, 0.7, 0.3]),
            // Fewer candidates than k = 3: every one counts.
            heap(5, &[0.9, 0.8]),
            // A NaN among them: every one counts.
            heap(5, &[0.9, f32::NAN, 0.5, 0.4]),
        ];
        let floors = rescore_floors(&mut heaps, 3, &[0.01, 0.01, 0.01]);
        assert_eq!(floors[0], 0.5 - 0.02);
        assert_eq!(floors[1], f32::NEG_INFINITY);
        assert_eq!(floors[2], f32::NEG_INFINITY);
    }
}
