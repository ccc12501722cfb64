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
//! measures it. That scan goes list-major, a part of the sample at a time (each list's codes
//! read once for the queries of the part that probe it): query after query it read every
//! list from memory, 0.34 of tune's 1.2 CPU-s at 0.99 on MiniLM 198k (now about 0.1).
//!
//! Why both: at the exact scan's nprobe the codes must keep nearly every neighbour those lists
//! hold, and the shortlist grows long. On 198,000 MiniLM sentences at 0.95 the exact scan
//! needs 70 lists, where codes needed a shortlist of 448 (0.21 ms a query); over 79 lists 96
//! reach the same recall (0.13 ms). At 0.99 no affordable shortlist reached the target at
//! the exact scan's nprobe, and single queries scanned by the product (0.92 ms, against 0.41
//! ms for codes over 317 lists with a shortlist of 128).

use super::{Cost, Tuning, MAX_SHORTLIST};
use crate::ivf::pq::Pq;
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
        let all: Vec<usize> = (0..t.sample.len()).collect();
        let ahead = all
            .par_chunks(RANK_PART)
            .flat_map_iter(|part| self.code_ranks_of(book, t, &queries, part, (top, &ps)))
            .collect();
        Some(CodeRanks { ps, ahead })
    }

    /// `CodeRanks::ahead` of the sample queries `part` over their first `top` lists, scanned
    /// list-major: each list's codes once for all of them that probe it, while in cache
    /// (query after query, each read its lists from memory: most of the model's cost).
    fn code_ranks_of(
        &self,
        book: &Pq,
        t: &Tuning,
        queries: &[f32],
        part: &[usize],
        (top, ps): (usize, &[usize]),
    ) -> Vec<Vec<u16>> {
        let level = kernels::level();
        let (dim, l2) = (self.dim, self.metric == Metric::L2);
        let (offsets, flat) = &t.orders;
        let (mut table, mut lut) = (Vec::new(), Vec::new());
        let tables: Vec<kernels::PqTables> = part
            .iter()
            .map(|&i| {
                book.lut(&queries[i * dim..(i + 1) * dim], l2, &mut table, &mut lut);
                let mut tables = kernels::PqTables::default();
                tables.set(level, &lut);
                tables
            })
            .collect();
        let mut counts: Vec<Counts> = (part.iter().zip(&tables))
            .map(|(&i, tables)| Counts::new(self, t, i, (tables, level), (top, ps)))
            .collect();
        // Per list, the part's queries that probe it among their first `top`, with its rank.
        let mut probing: Vec<Vec<(u32, u32)>> = vec![Vec::new(); self.lists.len()];
        for (j, &i) in part.iter().enumerate() {
            for (r, &l) in flat[offsets[i]..offsets[i] + top].iter().enumerate() {
                probing[l as usize].push((j as u32, r as u32));
            }
        }
        let mut sums = Vec::new();
        for (list, probing) in self.lists.iter().zip(&probing) {
            let Some(codes) = list.codes.as_ref().filter(|_| list.len() > 0) else {
                continue;
            };
            let n = list.len();
            sums.resize(n.div_ceil(kernels::PQ_BLOCK) * kernels::PQ_BLOCK, 0);
            for &(j, r) in probing {
                kernels::pq_scan_with(level, &tables[j as usize], codes.as_slice(), &mut sums);
                counts[j as usize].add(&sums[..n], list.keys.as_slice(), r as usize, t);
            }
        }
        counts.into_iter().map(|c| c.ahead(ps)).collect()
    }
}

/// Sample queries whose code ranks are counted together (each list scanned for those of them
/// that probe it).
const RANK_PART: usize = 64;

/// One sample query's rows ahead of its candidates, by the bucket of nprobes their lists
/// fall in.
struct Counts {
    /// Each candidate's list rank and rank by code (None beyond the first `top` lists or
    /// excluded: never in a shortlist).
    cand: Vec<Option<(usize, Rank)>>,
    /// The candidates by code rank, ascending.
    by_rank: Vec<(Rank, usize)>,
    /// The lowest candidate's sum: a row below it is ahead of none.
    low: u16,
    /// At `b * (cand.len() + 1) + n`: the rows of lists ranked in `ps[b - 1]..ps[b]`
    /// (`0..ps[0]` for b = 0) ahead of exactly the first n of `by_rank`.
    hist: Vec<u32>,
    /// The bucket of each list rank below `top`.
    bucket: Vec<u16>,
}

impl Counts {
    /// Sample query `i`'s candidates ranked by their codes (each one's block of its list's
    /// codes scanned with the query's tables).
    fn new(
        ix: &IvfIndex,
        t: &Tuning,
        i: usize,
        (tables, level): (&kernels::PqTables, kernels::Level),
        (top, ps): (usize, &[usize]),
    ) -> Counts {
        let union = &t.sample.union;
        let mut block = [0u16; kernels::PQ_BLOCK];
        let cand: Vec<Option<(usize, Rank)>> = t.sample.cand[i]
            .iter()
            .zip(&t.ranks[i])
            .map(|(&key, &r)| {
                let &(l, slot) = ix.map.get(&key)?;
                if r >= top || union.binary_search(&key).is_ok() {
                    return None;
                }
                let codes = ix.lists[l as usize].codes.as_ref()?.as_slice();
                let (b, at) = (
                    slot as usize / kernels::PQ_BLOCK,
                    slot as usize % kernels::PQ_BLOCK,
                );
                let size = codes.len() / ix.lists[l as usize].len().div_ceil(kernels::PQ_BLOCK);
                kernels::pq_scan_with(level, tables, &codes[b * size..(b + 1) * size], &mut block);
                Some((r, (block[at], Reverse(key))))
            })
            .collect();
        let mut by_rank: Vec<(Rank, usize)> = (cand.iter().enumerate())
            .filter_map(|(c, at)| at.map(|(_, v)| (v, c)))
            .collect();
        by_rank.sort_unstable();
        let mut bucket = vec![0u16; top];
        for (b, w) in ps.windows(2).enumerate() {
            bucket[w[0]..w[1]].fill(b as u16 + 1);
        }
        Counts {
            low: by_rank.first().map_or(u16::MAX, |b| b.0 .0),
            hist: vec![0; ps.len() * (cand.len() + 1)],
            cand,
            by_rank,
            bucket,
        }
    }

    /// Counts the rows of the list at rank `r` (its code `sums` and `keys`) ahead of each
    /// candidate. A row is ahead of a candidate where its sum is higher, or equal and its key
    /// lower (as the scan's top-k ranks: `Rank`); the sample's excluded keys are skipped (the
    /// measurements search single queries as a batch searches them: `Sample::union`).
    fn add(&mut self, sums: &[u16], keys: &[u64], r: usize, t: &Tuning) {
        let base = self.bucket[r] as usize * (self.cand.len() + 1);
        for (&x, &key) in sums.iter().zip(keys) {
            if x >= self.low && t.sample.union.binary_search(&key).is_err() {
                let row = (x, Reverse(key));
                self.hist[base + self.by_rank.partition_point(|b| b.0 < row)] += 1;
            }
        }
    }

    /// `CodeRanks::ahead` from the counts: at `ps[j]`, the rows of the lists of buckets up
    /// to j ahead of each candidate whose list is among them.
    fn ahead(&self, ps: &[usize]) -> Vec<u16> {
        let (np, width) = (ps.len(), self.cand.len() + 1);
        let mut out = vec![u16::MAX; self.cand.len() * np];
        let mut hist = vec![0usize; width];
        for (j, &p) in ps.iter().enumerate() {
            for (h, &x) in hist.iter_mut().zip(&self.hist[j * width..(j + 1) * width]) {
                *h += x as usize;
            }
            // Rows ahead of the n-th candidate: those ahead of more than n of them.
            let mut ahead = 0;
            for (n, &(_, c)) in self.by_rank.iter().enumerate().rev() {
                ahead += hist[n + 1];
                if self.cand[c].is_some_and(|(r, _)| r < p) {
                    out[c * np + j] = ahead.min(u16::MAX as usize - 1) as u16;
                }
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

    /// The counts scanned list-major are the rows ahead of each candidate counted directly:
    /// every row of the query's first lists (the excluded keys skipped) above it by code.
    #[test]
    fn code_ranks_count_the_rows_ahead_of_each_candidate() {
        use super::Rank;
        use crate::kernels;
        use std::cmp::Reverse;
        let (ix, _, t) = tuned(0.95, 10);
        let model = ix.code_ranks(&t, t.p_exact()).unwrap();
        let book = ix.codebooks.as_ref().unwrap();
        let level = kernels::level();
        let dim = ix.dim;
        let queries = ix.normalize(&t.sample.queries, true);
        let (offsets, flat) = &t.orders;
        let np = model.ps.len();
        let (mut counted, mut ahead) = (0, 0);
        for i in (0..t.sample.len()).step_by(50) {
            let (mut table, mut lut) = (Vec::new(), Vec::new());
            book.lut(
                &queries[i * dim..(i + 1) * dim],
                false,
                &mut table,
                &mut lut,
            );
            let mut tables = kernels::PqTables::default();
            tables.set(level, &lut);
            // Every row not excluded: its list's rank and its rank by code.
            let mut rows: Vec<(usize, Rank)> = Vec::new();
            for (r, &l) in flat[offsets[i]..offsets[i + 1]].iter().enumerate() {
                let list = &ix.lists[l as usize];
                if list.len() == 0 {
                    continue;
                }
                let mut sums =
                    vec![0u16; list.len().div_ceil(kernels::PQ_BLOCK) * kernels::PQ_BLOCK];
                let codes = list.codes.as_ref().unwrap().as_slice();
                kernels::pq_scan_with(level, &tables, codes, &mut sums);
                for (slot, &key) in list.keys.as_slice().iter().enumerate() {
                    if t.sample.union.binary_search(&key).is_err() {
                        rows.push((r, (sums[slot], Reverse(key))));
                    }
                }
            }
            for (c, (&key, &r)) in t.sample.cand[i].iter().zip(&t.ranks[i]).enumerate() {
                let mine = rows.iter().find(|x| x.1 .1 == Reverse(key)).map(|x| x.1);
                for j in [0, np / 2, np - 1] {
                    let p = model.ps[j];
                    let want = match mine {
                        Some(v) if r < p => {
                            rows.iter().filter(|x| x.0 < p && x.1 > v).count() as u16
                        }
                        _ => u16::MAX,
                    };
                    assert_eq!(model.ahead[i][c * np + j], want, "query {i} cand {c} p {p}");
                    counted += (want != u16::MAX) as usize;
                    ahead += (want != u16::MAX && want > 0) as usize;
                }
            }
        }
        assert!(counted > 100 && ahead > 0, "{counted} {ahead}");
    }
}
