//! Hard-negative mining: for every query, the top-k corpus rows outside the query's group.
//!
//! Built on the search core: the corpus streams through in blocks against blocks of queries
//! (matrix products on all cores), so memory beyond the inputs is the output plus one block
//! per thread, never a q x n score matrix.

use crate::error::{invalid, Error, Result};
use crate::index::{check_dim, check_rows, encode_append, Buffers};
use crate::kernels;
use crate::matmul::{PackedRows, Src};
use crate::search::{Plan, Queries, Rows, Scan, ScanPrecision, Search};
use crate::types::{DType, Metric};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

/// One hard-negative mining call (the keywords of the Python function): for each of
/// `queries`, the top `k` rows of `corpus` outside the query's group.
#[derive(Clone, Copy)]
pub struct Mining<'a> {
    /// `nq * dim` values.
    pub queries: Queries<'a>,
    /// `n * dim` values, f32 or f16.
    pub corpus: Rows<'a>,
    pub dim: usize,
    pub k: usize,
    /// One group per query and per corpus row, both or neither: a query skips the rows of
    /// its own group.
    pub query_groups: Option<&'a [i64]>,
    pub corpus_groups: Option<&'a [i64]>,
    pub metric: Metric,
    /// The precision the corpus is scored at.
    pub dtype: DType,
    /// The precision of the scan that picks candidates.
    pub precision: ScanPrecision,
}

/// Top-k rows of `corpus` for each query, best first, ties by ascending row index.
///
/// Rows whose group equals the query's group are skipped (both group arrays or neither).
/// Where fewer than k rows are eligible, the remaining slots hold index -1 and score
/// `metric.missing_score()` (-inf for "ip" / "cos", +inf for "l2").
/// Returns row-major `(indices, scores)`, `nq * k` each.
///
/// `corpus` is f32 or f16 input. `dtype` is the precision the corpus is scored at, as an
/// `Index` of that dtype would store it: "f32" reads f32 or f16 input as is (f16 -> f32 is
/// exact), "f16" rounds f32 input to f16 (a copy at half the size), "i8" quantizes each row
/// with its own scale (a copy at a quarter of the f32 size).
///
/// `precision` is the precision of the scan that picks candidates: "f32" scores every row
/// exactly; "i8" (AVX512-VNNI) and "bf16" (AVX512-BF16) scan in low precision for the top
/// `search::scan_candidates` rows per query and re-score those at `dtype`'s precision, so
/// the scores returned are exact and the rows are the exact top k unless more than the
/// margin of rows overtook a true top-k row in the scan (docs/mining.md gives the measured
/// agreement). The scan reads a copy of the corpus quantized (i8: n x dim bytes) or rounded
/// (bf16: twice that) and packed once per call. On a CPU without the instructions the scan
/// is exact.
pub fn mine_hard_negatives(mining: Mining<'_>) -> Result<(Vec<i64>, Vec<f32>)> {
    let Mining {
        queries,
        corpus,
        dim,
        k,
        query_groups,
        corpus_groups,
        metric,
        dtype,
        precision,
    } = mining;
    check_dim(dim)?;
    if k < 1 {
        return invalid(format!("k must be at least 1, got {k}"));
    }
    let nq = queries.count(dim);
    let n = corpus.count(dim);
    check_groups(query_groups, corpus_groups, nq, n)?;
    check_inputs(queries, corpus, dim, metric)?;
    let (mut ids, mut scores) = output_buffers(nq, k)?;
    let stored = Stored::new(corpus, n, dim, metric, dtype)?;
    let corpus = stored.rows();

    // A low-precision scan runs on a copy of the corpus packed once (i8: n x dim bytes,
    // bf16: twice that), which every block of queries reads as it is.
    let src = Src::from(corpus);
    let scan_copy = if precision.is_accelerated() {
        PackedRows::new(precision.product(), kernels::level(), src, n, dim)
    } else {
        None
    };
    // Without a low-precision scan, f16 and i8 rows are scanned with f32 products and
    // re-scored with the per-row kernels: every precision reports the same scores, those of
    // an `Index` of `dtype` searched one query at a time.
    let unscanned = match corpus {
        Rows::F32(_) => Scan::Exact,
        _ => Scan::Rescored,
    };
    let scan = scan_copy.as_ref().map_or(unscanned, Scan::Packed);
    let plan = Plan {
        dim,
        metric,
        normalize_queries: metric == Metric::Cos,
        // f16 and i8 rows are encoded unit length under cos (as `Index` stores them).
        normalize_rows: metric == Metric::Cos && dtype == DType::F32,
    };
    let row_id = |row: usize| row as u64;
    match (query_groups, corpus_groups) {
        (Some(qg), Some(cg)) => {
            let eligible = |q: usize, row: usize| qg[q] != cg[row];
            let search = Search {
                plan,
                rows: corpus,
                queries,
                k,
                eligible: &eligible,
                row_id: &row_id,
            };
            search.run_scan(scan, &mut ids, &mut scores);
        }
        _ => {
            let search = Search {
                plan,
                rows: corpus,
                queries,
                k,
                eligible: &|_: usize, _: usize| true,
                row_id: &row_id,
            };
            search.run_scan(scan, &mut ids, &mut scores);
        }
    }
    // Missing slots carry u64::MAX, which is -1 as i64; rows are < 2^63, so the cast is exact.
    let indices: Vec<i64> = bytemuck::allocation::cast_vec(ids);
    Ok((indices, scores))
}

/// The output of `nq` queries' top `k`: `(ids, scores)`, or an error naming `k` where it
/// does not fit in memory.
fn output_buffers(nq: usize, k: usize) -> Result<(Vec<u64>, Vec<f32>)> {
    let nq_k = nq.checked_mul(k).filter(|&m| m <= isize::MAX as usize / 8);
    let Some(nq_k) = nq_k else {
        return invalid(format!("k = {k} is too large for {nq} queries"));
    };
    let mut ids: Vec<u64> = Vec::new();
    let mut scores: Vec<f32> = Vec::new();
    if ids.try_reserve_exact(nq_k).is_err() || scores.try_reserve_exact(nq_k).is_err() {
        return invalid(format!(
            "k = {k} is too large: the output of {nq} x {k} does not fit in memory"
        ));
    }
    ids.resize(nq_k, 0);
    scores.resize(nq_k, 0.0);
    Ok((ids, scores))
}

/// The corpus as an `Index` of the mining `dtype` stores it: the input itself where it already
/// is that, else a copy encoded by the `Index`'s own rules ([`encode_rows`]).
enum Stored<'a> {
    Input(Rows<'a>),
    F16(Vec<f16>),
    I8 { data: Vec<i8>, scales: Vec<f32> },
}

impl<'a> Stored<'a> {
    fn new(corpus: Rows<'a>, n: usize, dim: usize, metric: Metric, dtype: DType) -> Result<Self> {
        Ok(match (dtype, corpus) {
            (DType::F32, rows) => Stored::Input(rows),
            // f16 rows as they are, except under cos, where an `Index` stores them unit length.
            (DType::F16, rows @ Rows::F16(_)) if metric != Metric::Cos => Stored::Input(rows),
            (DType::F16, rows) => Stored::F16(encode_rows(rows, n, dim, metric, DType::F16)?.0),
            (DType::I8, rows) => {
                let (_, data, scales) = encode_rows(rows, n, dim, metric, DType::I8)?;
                Stored::I8 { data, scales }
            }
        })
    }

    fn rows(&self) -> Rows<'_> {
        match self {
            Stored::Input(rows) => *rows,
            Stored::F16(v) => Rows::F16(v),
            Stored::I8 { data, scales } => Rows::I8 { data, scales },
        }
    }
}

/// Both group arrays or neither, one group per query and per corpus row.
fn check_groups(
    query_groups: Option<&[i64]>,
    corpus_groups: Option<&[i64]>,
    nq: usize,
    n: usize,
) -> Result<()> {
    match (query_groups, corpus_groups) {
        (Some(qg), Some(cg)) => {
            if qg.len() != nq {
                return invalid(format!(
                    "query_groups must have length {nq} (one per query), got {}",
                    qg.len()
                ));
            }
            if cg.len() != n {
                return invalid(format!(
                    "corpus_groups must have length {n} (one per corpus row), got {}",
                    cg.len()
                ));
            }
        }
        (None, None) => {}
        _ => return invalid("query_groups and corpus_groups must be given together"),
    }
    Ok(())
}

/// Queries and corpus of whole rows of `dim` values, each row valid for `metric`.
fn check_inputs(queries: Queries<'_>, corpus: Rows<'_>, dim: usize, metric: Metric) -> Result<()> {
    match queries {
        Queries::F32(v) if v.len() % dim != 0 => {
            return invalid(format!("queries must have shape (q, {dim})"))
        }
        Queries::F16(v) if v.len() % dim != 0 => {
            return invalid(format!("queries must have shape (q, {dim})"))
        }
        _ => {}
    }
    let corpus_len = match corpus {
        Rows::F32(v) => v.len(),
        Rows::F16(v) => v.len(),
        Rows::I8 { data, .. } => data.len(),
    };
    if corpus_len % dim != 0 {
        return invalid(format!("corpus must have shape (n, {dim})"));
    }
    check_queries(queries, dim, metric)?;
    check_corpus(corpus, dim, metric)
}

/// The rows encoded as an `Index` of `metric` and `dtype` (f16 or i8) stores them, by its own
/// encoding (so bit for bit: unit length first under "cos", f16 range checked for f16 under
/// "ip" / "l2", one scale per row for i8), converted a block at a time. Returns the f16 rows,
/// or the i8 rows and scales.
fn encode_rows(
    rows: Rows<'_>,
    n: usize,
    dim: usize,
    metric: Metric,
    dtype: DType,
) -> Result<(Vec<f16>, Vec<i8>, Vec<f32>)> {
    const BLOCK: usize = 16 * 1024;
    let (mut half, mut data, mut scales) = (Vec::new(), Vec::new(), Vec::new());
    let mut buf = Vec::new();
    for start in (0..n).step_by(BLOCK) {
        let end = (start + BLOCK).min(n);
        let block = rows.range(start, end, dim).to_f32(dim, &mut buf);
        let out = match dtype {
            DType::I8 => Buffers::I8(&mut data, &mut scales),
            _ => Buffers::F16(&mut half),
        };
        encode_append(block, dim, metric, out).map_err(|e| match e {
            Error::InvalidVector { row, fault, .. } => Error::InvalidVector {
                what: "corpus",
                row: start + row,
                fault,
            },
            other => other,
        })?;
    }
    Ok((half, data, scales))
}

fn check_queries(queries: Queries<'_>, dim: usize, metric: Metric) -> Result<()> {
    match queries {
        Queries::F32(v) => check_rows(v, dim, metric, "queries"),
        Queries::F16(v) => check_f16_rows(v, dim, metric, "queries"),
    }
}

fn check_corpus(corpus: Rows<'_>, dim: usize, metric: Metric) -> Result<()> {
    match corpus {
        Rows::F32(v) => check_rows(v, dim, metric, "corpus"),
        Rows::F16(v) => check_f16_rows(v, dim, metric, "corpus"),
        Rows::I8 { .. } => invalid("corpus must be float32 or float16"),
    }
}

/// `check_rows` for f16 input, converting a block at a time (rows renumbered within `v`).
fn check_f16_rows(v: &[half::f16], dim: usize, metric: Metric, what: &'static str) -> Result<()> {
    const BLOCK: usize = 1024;
    let first = v
        .par_chunks(dim * BLOCK)
        .enumerate()
        .find_map_first(|(b, block)| {
            let mut buf = vec![0f32; block.len()];
            block.convert_to_f32_slice(&mut buf);
            check_rows(&buf, dim, metric, what)
                .err()
                .map(|e| e.offset_row(b * BLOCK))
        });
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gaussian(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        let mut uniform = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let (u, v) = (uniform(), uniform());
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect()
    }

    fn normalize(v: &mut [f32], dim: usize) {
        for r in v.chunks_exact_mut(dim) {
            let n = r.iter().map(|x| x * x).sum::<f32>().sqrt();
            r.iter_mut().for_each(|x| *x /= n);
        }
    }

    /// Random rows, and clustered ones (rows near a few centres: many close scores).
    fn data(clustered: bool, nq: usize, n: usize, dim: usize) -> (Vec<f32>, Vec<f32>) {
        let mut q = gaussian(nq * dim, 1);
        let mut x = gaussian(n * dim, 2);
        if clustered {
            let centres = gaussian(20 * dim, 3);
            for (i, r) in x.chunks_exact_mut(dim).enumerate() {
                let c = &centres[(i % 20) * dim..(i % 20 + 1) * dim];
                r.iter_mut().zip(c).for_each(|(v, c)| *v = c + 0.15 * *v);
            }
            for (i, r) in q.chunks_exact_mut(dim).enumerate() {
                let c = &centres[(i % 20) * dim..(i % 20 + 1) * dim];
                r.iter_mut().zip(c).for_each(|(v, c)| *v = c + 0.15 * *v);
            }
        }
        normalize(&mut q, dim);
        normalize(&mut x, dim);
        (q, x)
    }

    #[test]
    fn low_precision_scans_return_the_exact_top_k() {
        let (nq, n, dim, k) = (96, 3000, 100, 10);
        for clustered in [false, true] {
            let (q, x) = data(clustered, nq, n, dim);
            let qg: Vec<i64> = (0..nq as i64).collect();
            let cg: Vec<i64> = (0..n as i64).map(|r| r % 97).collect();
            for metric in [Metric::Ip, Metric::Cos, Metric::L2] {
                let mine = |p| {
                    mine_hard_negatives(Mining {
                        queries: Queries::F32(&q),
                        corpus: Rows::F32(&x),
                        dim,
                        k,
                        query_groups: Some(&qg),
                        corpus_groups: Some(&cg),
                        metric,
                        dtype: DType::F32,
                        precision: p,
                    })
                    .unwrap()
                };
                let (want_ids, want_scores) = mine(ScanPrecision::F32);
                for p in [ScanPrecision::Bf16, ScanPrecision::I8] {
                    let (ids, scores) = mine(p);
                    let mut agree = 0;
                    for i in 0..nq {
                        let w = &want_ids[i * k..(i + 1) * k];
                        agree += ids[i * k..(i + 1) * k]
                            .iter()
                            .filter(|r| w.contains(r))
                            .count();
                    }
                    let agreement = agree as f64 / (nq * k) as f64;
                    assert!(
                        agreement >= 0.999,
                        "{p:?} {metric:?} clustered={clustered}: agreement {agreement}"
                    );
                    // Re-scored exactly: the same scores as the f32 scan (to f32 rounding).
                    for (a, b) in scores.iter().zip(&want_scores) {
                        assert!((a - b).abs() <= 1e-5, "{p:?} {metric:?}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn precision_names_parse_and_unknown_ones_are_rejected() {
        for p in [ScanPrecision::F32, ScanPrecision::Bf16, ScanPrecision::I8] {
            assert_eq!(ScanPrecision::parse(p.name()).unwrap(), p);
        }
        let err = ScanPrecision::parse("int4").unwrap_err().to_string();
        assert!(
            err.contains("unknown precision") && err.contains("\"i8\""),
            "{err}"
        );
    }
}
