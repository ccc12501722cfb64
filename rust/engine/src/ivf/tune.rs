//! `tune`: the cheapest nprobe (and shortlist) that reaches a target recall, measured.
//!
//! Recall is measured against the exact answer (every list scanned, all dimensions, codes
//! off: the index's own exact search over what it stores) on sample queries:
//! - the caller's queries if given (a seeded 1,000 of them at most);
//! - else 1,000 stored vectors held out as queries. A held-out vector's own key is excluded
//!   from its answers, and so are its near duplicates (stored vectors closer to it than 0.6 x
//!   its distance to its 20th neighbour): a new query is new content, and a burst of near
//!   duplicates in the index (photo libraries are full of them) would otherwise make the held
//!   out vector far easier to answer than a query (on the benchmark's near-duplicate set,
//!   plain leave-one-out asked for half the lists that held-out queries needed). Where the data
//!   has no near duplicates nothing more is excluded, and a held-out stored vector is then a
//!   draw from the very distribution of the data, which is what an unbiased sample needs.
//!
//! First the exact answers' lists: for each sample query, where each true neighbour's list
//! stands in the query's probe order gives the recall of scanning the first p lists exactly,
//! for every p at once; the smallest p reaching the target is what single queries without
//! codes need (they scan their lists exactly). Batches rank by a product (and `scan_dims`):
//! measured from that p up by an eighth at a time (a `scan_dims` chosen automatically is
//! dropped where it would need more than twice the lists). Codes (single queries) are measured
//! with single-query searches for the shortest shortlist reaching the target while they read
//! fewer bytes than the rows would (codes of the probed lists plus the re-scored rows, counted
//! twice as they lie anywhere in memory); where none does, codes chosen automatically are
//! dropped (`pq` 0: a smaller index, single queries scan rows).
//!
//! The recall reported is the sample's mean recall@k at the settings chosen, with its spread:
//! 1.96 standard errors of that mean (per-query recalls vary; 1,000 queries at recall 0.95 give
//! about +-0.006).

use super::IvfIndex;
use crate::error::{invalid, Result};
use rayon::prelude::*;
use rustc_hash::FxHashSet;

/// Most sample queries tune uses.
pub const TUNE_QUERIES: usize = 1000;
/// Neighbours fetched per held-out vector to find its near duplicates (2k + this).
const DUP_FETCH: usize = 32;
/// Near duplicates: closer than this share of the distance to the (2k)-th neighbour.
const DUP_RADIUS: f32 = 0.6;
/// Longest shortlist tried before nprobe grows.
const MAX_SHORTLIST: usize = 1024;

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
    /// With codes: the single queries' shortlist (else 0).
    pub shortlist: usize,
    pub single_recall: f64,
    pub single_spread: f64,
    pub scan_dims: usize,
    /// Settings measured (batch and single).
    pub evaluations: usize,
}

/// Sample queries and their exact answers.
struct Sample {
    queries: Vec<f32>,
    truth: Vec<Vec<u64>>,
    /// Keys each query's answers must not contain (its own and its near duplicates).
    exclude: Vec<Vec<u64>>,
}

impl Sample {
    fn len(&self) -> usize {
        self.truth.len()
    }
    fn max_excluded(&self) -> usize {
        self.exclude.iter().map(Vec::len).max().unwrap_or(0)
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
        if !(target > 0.0 && target <= 1.0) {
            return invalid(format!("target_recall must be in (0, 1], got {target}"));
        }
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
        );
        let out = self.tune_inner(target as f64, k, queries);
        if out.is_err() {
            self.params.nprobe = saved.0;
            self.params.shortlist = saved.1;
            self.set_scan_dims(saved.2)?;
            self.auto.nprobe_single = saved.3;
        }
        out
    }

    fn tune_inner(&mut self, target: f64, k: usize, queries: Option<&[f32]>) -> Result<TuneReport> {
        let nlist = self.lists.len();
        let sample = self.tune_sample(k, queries)?;
        let m = sample.len();
        let mut evaluations = 0usize;
        // Every list each query would scan, nearest first, and where its true neighbours lie:
        // the recall of an exact scan of the first p lists, for every p at once.
        let ranks = self.truth_list_ranks(&sample)?;
        let ideal = |p: usize| -> Vec<f64> {
            ranks
                .iter()
                .map(|r| {
                    if r.is_empty() {
                        1.0
                    } else {
                        r.iter().filter(|&&x| x < p).count() as f64 / r.len() as f64
                    }
                })
                .collect()
        };
        let smallest = |f: &dyn Fn(usize) -> Vec<f64>| -> usize {
            // recall grows with p: bisection over 1..=nlist
            let (mut lo, mut hi) = (0usize, nlist);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                if mean_spread(&f(mid)).0 >= target {
                    hi = mid;
                } else {
                    lo = mid;
                }
            }
            hi
        };
        let p_exact = smallest(&ideal);
        let extra = sample.max_excluded();
        let batch = |ix: &mut IvfIndex, p: usize| -> Result<Vec<f64>> {
            ix.params.nprobe = p;
            let kk = (k + extra).min(ix.len());
            let (ids, _, kp) = ix.search(&sample.queries, kk, None)?;
            let kp = kp.max(1);
            Ok((0..m)
                .map(|i| {
                    recall_of(
                        &ids[i * kp..(i + 1) * kp],
                        &sample.truth[i],
                        &sample.exclude[i],
                        k,
                    )
                })
                .collect())
        };
        // Batches rank by a product (and scan_dims): measured, from the exact scan's nprobe up
        // by an eighth at a time; scan_dims chosen automatically goes where it needs more than
        // twice that nprobe.
        let climb = |ix: &mut IvfIndex, evaluations: &mut usize| -> Result<(usize, Vec<f64>)> {
            let mut p = p_exact;
            loop {
                *evaluations += 1;
                let r = batch(ix, p)?;
                if mean_spread(&r).0 >= target || p >= nlist || p >= 2 * p_exact.max(4) {
                    return Ok((p, r));
                }
                p = (p + p.div_ceil(8)).min(nlist);
            }
        };
        let (mut nprobe, mut recalls) = climb(self, &mut evaluations)?;
        if mean_spread(&recalls).0 < target
            && self.params.scan_dims > 0
            && self.auto.knobs.scan_dims
        {
            self.set_scan_dims(0)?;
            self.auto.why.retain(|w| !w.starts_with("scan_dims="));
            self.auto.why.push(format!(
                "scan_dims=0: tune({target}) measured the reduced scan short of the target"
            ));
            (nprobe, recalls) = climb(self, &mut evaluations)?;
        }
        let (batch_recall, batch_spread) = mean_spread(&recalls);
        // Single queries scan exactly what they probe: the exact scan's nprobe, or through codes
        // where they cost less (see `tune_codes`).
        let mut single = p_exact;
        let mut single_recalls = ideal(p_exact);
        let mut shortlist = 0;
        if self.has_codes() {
            match self.tune_codes(&sample, k, target, p_exact, &mut evaluations)? {
                Some((s, r)) => {
                    shortlist = s;
                    single_recalls = r;
                }
                None if self.auto.knobs.pq => {
                    self.drop_codes();
                    self.auto.why.retain(|w| !w.starts_with("pq="));
                    self.auto.why.push(format!(
                        "pq=0: tune({target}) measured single queries cheaper scanning rows than codes"
                    ));
                }
                None => {
                    // Codes given by hand: the shortlist reaching the target, however long.
                    single = p_exact;
                    shortlist = MAX_SHORTLIST;
                    self.params.shortlist = shortlist;
                    self.auto.nprobe_single = single;
                    evaluations += 1;
                    single_recalls = self.single_recalls(&sample, k)?;
                }
            }
        }
        let (single_recall, single_spread) = mean_spread(&single_recalls);
        self.params.nprobe = nprobe;
        self.auto.nprobe_single = single;
        if shortlist > 0 {
            self.params.shortlist = shortlist;
        }
        self.auto.tuned = Some((target as f32, k));
        Ok(TuneReport {
            target: target as f32,
            k,
            queries: m,
            user_queries: queries.is_some(),
            nprobe,
            batch_recall,
            batch_spread,
            nprobe_single: single,
            shortlist,
            single_recall,
            single_spread,
            scan_dims: self.params.scan_dims,
            evaluations,
        })
    }

    /// For each sample query, the position of each true neighbour's list in the query's probe
    /// order (every list, nearest first).
    fn truth_list_ranks(&mut self, sample: &Sample) -> Result<Vec<Vec<usize>>> {
        let nlist = self.lists.len();
        let (np, single) = (self.params.nprobe, self.auto.nprobe_single);
        self.params.nprobe = nlist;
        self.auto.nprobe_single = nlist;
        let queries = self.normalize(&sample.queries, true).into_owned();
        let (offsets, flat) = self.probes(&queries, 0);
        self.params.nprobe = np;
        self.auto.nprobe_single = single;
        let mut pos = vec![usize::MAX; nlist];
        let mut out = Vec::with_capacity(sample.len());
        for (i, truth) in sample.truth.iter().enumerate() {
            let order = &flat[offsets[i]..offsets[i + 1]];
            for (r, &l) in order.iter().enumerate() {
                pos[l as usize] = r;
            }
            out.push(
                truth
                    .iter()
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
        Ok(out)
    }

    /// The sample's recalls searched one query at a time (in parallel) at the current settings.
    fn single_recalls(&self, sample: &Sample, k: usize) -> Result<Vec<f64>> {
        let dim = self.dim;
        (0..sample.len())
            .into_par_iter()
            .map(|i| {
                let q = &sample.queries[i * dim..(i + 1) * dim];
                let (ids, _, _) = self.search(q, k, Some(&sample.exclude[i]))?;
                Ok(recall_of(&ids, &sample.truth[i], &[], k))
            })
            .collect()
    }

    /// Single queries through codes at `nprobe`: the shortest shortlist reaching `target`
    /// (doubling from max(k, 32), then bisection to an eighth), if one does while the codes
    /// cost less than scanning the rows. Cost in bytes read: the codes of the probed lists
    /// plus the re-scored rows (counted twice: they lie anywhere in memory), against the rows
    /// of the probed lists. None: the rows are cheaper.
    fn tune_codes(
        &mut self,
        sample: &Sample,
        k: usize,
        target: f64,
        nprobe: usize,
        evaluations: &mut usize,
    ) -> Result<Option<(usize, Vec<f64>)>> {
        let per_list = self.len() as f64 / self.lists.len() as f64;
        let bytes = match self.dtype {
            crate::types::DType::F32 => 4,
            crate::types::DType::F16 => 2,
            crate::types::DType::I8 => 1,
        };
        let row = (self.dim * bytes) as f64;
        let rows_cost = nprobe as f64 * per_list * row;
        let code_cost = nprobe as f64 * per_list * (self.params.pq / 2) as f64;
        let longest =
            (((rows_cost - code_cost) / (2.0 * row)).max(0.0) as usize).min(MAX_SHORTLIST);
        self.auto.nprobe_single = nprobe;
        let mut lo = 0usize;
        let mut s = k.max(32);
        let mut found = None;
        while s <= longest.max(k) {
            *evaluations += 1;
            self.params.shortlist = s;
            let r = self.single_recalls(sample, k)?;
            if mean_spread(&r).0 >= target {
                found = Some((s, r));
                break;
            }
            lo = s;
            if s == longest {
                break;
            }
            s = (s * 2).min(longest.max(k));
        }
        let Some((mut hi, mut best)) = found else {
            return Ok(None);
        };
        while hi - lo > (hi / 8).max(1) {
            let mid = lo + (hi - lo) / 2;
            *evaluations += 1;
            self.params.shortlist = mid;
            let r = self.single_recalls(sample, k)?;
            if mean_spread(&r).0 >= target {
                hi = mid;
                best = r;
            } else {
                lo = mid;
            }
        }
        self.params.shortlist = hi;
        Ok(Some((hi, best)))
    }

    /// The sample queries with their exact answers (every list, all dimensions, no codes).
    fn tune_sample(&mut self, k: usize, queries: Option<&[f32]>) -> Result<Sample> {
        let dim = self.dim;
        let n = self.len();
        let rng = |seed: u64| super::kmeans::Rng::new(seed);
        let (qs, own): (Vec<f32>, Option<Vec<u64>>) = match queries {
            Some(q) => {
                let nq = q.len() / dim;
                let pick = rng(self.params.seed.wrapping_add(3)).sample(nq, TUNE_QUERIES.min(nq));
                let mut out = Vec::with_capacity(pick.len() * dim);
                for i in pick {
                    out.extend_from_slice(&q[i * dim..(i + 1) * dim]);
                }
                (out, None)
            }
            None => {
                let keys = self.keys()?;
                let m = TUNE_QUERIES.min(n / 2);
                let pick: Vec<u64> = rng(self.params.seed.wrapping_add(3))
                    .sample(n, m)
                    .into_iter()
                    .map(|i| keys[i])
                    .collect();
                (self.get(&pick)?, Some(pick))
            }
        };
        let m = qs.len() / dim;
        // Exact: every list, all dimensions, codes off (shortlist >= len with every list).
        let fetch = if own.is_some() { 2 * k + DUP_FETCH } else { k }.min(n);
        let (np, sl, sd) = (
            self.params.nprobe,
            self.params.shortlist,
            self.params.scan_dims,
        );
        self.params.nprobe = self.lists.len();
        self.params.shortlist = n;
        self.set_scan_dims(0)?;
        let single = self.auto.nprobe_single;
        self.auto.nprobe_single = 0;
        let found = self.search(&qs, fetch, None);
        self.params.nprobe = np;
        self.params.shortlist = sl;
        self.set_scan_dims(sd)?;
        self.auto.nprobe_single = single;
        let (ids, _, kp) = found?;
        let Some(own) = own else {
            let truth = (0..m).map(|i| ids[i * kp..(i + 1) * kp].to_vec()).collect();
            return Ok(Sample {
                queries: qs,
                truth,
                exclude: vec![Vec::new(); m],
            });
        };
        // Held-out stored vectors: drop the vector itself and its near duplicates.
        let per: Vec<(Vec<u64>, Vec<u64>)> = (0..m)
            .into_par_iter()
            .map(|i| -> Result<(Vec<u64>, Vec<u64>)> {
                let x = &qs[i * dim..(i + 1) * dim];
                let cand: Vec<u64> = ids[i * kp..(i + 1) * kp]
                    .iter()
                    .copied()
                    .filter(|&c| c != own[i])
                    .collect();
                let rows = self.get(&cand)?;
                let d: Vec<f32> = rows
                    .chunks_exact(dim)
                    .map(|r| {
                        r.iter()
                            .zip(x)
                            .map(|(a, b)| (a - b) * (a - b))
                            .sum::<f32>()
                            .sqrt()
                    })
                    .collect();
                let reference = d.get(2 * k - 1).or(d.last()).copied().unwrap_or(0.0);
                let mut exclude = vec![own[i]];
                let mut truth = Vec::with_capacity(k);
                for (c, dc) in cand.iter().zip(&d) {
                    if *dc < DUP_RADIUS * reference {
                        exclude.push(*c);
                    } else if truth.len() < k {
                        truth.push(*c);
                    }
                }
                Ok((truth, exclude))
            })
            .collect::<Result<_>>()?;
        let (truth, exclude) = per.into_iter().unzip();
        Ok(Sample {
            queries: qs,
            truth,
            exclude,
        })
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
        assert_eq!(back.tuned(), Some((0.9, 5)));
        assert_eq!(back.auto_knobs(), ix.auto_knobs());
        // Out of range or untrained: refused, nothing changed.
        assert!(ix.tune(1.5, 5, None).is_err());
        let mut fresh = IvfIndex::from_config(dim, Metric::Cos, IvfConfig::default()).unwrap();
        assert!(fresh.tune(0.9, 5, None).is_err());
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
