//! The IVF search driver: from checked queries to each query's top k, in steps.
//!
//! 1. The plan ([`SearchPlan`]): what this search runs, from the parameters and the number
//!    of queries alone. A batch (at least [`GEMM_MIN_QUERIES`] queries) scans list-major by
//!    matrix products and re-scores its best candidates; fewer queries scan with the
//!    single-query kernels, or their 4-bit codes (`pq > 0`) and re-score a shortlist, or
//!    ([`SingleScan::Product`]) as a batch does, one query at a time.
//! 2. The queries as the scans read them: normalized, projected onto the principal
//!    directions (`scan_dims`, `project.rs`), quantized for i8 rows and the i8 product.
//! 3. Each query's lists ([`IvfIndex::probes`]): its `nprobe` nearest centroids.
//! 4. The scan: a batch groups its queries by list and scans each probed list once for all
//!    of them (the scanner, `scan.rs`), in two rounds: the nearest lists first set each
//!    query's floor, then the far lists keep only what reaches it. Codes, and single queries
//!    scanning by the product, go list after list per query.
//! 5. The finish: each query's candidates re-ranked from the float32 copies (`rerank`) or
//!    re-scored with the single-query kernels, and written out best first.

use super::list::{List, PackCache};
use super::params::IvfParams;
use super::pq::Pq;
use super::project;
use super::scan::{self, Cand, ListScan, Reduced, ScanInputs, ScanSpec, Select, Q16, Q8};
use super::{IvfIndex, SingleScan};
use crate::error::Result;
use crate::index::check_search_args;
use crate::kernels;
use crate::matmul::Product;
use crate::search::{self, GEMM_MIN_QUERIES};
use crate::topk;
use crate::types::{DType, Metric};
use rayon::prelude::*;
use rustc_hash::FxHashSet;

/// Candidates beyond k (at least k) a batch with `scan_dims` re-scores per query. On 200k
/// MiniLM embeddings, 192 of 384 principal directions keep 99.96% of the true top 10 among
/// the best 64 by the reduced score.
const SCAN_DIMS_MARGIN: usize = 64;
/// (Query, list) pairs one batch scans at most (its buffers take ~50 bytes a pair); larger
/// batches run in chunks of queries.
pub(super) const MAX_BATCH_PAIRS: usize = 1 << 18;
/// (Query, list) pairs of each part of the lists an exact search under `scan_dims` scans at a
/// time (its own packed copies of them held meanwhile: on 1,000 queries, 64 of 1,024 lists).
const EXACT_LISTS_PAIRS: usize = MAX_BATCH_PAIRS / 4;
/// Candidates whose rows are being loaded while one is re-scored.
const RESCORE_AHEAD: usize = 32;
/// Probes per query scanned in the first round (they set the floors of the second).
const ROUND1_PROBES: usize = 4;
/// A batch scans a list probed by fewer of its queries than this with the single-query
/// kernels (a product pays packing and setup per call).
pub(super) const PRODUCT_MIN_QUERIES: usize = 8;

/// What one search runs, decided from the parameters and the batch alone (no data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SearchPlan {
    /// Results per query.
    pub k: usize,
    pub metric: Metric,
    /// At least [`GEMM_MIN_QUERIES`] queries: lists scanned list-major by matrix products,
    /// in parallel.
    pub batch: bool,
    /// Lists are scanned by the batch's product over their packed copies (and `scan_dims`),
    /// then re-scored: every batch, and single queries set to [`SingleScan::Product`].
    pub by_product: bool,
    /// The product a batch runs (its scores rank the candidates).
    pub product: Product,
    /// Single queries scan the 4-bit codes (the index has them): a batch's product over the
    /// lists themselves is compute-bound and costs less per query than codes plus a shortlist
    /// re-scored from rows spread through memory.
    pub codes: bool,
    /// Candidates re-ranked from the float32 copies per query (0: none).
    pub rerank: usize,
    /// Candidates re-scored from the rows with the single-query kernels (so a batch reports
    /// what Q=1 reports): every search of codes, and batches of f16 / i8 lists.
    pub rescore: bool,
    /// A batch ranks by the top `scan_dims` principal directions (None: all dimensions).
    pub scan_dims: Option<usize>,
    /// Candidates kept per query (and per (query, list) pair) for the finish.
    pub kc: usize,
    /// A batch scans every probed list by the product, however few of its queries probe it:
    /// single queries scanning by the product, searched together ([`Depth::AsSingle`]).
    pub all_by_product: bool,
}

impl SearchPlan {
    /// The plan of a search of `nq` queries for `k` results each (`k` at most the keys
    /// present) over an index with these parameters (`has_codes`: `pq > 0` and trained).
    pub fn new(
        params: &IvfParams,
        dtype: DType,
        metric: Metric,
        nq: usize,
        k: usize,
        single: SingleScan,
    ) -> SearchPlan {
        let batch = nq >= GEMM_MIN_QUERIES;
        let product = scan::batch_product(dtype);
        let by_product = batch || single == SingleScan::Product;
        let codes = single == SingleScan::Codes && !by_product;
        // Float32 copies exist exactly when rerank > 0 was allowed (f16 / i8, see params.rs).
        let rerank = params.rerank;
        let rescore = rerank == 0 && (codes || (by_product && dtype != DType::F32));
        // Candidates per query: k plus the margin of the scan's rounding (as `Index` batches
        // keep); an f32 product over f16 / i8 rows keeps the bf16 margin, as its order may
        // differ from the single-query kernels' in the last bits.
        let kc = if codes {
            k.max(rerank).max(params.shortlist)
        } else if rerank > 0 {
            k.max(rerank)
        } else if rescore {
            let probe = match product {
                Product::I8 => search::Scan::I8 {
                    data: &[],
                    scales: &[],
                },
                _ => search::Scan::Bf16,
            };
            search::scan_candidates(k, probe)
        } else {
            k
        };
        // A batch with scan_dims ranks by the principal directions: its candidates are
        // re-scored from the rows (scan_dims is allowed for f16 / i8 only), with a margin for
        // what the dropped dimensions move.
        let scan_dims = (by_product && params.scan_dims > 0).then_some(params.scan_dims);
        let kc = match scan_dims {
            Some(_) => kc.max(k + k.max(SCAN_DIMS_MARGIN)),
            None => kc,
        };
        SearchPlan {
            k,
            metric,
            batch,
            by_product,
            product,
            codes,
            rerank,
            rescore,
            scan_dims,
            kc,
            all_by_product: false,
        }
    }

    /// The plan of an exact search ([`IvfIndex::search_exact`]): all dimensions, no codes, every list
    /// (the caller probes them all).
    pub fn exact(params: &IvfParams, dtype: DType, metric: Metric, nq: usize, k: usize) -> Self {
        let all_dims = IvfParams {
            scan_dims: 0,
            ..*params
        };
        SearchPlan::new(&all_dims, dtype, metric, nq, k, SingleScan::Rows)
    }

    /// The plan of single queries scanning as `single` says, searched together
    /// ([`Depth::AsSingle`]): a single query's plan; by the product, list-major and in
    /// parallel as a batch scans, every probed list by the product (a single query's scan of a
    /// list by the product gives the scores the batch's product gives it: tested).
    pub fn as_single(
        params: &IvfParams,
        (dtype, metric): (DType, Metric),
        k: usize,
        single: SingleScan,
    ) -> Self {
        let alone = SearchPlan::new(params, dtype, metric, 1, k, single);
        match single {
            SingleScan::Product => SearchPlan {
                batch: true,
                all_by_product: true,
                ..alone
            },
            _ => alone,
        }
    }

    /// How the scanner scans the lists of `dim`-dimensional queries under this plan.
    pub fn spec(&self, dim: usize) -> ScanSpec {
        ScanSpec {
            metric: self.metric,
            dim,
            pdim: self.scan_dims.unwrap_or(dim),
            product: self.product,
            kc: self.kc,
            parallel: self.batch,
            by_product: self.by_product,
            all_by_product: self.all_by_product,
        }
    }
}

/// How a search goes: as the index is tuned (its nprobe, codes, `scan_dims`), or as single
/// queries go (`AsSingle`: each query's `nprobe_single` lists chosen as a single query
/// chooses them, scanned as it scans them), for any number of queries at once. (The exact
/// search, [`IvfIndex::search_exact`], goes its own way.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Depth {
    Tuned,
    AsSingle,
}

/// The keys a search excludes that the index holds, and how many fall in each list.
struct Excluded {
    keys: FxHashSet<u64>,
    per_list: Vec<usize>,
}

/// Single queries through codes ranked once for every shortlist ([`IvfIndex::codes_ranked`]):
/// the plan, the queries as the search reads them, each query's candidates best first by
/// code, the first `scored` of them re-scored as the finish scores them.
pub(super) struct CodesRanked {
    plan: SearchPlan,
    queries: Vec<f32>,
    q16: Option<Q16>,
    cands: Vec<Vec<Cand>>,
    scored: usize,
}

/// One query's output slots and candidates, as the search's last step receives them.
type FinishItem<'a> = (usize, ((&'a mut [u64], &'a mut [f32]), Vec<Cand>));

/// The (query, list) pairs of a batch's two rounds, query-major: query `q`'s pairs of round
/// one are `first[start1[q]..start1[q + 1]]`, and likewise for round two.
struct Rounds {
    first: Vec<(u32, u32)>,
    start1: Vec<usize>,
    second: Vec<(u32, u32)>,
    start2: Vec<usize>,
}

impl Rounds {
    /// Each query's nearest lists (up to `first`) in round one, the rest in two.
    fn split(probes: &(Vec<usize>, Vec<u32>), nq: usize, first: usize) -> Rounds {
        let (offsets, flat) = probes;
        let mut r = Rounds {
            first: Vec::new(),
            start1: Vec::with_capacity(nq + 1),
            second: Vec::new(),
            start2: Vec::with_capacity(nq + 1),
        };
        r.start1.push(0);
        r.start2.push(0);
        for q in 0..nq {
            let mine = &flat[offsets[q]..offsets[q + 1]];
            let (near, far) = mine.split_at(mine.len().min(first));
            r.first.extend(near.iter().map(|&l| (q as u32, l)));
            r.second.extend(far.iter().map(|&l| (q as u32, l)));
            r.start1.push(r.first.len());
            r.start2.push(r.second.len());
        }
        r
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

impl IvfIndex {
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
        let found = self.search_parts(queries, k, exclude, nq, Depth::Tuned)?;
        // A file changed during the search may have given other bytes than were checked.
        self.check_file()?;
        Ok(found)
    }

    /// The exact top-`k` of checked queries: every list, all dimensions, no codes, as a batch
    /// of any size (re-scored from the rows), without replacing what the index keeps for its
    /// searches (with `scan_dims`, its packed copies of all dimensions are its own). What
    /// `tune` measures recall against.
    pub(super) fn search_exact(
        &self,
        queries: &[f32],
        k: usize,
    ) -> Result<(Vec<u64>, Vec<f32>, usize)> {
        let nq = check_search_args(queries, self.dim, k)?;
        self.check_file()?;
        let found = self.search_exact_by_lists(queries, k, nq)?;
        self.check_file()?;
        Ok(found)
    }

    /// [`Self::search_exact`] of `nq` checked queries: the lists a part at a time
    /// (`EXACT_LISTS_PAIRS` (query, list) pairs), each query's candidates from a part merged
    /// into its best `kc` by scan score over every list (as one search finds them), and its
    /// `kc`-th best so far the floor of the next part. Where batches scan all dimensions, the
    /// lists' own packed copies are the ones they scan (kept); else each part's copies of all
    /// dimensions are packed once, held for its two rounds and dropped. (Scanned by parts of
    /// the queries, every list was packed 8 times, half of the exact pass; held for the whole
    /// search, the copies raised the process's peak and resident memory by a byte a value.)
    fn search_exact_by_lists(
        &self,
        queries: &[f32],
        k: usize,
        nq: usize,
    ) -> Result<(Vec<u64>, Vec<f32>, usize)> {
        let (dim, nlist) = (self.dim, self.lists.len());
        let kp = k.min(self.len());
        if nq == 0 || kp == 0 {
            return Ok((Vec::new(), Vec::new(), kp));
        }
        let plan = SearchPlan::exact(&self.params, self.dtype, self.metric, nq, kp);
        let spec = plan.spec(dim);
        let queries = self.normalize(queries, true);
        let q16 =
            (self.dtype == DType::I8 && self.metric != Metric::L2).then(|| Q16::new(&queries, dim));
        let q8 = (plan.product == Product::I8).then(|| Q8::new(&queries, dim));
        let (offsets, flat) = self.probes(&queries, kp, &[], (nlist, false));
        let excluded = self.excluded(None);
        let per = (EXACT_LISTS_PAIRS / nq)
            .max(ROUND1_PROBES)
            .min(nlist)
            .max(1);
        let mut best: Vec<Select> = (0..nq)
            .map(|_| {
                let mut sel = Select::default();
                sel.reset(plan.kc, f32::NEG_INFINITY);
                sel
            })
            .collect();
        // Each part's lists of each query, nearest first, in one pass over the queries' lists
        // (filtered part by part, 16 passes on one thread cost 0.06 of the exact search's
        // 0.44 CPU-s: 1,000 queries over 1,024 lists).
        let mut parts: Vec<(Vec<usize>, Vec<u32>)> = (0..nlist.div_ceil(per))
            .map(|_| (vec![0usize], Vec::with_capacity(nq * per)))
            .collect();
        for q in 0..nq {
            for &l in &flat[offsets[q]..offsets[q + 1]] {
                parts[l as usize / per].1.push(l);
            }
            for (starts, lists) in parts.iter_mut() {
                starts.push(lists.len());
            }
        }
        for probes in parts {
            let own = if self.params.scan_dims > 0 { nlist } else { 0 };
            let packs: Vec<PackCache> = (0..own).map(|_| PackCache::default()).collect();
            // Each query's kc-th best so far: what the part's candidates must reach.
            let floors: Vec<f32> = best.iter().map(|sel| sel.threshold()).collect();
            let inputs = ScanInputs {
                spec,
                queries: &queries,
                reduced: Reduced {
                    directions: None,
                    queries: &queries,
                },
                q16: q16.as_ref(),
                q8: q8.as_ref(),
                packs: (own > 0).then_some(packs.as_slice()),
                floors: Some(&floors),
            };
            let hits = self.scan_lists(&inputs, &probes, &excluded);
            best.par_iter_mut().zip(hits).for_each(|(sel, hits)| {
                for c in hits {
                    sel.push(c);
                }
                sel.kept();
            });
        }
        let hits = best
            .into_iter()
            .map(|mut sel| sel.sorted().to_vec())
            .collect();
        let (ids, scores) = self.finish(&plan, &queries, q16.as_ref(), hits);
        Ok((ids, scores, kp))
    }

    /// What each of `queries` gets searched alone (at `nprobe_single`, scanning as
    /// `single_scan` says), from one search of them all ([`Depth::AsSingle`]): each query's
    /// lists as a single query chooses them, its excluded keys looked up once for all. By the
    /// product, the lists are scanned list-major, every one by the product; codes and rows,
    /// query after query on this thread. What `tune` measures single queries with: alone, a
    /// query scanning by the product reads every probed list's packed copy (on random vectors
    /// at 750 of 1,024 lists, 64 such queries cost more than a batch of 1,000), and one
    /// through codes spent more on the keys a sample excludes than on its scan.
    pub(super) fn search_as_single(
        &self,
        queries: &[f32],
        k: usize,
        exclude: Option<&[u64]>,
    ) -> Result<(Vec<u64>, Vec<f32>, usize)> {
        let nq = check_search_args(queries, self.dim, k)?;
        self.check_file()?;
        let found = self.search_parts(queries, k, exclude, nq, Depth::AsSingle)?;
        self.check_file()?;
        Ok(found)
    }

    /// Single queries through codes at every shortlist up to `longest` at once (`codes_found`
    /// then gives any shortlist's results): each query's best `longest` candidates by their
    /// codes, best first (equal scores by ascending key), scanned as
    /// [`Self::search_as_single`] scans. A search at shortlist `s` (at most `longest`) keeps
    /// the first `s` of them and returns their best `k` by the finish's scores: `tune`
    /// measures every shortlist from this one scan (each took a search of the sample).
    pub(super) fn codes_ranked(
        &self,
        queries: &[f32],
        (k, longest): (usize, usize),
        exclude: Option<&[u64]>,
    ) -> Result<CodesRanked> {
        let dim = self.dim;
        let nq = check_search_args(queries, dim, k)?;
        self.check_file()?;
        let Some(book) = self.codebooks.as_ref() else {
            return crate::error::invalid("codes_ranked needs an index with codes");
        };
        let excluded = self.excluded(exclude);
        let kp = k.min(self.len() - excluded.keys.len());
        let params = IvfParams {
            shortlist: longest,
            ..self.params
        };
        let kinds = (self.dtype, self.metric);
        let plan = SearchPlan::as_single(&params, kinds, kp, SingleScan::Codes);
        let queries = self.normalize(queries, true).into_owned();
        if kp == 0 {
            let cands = vec![Vec::new(); nq];
            return Ok(CodesRanked {
                plan,
                queries,
                q16: None,
                cands,
                scored: 0,
            });
        }
        debug_assert!(plan.codes && plan.kc == kp.max(plan.rerank).max(longest));
        let q16 =
            (self.dtype == DType::I8 && self.metric != Metric::L2).then(|| Q16::new(&queries, dim));
        let np = self.probed(1, Depth::AsSingle);
        let probes = self.probes(&queries, kp, &excluded.per_list, (np, true));
        let mut cands = self.scan_codes(book, plan.spec(dim), &queries, &probes, &excluded.keys);
        for c in cands.iter_mut() {
            c.sort_unstable_by(topk::rank);
        }
        self.check_file()?;
        Ok(CodesRanked {
            plan,
            queries,
            q16,
            cands,
            scored: 0,
        })
    }

    /// What each query of `ranked` gets searched at shortlist `s` (at most the longest ranked):
    /// the best k of its first `s` candidates by the finish's scores (computed here as far as
    /// they are first needed), best first.
    pub(super) fn codes_found(&self, ranked: &mut CodesRanked, s: usize) -> Vec<Vec<u64>> {
        let dim = self.dim;
        let r = &mut *ranked;
        if s > r.scored {
            let mut conv = Vec::new();
            for (q, c) in r.cands.iter_mut().enumerate() {
                let (from, to) = (r.scored.min(c.len()), s.min(c.len()));
                let qv = &r.queries[q * dim..(q + 1) * dim];
                let q16 = r.q16.as_ref().map(|x| x.query(q, dim));
                self.rescore(&r.plan, (qv, q16), &mut c[from..to], &mut conv);
            }
            r.scored = s;
        }
        let mut best = topk::TopK::<topk::Hit>::default();
        r.cands
            .iter()
            .map(|c| {
                best.reset(r.plan.k, f32::NEG_INFINITY);
                for c in &c[..s.min(c.len())] {
                    best.push(topk::Hit {
                        score: c.score,
                        id: c.key,
                    });
                }
                best.sorted().iter().map(|h| h.id).collect()
            })
            .collect()
    }

    /// [`Self::search`] of `nq` checked queries, in parts where the batch is large.
    fn search_parts(
        &self,
        queries: &[f32],
        k: usize,
        exclude: Option<&[u64]>,
        nq: usize,
        depth: Depth,
    ) -> Result<(Vec<u64>, Vec<f32>, usize)> {
        let dim = self.dim;
        // A batch's per-pair buffers grow with queries x probed lists: a large one runs in
        // chunks of queries, balanced so that each stays a batch.
        let probed = self.probed(nq, depth);
        let parts = (nq * probed.max(1)).div_ceil(MAX_BATCH_PAIRS).max(1);
        if parts == 1 || nq < 2 * parts * search::GEMM_MIN_QUERIES {
            return self.search_checked(queries, k, exclude, depth);
        }
        let per = nq.div_ceil(parts);
        let (mut ids, mut scores, mut kp) = (Vec::new(), Vec::new(), 0);
        for part in queries.chunks(per * dim) {
            let (i, s, kpart) = self.search_checked(part, k, exclude, depth)?;
            ids.extend_from_slice(&i);
            scores.extend_from_slice(&s);
            kp = kpart;
        }
        Ok((ids, scores, kp))
    }

    /// Lists each of `nq` queries scans.
    fn probed(&self, nq: usize, depth: Depth) -> usize {
        match depth {
            Depth::Tuned if self.is_trained() => self.nprobe_for(nq).min(self.lists.len()),
            Depth::AsSingle if self.is_trained() => self.nprobe_single().min(self.lists.len()),
            _ => self.lists.len(),
        }
    }

    /// [`Self::search`] of queries already checked: the steps of the module documentation.
    fn search_checked(
        &self,
        queries: &[f32],
        k: usize,
        exclude: Option<&[u64]>,
        depth: Depth,
    ) -> Result<(Vec<u64>, Vec<f32>, usize)> {
        let dim = self.dim;
        let nq = queries.len() / dim;
        let excluded = self.excluded(exclude);
        let kp = k.min(self.len() - excluded.keys.len());
        if nq == 0 || kp == 0 {
            return Ok((Vec::new(), Vec::new(), kp));
        }
        let plan = match depth {
            Depth::Tuned => {
                let single = self.single_scan();
                SearchPlan::new(&self.params, self.dtype, self.metric, nq, kp, single)
            }
            Depth::AsSingle => {
                let kinds = (self.dtype, self.metric);
                SearchPlan::as_single(&self.params, kinds, kp, self.single_scan())
            }
        };
        debug_assert!(plan.rerank == 0 || self.keeps_exact());
        let spec = plan.spec(dim);
        // The queries as the scans read them.
        let queries = self.normalize(queries, true);
        let directions = plan.scan_dims.map(|_| self.directions());
        let projected = directions.map(|d| scan::project_queries(&queries, dim, d, spec.pdim));
        let reduced = Reduced {
            directions,
            queries: projected.as_deref().unwrap_or(&queries),
        };
        let q16 =
            (self.dtype == DType::I8 && self.metric != Metric::L2).then(|| Q16::new(&queries, dim));
        let q8 = (plan.by_product && plan.product == Product::I8)
            .then(|| Q8::new(reduced.queries, spec.pdim));
        // Each query's lists, the scan, the finish.
        let np = self.probed(nq, depth);
        let probes = self.probes(
            &queries,
            kp,
            &excluded.per_list,
            (np, depth == Depth::AsSingle),
        );
        let hits = match &self.codebooks {
            Some(book) if plan.codes => {
                self.scan_codes(book, spec, &queries, &probes, &excluded.keys)
            }
            _ => {
                let inputs = ScanInputs {
                    spec,
                    queries: &queries,
                    reduced,
                    q16: q16.as_ref(),
                    q8: q8.as_ref(),
                    packs: None,
                    floors: None,
                };
                if plan.by_product && !plan.batch {
                    self.scan_product_few(&inputs, &probes, &excluded.keys)
                } else {
                    self.scan_lists(&inputs, &probes, &excluded)
                }
            }
        };
        let (ids, scores) = self.finish(&plan, &queries, q16.as_ref(), hits);
        Ok((ids, scores, kp))
    }

    /// The keys of `exclude` the index holds (each once), and how many fall in each list.
    fn excluded(&self, exclude: Option<&[u64]>) -> Excluded {
        let mut keys: FxHashSet<u64> = FxHashSet::default();
        let mut per_list = vec![0usize; self.lists.len()];
        for key in exclude.unwrap_or(&[]) {
            if let Some(&(l, _)) = self.map.get(key) {
                if keys.insert(*key) {
                    per_list[l as usize] += 1;
                }
            }
        }
        Excluded { keys, per_list }
    }

    /// The principal directions a batch with `scan_dims` ranks by: trained with the index, or
    /// else computed by the first such batch from a sample of the contents (project.rs).
    fn directions(&self) -> &[f32] {
        self.directions.get_or_init(|| {
            let sample = self.sample_contents(project::BASIS_SAMPLE);
            project::principal_directions(&sample, self.dim)
        })
    }

    /// Each query's top `plan.k` from its candidates (best first by scan score): re-ranked
    /// from the float32 copies, or re-scored from the rows with the single-query kernels;
    /// written out row-major.
    fn finish(
        &self,
        plan: &SearchPlan,
        queries: &[f32],
        q16: Option<&Q16>,
        hits: Vec<Vec<Cand>>,
    ) -> (Vec<u64>, Vec<f32>) {
        let (dim, kp) = (self.dim, plan.k);
        let nq = queries.len() / dim;
        let mut ids = vec![0u64; nq * kp];
        let mut scores = vec![0f32; nq * kp];
        let finish = |conv: &mut Vec<f32>, (q, ((ids, scores), mut top)): FinishItem| {
            let qv = &queries[q * dim..(q + 1) * dim];
            if self.rescore(plan, (qv, q16.map(|x| x.query(q, dim))), &mut top, conv) {
                top.sort_unstable_by(topk::rank);
            }
            debug_assert!(top.len() >= kp);
            for (j, h) in top.iter().take(kp).enumerate() {
                ids[j] = h.key;
                scores[j] = self.metric.to_external(h.score);
            }
        };
        if plan.batch {
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
        (ids, scores)
    }

    /// The finish's scores of a query's candidates (`qv`, and for i8 rows its i16 copy):
    /// from the float32 copies (`rerank`) or from the rows with the single-query kernels
    /// (`rescore`); false where the plan keeps the scan's scores.
    fn rescore(
        &self,
        plan: &SearchPlan,
        (qv, q16): (&[f32], Option<(&[i16], f32)>),
        top: &mut [Cand],
        conv: &mut Vec<f32>,
    ) -> bool {
        let dim = self.dim;
        if plan.rerank > 0 {
            self.rerank(qv, top);
        } else if plan.rescore {
            // Candidates lie anywhere in memory: loading starts RESCORE_AHEAD rows ahead of
            // the scoring (all at once, a long shortlist's rows left the cache before they
            // were scored: most of tune's time on MiniLM's shortlists of 448).
            let row = |c: &Cand| self.lists[c.list as usize].row_bytes(c.slot as usize, dim);
            for c in top.iter().take(RESCORE_AHEAD) {
                kernels::prefetch(row(c));
            }
            for i in 0..top.len() {
                if let Some(ahead) = top.get(i + RESCORE_AHEAD) {
                    kernels::prefetch(row(ahead));
                }
                let c = &mut top[i];
                let list = &self.lists[c.list as usize];
                c.score = scan::exact_score(list, c.slot as usize, self.metric, dim, qv, q16, conv);
            }
        }
        plan.rerank > 0 || plan.rescore
    }

    /// Scores the candidates from their float32 copies.
    fn rerank(&self, q: &[f32], top: &mut [Cand]) {
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
    }

    /// Scans every probed list once for all the queries probing it (list-major) and merges
    /// each query's candidates: its best `spec.kc` by scan score, best first.
    ///
    /// Two rounds: first each query's nearest lists only (up to [`ROUND1_PROBES`]), which give
    /// every query a floor (its `kc`-th best score there; the final `kc`-th best can only be
    /// higher), then the other probed lists, where a (query, list) pair keeps only scores at or
    /// above the floor: most rows of a far list are dropped by one comparison, not sorted.
    fn scan_lists(
        &self,
        inputs: &ScanInputs<'_>,
        probes: &(Vec<usize>, Vec<u32>),
        excluded: &Excluded,
    ) -> Vec<Vec<Cand>> {
        let spec = inputs.spec;
        let nq = inputs.queries.len() / self.dim;
        let kc = spec.kc;
        // Where every query's floor is known before the scan (an exact search's later parts of
        // the lists: its kc-th best of the parts before), round one is left empty: it visited
        // each list twice for floors seldom higher (random vectors: 3-5% of the exact pass).
        let known_all = inputs
            .floors
            .is_some_and(|f| f.iter().all(|x| x.is_finite()));
        let first = if known_all { 0 } else { ROUND1_PROBES };
        let rounds = Rounds::split(probes, nq, first);
        // Each list is scanned the same way in both rounds (so a query's scores from one list
        // do not depend on the round): by the product if the batch probes it often enough. A
        // reduced scan's scores are not the exact ones: every list takes the product then.
        let mut probed = vec![0usize; self.lists.len()];
        for &l in probes.1.iter() {
            probed[l as usize] += 1;
        }
        // Single queries set to scan by the product scan every list so.
        let all = inputs.reduced.directions.is_some() || !spec.parallel || spec.all_by_product;
        let by_product: Vec<bool> = probed
            .iter()
            .map(|&c| c >= PRODUCT_MIN_QUERIES || all)
            .collect();
        // Floors known before the scan (an exact search's earlier parts of the lists) bound
        // round one too.
        let mut floors = inputs
            .floors
            .map_or_else(|| vec![f32::NEG_INFINITY; nq], <[f32]>::to_vec);
        let known = floors.clone();
        let h1 = self.scan_pairs(inputs, &by_product, &rounds.first, &floors, excluded);
        let merge_round1 = |sel: &mut Select, q: usize| {
            sel.reset(kc, f32::NEG_INFINITY);
            for i in rounds.start1[q]..rounds.start1[q + 1] {
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
                best[kc - 1].score.max(known[q])
            } else {
                known[q]
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
        let h2 = self.scan_pairs(inputs, &by_product, &rounds.second, &floors, excluded);
        let merge = |sel: &mut Select, q: usize| -> Vec<Cand> {
            merge_round1(sel, q);
            for i in rounds.start2[q]..rounds.start2[q + 1] {
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
    fn scan_pairs(
        &self,
        inputs: &ScanInputs<'_>,
        by_product: &[bool],
        pairs: &[(u32, u32)],
        floors: &[f32],
        excluded: &Excluded,
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
            let job = ListScan {
                list: &self.lists[l],
                packed: inputs.packs.map_or(&self.lists[l].packed, |p| &p[l]),
                qs: &list_queries[start[l]..start[l + 1]],
                floors,
                by_product: by_product[l],
                excluded: (excluded.per_list[l] > 0).then_some(&excluded.keys),
            };
            (l, inputs.scan_list(&job, n))
        };
        let outs: Vec<(usize, Vec<Cand>)> = if inputs.spec.parallel {
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

    /// Few queries scanning as batches do ([`SingleScan::Product`]): each query's probed
    /// lists, nearest first, by the product over their packed copies, keeping its best
    /// `spec.kc` by the product's scores (to be re-scored). On the calling thread.
    fn scan_product_few(
        &self,
        inputs: &ScanInputs<'_>,
        probes: &(Vec<usize>, Vec<u32>),
        excluded: &FxHashSet<u64>,
    ) -> Vec<Vec<Cand>> {
        let (offsets, flat) = probes;
        let pdim = inputs.spec.pdim;
        let ex = (!excluded.is_empty()).then_some(excluded);
        let mut sel = Select::default();
        let mut one = |q: usize| -> Vec<Cand> {
            sel.reset(inputs.spec.kc, f32::NEG_INFINITY);
            let qr = &inputs.reduced.queries[q * pdim..(q + 1) * pdim];
            let q8 = inputs
                .q8
                .map(|x| (&x.data[q * pdim..(q + 1) * pdim], x.scales[q]));
            for &l in &flat[offsets[q]..offsets[q + 1]] {
                let list = &self.lists[l as usize];
                if list.len() > 0 {
                    scan::push_product(inputs, (list, l), (qr, q8), &mut sel, ex);
                }
            }
            sel.kept().to_vec()
        };
        (0..offsets.len() - 1).map(&mut one).collect()
    }

    /// Each query's best `spec.kc` candidates by its 4-bit codes (see `pq.rs`): the probed
    /// lists' codes are summed through the query's lookup table, one list after another.
    /// Candidate scores are those sums (to be re-scored). Few queries (a batch scans the
    /// lists themselves): on the calling thread.
    fn scan_codes(
        &self,
        book: &Pq,
        spec: ScanSpec,
        queries: &[f32],
        probes: &(Vec<usize>, Vec<u32>),
        excluded: &FxHashSet<u64>,
    ) -> Vec<Vec<Cand>> {
        let dim = spec.dim;
        if queries.len() > dim {
            return self.scan_codes_together(book, spec, queries, probes, excluded);
        }
        let (offsets, flat) = probes;
        let level = kernels::level();
        let l2 = spec.metric == Metric::L2;
        let ex = (!excluded.is_empty()).then_some(excluded);
        let mut s = scan::CodeScratch::default();
        let mut one = |q: usize| -> Vec<Cand> {
            let qv = &queries[q * dim..(q + 1) * dim];
            book.lut(qv, l2, &mut s.table, &mut s.lut);
            s.tables.set(level, &s.lut);
            s.sel.reset(spec.kc, f32::NEG_INFINITY);
            let mine = &flat[offsets[q]..offsets[q + 1]];
            for (i, &l) in mine.iter().enumerate() {
                let list: &List = &self.lists[l as usize];
                let Some(codes) = list.codes.as_ref().filter(|_| list.len() > 0) else {
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
                scan::push_codes(&mut s, list, l, codes.as_slice(), ex);
            }
            s.sel.kept().to_vec()
        };
        (0..queries.len() / dim).map(&mut one).collect()
    }

    /// [`Self::scan_codes`] of several queries (single queries searched together,
    /// [`Self::search_as_single`]): each query's tables built once and its nearest lists
    /// scanned first (they set its floor), then the other lists list-major, each list's codes
    /// read once for all the queries probing it (a query's best `spec.kc` by rank do not
    /// depend on the order its lists are scanned in). Alone, each query read every probed
    /// list's codes from memory: on MiniLM at 270 of 1,024 lists, 2.5 MB a query.
    fn scan_codes_together(
        &self,
        book: &Pq,
        spec: ScanSpec,
        queries: &[f32],
        probes: &(Vec<usize>, Vec<u32>),
        excluded: &FxHashSet<u64>,
    ) -> Vec<Vec<Cand>> {
        let dim = spec.dim;
        let nq = queries.len() / dim;
        let (offsets, flat) = probes;
        let level = kernels::level();
        let l2 = spec.metric == Metric::L2;
        let ex = (!excluded.is_empty()).then_some(excluded);
        let mut s = scan::CodeScratch::default();
        let codes_of = |l: u32| {
            let list: &List = &self.lists[l as usize];
            let codes = list.codes.as_ref().filter(|_| list.len() > 0)?;
            Some((list, l, codes.as_slice()))
        };
        let mut tables = Vec::with_capacity(nq);
        let mut sels = Vec::with_capacity(nq);
        for (q, qv) in queries.chunks_exact(dim).enumerate() {
            book.lut(qv, l2, &mut s.table, &mut s.lut);
            let mut t = kernels::PqTables::default();
            t.set(level, &s.lut);
            let mut sel = Select::default();
            sel.reset(spec.kc, f32::NEG_INFINITY);
            let mine = &flat[offsets[q]..offsets[q + 1]];
            for &l in &mine[..mine.len().min(ROUND1_PROBES)] {
                if let Some(job) = codes_of(l) {
                    scan::push_codes_of(&mut s, (&t, &mut sel), job, ex);
                }
            }
            tables.push(t);
            sels.push(sel);
        }
        let mut pairs: Vec<(u32, u32)> = (0..nq)
            .flat_map(|q| {
                let mine = &flat[offsets[q]..offsets[q + 1]];
                mine.iter().skip(ROUND1_PROBES).map(move |&l| (l, q as u32))
            })
            .collect();
        pairs.sort_unstable();
        for (i, &(l, q)) in pairs.iter().enumerate() {
            let Some(job) = codes_of(l) else {
                continue;
            };
            // The next list's codes start loading while this one is scanned.
            if i == 0 || pairs[i - 1].0 != l {
                if let Some((_, _, next)) = pairs[i..]
                    .iter()
                    .find(|p| p.0 != l)
                    .and_then(|p| codes_of(p.0))
                {
                    kernels::prefetch(next);
                }
            }
            let q = q as usize;
            scan::push_codes_of(&mut s, (&tables[q], &mut sels[q]), job, ex);
        }
        sels.into_iter()
            .map(|mut sel| sel.kept().to_vec())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(params: IvfParams, dtype: DType, nq: usize, k: usize, codes: bool) -> SearchPlan {
        let single = if codes {
            SingleScan::Codes
        } else {
            SingleScan::Rows
        };
        SearchPlan::new(&params, dtype, Metric::Cos, nq, k, single)
    }

    fn params() -> IvfParams {
        IvfParams::with_nlist(64)
    }

    #[test]
    fn a_batch_starts_at_gemm_min_queries() {
        for dtype in [DType::F32, DType::F16, DType::I8] {
            assert!(!plan(params(), dtype, GEMM_MIN_QUERIES - 1, 10, false).batch);
            assert!(plan(params(), dtype, GEMM_MIN_QUERIES, 10, false).batch);
        }
    }

    #[test]
    fn single_queries_scan_codes_and_rescore_a_shortlist_batches_never_do() {
        let p = IvfParams {
            pq: 8,
            shortlist: 40,
            ..params()
        };
        let single = plan(p, DType::F16, 1, 10, true);
        assert!(single.codes && single.rescore);
        assert_eq!(single.kc, 40, "the shortlist, at least k");
        assert_eq!(plan(p, DType::F16, 1, 50, true).kc, 50);
        let batch = plan(p, DType::F16, GEMM_MIN_QUERIES, 10, true);
        assert!(!batch.codes);
        // Not trained yet (no codes): single queries scan the lists exactly.
        let untrained = plan(p, DType::F16, 1, 10, false);
        assert!(!untrained.codes && !untrained.rescore);
        assert_eq!(untrained.kc, 10);
    }

    #[test]
    fn f32_batches_keep_k_low_precision_batches_keep_a_margin_to_rescore() {
        let f32_batch = plan(params(), DType::F32, 100, 10, false);
        assert!(!f32_batch.rescore);
        assert_eq!(f32_batch.kc, 10);
        for dtype in [DType::F16, DType::I8] {
            let p = plan(params(), dtype, 100, 10, false);
            assert!(p.rescore, "{dtype:?}");
            // The margin of the product's rounding: max(k, 16) for bf16, max(k, 32) for i8.
            let margin = if p.product == Product::I8 { 32 } else { 16 };
            assert_eq!(p.kc, 10 + margin, "{dtype:?} {:?}", p.product);
            assert_eq!(plan(params(), dtype, 100, 100, false).kc, 200);
            // Single queries scan exactly with the single-query kernels.
            let single = plan(params(), dtype, 1, 10, false);
            assert!(!single.rescore);
            assert_eq!(single.kc, 10);
        }
    }

    #[test]
    fn rerank_replaces_the_rescore_and_keeps_its_depth() {
        let p = IvfParams {
            rerank: 50,
            ..params()
        };
        for nq in [1, 100] {
            let r = plan(p, DType::I8, nq, 10, false);
            assert!(!r.rescore);
            assert_eq!((r.rerank, r.kc), (50, 50));
            assert_eq!(plan(p, DType::I8, nq, 80, false).kc, 80);
        }
    }

    #[test]
    fn scan_dims_apply_to_batches_with_their_own_margin() {
        let p = IvfParams {
            scan_dims: 32,
            ..params()
        };
        let single = plan(p, DType::F16, 1, 10, false);
        assert_eq!(single.scan_dims, None);
        assert_eq!(single.spec(384).pdim, 384);
        let batch = plan(p, DType::F16, 100, 10, false);
        assert_eq!(batch.scan_dims, Some(32));
        assert_eq!(batch.spec(384).pdim, 32);
        assert_eq!(batch.kc, 10 + SCAN_DIMS_MARGIN);
        assert_eq!(plan(p, DType::F16, 100, 100, false).kc, 200);
    }

    #[test]
    fn single_queries_scanning_by_the_product_plan_as_a_batch_on_one_thread() {
        let p = IvfParams {
            scan_dims: 32,
            pq: 8,
            ..params()
        };
        let one = SearchPlan::new(&p, DType::F16, Metric::Cos, 1, 10, SingleScan::Product);
        let batch = plan(p, DType::F16, 100, 10, true);
        assert!(one.by_product && !one.batch && !one.codes && one.rescore);
        assert_eq!(
            (one.scan_dims, one.kc, one.product),
            (batch.scan_dims, batch.kc, batch.product)
        );
        let spec = one.spec(384);
        assert!(spec.by_product && !spec.parallel);
        // The other ways keep their plans; a batch scans by the product whatever is set.
        assert!(!plan(p, DType::F16, 1, 10, true).by_product);
        let b = SearchPlan::new(&p, DType::F16, Metric::Cos, 100, 10, SingleScan::Product);
        assert_eq!(b, batch);
    }

    #[test]
    fn the_spec_carries_the_plan() {
        let p = plan(params(), DType::I8, 100, 10, false);
        let spec = p.spec(64);
        assert_eq!((spec.dim, spec.kc, spec.parallel), (64, p.kc, true));
        assert_eq!((spec.metric, spec.product), (Metric::Cos, p.product));
        assert!(!plan(params(), DType::I8, 1, 10, false).spec(64).parallel);
    }
}
