//! Tune's single queries through codes: nprobe and shortlist chosen together.
//!
//! A query through codes scans the 4-bit codes of its first p lists, keeps the best
//! `shortlist` rows by code score and re-scores them from the rows. Its answer is then the
//! first k of its exact candidates (`Sample::cand`, best first) that the shortlist holds
//! (every other row scores below them), and the shortlist holds a candidate when fewer than
//! `shortlist` rows of those lists rank ahead of it by code (a higher sum, or an equal one and
//! a lower key, as the scan's top-k ranks). So one scan of each sample query's codes, to half
//! again the lists the exact scan needs, gives the recall of every (nprobe, shortlist) pair,
//! as `Tuning::ideal` gives the exact scan's for every nprobe (tested: within 0.002 of
//! searches at every setting); tune takes the pair that reads the fewest bytes, then
//! measures it.
//!
//! Why both: at the exact scan's nprobe the codes must keep nearly every neighbour those lists
//! hold, and the shortlist grows long. On 198,000 MiniLM sentences at 0.95 the exact scan
//! needs 70 lists, where codes needed a shortlist of 448 (0.21 ms a query); over 79 lists 96
//! reach the same recall (0.13 ms). At 0.99 no affordable shortlist reached the target at
//! the exact scan's nprobe, and single queries scanned by the product (0.92 ms, against 0.41
//! ms for codes over 317 lists with a shortlist of 128).

use super::{Cost, Tuning, MAX_SHORTLIST};
use crate::ivf::IvfIndex;
use crate::kernels;
use crate::types::Metric;
use rayon::prelude::*;
use std::cmp::Reverse;

/// Most nprobes the model keeps (evenly spaced from the exact scan's).
const STEPS: usize = 32;

/// Where each sample query's candidates stand by code score, at a few nprobes.
pub(super) struct CodeRanks {
    /// The nprobes known, ascending, from the exact scan's up.
    ps: Vec<usize>,
    /// Per query, at `c * ps.len() + j`: the rows of the query's first `ps[j]` lists that rank
    /// ahead of its candidate `c` by code (its position in the shortlist; the sample's excluded
    /// keys left out, as the measurements search); `u16::MAX` where c's list is not among
    /// them or c is excluded.
    ahead: Vec<Vec<u16>>,
}

impl CodeRanks {
    /// Per-query recall of codes over the first `ps[j]` lists with shortlist `s`.
    fn recalls(&self, t: &Tuning, j: usize, s: usize) -> Vec<f64> {
        let np = self.ps.len();
        let sample = &t.sample;
        (0..sample.len())
            .map(|i| {
                let truth = &sample.truth_batch[i];
                if truth.is_empty() {
                    return 1.0;
                }
                let ahead = &self.ahead[i];
                let hits = sample.cand[i]
                    .iter()
                    .enumerate()
                    .filter(|&(c, _)| (ahead[c * np + j] as usize) < s)
                    .take(t.k)
                    .filter(|(_, key)| truth.contains(key))
                    .count();
                hits as f64 / truth.len() as f64
            })
            .collect()
    }

    fn mean(&self, t: &Tuning, j: usize, s: usize) -> f64 {
        super::mean_spread(&self.recalls(t, j, s)).0
    }

    /// The shortest shortlist (from k) whose modelled recall over `ps[j]` lists reaches `aim`
    /// (recall grows with the shortlist: bisection), if one up to `MAX_SHORTLIST` does.
    fn shortest(&self, t: &Tuning, j: usize, aim: f64) -> Option<usize> {
        if self.mean(t, j, MAX_SHORTLIST) < aim {
            return None;
        }
        let (mut lo, mut hi) = (t.k - 1, MAX_SHORTLIST);
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if self.mean(t, j, mid) >= aim {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Some(hi)
    }

    /// The (nprobe, shortlist) reaching `aim` by the model that reads the fewest bytes, if
    /// one reads fewer than `budget`; with its modelled recall.
    pub(super) fn cheapest(
        &self,
        t: &Tuning,
        cost: &Cost,
        budget: f64,
        aim: f64,
    ) -> Option<(usize, usize, f64)> {
        let mut best: Option<(f64, usize, usize, f64)> = None;
        for (j, &p) in self.ps.iter().enumerate() {
            let floor = best.map_or(budget, |b| b.0);
            if cost.codes(p, t.k) >= floor {
                break;
            }
            let Some(s) = self.shortest(t, j, aim) else {
                continue;
            };
            let bytes = cost.codes(p, s);
            if bytes < floor {
                best = Some((bytes, p, s, self.mean(t, j, s)));
            }
        }
        best.map(|(_, p, s, r)| (p, s, r))
    }
}

impl IvfIndex {
    /// The code ranks of the sample's candidates at nprobes from `p_exact` to half again as
    /// many (None without codes).
    pub(super) fn code_ranks(&self, t: &Tuning, p_exact: usize) -> Option<CodeRanks> {
        let book = self.codebooks.as_ref()?;
        let nlist = self.lists.len();
        let top = (p_exact + p_exact / 2).max(p_exact + 4).min(nlist);
        let step = (top - p_exact).div_ceil(STEPS).max(1);
        let mut ps: Vec<usize> = (p_exact..top).step_by(step).collect();
        ps.push(top);
        let queries = self.normalize(&t.sample.queries, true);
        let (offsets, flat) = &t.orders;
        let dim = self.dim;
        let l2 = self.metric == Metric::L2;
        let ahead = (0..t.sample.len())
            .into_par_iter()
            .map_init(CodeSums::default, |s, i| {
                let order = &flat[offsets[i]..offsets[i + 1]];
                let q = &queries[i * dim..(i + 1) * dim];
                s.scan(self, book, q, l2, &order[..top]);
                s.ranks(self, t, i, &ps)
            })
            .collect();
        Some(CodeRanks { ps, ahead })
    }
}

/// One query's code sums over its first lists, and a thread's buffers.
#[derive(Default)]
struct CodeSums {
    table: Vec<f32>,
    lut: Vec<u8>,
    tables: kernels::PqTables,
    /// The sums of the lists scanned, one after another; list `j`'s at `starts[j]..starts[j + 1]`.
    sums: Vec<u16>,
    starts: Vec<usize>,
}

impl CodeSums {
    /// The code sums of every row of `lists`, in order (a list without codes adds none).
    fn scan(
        &mut self,
        ix: &IvfIndex,
        book: &crate::ivf::pq::Pq,
        q: &[f32],
        l2: bool,
        lists: &[u32],
    ) {
        let level = kernels::level();
        book.lut(q, l2, &mut self.table, &mut self.lut);
        self.tables.set(level, &self.lut);
        self.sums.clear();
        self.starts.clear();
        self.starts.push(0);
        for &l in lists {
            let list = &ix.lists[l as usize];
            if let Some(codes) = list.codes.as_ref().filter(|_| list.len() > 0) {
                let (at, n) = (self.sums.len(), list.len());
                let rows = n.div_ceil(kernels::PQ_BLOCK) * kernels::PQ_BLOCK;
                self.sums.resize(at + rows, 0);
                kernels::pq_scan_with(level, &self.tables, codes.as_slice(), &mut self.sums[at..]);
                self.sums.truncate(at + n);
            }
            self.starts.push(self.sums.len());
        }
    }

    /// Sample query `i`'s `CodeRanks::ahead` from the sums scanned. A row is ahead of a
    /// candidate where its sum is higher, or equal and its key lower (as the scan's top-k
    /// ranks: `Rank`).
    fn ranks(&self, ix: &IvfIndex, t: &Tuning, i: usize, ps: &[usize]) -> Vec<u16> {
        let scanned = self.starts.len() - 1;
        let (offsets, flat) = &t.orders;
        let order = &flat[offsets[i]..offsets[i] + scanned];
        let rank_at = |j: usize, slot: usize, key: u64| -> Option<Rank> {
            let sum = self.sums.get(self.starts[j] + slot).copied()?;
            Some((sum, Reverse(key)))
        };
        // The scan skips every key a sample query excludes (the measurements search single
        // queries as a batch searches them: `Sample::union`).
        let union = &t.sample.union;
        let skipped = |key: &u64| union.binary_search(key).is_ok();
        // Each candidate's list rank and its rank by code (None beyond the lists scanned or
        // skipped: never in a shortlist).
        let cand: Vec<Option<(usize, Rank)>> = t.sample.cand[i]
            .iter()
            .zip(&t.ranks[i])
            .map(|(&key, &r)| {
                let &(_, slot) = ix.map.get(&key)?;
                if r >= scanned || skipped(&key) {
                    return None;
                }
                rank_at(r, slot as usize, key).map(|v| (r, v))
            })
            .collect();
        // Candidates by rank, ascending: a row is ahead of the first `partition_point` of
        // them; `hist[n]` counts the rows scanned so far ahead of exactly the first n (most
        // rows score below every candidate and cost one comparison).
        let mut by_rank: Vec<(Rank, usize)> = cand
            .iter()
            .enumerate()
            .filter_map(|(c, at)| at.map(|(_, v)| (v, c)))
            .collect();
        by_rank.sort_unstable();
        let low = by_rank.first().map_or(u16::MAX, |b| b.0 .0);
        let mut hist = vec![0usize; by_rank.len() + 1];
        let np = ps.len();
        let mut out = vec![u16::MAX; cand.len() * np];
        let mut next = 0;
        for (j, &l) in order.iter().enumerate() {
            let keys = ix.lists[l as usize].keys.as_slice();
            let seg = &self.sums[self.starts[j]..self.starts[j + 1]];
            for (slot, &x) in seg.iter().enumerate() {
                if x >= low && !skipped(&keys[slot]) {
                    let row = (x, Reverse(keys[slot]));
                    hist[by_rank.partition_point(|b| b.0 < row)] += 1;
                }
            }
            while next < np && ps[next] == j + 1 {
                // Rows ahead of the n-th candidate: those ahead of more than n of them.
                let mut ahead = 0;
                for (n, &(_, c)) in by_rank.iter().enumerate().rev() {
                    ahead += hist[n + 1];
                    if cand[c].is_some_and(|(r, _)| r <= j) {
                        out[c * np + next] = ahead.min(u16::MAX as usize - 1) as u16;
                    }
                }
                next += 1;
            }
        }
        out
    }
}

/// A row's rank by code, as the scan's top-k orders it: the sum, then the lower key.
type Rank = (u16, Reverse<u64>);

#[cfg(test)]
mod tests {
    use super::super::{mean_spread, Cost, TuneReport, Tuning};
    use crate::ivf::{IvfConfig, IvfIndex, SingleScan};
    use crate::types::{DType, Metric};

    /// `n` unit-ish points near a `rank`-dimensional subspace, in clusters.
    fn low_rank_clusters(n: usize, dim: usize, rank: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::ivf::kmeans::Rng::new(seed);
        let mut u = move || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let basis: Vec<f32> = (0..rank * dim).map(|_| u()).collect();
        let centers: Vec<f32> = (0..(n / 40) * rank).map(|_| u()).collect();
        let mut out = Vec::with_capacity(n * dim);
        for i in 0..n {
            let c = (i * 7919) % (n / 40);
            let z: Vec<f32> = (0..rank)
                .map(|r| centers[c * rank + r] + 1.0 * u())
                .collect();
            for d in 0..dim {
                let x: f32 = (0..rank).map(|r| z[r] * basis[r * dim + d]).sum();
                out.push(x + 0.05 * u());
            }
        }
        out
    }

    /// An index of 8,000 vectors with codes (given: tune keeps them), `tune(target)`'s report,
    /// and the sample and measurements it had.
    fn tuned(target: f32, k: usize) -> (IvfIndex, TuneReport, Tuning) {
        let (n, dim) = (8000, 32);
        let x = low_rank_clusters(n, dim, 16, 5);
        let keys: Vec<u64> = (0..n as u64).collect();
        let config = IvfConfig {
            dtype: Some(DType::F32),
            pq: Some(16),
            train_threshold: Some(0),
            ..Default::default()
        };
        let mut ix = IvfIndex::from_config(dim, Metric::Cos, config).unwrap();
        ix.add(&keys, &x).unwrap();
        ix.train(&x).unwrap();
        let r = ix.tune(target, k, None).unwrap();
        let sample = ix.remembered_sample(k, None).unwrap();
        let (ranks, orders) = ix.cand_list_ranks(&sample).unwrap();
        let t = Tuning {
            sample,
            ranks,
            orders,
            target: target as f64,
            k,
            nlist: ix.lists.len(),
            evaluations: 0,
        };
        (ix, r, t)
    }

    /// The sample's mean recall searched as single queries through codes over `p` lists, at
    /// each of `shortlists` (from one scan: `codes_ranked`, tested against searches).
    fn measured(ix: &mut IvfIndex, t: &Tuning, p: usize, shortlists: &[usize]) -> Vec<f64> {
        ix.auto.nprobe_single = p;
        let top = *shortlists.iter().max().unwrap();
        let mut ranked = ix.codes_ranked_sample(&t.sample, t.k, top).unwrap();
        shortlists
            .iter()
            .map(|&s| {
                let found: Vec<Vec<u64>> = ranked
                    .iter_mut()
                    .flat_map(|part| ix.codes_found(part, s))
                    .collect();
                let recalls: Vec<f64> = (found.iter().zip(&t.sample.truth_batch))
                    .map(|(f, truth)| super::super::recall_of(f, truth, &[], t.k))
                    .collect();
                mean_spread(&recalls).0
            })
            .collect()
    }

    /// Shortlists measured (past 192 nothing more is found here: 0.946 at the exact scan's
    /// nprobe from 192 to 1,024).
    const SHORTLISTS: [usize; 10] = [10, 16, 24, 32, 48, 64, 96, 128, 192, 256];

    /// Tune's codes reach the target and read no more than any measured (nprobe, shortlist)
    /// reaching it, from the exact scan's nprobe to half again as many; and where the code
    /// ranks say each candidate stands gives the recall measured at every setting. Before
    /// they were chosen together, tune kept the exact scan's nprobe, where the codes must keep
    /// nearly every neighbour its lists hold: here none reached 0.95 there (0.946 at every
    /// shortlist from 192), and tune set the longest shortlist, 1,024, and missed the target.
    #[test]
    fn codes_take_the_lists_and_shortlist_that_read_the_least() {
        let k = 10;
        let (mut ix, r, t) = tuned(0.95, k);
        assert_eq!(r.single_scan, SingleScan::Codes, "{r:?}");
        assert!(r.single_recall >= t.target, "{r:?}");
        let p_exact = t.p_exact();
        let model = ix.code_ranks(&t, p_exact).unwrap();
        let cost = Cost::of(&ix);
        let chosen = cost.codes(r.nprobe_single, r.shortlist);
        let mut least = f64::INFINITY;
        for (j, &p) in model.ps.iter().enumerate() {
            let reach = measured(&mut ix, &t, p, &SHORTLISTS);
            for (&s, &m) in SHORTLISTS.iter().zip(&reach) {
                let modelled = model.mean(&t, j, s);
                // (single queries choose their lists by another kernel: near ties may differ)
                assert!(
                    (m - modelled).abs() <= 0.002,
                    "p={p} s={s}: measured {m}, modelled {modelled}"
                );
            }
            if let Some(i) = reach.iter().position(|&m| m >= t.target) {
                least = least.min(cost.codes(p, SHORTLISTS[i]));
            }
        }
        assert_eq!(model.ps.first(), Some(&p_exact));
        assert_eq!(model.ps.last(), Some(&(p_exact + p_exact / 2)));
        assert!(
            chosen <= least * 1.05,
            "tune's codes read {chosen} bytes; {least} reach the target ({r:?}, from {p_exact})"
        );
    }
}
