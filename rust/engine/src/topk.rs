//! Bounded top-k selection. Scores are "higher is better" here (callers negate distances);
//! equal scores rank by ascending id, so results are deterministic.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

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

/// Heap entry ordered so that the worst hit is the maximum (sits at the root).
#[derive(Clone, Copy, Debug)]
struct Worst(Hit);

impl PartialEq for Worst {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Worst {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.rank_cmp(&other.0)
    }
}

/// Keeps the best `k` hits seen so far.
#[derive(Clone, Debug)]
pub struct TopK {
    k: usize,
    heap: BinaryHeap<Worst>,
}

impl TopK {
    pub fn new(k: usize) -> Self {
        // k may exceed the candidates by far (mining pads with -1): let the heap grow as needed.
        TopK {
            k,
            heap: BinaryHeap::with_capacity(k.min(256) + 1),
        }
    }

    /// Scores strictly below this can never enter (`-inf` until the heap is full). A score equal
    /// to it may still enter with a lower id, so callers filter with `>=`.
    #[inline]
    pub fn threshold(&self) -> f32 {
        if self.heap.len() < self.k {
            f32::NEG_INFINITY
        } else {
            self.heap.peek().map_or(f32::NEG_INFINITY, |w| w.0.score)
        }
    }

    #[inline]
    pub fn push(&mut self, score: f32, id: u64) {
        if self.k == 0 {
            return;
        }
        let hit = Hit { score, id };
        if self.heap.len() < self.k {
            self.heap.push(Worst(hit));
        } else if let Some(mut root) = self.heap.peek_mut() {
            if hit.rank_cmp(&root.0) == Ordering::Less {
                *root = Worst(hit);
            }
        }
    }

    pub fn merge(&mut self, other: TopK) {
        for w in other.heap {
            self.push(w.0.score, w.0.id);
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// The hits, best first.
    pub fn into_sorted(self) -> Vec<Hit> {
        // BinaryHeap::into_sorted_vec is ascending by Ord, i.e. best first here.
        self.heap
            .into_sorted_vec()
            .into_iter()
            .map(|w| w.0)
            .collect()
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
    fn threshold_is_neg_inf_until_full_then_worst_kept() {
        let mut t = TopK::new(2);
        assert_eq!(t.threshold(), f32::NEG_INFINITY);
        t.push(1.0, 1);
        assert_eq!(t.threshold(), f32::NEG_INFINITY);
        t.push(2.0, 2);
        assert_eq!(t.threshold(), 1.0);
        t.push(3.0, 3);
        assert_eq!(t.threshold(), 2.0);
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
}
