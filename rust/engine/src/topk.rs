//! Bounded top-k selection, the one every scan uses (exact, mining, IVF). Scores are "higher is better" here (callers negate distances);
//! equal scores rank by ascending id, so results are deterministic.
//!
//! Candidates go into a buffer of about twice k; when it fills, a linear-time selection
//! keeps the best k and raises the entry threshold to the worst of them. Per candidate that
//! is an append plus an amortized constant, where a binary heap pays a branchy log-k sift:
//! the difference shows when a scan keeps k + margin candidates per query.

use std::cmp::Ordering;

/// What a top-k ranks: an internal score (higher is better) and an id that breaks ties.
pub trait Ranked: Copy {
    fn score(&self) -> f32;
    fn id(&self) -> u64;
}

/// Total order, best first: higher score, then lower id. NaN never panics (total_cmp).
#[inline]
pub fn rank<T: Ranked>(a: &T, b: &T) -> Ordering {
    b.score().total_cmp(&a.score()).then(a.id().cmp(&b.id()))
}

/// One candidate: an internal score (higher is better) and its id (key or row).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Hit {
    pub score: f32,
    pub id: u64,
}

impl Ranked for Hit {
    #[inline]
    fn score(&self) -> f32 {
        self.score
    }

    #[inline]
    fn id(&self) -> u64 {
        self.id
    }
}

/// Keeps the best `k` candidates seen so far (`Hit`s, or any [`Ranked`] that carries where
/// its row lies, as the IVF scan's do).
#[derive(Clone, Debug)]
pub struct TopK<T = Hit> {
    k: usize,
    /// Buffer length that triggers a selection (`k` plus a slack of at least 32).
    cap: usize,
    hits: Vec<T>,
    /// Nothing below it enters: the floor given, raised to the worst kept score by each
    /// selection.
    cut: f32,
}

impl<T> Default for TopK<T> {
    /// Keeps nothing until [`TopK::reset`].
    fn default() -> Self {
        TopK {
            k: 0,
            cap: 0,
            hits: Vec::new(),
            cut: f32::NEG_INFINITY,
        }
    }
}

impl<T: Ranked> TopK<T> {
    pub fn new(k: usize) -> Self {
        let mut top = TopK::default();
        top.reset(k, f32::NEG_INFINITY);
        top
    }

    /// Starts over for `k` (keeping the buffer), refusing scores below `floor`: one known
    /// not to reach the final `k`.
    pub fn reset(&mut self, k: usize, floor: f32) {
        // k may exceed the candidates by far (mining pads with -1): the buffer grows as needed.
        self.k = k;
        self.cap = k.saturating_add(k.max(32));
        self.hits.clear();
        self.hits.reserve(self.cap.min(512));
        self.cut = floor;
    }

    /// Scores strictly below this can never enter (the floor until k hits were kept). A score
    /// equal to it may still enter with a lower id, so callers filter with `>=`.
    #[inline]
    pub fn threshold(&self) -> f32 {
        self.cut
    }

    #[inline]
    pub fn push(&mut self, hit: T) {
        if self.k == 0 || hit.score() < self.cut {
            return;
        }
        self.hits.push(hit);
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
        self.hits.select_nth_unstable_by(k - 1, rank);
        self.hits.truncate(k);
        self.cut = self.hits[k - 1].score();
    }

    pub fn merge(&mut self, other: TopK<T>) {
        for h in other.hits {
            self.push(h);
        }
    }

    pub fn len(&self) -> usize {
        self.hits.len().min(self.k)
    }

    pub fn is_empty(&self) -> bool {
        self.hits.is_empty()
    }

    /// The best k (or fewer), in no order.
    pub fn kept(&mut self) -> &[T] {
        self.select();
        &self.hits
    }

    /// The best k (or fewer), best first, left in place for the next [`TopK::reset`].
    pub fn sorted(&mut self) -> &mut [T] {
        self.select();
        self.hits.sort_unstable_by(rank);
        &mut self.hits
    }

    /// The hits, best first.
    pub fn into_sorted(mut self) -> Vec<T> {
        self.sorted();
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
            t.push(Hit { score: s, id });
        }
        let ids: Vec<u64> = t.into_sorted().iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![2, 4, 7]);
    }

    #[test]
    fn threshold_is_neg_inf_until_a_selection_then_the_worst_kept_and_only_rises() {
        let mut t = TopK::new(2);
        assert_eq!(t.threshold(), f32::NEG_INFINITY);
        t.push(Hit { score: 1.0, id: 1 });
        t.push(Hit { score: 2.0, id: 2 });
        assert_eq!(t.threshold(), f32::NEG_INFINITY);
        let mut last = f32::NEG_INFINITY;
        for i in 3..100u64 {
            t.push(Hit {
                score: i as f32,
                id: i,
            });
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
                a.push(Hit { score: s, id: i })
            } else {
                b.push(Hit { score: s, id: i })
            }
            all.push(Hit { score: s, id: i });
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
                    top.push(*h);
                }
                assert_eq!(top.len(), n.min(k));
                let mut want = hits.clone();
                want.sort_by(rank);
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
    fn reset_keeps_a_floor_and_kept_is_the_best_k() {
        let mut t = TopK::default();
        t.push(Hit { score: 9.0, id: 0 }); // k = 0 until reset: kept nothing
        assert!(t.is_empty());
        t.reset(2, 3.0);
        for (s, id) in [(2.9, 1), (3.0, 2), (5.0, 3), (4.0, 4), (1.0, 5)] {
            t.push(Hit { score: s, id });
        }
        let mut kept: Vec<u64> = t.kept().iter().map(|h| h.id).collect();
        kept.sort();
        assert_eq!(kept, vec![3, 4]);
        assert_eq!(t.threshold(), 4.0);
        t.reset(3, f32::NEG_INFINITY);
        t.push(Hit { score: -1.0, id: 7 });
        let ids: Vec<u64> = t.sorted().iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![7]);
    }

    #[test]
    fn threshold_never_excludes_a_hit_that_belongs() {
        let mut t = TopK::new(3);
        for i in 0..200u64 {
            let s = (i % 7) as f32;
            if s >= t.threshold() {
                t.push(Hit { score: s, id: i });
            }
        }
        let ids: Vec<u64> = t.into_sorted().iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![6, 13, 20]);
    }
}
