//! Principal directions of the stored vectors, for batches that rank by fewer dimensions
//! (`scan_dims`).
//!
//! Real embeddings keep most of their variance in a fraction of their dimensions (MiniLM:
//! 90% in 192 of 384). A batch's list-major product only ranks candidates (each query's best
//! are re-scored from the stored rows afterwards), so it can run on the rows and queries
//! projected onto the top `scan_dims` principal directions: half the dimensions, half the
//! multiply-adds and half the packed copy, for a ranking that keeps the true neighbours
//! among the re-scored candidates. The directions are the eigenvectors of the (uncentered:
//! inner products are what is ranked) second-moment matrix of a sample of the rows.
//!
//! Training computes them from its sample when `scan_dims > 0` (as it trains the centroids and
//! codebooks), or `IvfIndex::train_directions` from a given sample; either way they are saved
//! with the index, so copies of one trained quantizer (the shards of a manifest) all rank by
//! the same directions. An index without them (a file saved before they were stored, or
//! `scan_dims` set after training) computes them from its contents at the first batch.

use crate::kernels;
use crate::matmul::{PackedQueries, Product, Src, Workspace};
use std::sync::OnceLock;

/// Rows of the sample the directions are computed from.
pub(crate) const BASIS_SAMPLE: usize = 16 * 1024;
/// Largest `dim` that `scan_dims` allows. The directions take a dense eigendecomposition of a
/// `dim x dim` matrix: about 24 * dim^2 bytes plus the sample's 8 * 16,384 * dim (~370 MiB at
/// 2,048) and O(dim^3) time (0.6 s at 512, 5 s at 1,024, 55 s at 2,048 on one Xeon core).
/// At dim 65,536 that would be ~34 GB: refused before anything is allocated.
pub const MAX_SCAN_DIMS_DIM: usize = 2048;

/// The principal directions an index ranks batches by (`dim x dim`, see
/// [`principal_directions`]).
#[derive(Default)]
pub(crate) struct Directions {
    cell: OnceLock<Vec<f32>>,
    /// Trained from a sample (saved with the index), not computed from the contents.
    trained: bool,
}

impl Directions {
    /// Directions trained from `sample` (rows of `dim` values; at most `BASIS_SAMPLE` of them,
    /// evenly spaced, are used).
    pub(crate) fn train(sample: &[f32], dim: usize) -> Self {
        let n = sample.len() / dim;
        let step = n.div_ceil(BASIS_SAMPLE).max(1);
        let rows: Vec<f32> = sample
            .chunks_exact(dim)
            .step_by(step)
            .flatten()
            .copied()
            .collect();
        Self::trained(principal_directions(&rows, dim))
    }

    /// Directions as saved (`dim x dim`).
    pub(crate) fn trained(directions: Vec<f32>) -> Self {
        Directions {
            cell: OnceLock::from(directions),
            trained: true,
        }
    }

    /// The directions, computed by `compute` if neither trained nor computed before.
    pub(crate) fn get_or_init(&self, compute: impl FnOnce() -> Vec<f32>) -> &[f32] {
        self.cell.get_or_init(compute)
    }

    /// The directions, trained or computed, if either happened (tests).
    #[cfg(test)]
    pub(crate) fn get(&self) -> Option<&[f32]> {
        self.cell.get().map(Vec::as_slice)
    }

    /// The trained directions (what a saved file holds), if any.
    pub(crate) fn saved(&self) -> Option<&[f32]> {
        self.cell.get().filter(|_| self.trained).map(Vec::as_slice)
    }
}

/// The `dim` principal directions of `sample` (rows of `dim` values), by decreasing
/// variance, as `dim x dim` row-major (row `c` is the c-th direction, unit length).
/// Deterministic: the same sample gives the same directions, signs included.
pub(crate) fn principal_directions(sample: &[f32], dim: usize) -> Vec<f32> {
    let m = sample.len() / dim;
    // The second-moment matrix S^T S through the engine's GEMM: the columns of S as rows.
    let mut cols = vec![0f32; dim * m];
    for (r, row) in sample.chunks_exact(dim).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            cols[c * m + r] = v;
        }
    }
    let mut moment = vec![0f32; dim * dim];
    let packed = PackedQueries::new(Product::F32, kernels::level(), dim, m, &cols);
    packed.scores(
        Src::F32(&cols),
        dim,
        &mut moment,
        dim,
        &mut Workspace::default(),
    );
    let sym = nalgebra::DMatrix::<f64>::from_fn(dim, dim, |i, j| {
        // Exactly symmetric (the product's two triangles may differ in the last bits).
        0.5 * (moment[i * dim + j] as f64 + moment[j * dim + i] as f64)
    });
    let eig = nalgebra::SymmetricEigen::new(sym);
    let mut order: Vec<usize> = (0..dim).collect();
    order.sort_by(|&a, &b| {
        eig.eigenvalues[b]
            .total_cmp(&eig.eigenvalues[a])
            .then(a.cmp(&b))
    });
    let mut out = Vec::with_capacity(dim * dim);
    for &c in &order {
        let v = eig.eigenvectors.column(c);
        // A fixed sign (largest component positive): the same directions on every platform.
        let big = (0..dim).max_by(|&a, &b| v[a].abs().total_cmp(&v[b].abs()).then(b.cmp(&a)));
        let sign = if big.is_some_and(|i| v[i] < 0.0) {
            -1.0
        } else {
            1.0
        };
        out.extend(v.iter().map(|&x| (sign * x) as f32));
    }
    out
}

/// `rows` (n x dim) projected onto the first `pdim` rows of `directions`: n x pdim in `out`.
pub(crate) fn project(
    rows: &[f32],
    dim: usize,
    directions: &[f32],
    pdim: usize,
    out: &mut Vec<f32>,
    ws: &mut Workspace,
) {
    project_by(Product::F32, (rows, dim), directions, pdim, out, ws);
}

/// A list's rows projected as [`project`] does, by the bf16 product where the CPU has one:
/// the projection only ranks the candidates a batch re-scores from the rows, and its rounding
/// (2^-9 of each value) is no more than the product that scans the projected rows adds (bf16,
/// or i8 at 1/254 of the largest value). It is most of a list's first reduced scan: on 198k
/// MiniLM rows (384 -> 192 directions, 1,024 lists) 0.245 CPU-s by f32, 0.118 by bf16.
pub(crate) fn project_rows(
    rows: &[f32],
    dim: usize,
    directions: &[f32],
    pdim: usize,
    out: &mut Vec<f32>,
    ws: &mut Workspace,
) {
    let product = if crate::matmul::has_bf16_product(kernels::level()) {
        Product::Bf16
    } else {
        Product::F32
    };
    project_by(product, (rows, dim), directions, pdim, out, ws);
}

fn project_by(
    product: Product,
    (rows, dim): (&[f32], usize),
    directions: &[f32],
    pdim: usize,
    out: &mut Vec<f32>,
    ws: &mut Workspace,
) {
    let n = rows.len() / dim;
    out.clear();
    out.resize(n * pdim, 0.0);
    if n == 0 {
        return;
    }
    let packed = PackedQueries::new(product, kernels::level(), n, dim, rows);
    packed.scores(Src::F32(&directions[..pdim * dim]), pdim, out, pdim, ws);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ivf::{IvfIndex, IvfParams};
    use crate::types::{DType, Metric};

    fn rows(seed: u64, n: usize, dim: usize, skew: f32) -> Vec<f32> {
        let mut rng = crate::ivf::kmeans::Rng::new(seed);
        (0..n * dim)
            .map(|i| {
                let v = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                // variance falling with the dimension; `skew` tilts it towards the last ones
                v * (1.0 + skew * (i % dim) as f32) / (1.0 + (i % dim) as f32).sqrt()
            })
            .collect()
    }

    fn quantizer(dim: usize, scan_dims: usize, sample: &[f32]) -> IvfIndex {
        let p = IvfParams {
            train_threshold: 0,
            scan_dims,
            ..IvfParams::with_nlist(4)
        };
        let mut q = IvfIndex::new(dim, Metric::Ip, DType::F16, p).unwrap();
        q.train(sample).unwrap();
        q
    }

    /// Training with scan_dims trains the directions from the training sample; copies of the
    /// quantizer holding different rows (the shards of a manifest) keep them through save and
    /// load, in memory and mapped, and rank their batches by them.
    #[test]
    fn directions_trained_with_the_quantizer_travel_with_its_copies() {
        let dim = 24;
        let sample = rows(1, 250, dim, 0.0); // all of it is the training sample (<= 64 nlist)
        let q = quantizer(dim, 6, &sample);
        let trained = q
            .trained_directions()
            .expect("trained with scan_dims")
            .to_vec();
        // (less the rows tune holds out as queries: they are not trained on)
        let kept: Vec<f32> = sample
            .chunks_exact(dim)
            .filter(|r| !crate::ivf::tune::held_out(&crate::ivf::tune::stored_bytes(DType::F16, r)))
            .flatten()
            .copied()
            .collect();
        assert!(kept.len() < sample.len());
        assert_eq!(trained, principal_directions(&kept, dim));
        let image = q.to_bytes();
        let dir = tempfile::tempdir().unwrap();
        for (s, skew) in [(0u64, 0.0f32), (1, 3.0)] {
            // shard s: rows of another spectrum, whose own directions differ from the sample's
            let mut shard = IvfIndex::from_bytes(&image).unwrap();
            let v = rows(10 + s, 500, dim, skew);
            let keys: Vec<u64> = (0..500).map(|k| k + 1000 * s).collect();
            shard.add(&keys, &v).unwrap();
            let path = dir.path().join(format!("{s}.ivf"));
            shard.save(&path).unwrap();
            let batch = rows(20, 16, dim, 0.0);
            let before = shard.search(&batch, 5, None).unwrap();
            for mmap in [false, true] {
                let loaded = IvfIndex::load(&path, mmap, true).unwrap();
                assert_eq!(loaded.trained_directions(), Some(&trained[..]), "shard {s}");
                assert_eq!(loaded.search(&batch, 5, None).unwrap(), before);
            }
            if skew > 0.0 {
                assert_ne!(
                    principal_directions(&v, dim),
                    trained,
                    "a test that can fail"
                );
            }
        }
    }

    /// Without scan_dims nothing is trained or stored: the file is what builds before wrote
    /// (flag bit 2 clear, byte for byte the same after a load), and scan_dims set later
    /// computes the directions from the contents, unsaved, as before.
    #[test]
    fn files_without_trained_directions_are_unchanged() {
        let dim = 16;
        let sample = rows(2, 300, dim, 0.0);
        let mut q = quantizer(dim, 0, &sample);
        assert!(q.trained_directions().is_none());
        let image = q.to_bytes();
        assert_eq!(image[22] & 4, 0);
        assert_eq!(IvfIndex::from_bytes(&image).unwrap().to_bytes(), image);
        q.add(&(0..300).collect::<Vec<u64>>(), &sample).unwrap();
        q.set_scan_dims(4).unwrap();
        q.search(&sample[..10 * dim], 3, None).unwrap();
        assert!(q.directions.get().is_some() && q.trained_directions().is_none());
        assert_eq!(q.to_bytes()[22] & 4, 0);
        let with = quantizer(dim, 4, &sample).to_bytes();
        assert_eq!(with[22] & 4, 4);
        assert_eq!(with.len(), image.len() + 4 * dim * dim);
    }

    /// `train_directions` trains them from a given sample (normalized under cos), saved; it is
    /// refused, with the reason, where scan_dims is; a non-finite stored direction is corrupt.
    #[test]
    fn directions_trained_from_a_given_sample() {
        let dim = 16;
        let sample = rows(3, 300, dim, 0.0);
        let mut q = quantizer(dim, 0, &sample);
        let other = rows(4, 200, dim, 2.0);
        q.train_directions(&other).unwrap();
        assert_eq!(
            q.trained_directions(),
            Some(&principal_directions(&other, dim)[..])
        );
        let image = q.to_bytes();
        let loaded = IvfIndex::from_bytes(&image).unwrap();
        assert_eq!(loaded.trained_directions(), q.trained_directions());
        let mut cos = IvfIndex::new(dim, Metric::Cos, DType::I8, IvfParams::with_nlist(4)).unwrap();
        cos.train_directions(&other).unwrap();
        let unit: Vec<f32> = other
            .chunks_exact(dim)
            .flat_map(|r| {
                let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
                r.iter().map(move |x| x / norm)
            })
            .collect();
        let want = principal_directions(&unit, dim);
        let got = cos.trained_directions().unwrap();
        assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-5));
        for (metric, dtype, why) in [
            (Metric::Ip, DType::F32, "needs dtype"),
            (Metric::L2, DType::F16, "needs metric"),
        ] {
            let mut bad = IvfIndex::new(dim, metric, dtype, IvfParams::with_nlist(4)).unwrap();
            let err = bad.train_directions(&other).unwrap_err().to_string();
            assert!(
                err.starts_with("train_directions: ") && err.contains(why),
                "{err}"
            );
        }
        assert!(q.train_directions(&other[..dim + 1]).is_err());
        assert!(q.train_directions(&[]).is_err());
        // a NaN in the directions section (checksum made to match): refused as corrupt
        let mut bytes = image.clone();
        let (directions, meta_end) = super::super::file::sections_of(&bytes);
        assert_eq!(directions.len(), 4 * dim * dim);
        bytes[directions.start..directions.start + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        let sum = crate::file_io::meta_checksum(&bytes[..120], &bytes[128..meta_end]);
        bytes[120..128].copy_from_slice(&sum.to_le_bytes());
        let err = IvfIndex::from_bytes(&bytes).unwrap_err().to_string();
        assert!(err.contains("principal direction is not finite"), "{err}");
    }

    #[test]
    fn rows_project_as_queries_do_to_the_bf16_rounding() {
        // project_rows may round inputs to bf16 (8 bits): each value within 2^-8 of the norms'
        // product of the f32 projection (Cauchy-Schwarz bounds every term's rounding).
        let (n, dim, pdim) = (70, 48, 20);
        let sample = rows(3, n, dim, 0.2);
        let dirs = principal_directions(&sample, dim);
        let (mut want, mut got, mut ws) = (Vec::new(), Vec::new(), Workspace::default());
        project(&sample, dim, &dirs, pdim, &mut want, &mut ws);
        project_rows(&sample, dim, &dirs, pdim, &mut got, &mut ws);
        assert_eq!(got.len(), n * pdim);
        for (i, row) in sample.chunks_exact(dim).enumerate() {
            let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
            for j in 0..pdim {
                let (a, b) = (want[i * pdim + j], got[i * pdim + j]);
                assert!(
                    (a - b).abs() <= norm / 256.0,
                    "row {i} direction {j}: {a} {b}"
                );
            }
        }
        // no rows: nothing, and the buffer cleared
        project_rows(&[], dim, &dirs, pdim, &mut got, &mut ws);
        assert!(got.is_empty());
    }

    #[test]
    fn directions_are_orthonormal_and_span_a_low_rank_sample_first() {
        // Rows in a 3-d subspace of 8-d: the first 3 directions span it, so projecting onto
        // them keeps every inner product.
        let dim = 8;
        let basis = [
            [1.0f32, 2.0, 0.0, -1.0, 0.5, 0.0, 0.0, 1.0],
            [0.0, 1.0, 1.0, 0.0, -2.0, 1.0, 0.0, 0.0],
            [3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, -1.0],
        ];
        let mut rng = crate::ivf::kmeans::Rng::new(7);
        let mut sample = Vec::new();
        for _ in 0..200 {
            let w: Vec<f32> = (0..3)
                .map(|_| (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                .collect();
            sample.extend((0..dim).map(|d| (0..3).map(|b| w[b] * basis[b][d]).sum::<f32>()));
        }
        let dirs = principal_directions(&sample, dim);
        for a in 0..dim {
            for b in 0..dim {
                let dot: f32 = (0..dim)
                    .map(|d| dirs[a * dim + d] * dirs[b * dim + d])
                    .sum();
                let want = if a == b { 1.0 } else { 0.0 };
                assert!((dot - want).abs() < 1e-4, "directions {a}, {b}: {dot}");
            }
        }
        let (mut p, mut ws) = (Vec::new(), Workspace::default());
        project(&sample, dim, &dirs, 3, &mut p, &mut ws);
        for i in [0usize, 17, 199] {
            for j in [3usize, 50, 120] {
                let full: f32 = (0..dim)
                    .map(|d| sample[i * dim + d] * sample[j * dim + d])
                    .sum();
                let low: f32 = (0..3).map(|d| p[i * 3 + d] * p[j * 3 + d]).sum();
                assert!(
                    (full - low).abs() < 1e-3 * full.abs().max(1.0),
                    "{full} vs {low}"
                );
            }
        }
        assert_eq!(dirs, principal_directions(&sample, dim), "deterministic");
    }
}
