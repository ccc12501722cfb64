//! Bounded top-k selection. Scores are "higher is better" here (callers negate distances);
//! equal scores rank by ascending id, so results are deterministic.
//!
//! Candidates go into a buffer of about twice k; when it fills, a linear-time selection
//! keeps the best k and raises the entry threshold to the worst of them. Per candidate that
//! is an append plus an amortized constant, where a binary heap pays a branchy log-k sift:
//! the difference shows when a scan keeps k + margin candidates per query.

use std::cmp::Ordering;

/// One candidate: an internal score (higher is better) and its id (key or row).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub score: f32,
    pub id: u64,
}

impl Hit {
    /// Total order, best first: higher score, then lower id. NaN never panics (total_cmp).
    #[inline]
    pub fn rank_cmp(&self, other: &Hit) -> Ordering {
        other
            .score
            .total_cmp(&self.score)
            .then(self.id.cmp(&other.id))
    }
}

/// Keeps the best `k` hits seen so far.
#[derive(Clone, Debug)]
pub struct TopK {
    k: usize,
    /// Buffer length that triggers a selection (`k` plus a slack of at least 32).
    cap: usize,
    hits: Vec<Hit>,
    /// The worst kept hit's score after the last selection (`-inf` before the first).
    cut: f32,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        // k may exceed the candidates by far (mining pads with -1): the buffer grows as needed.
        let cap = k.saturating_add(k.max(32));
        TopK {
            k,
            cap,
            hits: Vec::with_capacity(cap.min(512)),
            cut: f32::NEG_INFINITY,
        }
    }

    /// Scores strictly below this can never enter (`-inf` until k hits were kept). A score
    /// equal to it may still enter with a lower id, so callers filter with `>=`.
    #[inline]
    pub fn threshold(&self) -> f32 {
        self.cut
    }

    #[inline]
    pub fn push(&mut self, score: f32, id: u64) {
        if self.k == 0 || score < self.cut {
            return;
        }
        self.hits.push(Hit { score, id });
        if self.hits.len() >= self.cap {
            self.select();
        }
    }

    /// Keeps the best k of the buffer and raises the threshold to the worst of them.
    fn select(&mut self) {
        if self.hits.len() <= self.k {
            return;
        }
        let k = self.k;
        self.hits.select_nth_unstable_by(k - 1, Hit::rank_cmp);
        self.hits.truncate(k);
        self.cut = self.hits[k - 1].score;
    }

    pub fn merge(&mut self, other: TopK) {
        for h in other.hits {
            self.push(h.score, h.id);
        }
    }

    pub fn len(&self) -> usize {
        self.hits.len().min(self.k)
    }

    pub fn is_empty(&self) -> bool {
        self.hits.is_empty()
    }

    /// The hits, best first.
    pub fn into_sorted(mut self) -> Vec<Hit> {
        self.select();
        self.hits.sort_unstable_by(Hit::rank_cmp);
        self.hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_best_k_with_ties_by_ascending_id() {
        let mut t = TopK::new(3);
        for (s, id) in [(1.0, 9), (5.0, 4), (5.0, 2), (3.0, 1), (5.0, 7), (0.5, 0)] {
            t.push(s, id);
        }
        let ids: Vec<u64> = t.into_sorted().iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![2, 4, 7]);
    }

    #[test]
    fn threshold_is_neg_inf_until_a_selection_then_the_worst_kept_and_only_rises() {
        let mut t = TopK::new(2);
        assert_eq!(t.threshold(), f32::NEG_INFINITY);
        t.push(1.0, 1);
        t.push(2.0, 2);
        assert_eq!(t.threshold(), f32::NEG_INFINITY);
        let mut last = f32::NEG_INFINITY;
        for i in 3..100u64 {
            t.push(i as f32, i);
            assert!(t.threshold() >= last);
            last = t.threshold();
        }
        // 34 pushes fill the buffer: the kept two then were 33 and 34.
        assert!(last >= 33.0, "{last}");
        let ids: Vec<u64> = t.into_sorted().iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![99, 98]);
    }

    #[test]
    fn merge_equals_single_pass() {
        let mut a = TopK::new(4);
        let mut b = TopK::new(4);
        let mut all = TopK::new(4);
        for i in 0..50u64 {
            let s = ((i * 37) % 11) as f32;
            if i % 2 == 0 {
                a.push(s, i)
            } else {
                b.push(s, i)
            }
            all.push(s, i);
        }
        a.merge(b);
        assert_eq!(a.into_sorted(), all.into_sorted());
    }

    /// Against a full sort, on many sizes, with ties, repeated scores, NaN and infinities.
    #[test]
    fn equals_a_full_sort_on_random_streams() {
        let mut state = 0x2545F4914F6CDD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for k in [1usize, 2, 3, 10, 33, 100] {
            for n in [0usize, 1, k, 2 * k + 31, 500, 5000] {
                let hits: Vec<Hit> = (0..n as u64)
                    .map(|id| {
                        let r = next();
                        let score = match r % 50 {
                            0 => f32::NAN,
                            1 => f32::INFINITY,
                            2 => f32::NEG_INFINITY,
                            _ => (r % 64) as f32 / 8.0, // many ties
                        };
                        Hit {
                            score,
                            id: next() % 1000 + id * 1000,
                        }
                    })
                    .collect();
                let mut top = TopK::new(k);
                for h in &hits {
                    top.push(h.score, h.id);
                }
                assert_eq!(top.len(), n.min(k));
                let mut want = hits.clone();
                want.sort_by(Hit::rank_cmp);
                want.truncate(k);
                let got = top.into_sorted();
                assert_eq!(got.len(), want.len(), "k {k} n {n}");
                for (g, w) in got.iter().zip(&want) {
                    assert_eq!(g.id, w.id, "k {k} n {n}");
                    assert_eq!(g.score.to_bits(), w.score.to_bits());
                }
            }
        }
    }

    #[test]
    fn threshold_never_excludes_a_hit_that_belongs() {
        let mut t = TopK::new(3);
        for i in 0..200u64 {
            let s = (i % 7) as f32;
            if s >= t.threshold() {
                t.push(s, i);
            }
        }
        let ids: Vec<u64> = t.into_sorted().iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![6, 13, 20]);
    }
}
