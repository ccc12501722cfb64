//! Principal directions of the stored vectors, for batches that rank by fewer dimensions
//! (`scan_dims`).
//!
//! Real embeddings keep most of their variance in a fraction of their dimensions (MiniLM:
//! 90% in 192 of 384). A batch's list-major product only ranks candidates (each query's best
//! are re-scored from the stored rows afterwards), so it can run on the rows and queries
//! projected onto the top `scan_dims` principal directions: half the dimensions, half the
//! multiply-adds and half the packed copy, for a ranking that keeps the true neighbours
//! among the re-scored candidates. The directions are the eigenvectors of the (uncentered:
//! inner products are what is ranked) second-moment matrix of a sample of the stored rows.

use crate::kernels;
use crate::matmul::{PackedQueries, Product, Src, Workspace};

/// Rows of the sample the directions are computed from.
pub(crate) const BASIS_SAMPLE: usize = 16 * 1024;
/// Largest `dim` that `scan_dims` allows. The directions take a dense eigendecomposition of a
/// `dim x dim` matrix: about 24 * dim^2 bytes plus the sample's 8 * 16,384 * dim (~370 MiB at
/// 2,048) and O(dim^3) time (0.6 s at 512, 5 s at 1,024, 55 s at 2,048 on one Xeon core).
/// At dim 65,536 that would be ~34 GB: refused before anything is allocated.
pub const MAX_SCAN_DIMS_DIM: usize = 2048;

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
    let n = rows.len() / dim;
    out.clear();
    out.resize(n * pdim, 0.0);
    if n == 0 {
        return;
    }
    let packed = PackedQueries::new(Product::F32, kernels::level(), n, dim, rows);
    packed.scores(Src::F32(&directions[..pdim * dim]), pdim, out, pdim, ws);
}

#[cfg(test)]
mod tests {
    use super::*;

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
