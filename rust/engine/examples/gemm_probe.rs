//! Measures the single-thread GFLOPS of the score-tile matrix product for a few block shapes
//! (used to pick QUERY_BLOCK / ROW_BLOCK). `cargo run --release --example gemm_probe`.
use std::time::Instant;

fn main() {
    let dim = 512;
    for &(qb, nb) in &[
        (128usize, 1024usize),
        (256, 1024),
        (128, 4096),
        (64, 2048),
        (256, 256),
        (512, 512),
    ] {
        let q: Vec<f32> = (0..qb * dim).map(|i| (i % 17) as f32 * 0.01).collect();
        let x: Vec<f32> = (0..nb * dim).map(|i| (i % 13) as f32 * 0.01).collect();
        let mut tile = vec![0f32; qb * nb];
        let reps = (4e9 / (2.0 * (qb * nb * dim) as f64)).ceil() as usize;
        for layout in 0..2 {
            let t = Instant::now();
            for _ in 0..reps {
                // SAFETY: all matrices are in bounds for the given shapes and strides.
                unsafe {
                    if layout == 0 {
                        // tile (qb x nb, row-major) = Q (qb x dim) * X^T
                        gemm::gemm(
                            qb,
                            nb,
                            dim,
                            tile.as_mut_ptr(),
                            1,
                            nb as isize,
                            false,
                            q.as_ptr(),
                            1,
                            dim as isize,
                            x.as_ptr(),
                            dim as isize,
                            1,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    } else {
                        // tile^T (nb x qb, column-major dst = row-major tile) = X * Q^T
                        gemm::gemm(
                            nb,
                            qb,
                            dim,
                            tile.as_mut_ptr(),
                            nb as isize,
                            1,
                            false,
                            x.as_ptr(),
                            1,
                            dim as isize,
                            q.as_ptr(),
                            dim as isize,
                            1,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                }
            }
            let secs = t.elapsed().as_secs_f64();
            println!(
                "qb {qb:4} nb {nb:5} layout {layout}: {:.1} GFLOPS",
                2.0 * (qb * nb * dim * reps) as f64 / secs / 1e9
            );
        }
        let t = Instant::now();
        for _ in 0..reps {
            // SAFETY: all matrices are in bounds for the given shapes and strides.
            unsafe {
                matrixmultiply::sgemm(
                    qb,
                    dim,
                    nb,
                    1.0,
                    q.as_ptr(),
                    dim as isize,
                    1,
                    x.as_ptr(),
                    1,
                    dim as isize,
                    0.0,
                    tile.as_mut_ptr(),
                    nb as isize,
                    1,
                );
            }
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "qb {qb:4} nb {nb:5} matrixmultiply: {:.1} GFLOPS",
            2.0 * (qb * nb * dim * reps) as f64 / secs / 1e9
        );
    }
}

#[allow(dead_code)]
fn unused() {}
