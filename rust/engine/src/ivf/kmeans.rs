//! Seeded k-means for the coarse quantizer. Assignment runs through the engine's search core
//! (`search::Search`: blocked GEMM for batches), centroid updates are summed per centroid
//! in row order, so the result depends only on the data and the seed (not on thread timing).

use crate::search::{Plan, Queries, Rows, Search};
use crate::types::Metric;
use rayon::prelude::*;

/// A small deterministic generator (SplitMix64): enough for sampling and initialization.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5851_F42D_4C95_7F2D)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        ((self.next_u64() as u128 * n as u128) >> 64) as usize
    }

    /// `m` distinct indices of `0..n`, ascending (partial Fisher-Yates).
    pub(crate) fn sample(&mut self, n: usize, m: usize) -> Vec<usize> {
        let m = m.min(n);
        let mut idx: Vec<usize> = (0..n).collect();
        for i in 0..m {
            let j = i + self.below(n - i);
            idx.swap(i, j);
        }
        idx.truncate(m);
        idx.sort_unstable();
        idx
    }
}

/// The nearest of `centroids` (by `metric`: inner product or L2) for every row of `rows`.
pub(crate) fn assign(rows: &[f32], centroids: &[f32], dim: usize, metric: Metric) -> Vec<u32> {
    let n = rows.len() / dim;
    if n == 0 {
        return Vec::new();
    }
    let plan = Plan {
        dim,
        metric,
        normalize_queries: false,
        normalize_rows: false,
    };
    let mut ids = vec![0u64; n];
    let mut scores = vec![0f32; n];
    let search = Search {
        plan,
        rows: Rows::F32(centroids),
        queries: Queries::F32(rows),
        k: 1,
        eligible: &|_: usize, _: usize| true,
        row_id: &|r: usize| r as u64,
    };
    search.run(&mut ids, &mut scores);
    // A row that scores NaN against every centroid gets no id (u64::MAX): checked input
    // cannot, but a crafted file's values could; it goes to list 0 rather than out of bounds.
    let k = (centroids.len() / dim) as u64;
    ids.into_iter()
        .map(|i| if i < k { i as u32 } else { 0 })
        .collect()
}

fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

/// `k` centroids of `data` (`n >= k` rows of `dim` values) after `iters` Lloyd iterations.
/// `spherical`: centroids are unit length and rows are assigned by inner product (cos / ip
/// indexes, as faiss does for inner-product IVF); otherwise by L2. Empty clusters are split off
/// the largest ones (a perturbed copy of their centroid), deterministically given `seed`.
pub(crate) fn kmeans(
    data: &[f32],
    dim: usize,
    k: usize,
    iters: usize,
    spherical: bool,
    seed: u64,
) -> Vec<f32> {
    let n = data.len() / dim;
    assert!(n >= k && k > 0, "k-means needs at least k rows");
    let metric = if spherical { Metric::Ip } else { Metric::L2 };
    let mut rng = Rng::new(seed);
    let mut centroids = Vec::with_capacity(k * dim);
    for i in rng.sample(n, k) {
        centroids.extend_from_slice(&data[i * dim..(i + 1) * dim]);
    }
    if spherical {
        centroids.chunks_exact_mut(dim).for_each(normalize);
    }
    for _ in 0..iters {
        let labels = assign(data, &centroids, dim, metric);
        let mut members: Vec<Vec<u32>> = vec![Vec::new(); k];
        for (row, &c) in labels.iter().enumerate() {
            members[c as usize].push(row as u32);
        }
        centroids
            .par_chunks_mut(dim)
            .zip(members.par_iter())
            .for_each(|(c, rows)| {
                if rows.is_empty() {
                    return;
                }
                let mut sum = vec![0f64; dim];
                for &r in rows {
                    let row = &data[r as usize * dim..(r as usize + 1) * dim];
                    for (s, &x) in sum.iter_mut().zip(row) {
                        *s += x as f64;
                    }
                }
                let inv = 1.0 / rows.len() as f64;
                for (o, s) in c.iter_mut().zip(&sum) {
                    *o = (s * inv) as f32;
                }
                if spherical {
                    normalize(c);
                }
            });
        split_empty(&mut centroids, &mut members, dim, spherical, &mut rng);
    }
    centroids
}

/// Gives every empty cluster a perturbed copy of a large cluster's centroid (faiss's rule).
fn split_empty(
    centroids: &mut [f32],
    members: &mut [Vec<u32>],
    dim: usize,
    spherical: bool,
    rng: &mut Rng,
) {
    const EPS: f32 = 1.0 / 1024.0;
    let k = members.len();
    let n: usize = members.iter().map(Vec::len).sum();
    for empty in 0..k {
        if !members[empty].is_empty() {
            continue;
        }
        // Pick a cluster with probability (size - 1) / (n - k), like faiss.
        let denom = (n - k).max(1) as f64;
        let mut c = rng.below(k);
        let donor = loop {
            let p = (members[c].len() as f64 - 1.0) / denom;
            let r = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            if members[c].len() > 1 && r < p {
                break c;
            }
            c = (c + 1) % k;
        };
        let (a, b) = (donor * dim, empty * dim);
        for d in 0..dim {
            let v = centroids[a + d];
            let sign = if d % 2 == 0 { 1.0 } else { -1.0 };
            centroids[b + d] = v * (1.0 + sign * EPS);
            centroids[a + d] = v * (1.0 - sign * EPS);
        }
        if spherical {
            normalize(&mut centroids[a..a + dim]);
            normalize(&mut centroids[b..b + dim]);
        }
        // Share the donor's rows so later empties pick among sizes that reflect the split.
        let half = members[donor].len() / 2;
        let moved = members[donor].split_off(half);
        members[empty] = moved;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blobs(seed: u64, centers: usize, per: usize, dim: usize) -> Vec<f32> {
        let mut rng = Rng::new(seed);
        let mut unit = || (rng.next_u64() >> 11) as f32 / (1u64 << 53) as f32 - 0.5;
        let means: Vec<f32> = (0..centers * dim).map(|_| unit() * 20.0).collect();
        let mut out = Vec::new();
        for c in 0..centers {
            for _ in 0..per {
                for d in 0..dim {
                    out.push(means[c * dim + d] + unit() * 0.1);
                }
            }
        }
        out
    }

    #[test]
    fn sample_is_distinct_sorted_and_seeded() {
        let a = Rng::new(7).sample(100, 30);
        let b = Rng::new(7).sample(100, 30);
        let c = Rng::new(8).sample(100, 30);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 30);
        assert!(a.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn kmeans_is_deterministic_and_finds_separated_blobs() {
        let dim = 8;
        let data = blobs(1, 4, 50, dim);
        let c1 = kmeans(&data, dim, 4, 10, false, 42);
        let c2 = kmeans(&data, dim, 4, 10, false, 42);
        assert_eq!(c1, c2);
        // Every blob's rows share one label, and the four blobs get four labels.
        let labels = assign(&data, &c1, dim, Metric::L2);
        let mut seen = Vec::new();
        for blob in labels.chunks(50) {
            assert!(blob.iter().all(|&l| l == blob[0]), "a blob was split");
            seen.push(blob[0]);
        }
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn kmeans_fills_every_cluster_even_with_duplicates() {
        let dim = 4;
        // 3 distinct points repeated: more clusters than distinct points forces empty splits.
        let mut data = Vec::new();
        for i in 0..30 {
            let p = (i % 3) as f32;
            data.extend_from_slice(&[p, p * 2.0, 1.0, -p]);
        }
        let c = kmeans(&data, dim, 6, 5, false, 3);
        assert_eq!(c.len(), 6 * dim);
        assert!(c.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn spherical_centroids_are_unit_length() {
        let dim = 6;
        let data = blobs(2, 3, 20, dim);
        let c = kmeans(&data, dim, 3, 5, true, 1);
        for row in c.chunks_exact(dim) {
            let n: f32 = row.iter().map(|x| x * x).sum();
            assert!((n - 1.0).abs() < 1e-4);
        }
    }
}
