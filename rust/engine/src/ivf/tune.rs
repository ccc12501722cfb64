//! `tune`: the cheapest nprobe (and shortlist) that reaches a target recall, measured.
//!
//! Recall is measured against the exact answer on sample queries:
//! - the caller's queries if given (a seeded 1,000 of them at most);
//! - else 1,000 stored vectors held out as queries, drawn from the rows the index was never
//!   trained on: one stored row in 32 (`held_out`, by a hash of its stored bytes) is left out
//!   of every training sample. A row the centroids were fitted to finds its neighbours in its
//!   own list more often than a new query does (on the power-law set, 64 training rows a list:
//!   recall 0.900 for rows trained on, 0.884 for rows not, 0.885 for new queries at one
//!   nprobe; tune's sample held a third of trained rows and landed 0.02 under 0.9). A held-out
//!   vector's own key is excluded from its answers, and so are its near duplicates (stored
//!   vectors closer to it than 0.6 x its distance to its 20th neighbour): a new query is new
//!   content, and a burst of near duplicates (photo libraries are full of them) would make the
//!   held-out vector far easier to answer (on the benchmark's near-duplicate set, plain
//!   leave-one-out asked for half the lists that new queries needed).
//!
//! The exact answer: the index's exact search (every list, all dimensions, no codes) gives
//! each query's best 2k + 32 candidates; the truth is their best k by float32 score, and for
//! i8 rows by float32 score plus a draw of what rounding took from each row (a uniform error
//! of up to half a step per value: variance scale^2 / 12 a value). That draw stands in for the
//! float32 vectors the index no longer holds: measured against its own i8 rows, tune landed
//! 0.02-0.03 under every target on the mixtures (0.962 for 0.99).
//!
//! Then, for each sample query, where each candidate's list stands in its probe order gives
//! the recall of scanning the first p lists exactly, for every p at once (the scan returns
//! the first k candidates in those lists); the smallest p reaching the target is what single
//! queries scanning rows need. Where even every list misses the target (i8 rounding), tune
//! aims at what every list reaches less one standard error, and says so (`auto`: "reach:").
//! Batches rank by a product (and `scan_dims`): measured from that p up by an eighth at a time
//! (a `scan_dims` chosen automatically is dropped where it would need more than twice the
//! lists), as one search for k of the whole sample that excludes every key any sample query
//! excludes (each query's truth then its best k outside them); where a seeded 128 of the
//! sample probe only lists the batch scans by the product (near-exhaustive scans), those are
//! searched first, and where each finds what an exact scan of its lists finds, the others'
//! recalls are taken from that exact scan (`batch_recalls`). Single queries: the rows, the
//! packed copy a batch scans (`single_scan` "product": where the batch scanned every probed
//! list by the product, the queries that choose the same lists alone find what they found in
//! the batch, and only the others are searched), or codes (nprobe and shortlist together: from
//! where each candidate stands by code score, `tune/codes.rs`, the pair reading the fewest
//! bytes, then confirmed by searches of a part of the sample; at the exact scan's nprobe the
//! codes must keep nearly every neighbour, and the shortlist grows long), whichever reads the
//! fewest bytes; codes chosen automatically and not used are dropped (`pq` 0: a smaller
//! index). Single queries are measured in searches of many at once that give each what it
//! gets alone (`search_as_single`: by the product, one list-major scan for all of them), and
//! every shortlist of codes from one scan at the longest (`codes_ranked`); a way that reads more
//! than the rows at its first step is not measured.
//!
//! The recall reported is the sample's mean recall@k at the settings chosen, with its spread:
//! 1.96 standard errors of that mean (per-query recalls vary; 1,000 queries at recall 0.95 give
//! about +-0.006). The sample and its exact answers are kept for the next tune of the same
//! contents and arguments (one process-wide entry, keyed by a hash of every key and row).

use super::kmeans::Rng;
use super::search::CodesRanked;
use super::{IvfIndex, SingleScan};
use crate::error::{invalid, Result};
use crate::types::{DType, Metric};
use rayon::prelude::*;
use rustc_hash::FxHashSet;
use std::sync::{Arc, Mutex};

mod codes;

/// Most sample queries tune uses.
pub const TUNE_QUERIES: usize = 1000;
/// Neighbours fetched per held-out vector to find its near duplicates (2k + this).
const DUP_FETCH: usize = 32;
/// Near duplicates: closer than this share of the distance to the (2k)-th neighbour.
const DUP_RADIUS: f32 = 0.6;
/// Most single queries `product_like_batch` searches (the rest move by their mean change).
const LIKE_BATCH_MEASURED: usize = 64;
/// Single queries (through codes or rows) `single_recalls_of` searches together, a part of
/// the sample per task.
const AS_SINGLE_PART: usize = 32;
/// Sample queries a batch measurement searches first where they may stand for the others
/// (`batch_recalls`).
const BATCH_FIRST: usize = 128;
/// Longest shortlist tune sets.
const MAX_SHORTLIST: usize = 1024;
/// Most settings of codes measured (the cheapest by the code ranks, then aiming higher by what
/// they over-estimated).
const CODE_TRIES: usize = 3;

/// What `tune` chose and the recall it expects.
#[derive(Clone, Debug, PartialEq)]
pub struct TuneReport {
    pub target: f32,
    pub k: usize,
    /// Sample queries used, and whether they were the caller's (else held-out stored vectors).
    pub queries: usize,
    pub user_queries: bool,
    pub nprobe: usize,
    pub batch_recall: f64,
    pub batch_spread: f64,
    pub nprobe_single: usize,
    /// How single queries scan.
    pub single_scan: SingleScan,
    /// With codes: the single queries' shortlist (else 0).
    pub shortlist: usize,
    pub single_recall: f64,
    pub single_spread: f64,
    pub scan_dims: usize,
    /// Settings measured (batch and single).
    pub evaluations: usize,
}

/// The last sample `tune` measured, with the fingerprint of what it depends on.
static LAST_SAMPLE: Mutex<Option<(u64, Arc<Sample>)>> = Mutex::new(None);

/// Sample queries and their exact answers.
struct Sample {
    queries: Vec<f32>,
    truth: Vec<Vec<u64>>,
    /// Keys each query's answers must not contain (its own and its near duplicates).
    exclude: Vec<Vec<u64>>,
    /// Each query's best stored rows by the index's own exact scores (excluded keys dropped),
    /// best first: an exact scan of some lists returns the first k of these that lie in them.
    cand: Vec<Vec<u64>>,
    /// Batches: one search excludes the keys every query excludes (`union`), and each
    /// query's truth is then its best k outside them, so that a batch keeps the candidates a
    /// real batch of k keeps (asking for k + the most excluded re-scored more, and measured
    /// batches better than they are).
    union: Vec<u64>,
    truth_batch: Vec<Vec<u64>>,
}

impl Sample {
    fn len(&self) -> usize {
        self.truth.len()
    }
}

/// One stored row in this many is held out of training (the k-means sample, and so the
/// codebooks and directions trained with it) and kept for tune's sample queries: a vector the
/// centroids were fitted to finds its neighbours in its own list more often than a new query
/// does (on the power-law set, 64 training rows a list: recall 0.900 for rows trained on,
/// 0.884 for rows not trained on and 0.885 for new queries, at the same nprobe).
const HOLD_OUT: u64 = 32;

/// Whether tune may hold out the row stored as `bytes` (a hash of the encoded row: the same
/// rows whether trained from given vectors or from the contents, and after a reload).
pub(super) fn held_out(bytes: &[u8]) -> bool {
    row_hash(bytes).is_multiple_of(HOLD_OUT)
}

/// The hash of a stored row's bytes `held_out` reads.
fn row_hash(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

/// The bytes `add` stores for a (normalized) row.
pub(super) fn stored_bytes(dtype: DType, row: &[f32]) -> Vec<u8> {
    match dtype {
        DType::F32 => bytemuck::cast_slice(row).to_vec(),
        DType::F16 => row
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
            .collect(),
        DType::I8 => {
            let mut q = vec![0i8; row.len()];
            crate::kernels::quantize_row_i8(row, &mut q);
            bytemuck::cast_slice(&q).to_vec()
        }
    }
}

/// Mean and 1.96 standard errors of per-query recalls.
fn mean_spread(r: &[f64]) -> (f64, f64) {
    let n = r.len().max(1) as f64;
    let mean = r.iter().sum::<f64>() / n;
    let var = r.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, 1.96 * (var / n).sqrt())
}

/// Per-query recall: of `truth`, the share among the first k of `found` once `exclude` is
/// dropped.
fn recall_of(found: &[u64], truth: &[u64], exclude: &[u64], k: usize) -> f64 {
    if truth.is_empty() {
        return 1.0;
    }
    let got: FxHashSet<u64> = found
        .iter()
        .filter(|key| !exclude.contains(key))
        .take(k)
        .copied()
        .collect();
    truth.iter().filter(|t| got.contains(t)).count() as f64 / truth.len() as f64
}

impl IvfIndex {
    /// Sets nprobe (batches), the single queries' nprobe and, with codes, the shortlist to the
    /// cheapest settings whose recall@k reaches `target` on sample queries (`queries`, or held
    /// out stored vectors); see `tune.rs`. The settings are kept (and saved with the index).
    pub fn tune(&mut self, target: f32, k: usize, queries: Option<&[f32]>) -> Result<TuneReport> {
        self.check_writable()?;
        super::params::check_recall("target_recall", target)?;
        if k == 0 {
            return invalid("k must be at least 1, got 0");
        }
        if !self.is_trained() {
            return invalid(format!(
                "tune needs a trained index (it holds {} vectors; train() or add more)",
                self.len()
            ));
        }
        if self.len() <= 2 * k + 1 {
            return invalid(format!(
                "tune needs more than 2k + 1 = {} stored vectors, got {}",
                2 * k + 1,
                self.len()
            ));
        }
        if let Some(q) = queries {
            if q.is_empty() || !q.len().is_multiple_of(self.dim) {
                return invalid(format!(
                    "queries must have shape (n, {}) with n >= 1; got {} values",
                    self.dim,
                    q.len()
                ));
            }
            self.check_vectors(q, "queries", false)?;
        }
        let saved = (
            self.params.nprobe,
            self.params.shortlist,
            self.params.scan_dims,
            self.auto.nprobe_single,
            self.auto.single_product,
        );
        let out = self.tune_inner(target as f64, k, queries);
        if out.is_err() {
            self.params.nprobe = saved.0;
            self.params.shortlist = saved.1;
            self.set_scan_dims(saved.2)?;
            self.auto.nprobe_single = saved.3;
            self.auto.single_product = saved.4;
        }
        out
    }

    fn tune_inner(&mut self, target: f64, k: usize, queries: Option<&[f32]>) -> Result<TuneReport> {
        let mut t = self.tuning(target, k, queries)?;
        self.aim_within_reach(&mut t);
        let p_exact = t.p_exact();
        let (nprobe, recalls) = self.tune_batches(&mut t, p_exact)?;
        let single = self.tune_single(&mut t, p_exact, (nprobe, &recalls))?;
        let (batch_recall, batch_spread) = mean_spread(&recalls);
        let (single_recall, single_spread) = mean_spread(&single.recalls);
        self.params.nprobe = nprobe;
        self.auto.nprobe_single = single.nprobe;
        self.auto.single_product = single.scan == SingleScan::Product;
        if single.shortlist > 0 {
            self.params.shortlist = single.shortlist;
        }
        self.auto.tuned = Some((target as f32, k));
        Ok(TuneReport {
            target: target as f32,
            k,
            queries: t.sample.len(),
            user_queries: queries.is_some(),
            nprobe,
            batch_recall,
            batch_spread,
            nprobe_single: single.nprobe,
            single_scan: single.scan,
            shortlist: single.shortlist,
            single_recall,
            single_spread,
            scan_dims: self.params.scan_dims,
            evaluations: t.evaluations,
        })
    }

    /// The sample (remembered or drawn and answered) and where each candidate's list stands in
    /// each query's probe order: what every measurement of `tune` starts from.
    fn tuning(&mut self, target: f64, k: usize, queries: Option<&[f32]>) -> Result<Tuning> {
        let sample = self.remembered_sample(k, queries)?;
        let (ranks, orders) = self.cand_list_ranks(&sample)?;
        Ok(Tuning {
            sample,
            ranks,
            orders,
            target,
            k,
            nlist: self.lists.len(),
            evaluations: 0,
        })
    }

    /// Where even an exact scan of every list misses the target (i8 rows: rounding loses
    /// neighbours whatever is scanned), tune aims at what that scan reaches less one standard
    /// error (within the sample's noise of the best there is), and says so in `auto`.
    fn aim_within_reach(&mut self, t: &mut Tuning) {
        self.auto.why.retain(|w| !w.starts_with("reach:"));
        let (best, spread) = mean_spread(&t.ideal(t.nlist));
        if best >= t.target {
            return;
        }
        let aim = best - spread / 1.96;
        self.auto.why.push(format!(
            "reach: tune({}) measured {best:.3} +- {spread:.3} with every list scanned \
             ({}); it aimed at {aim:.3}",
            t.target as f32,
            if self.dtype == DType::I8 {
                "i8 rows: f16 keeps more"
            } else {
                "the rows as stored"
            }
        ));
        t.target = aim;
    }

    /// The sample and its answers for `tune_sample(k, queries)`, reused from the last tune
    /// where the contents and arguments are the same (the answers cost an exact search of
    /// every sample query; the gallery and the benchmark tune one index to several targets).
    fn remembered_sample(&mut self, k: usize, queries: Option<&[f32]>) -> Result<Arc<Sample>> {
        let (print, marked) = self.fingerprint(k, queries);
        if let Some((p, s)) = LAST_SAMPLE.lock().map(|g| g.clone()).ok().flatten() {
            if p == print {
                return Ok(s);
            }
        }
        let sample = Arc::new(self.tune_sample(k, queries, marked)?);
        if let Ok(mut g) = LAST_SAMPLE.lock() {
            *g = Some((print, sample.clone()));
        }
        Ok(sample)
    }

    /// A hash of everything a sample's answers depend on: the arguments, the layout and every
    /// stored key and row; and the keys of the rows `held_out` marks (from the same hash of
    /// each row: on 200,000 x 512 f16 rows, a second pass over them cost 0.03 CPU-s).
    fn fingerprint(&self, k: usize, queries: Option<&[f32]>) -> (u64, Vec<u64>) {
        use super::list::Data;
        let dim = self.dim;
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        let head = [
            self.dim as u64,
            self.dtype as u64,
            self.metric as u64,
            self.params.seed,
            self.params.rerank as u64,
            k as u64,
            queries.map_or(u64::MAX, |q| q.len() as u64),
        ];
        h.update(bytemuck::cast_slice(&head));
        h.update(bytemuck::cast_slice(queries.unwrap_or(&[])));
        let parts: Vec<(u64, Vec<u64>)> = self
            .lists
            .par_iter()
            .map(|list| {
                let mut h = xxhash_rust::xxh3::Xxh3::new();
                let keys = list.keys.as_slice();
                h.update(bytemuck::cast_slice(keys));
                let mut marked = Vec::new();
                for (slot, &key) in keys.iter().enumerate() {
                    let row = row_hash(list.row_bytes(slot, dim));
                    h.update(&row.to_le_bytes());
                    if row.is_multiple_of(HOLD_OUT) {
                        marked.push(key);
                    }
                }
                if let Data::I8 { scales, .. } = &list.data {
                    h.update(bytemuck::cast_slice(scales.as_slice()));
                }
                if let Some(e) = &list.exact {
                    h.update(bytemuck::cast_slice(e.as_slice()));
                }
                (h.digest(), marked)
            })
            .collect();
        let mut marked = Vec::new();
        for (digest, keys) in parts {
            h.update(&digest.to_le_bytes());
            marked.extend(keys);
        }
        (h.digest(), marked)
    }

    /// Batches rank by a product (and `scan_dims`): measured from the exact scan's nprobe up
    /// by an eighth at a time; an automatic `scan_dims` that does not reach the target within
    /// twice that nprobe is dropped (all dimensions), and the climb starts again.
    fn tune_batches(&mut self, t: &mut Tuning, p_exact: usize) -> Result<(usize, Vec<f64>)> {
        let (nprobe, recalls) = self.climb(t, p_exact, Climb::Batch)?;
        if t.reaches(&recalls) || self.params.scan_dims == 0 || !self.auto.knobs.scan_dims {
            return Ok((nprobe, recalls));
        }
        self.set_scan_dims(0)?;
        self.auto.why.retain(|w| !w.starts_with("scan_dims="));
        self.auto.why.push(format!(
            "scan_dims=0: tune({}) measured the reduced scan short of the target",
            t.target as f32
        ));
        self.climb(t, p_exact, Climb::Batch)
    }

    /// The smallest nprobe from `from` up (by an eighth at a time, at most twice the exact
    /// scan's need) whose recall reaches the target, measured as batches or as single queries
    /// scanning by the product; else the last one measured. The first two steps are measured
    /// in turn (most targets are met there); past them the last step is measured next: where
    /// even it misses, the climb stops there (i8 rows aiming at what every list reaches
    /// measured 8 steps of a reduced scan that reached nowhere), else bisection finds the
    /// first step reaching the target between them (recall grows with nprobe).
    fn climb(&mut self, t: &mut Tuning, from: usize, how: Climb) -> Result<(usize, Vec<f64>)> {
        let limit = 2 * t.p_exact().max(4);
        let mut steps = vec![from.clamp(1, t.nlist)];
        while let Some(&p) = steps.last().filter(|&&p| p < t.nlist && p < limit) {
            steps.push((p + p.div_ceil(8)).min(t.nlist));
        }
        let last = steps.len() - 1;
        let mut lo = 0;
        for (i, &p) in steps.iter().enumerate().take(2) {
            let r = self.measure(t, how, p)?;
            if t.reaches(&r) || i == last {
                return Ok((p, r));
            }
            lo = i;
        }
        let top = self.measure(t, how, steps[last])?;
        if !t.reaches(&top) {
            return Ok((steps[last], top));
        }
        let (mut hi, mut best) = (last, top);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let r = self.measure(t, how, steps[mid])?;
            if t.reaches(&r) {
                (hi, best) = (mid, r);
            } else {
                lo = mid;
            }
        }
        Ok((steps[hi], best))
    }

    /// The sample's recalls at nprobe `p`, as `climb` measures them.
    fn measure(&mut self, t: &mut Tuning, how: Climb, p: usize) -> Result<Vec<f64>> {
        t.evaluations += 1;
        match how {
            Climb::Batch => self.batch_recalls(t, p),
            Climb::SingleProduct => {
                self.auto.nprobe_single = p;
                self.single_recalls(&t.sample, t.k, t.sample.len())
            }
        }
    }

    /// The sample's recalls searched as one batch at nprobe `p`. Where a seeded
    /// `BATCH_FIRST` of the sample, searched as a batch over all dimensions, scan every list
    /// they probe by the product (near-exhaustive scans), those are searched first; where
    /// each finds what an exact scan of its lists finds (`Tuning::ideal_batch`), the others'
    /// recalls are the exact scan's too (a difference estimator: the ideal recalls, free from
    /// the list ranks, plus the mean measured difference, 0, whose estimated variance is 0).
    /// Else the whole sample is searched. (On random vectors at 750 of 1,024 lists, a batch of
    /// the sample cost as much as the exact answers; its recalls equalled the exact scan's
    /// for every query.)
    fn batch_recalls(&mut self, t: &Tuning, p: usize) -> Result<Vec<f64>> {
        self.params.nprobe = p;
        let all_dims = self.params.scan_dims == 0;
        if let Some(first) = t.batch_first(p, all_dims, self.params.seed) {
            let ideal = t.ideal_batch(p);
            let r = self.batch_recalls_of(t, &first)?;
            if first.iter().zip(&r).all(|(&i, &x)| x == ideal[i]) {
                return Ok(ideal);
            }
        }
        let all: Vec<usize> = (0..t.sample.len()).collect();
        self.batch_recalls_of(t, &all)
    }

    /// The recalls of the sample queries `which` searched as one batch at the current nprobe.
    fn batch_recalls_of(&self, t: &Tuning, which: &[usize]) -> Result<Vec<f64>> {
        let (s, dim) = (&t.sample, self.dim);
        let mut part = Vec::new();
        let queries = if which.len() == s.len() {
            &s.queries
        } else {
            for &i in which {
                part.extend_from_slice(&s.queries[i * dim..(i + 1) * dim]);
            }
            &part
        };
        let (ids, _, kp) = self.search(queries, t.k, Some(&s.union))?;
        // (kp is 0 where the union leaves fewer than one key: every truth is then empty)
        Ok(which
            .iter()
            .enumerate()
            .map(|(j, &i)| {
                let found = ids.get(j * kp..(j + 1) * kp).unwrap_or(&[]);
                recall_of(found, &s.truth_batch[i], &[], t.k)
            })
            .collect())
    }

    /// How single queries scan, chosen by what each way reads to reach the target: the rows
    /// of the exact scan's lists; the lists' packed copies as a batch scans them (where they
    /// are smaller than the rows), from the batches' nprobe up; the codes (see `tune_codes`).
    /// Codes chosen automatically and not chosen here are dropped (a smaller index).
    fn tune_single(
        &mut self,
        t: &mut Tuning,
        p_exact: usize,
        (nprobe, batch): (usize, &[f64]),
    ) -> Result<Single> {
        let cost = Cost::of(self);
        let mut best = Single {
            scan: SingleScan::Rows,
            nprobe: p_exact,
            shortlist: 0,
            recalls: t.ideal(p_exact),
            bytes: cost.rows(p_exact),
        };
        let from = if t.reaches(&t.ideal(nprobe)) {
            nprobe
        } else {
            p_exact
        };
        // The product reads more with every list: where it reads more than the rows at its
        // first step, it cannot win and is not measured.
        if self.product_scan_fits() && cost.product(self, from, t.k) < best.bytes {
            self.auto.single_product = true;
            let like_batch = from == nprobe
                && t.reaches(batch)
                && t.batch_is_all_product(nprobe, self.params.scan_dims > 0);
            let (p, r) = match like_batch {
                true => {
                    t.evaluations += 1;
                    let r = self.product_like_batch(t, nprobe, batch)?;
                    match t.reaches(&r) {
                        true => (nprobe, r),
                        false => {
                            self.climb(t, nprobe + nprobe.div_ceil(8), Climb::SingleProduct)?
                        }
                    }
                }
                false => self.climb(t, from, Climb::SingleProduct)?,
            };
            self.auto.single_product = false;
            let bytes = cost.product(self, p, t.k);
            if t.reaches(&r) && bytes < best.bytes {
                best = Single {
                    scan: SingleScan::Product,
                    nprobe: p,
                    shortlist: 0,
                    recalls: r,
                    bytes,
                };
            }
        }
        if !self.has_codes() {
            return Ok(best);
        }
        match self.tune_codes(t, p_exact, best.bytes)? {
            Some((p, s, r)) => {
                return Ok(Single {
                    scan: SingleScan::Codes,
                    nprobe: p,
                    shortlist: s,
                    recalls: r,
                    bytes: cost.codes(p, s),
                })
            }
            None if self.auto.knobs.pq => {
                self.drop_codes();
                self.auto.why.retain(|w| !w.starts_with("pq="));
                self.auto.why.push(format!(
                    "pq=0: tune({}) measured single queries cheaper without codes",
                    t.target as f32
                ));
            }
            None if best.scan == SingleScan::Rows => {
                // Codes given by hand (single queries scan them unless they scan by the
                // product): the longest shortlist tried, at the exact scan's nprobe.
                self.auto.nprobe_single = p_exact;
                self.params.shortlist = MAX_SHORTLIST;
                t.evaluations += 1;
                let recalls = self.single_recalls(&t.sample, t.k, t.sample.len())?;
                return Ok(Single {
                    scan: SingleScan::Codes,
                    nprobe: p_exact,
                    shortlist: MAX_SHORTLIST,
                    recalls,
                    bytes: cost.codes(p_exact, MAX_SHORTLIST),
                });
            }
            None => {}
        }
        Ok(best)
    }

    /// For each sample query, the position of each candidate's list in the query's probe
    /// order (every list, nearest first).
    fn cand_list_ranks(&mut self, sample: &Sample) -> Result<(Vec<Vec<usize>>, Probes)> {
        let nlist = self.lists.len();
        let queries = self.normalize(&sample.queries, true);
        let (offsets, flat) = self.probes(&queries, 0, &[], (nlist, false));
        let mut pos = vec![usize::MAX; nlist];
        let mut out = Vec::with_capacity(sample.len());
        for (i, cand) in sample.cand.iter().enumerate() {
            let order = &flat[offsets[i]..offsets[i + 1]];
            for (r, &l) in order.iter().enumerate() {
                pos[l as usize] = r;
            }
            out.push(
                cand.iter()
                    .map(|key| {
                        self.map
                            .get(key)
                            .map_or(usize::MAX, |&(l, _)| pos[l as usize])
                    })
                    .collect(),
            );
            for &l in order {
                pos[l as usize] = usize::MAX;
            }
        }
        Ok((out, (offsets, flat)))
    }

    /// The recalls of the sample's first `m` queries searched one at a time (in parallel) at
    /// the current settings.
    fn single_recalls(&self, sample: &Sample, k: usize, m: usize) -> Result<Vec<f64>> {
        let which: Vec<usize> = (0..m.min(sample.len())).collect();
        self.single_recalls_of(sample, k, &which)
    }

    /// The recalls of the sample queries `which` searched as single queries at the current
    /// settings, as a batch searches them (the keys any query excludes excluded), from
    /// searches of many at once (`search_as_single`: what each gets alone): by the product,
    /// one search of them all (each list scanned once for all); else parts in parallel.
    fn single_recalls_of(&self, sample: &Sample, k: usize, which: &[usize]) -> Result<Vec<f64>> {
        let dim = self.dim;
        let part = match self.single_scan() {
            SingleScan::Product => which.len().max(1),
            _ => AS_SINGLE_PART,
        };
        let parts: Vec<Vec<f64>> = which
            .par_chunks(part)
            .map(|part| {
                let mut qs = Vec::with_capacity(part.len() * dim);
                for &i in part {
                    qs.extend_from_slice(&sample.queries[i * dim..(i + 1) * dim]);
                }
                let (ids, _, kp) = self.search_as_single(&qs, k, Some(&sample.union))?;
                Ok(part
                    .iter()
                    .enumerate()
                    .map(|(j, &i)| {
                        let found = ids.get(j * kp..(j + 1) * kp).unwrap_or(&[]);
                        recall_of(found, &sample.truth_batch[i], &[], k)
                    })
                    .collect())
            })
            .collect::<Result<_>>()?;
        Ok(parts.concat())
    }

    /// Single queries scanning by the product at the batches' nprobe `p`, where the batch
    /// scanned every probed list by the product: a single query whose lists are the ones it
    /// had in the batch finds what it found there (integer products over the same packed
    /// rows, the same candidates kept and re-scored; tested), so only the queries whose
    /// lists differ (single queries score the centroids by another kernel, which orders near
    /// ties otherwise) are searched. On random vectors, at 750 of 1,024 lists, 1,000 single
    /// queries cost more than the build.
    fn product_like_batch(&mut self, t: &Tuning, p: usize, batch: &[f64]) -> Result<Vec<f64>> {
        let queries = self.normalize(&t.sample.queries, true);
        let single = self.single_query_lists(&queries, p);
        let (offsets, flat) = &t.orders;
        let differ: Vec<usize> = (0..t.sample.len())
            .filter(|&i| {
                let mut a: Vec<u64> = single[i * p..(i + 1) * p].to_vec();
                let mut b: Vec<u64> = flat[offsets[i]..offsets[i] + p]
                    .iter()
                    .map(|&l| l as u64)
                    .collect();
                a.sort_unstable();
                b.sort_unstable();
                a != b
            })
            .collect();
        self.auto.nprobe_single = p;
        // At most LIKE_BATCH_MEASURED of them (every j-th): the others move from their batch
        // recall by the mean of what the measured ones moved (near-exhaustive scans on random
        // vectors differ for most queries, by a list or two of hundreds, and barely move).
        let step = differ.len().div_ceil(LIKE_BATCH_MEASURED).max(1);
        let which: Vec<usize> = differ.iter().copied().step_by(step).collect();
        let measured = self.single_recalls_of(&t.sample, t.k, &which)?;
        let mut r = batch.to_vec();
        let mut shift = 0.0;
        for (&i, &x) in which.iter().zip(&measured) {
            shift += x - r[i];
            r[i] = x;
        }
        let shift = shift / which.len().max(1) as f64;
        for &i in &differ {
            if which.binary_search(&i).is_err() {
                r[i] = (r[i] + shift).clamp(0.0, 1.0);
            }
        }
        Ok(r)
    }

    /// Single queries through codes: of the (nprobe, shortlist) pairs the code ranks say reach
    /// the target (`tune/codes.rs`), the one reading the fewest bytes, if it reads fewer than
    /// `budget` (what the cheapest other way reads): the codes of the probed lists plus the
    /// re-scored rows, counted twice as they lie anywhere in memory. That pair is then
    /// confirmed by searches of `codes::CHECKED` sample queries (`codes_ranked`: a search at
    /// shortlist s returns the best k of the first s candidates it ranks, so one scan gives
    /// every shortlist up to twice the one chosen): their recalls replace the counted ones,
    /// and the others move by the mean of what they moved. The shortest shortlist reaching
    /// the target is kept; where none does, the model aims higher by what it over-estimated,
    /// `CODE_TRIES` times at most. None: another way is cheaper.
    fn tune_codes(
        &mut self,
        t: &mut Tuning,
        p_exact: usize,
        budget: f64,
    ) -> Result<Option<(usize, usize, Vec<f64>)>> {
        let Some(mut model) = self.code_ranks(t, p_exact) else {
            return Ok(None);
        };
        t.evaluations += 1;
        let cost = Cost::of(self);
        let (sample, k) = (t.sample.clone(), t.k);
        let step = sample.len().div_ceil(codes::CHECKED).max(1);
        let checked: Vec<usize> = (0..sample.len()).step_by(step).collect();
        let mut aim = t.target;
        for _ in 0..CODE_TRIES {
            let Some((j, s, expected)) = model.cheapest(self, t, (&cost, budget), aim) else {
                return Ok(None);
            };
            let p = model.ps[j];
            let longest = (budget - cost.codes(p, 0)) / (2.0 * cost.row);
            let top = (2 * s).min(longest as usize).clamp(s, MAX_SHORTLIST);
            self.auto.nprobe_single = p;
            let mut ranked = self.codes_ranked_sample(&sample, k, top, &checked)?;
            let (ix, tuning): (&IvfIndex, &Tuning) = (self, t);
            let mut measured = 0;
            let mut at = |s: usize| -> Vec<f64> {
                measured += 1;
                let found: Vec<Vec<u64>> = ranked
                    .par_iter_mut()
                    .flat_map_iter(|part| ix.codes_found(part, s))
                    .collect();
                let measured: Vec<f64> = (checked.iter().zip(&found))
                    .map(|(&i, f)| recall_of(f, &sample.truth_batch[i], &[], k))
                    .collect();
                model.confirmed(tuning, (j, s), &checked, &measured)
            };
            let r = at(s);
            let missed = expected - mean_spread(&r).0;
            let found = match mean_spread(&r).0 >= t.target {
                true => Some((s, r)),
                // The shortest measured shortlist reaching the target, if the longest does.
                false => {
                    let at_top = at(top);
                    (mean_spread(&at_top).0 >= t.target).then(|| {
                        let (mut lo, mut hi, mut best) = (s, top, at_top);
                        while hi - lo > 1 {
                            let mid = lo + (hi - lo) / 2;
                            let r = at(mid);
                            if mean_spread(&r).0 >= t.target {
                                (hi, best) = (mid, r);
                            } else {
                                lo = mid;
                            }
                        }
                        (hi, best)
                    })
                }
            };
            t.evaluations += measured;
            if let Some((s, r)) = found {
                self.params.shortlist = s;
                return Ok(Some((p, s, r)));
            }
            aim += missed;
        }
        Ok(None)
    }

    /// `codes_ranked` of the sample queries `which` (each one's best `longest` by codes), as
    /// the batches exclude keys: parts of them in parallel, in order.
    fn codes_ranked_sample(
        &self,
        sample: &Sample,
        k: usize,
        longest: usize,
        which: &[usize],
    ) -> Result<Vec<CodesRanked>> {
        let dim = self.dim;
        which
            .par_chunks(AS_SINGLE_PART)
            .map(|part| {
                let mut qs = Vec::with_capacity(part.len() * dim);
                for &i in part {
                    qs.extend_from_slice(&sample.queries[i * dim..(i + 1) * dim]);
                }
                self.codes_ranked(&qs, (k, longest), Some(&sample.union))
            })
            .collect()
    }

    /// The sample queries with their answers: the caller's queries (a seeded 1,000 at most),
    /// or stored rows held out as queries (`held_out_keys` of the keys `marked` for it).
    fn tune_sample(
        &mut self,
        k: usize,
        queries: Option<&[f32]>,
        marked: Vec<u64>,
    ) -> Result<Sample> {
        let dim = self.dim;
        let n = self.len();
        let seed = self.params.seed.wrapping_add(3);
        let (qs, own): (Vec<f32>, Option<Vec<u64>>) = match queries {
            Some(q) => {
                let nq = q.len() / dim;
                let pick = Rng::new(seed).sample(nq, TUNE_QUERIES.min(nq));
                let mut out = Vec::with_capacity(pick.len() * dim);
                for i in pick {
                    out.extend_from_slice(&q[i * dim..(i + 1) * dim]);
                }
                (out, None)
            }
            None => {
                let pick = self.held_out_keys(TUNE_QUERIES.min(n / 2), seed, marked);
                (self.get(&pick)?, Some(pick))
            }
        };
        let m = qs.len() / dim;
        // Exact: every list, all dimensions, no codes (the lists keep their packed copies).
        let (ids, _, kp) = self.search_exact(&qs, (2 * k + DUP_FETCH).min(n))?;
        let qn = self.normalize(&qs, true);
        let per: Vec<Answer> = (0..m)
            .into_par_iter()
            .map(|i| {
                let q = Query {
                    raw: &qs[i * dim..(i + 1) * dim],
                    unit: &qn[i * dim..(i + 1) * dim],
                    own: own.as_ref().map(|o| o[i]),
                    seed: seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                };
                self.answer(&q, &ids[i * kp..(i + 1) * kp], k)
            })
            .collect::<Result<_>>()?;
        let mut union: Vec<u64> = per.iter().flat_map(|a| a.exclude.iter().copied()).collect();
        union.sort_unstable();
        union.dedup();
        let mut sample = Sample {
            queries: qs,
            truth: Vec::with_capacity(m),
            exclude: Vec::with_capacity(m),
            cand: Vec::with_capacity(m),
            truth_batch: Vec::with_capacity(m),
            union: Vec::new(),
        };
        for a in per {
            let outside = a.ranked.iter().filter(|c| union.binary_search(c).is_err());
            sample.truth_batch.push(outside.take(k).copied().collect());
            sample.truth.push(a.ranked.into_iter().take(k).collect());
            sample.exclude.push(a.exclude);
            sample.cand.push(a.cand);
        }
        sample.union = union;
        Ok(sample)
    }

    /// `m` stored keys to hold out as queries: rows `held_out` marks first (`marked`: rows the
    /// index was not trained on), others only where too few are marked (an index trained
    /// before rows were held out, or a small one); a seeded sample of each.
    fn held_out_keys(&self, m: usize, seed: u64, mut marked: Vec<u64>) -> Vec<u64> {
        marked.sort_unstable();
        let mut rng = Rng::new(seed);
        let first = m.min(marked.len());
        let mut pick: Vec<u64> = rng
            .sample(marked.len(), first)
            .into_iter()
            .map(|i| marked[i])
            .collect();
        if first < m {
            let mut other: Vec<u64> = (self.lists.iter())
                .flat_map(|list| list.keys.as_slice().iter().copied())
                .filter(|key| marked.binary_search(key).is_err())
                .collect();
            other.sort_unstable();
            pick.extend(
                rng.sample(other.len(), m - first)
                    .into_iter()
                    .map(|i| other[i]),
            );
        }
        pick
    }

    /// One query's truth, exclusions and candidates, from its best stored rows by the index's
    /// exact scores (`found`). A held-out stored row drops itself and its near duplicates
    /// (closer to it than `DUP_RADIUS` x its distance to its (2k)-th neighbour). The truth is
    /// the best k by the float32 score of each stored row, plus for i8 rows a draw of what
    /// rounding took from it (`true_score`): an exact answer of float32 vectors the i8 rows
    /// could have come from.
    fn answer(&self, q: &Query, found: &[u64], k: usize) -> Result<Answer> {
        let dim = self.dim;
        let found: Vec<u64> = found
            .iter()
            .copied()
            .filter(|&c| Some(c) != q.own)
            .collect();
        let rows = self.get(&found)?;
        let rows: Vec<&[f32]> = rows.chunks_exact(dim).collect();
        let mut exclude = Vec::new();
        if let Some(own) = q.own {
            exclude.push(own);
            let d: Vec<f32> = rows.iter().map(|r| sq_l2(r, q.raw).sqrt()).collect();
            let reference = d.get(2 * k - 1).or(d.last()).copied().unwrap_or(0.0);
            for (c, dc) in found.iter().zip(&d) {
                if *dc < DUP_RADIUS * reference {
                    exclude.push(*c);
                }
            }
        }
        let mut rng = Rng::new(q.seed);
        let mut cand = Vec::with_capacity(found.len());
        let mut scored = Vec::with_capacity(found.len());
        for (&c, r) in found.iter().zip(&rows) {
            if exclude.contains(&c) {
                continue;
            }
            cand.push(c);
            let (score, sd) = self.true_score(q.unit, r);
            scored.push((score + sd * gauss(&mut rng), c));
        }
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        Ok(Answer {
            ranked: scored.into_iter().map(|(_, c)| c).collect(),
            exclude,
            cand,
        })
    }

    /// A stored row's float32 score for a (normalized) query, and for i8 rows the standard
    /// deviation of what rounding changed in it: each value moved by a uniform error of one
    /// step (`scale` = max |value| / 127) or less, variance scale^2 / 12 per dimension, so
    /// the score by |q|^2 scale^2 / 12 (L2: the distance by 4 |q - x|^2 scale^2 / 12). f16
    /// and f32 rows: 0 (f16 keeps 11 bits of each value: far below the gaps between
    /// neighbours' scores).
    fn true_score(&self, q: &[f32], r: &[f32]) -> (f32, f32) {
        let scale = match self.dtype {
            DType::I8 => r.iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0,
            _ => 0.0,
        };
        let step = scale / 12f32.sqrt();
        if self.metric == Metric::L2 {
            let d = sq_l2(q, r);
            (-d, 2.0 * d.sqrt() * step)
        } else {
            let dot: f32 = q.iter().zip(r).map(|(a, b)| a * b).sum();
            if step == 0.0 {
                return (dot, 0.0);
            }
            let norm = q.iter().map(|a| a * a).sum::<f32>().sqrt();
            (dot, norm * step)
        }
    }
}

/// A sample query as `answer` reads it: as given, normalized like the search's, the stored
/// row it was held out from, and the seed of its draws.
struct Query<'a> {
    raw: &'a [f32],
    unit: &'a [f32],
    own: Option<u64>,
    seed: u64,
}

/// What `answer` found for one query (the fields of `Sample`; `ranked`: the candidates by
/// true score, best first).
struct Answer {
    ranked: Vec<u64>,
    exclude: Vec<u64>,
    cand: Vec<u64>,
}

fn sq_l2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// A standard normal draw (Box-Muller).
fn gauss(rng: &mut Rng) -> f32 {
    let unit = |r: &mut Rng| ((r.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    let (u1, u2) = (unit(rng), unit(rng));
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

/// What tune measures with: the sample, where each query's true neighbours' lists stand in
/// its probe order, the target and k, and how many settings it measured.
struct Tuning {
    sample: Arc<Sample>,
    ranks: Vec<Vec<usize>>,
    /// Each query's lists, nearest first (CSR, as `probes` gives them).
    orders: Probes,
    target: f64,
    k: usize,
    nlist: usize,
    evaluations: usize,
}

/// Lists per query, CSR (offsets, flat).
type Probes = (Vec<usize>, Vec<u32>);

impl Tuning {
    fn reaches(&self, recalls: &[f64]) -> bool {
        mean_spread(recalls).0 >= self.target
    }

    /// Whether the sample searched as a batch at nprobe `p` scans every probed list by the
    /// product, as a single query scanning by the product does (a batch scans a list probed
    /// by fewer than `PRODUCT_MIN_QUERIES` of its queries by the rows).
    fn batch_is_all_product(&self, p: usize, scan_dims: bool) -> bool {
        if scan_dims {
            return true;
        }
        self.all_by_product(0..self.orders.0.len() - 1, p)
    }

    /// Whether a batch of the sample queries `which` at nprobe `p` scans every list it probes
    /// by the product (each probed by at least `PRODUCT_MIN_QUERIES` of them).
    fn all_by_product(&self, which: impl IntoIterator<Item = usize>, p: usize) -> bool {
        let (offsets, flat) = &self.orders;
        let mut count = vec![0usize; self.nlist];
        for q in which {
            let mine = &flat[offsets[q]..offsets[q + 1]];
            for &l in &mine[..p.min(mine.len())] {
                count[l as usize] += 1;
            }
        }
        count
            .iter()
            .all(|&c| c == 0 || c >= super::search::PRODUCT_MIN_QUERIES)
    }

    /// Per-query recall of an exact scan of each query's first `p` lists (for every p at
    /// once from the ranks: no search): the scan returns the first k candidates in those
    /// lists (every other stored row scores below all of them).
    fn ideal(&self, p: usize) -> Vec<f64> {
        self.exact_scan_recalls(p, false)
    }

    /// Per-query recall (against the batch's truth) of an exact scan of each query's first
    /// `p` lists that excludes the keys any sample query excludes, as a batch searches: the
    /// first k candidates in those lists outside the union (every other stored row scores
    /// below all of them). What a batch at nprobe `p` finds where its product loses nothing.
    fn ideal_batch(&self, p: usize) -> Vec<f64> {
        self.exact_scan_recalls(p, true)
    }

    /// `ideal` (each query's own truth) or `ideal_batch` (the batch's truth, the union of
    /// excluded keys dropped).
    fn exact_scan_recalls(&self, p: usize, as_batch: bool) -> Vec<f64> {
        let s = &self.sample;
        (0..s.len())
            .map(|i| {
                let truth = match as_batch {
                    true => &s.truth_batch[i],
                    false => &s.truth[i],
                };
                if truth.is_empty() {
                    return 1.0;
                }
                let hits = s.cand[i]
                    .iter()
                    .zip(&self.ranks[i])
                    .filter(|(c, &r)| r < p && !(as_batch && s.union.binary_search(c).is_ok()))
                    .take(self.k)
                    .filter(|(c, _)| truth.contains(c))
                    .count();
                hits as f64 / truth.len() as f64
            })
            .collect()
    }

    /// A seeded `BATCH_FIRST` of the sample (ascending) that a batch over all dimensions at
    /// nprobe `p` scans by the product in every list they probe (each probed by at least
    /// `PRODUCT_MIN_QUERIES` of them: so they find what they find in the whole sample's
    /// batch), where the sample holds more than twice as many; else None.
    fn batch_first(&self, p: usize, all_dims: bool, seed: u64) -> Option<Vec<usize>> {
        let n = self.sample.len();
        if !all_dims || n <= 2 * BATCH_FIRST {
            return None;
        }
        let first = Rng::new(seed.wrapping_add(5)).sample(n, BATCH_FIRST);
        self.all_by_product(first.iter().copied(), p)
            .then_some(first)
    }

    /// The fewest lists whose exact scan reaches the target (recall grows with p: bisection
    /// over 1..=nlist).
    fn p_exact(&self) -> usize {
        let (mut lo, mut hi) = (0usize, self.nlist);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.reaches(&self.ideal(mid)) {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        hi
    }
}

/// What `climb` measures.
#[derive(Clone, Copy)]
enum Climb {
    Batch,
    SingleProduct,
}

/// A way single queries scan, as tune measured it.
struct Single {
    scan: SingleScan,
    nprobe: usize,
    shortlist: usize,
    recalls: Vec<f64>,
    /// Bytes a query reads (the cost compared).
    bytes: f64,
}

/// Bytes a single query reads, beyond the centroids every way reads alike. Re-scored rows
/// count twice: they lie anywhere in memory, where a list is read in one run.
struct Cost {
    per_list: f64,
    /// Bytes of a stored row.
    row: f64,
    pq: usize,
}

impl Cost {
    fn of(ix: &IvfIndex) -> Cost {
        let bytes = match ix.dtype {
            crate::types::DType::F32 => 4,
            crate::types::DType::F16 => 2,
            crate::types::DType::I8 => 1,
        };
        Cost {
            per_list: ix.len() as f64 / ix.lists.len().max(1) as f64,
            row: (ix.dim * bytes) as f64,
            pq: ix.params.pq,
        }
    }

    fn rows(&self, nprobe: usize) -> f64 {
        nprobe as f64 * self.per_list * self.row
    }

    fn codes(&self, nprobe: usize, shortlist: usize) -> f64 {
        nprobe as f64 * self.per_list * (self.pq / 2) as f64 + 2.0 * self.row * shortlist as f64
    }

    /// The packed copies of the probed lists (`scan_dims` or all dimensions, at the batch
    /// product's bytes a value) and the re-scored candidates.
    fn product(&self, ix: &IvfIndex, nprobe: usize, k: usize) -> f64 {
        let plan = super::search::SearchPlan::new(
            &ix.params,
            ix.dtype,
            ix.metric,
            1,
            k,
            SingleScan::Product,
        );
        let value = match plan.product {
            crate::matmul::Product::I8 => 1.0,
            crate::matmul::Product::Bf16 => 2.0,
            crate::matmul::Product::F32 => 4.0,
        };
        let pdim = plan.scan_dims.unwrap_or(ix.dim) as f64;
        nprobe as f64 * self.per_list * pdim * value + 2.0 * self.row * plan.kc as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recall_drops_excluded_keys_first() {
        assert_eq!(recall_of(&[5, 1, 2, 3], &[1, 2, 3], &[5], 3), 1.0);
        assert_eq!(recall_of(&[5, 1, 2, 3], &[1, 2, 3], &[], 3), 2.0 / 3.0);
    }

    /// `n` points around `n / 50` random centers in `dim` dimensions.
    fn clustered(n: usize, dim: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::ivf::kmeans::Rng::new(seed);
        let mut u = move || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let centers: Vec<f32> = (0..(n / 50).max(1) * dim).map(|_| u()).collect();
        let mut out = Vec::with_capacity(n * dim);
        for i in 0..n {
            let c = (i * 7919) % (n / 50).max(1);
            for d in 0..dim {
                out.push(centers[c * dim + d] + 0.3 * u());
            }
        }
        out
    }

    #[test]
    fn tune_meets_its_sample_target_and_the_file_keeps_what_it_set() {
        use crate::ivf::IvfConfig;
        use crate::types::Metric;
        let (n, dim) = (4000, 16);
        let x = clustered(n, dim, 9);
        let keys: Vec<u64> = (0..n as u64).collect();
        let config = IvfConfig {
            train_threshold: Some(0),
            ..Default::default()
        };
        let mut ix = IvfIndex::from_config(dim, Metric::Cos, config).unwrap();
        ix.add(&keys, &x).unwrap();
        ix.train(&x).unwrap();
        assert_eq!(ix.params().nlist, 64); // 2 sqrt(4000) = 126 -> 128, 62 a list: 64
        let r = ix.tune(0.9, 5, None).unwrap();
        assert!(r.batch_recall >= 0.9 && r.single_recall >= 0.9, "{r:?}");
        assert!(r.nprobe < 64, "{r:?}");
        assert_eq!(
            (ix.params().nprobe, ix.nprobe_single()),
            (r.nprobe, r.nprobe_single)
        );
        let back = IvfIndex::from_bytes(&ix.to_bytes()).unwrap();
        assert_eq!(back.params(), ix.params());
        assert_eq!(back.nprobe_single(), ix.nprobe_single());
        assert_eq!(back.single_scan(), ix.single_scan());
        assert_eq!(r.single_scan, ix.single_scan());
        assert_eq!(back.tuned(), Some((0.9, 5)));
        assert_eq!(back.auto_knobs(), ix.auto_knobs());
        // Out of range or untrained: refused, nothing changed.
        assert!(ix.tune(1.5, 5, None).is_err());
        let mut fresh = IvfIndex::from_config(dim, Metric::Cos, IvfConfig::default()).unwrap();
        assert!(fresh.tune(0.9, 5, None).is_err());
    }

    /// Near-exhaustive batches on random vectors: a seeded part of the sample searched first
    /// finds, query by query, what the whole sample's batch finds; the recalls measured so
    /// stay with the whole batch's; with few lists probed, or a reduced scan, the whole
    /// sample is searched.
    #[test]
    fn a_batch_measured_on_part_of_the_sample_stays_with_the_whole_batch() {
        use crate::ivf::IvfConfig;
        use crate::types::{DType, Metric};
        let (n, dim, k) = (4000, 32, 5);
        let mut rng = Rng::new(11);
        let x: Vec<f32> = (0..n * dim).map(|_| gauss(&mut rng)).collect();
        let keys: Vec<u64> = (0..n as u64).collect();
        let config = IvfConfig {
            dtype: Some(DType::F16),
            nlist: Some(64),
            pq: Some(0),
            scan_dims: Some(0),
            train_threshold: Some(0),
            ..Default::default()
        };
        let mut ix = IvfIndex::from_config(dim, Metric::Ip, config).unwrap();
        ix.add(&keys, &x).unwrap();
        ix.train(&x).unwrap();
        let t = ix.tuning(0.9, k, None).unwrap();
        let seed = ix.params.seed;
        assert!(t.sample.len() > 2 * BATCH_FIRST);
        assert!(t.batch_first(1, true, seed).is_none());
        assert!(t.batch_first(48, false, seed).is_none());
        let first = t
            .batch_first(48, true, seed)
            .expect("every list by the product");
        assert_eq!(first.len(), BATCH_FIRST);
        ix.params.nprobe = 48;
        let all: Vec<usize> = (0..t.sample.len()).collect();
        let whole = ix.batch_recalls_of(&t, &all).unwrap();
        let part = ix.batch_recalls_of(&t, &first).unwrap();
        for (&i, &r) in first.iter().zip(&part) {
            assert_eq!(r, whole[i], "query {i}");
        }
        let est = ix.batch_recalls(&t, 48).unwrap();
        let (a, b) = (mean_spread(&est).0, mean_spread(&whole).0);
        assert!((a - b).abs() <= 0.005, "{a} {b}");
        // Single queries by the product, measured like the batch, stay with all of them
        // searched alone.
        ix.auto.single_product = true;
        let like = ix.product_like_batch(&t, 48, &est).unwrap();
        let alone = ix.single_recalls(&t.sample, k, t.sample.len()).unwrap();
        let (a, b) = (mean_spread(&like).0, mean_spread(&alone).0);
        assert!((a - b).abs() <= 0.005, "{a} {b}");
        // Where the part finds what the exact scan finds, so does every query here.
        if first
            .iter()
            .zip(&part)
            .all(|(&i, &r)| r == t.ideal_batch(48)[i])
        {
            assert_eq!(est, t.ideal_batch(48));
        } else {
            assert_eq!(est, whole);
        }
    }

    #[test]
    fn spread_is_196_standard_errors() {
        let r: Vec<f64> = (0..100)
            .map(|i| if i % 2 == 0 { 1.0 } else { 0.0 })
            .collect();
        let (m, s) = mean_spread(&r);
        assert!((m - 0.5).abs() < 1e-12);
        assert!((s - 1.96 * (0.25f64 * 100.0 / 99.0 / 100.0).sqrt()).abs() < 1e-9);
    }
}
