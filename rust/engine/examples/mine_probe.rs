//! Times `mine_hard_negatives` against the bare blocked matrix products it runs (same block
//! shapes, all cores, no top-k), alternately in one process, to split GEMM time from the rest.
//! `cargo run --release --example mine_probe -- [nq] [n]`.
use leanclip_engine::{mine_hard_negatives, DType, Metric, Mining, Queries, Rows, ScanPrecision};
use rayon::prelude::*;
use std::time::Instant;

fn rand_rows(n: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    let mut v: Vec<f32> = (0..n * dim)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    for r in v.chunks_exact_mut(dim) {
        let norm = r.iter().map(|x| x * x).sum::<f32>().sqrt();
        r.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

fn gemm_only(q: &[f32], x: &[f32], dim: usize, qb: usize, nb: usize) -> f32 {
    let nq = q.len() / dim;
    let n = x.len() / dim;
    (0..nq.div_ceil(qb))
        .into_par_iter()
        .map(|b| {
            let q0 = b * qb;
            let q1 = (q0 + qb).min(nq);
            let m = q1 - q0;
            let mut tile = vec![0f32; m * nb];
            let mut acc = 0f32;
            let mut r0 = 0;
            while r0 < n {
                let r1 = (r0 + nb).min(n);
                let w = r1 - r0;
                // SAFETY: in-bounds row-major matrices for the given shapes and strides.
                unsafe {
                    gemm::gemm(
                        m,
                        w,
                        dim,
                        tile.as_mut_ptr(),
                        1,
                        w as isize,
                        false,
                        q[q0 * dim..].as_ptr(),
                        1,
                        dim as isize,
                        x[r0 * dim..].as_ptr(),
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
                acc += tile[0];
                r0 = r1;
            }
            acc
        })
        .sum()
}

fn cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let nq = args.first().copied().unwrap_or(8192);
    let n = args.get(1).copied().unwrap_or(20000);
    let dim = 512;
    let k = 10;
    let q = rand_rows(nq, dim, 1);
    let x = rand_rows(n, dim, 2);
    let qg: Vec<i64> = (0..nq as i64).map(|i| i / 5).collect();
    let cg: Vec<i64> = (0..n as i64).map(|i| i / 5).collect();
    let flop = 2.0 * (nq * n * dim) as f64;
    // mine (512 x 1,024 tiles + top-k) against bare matrix products of a few tile shapes.
    let shapes = [(512usize, 1024usize), (256, 1024), (256, 256)];
    let mut best = [(f64::MAX, f64::MAX); 4];
    for round in 0..3 {
        let t = Instant::now();
        let c = cpu();
        let (ids, _) = mine_hard_negatives(Mining {
            queries: Queries::F32(&q),
            corpus: Rows::F32(&x),
            dim,
            k,
            query_groups: Some(&qg),
            corpus_groups: Some(&cg),
            metric: Metric::Ip,
            dtype: DType::F32,
            precision: ScanPrecision::F32,
        })
        .unwrap();
        let (tm, cm) = (t.elapsed().as_secs_f64(), cpu() - c);
        best[0] = (best[0].0.min(tm), best[0].1.min(cm));
        println!("round {round} mine: {tm:.2}s cpu {cm:.2}s (id0 {})", ids[0]);
        for (i, &(qb, nb)) in shapes.iter().enumerate() {
            let t = Instant::now();
            let c = cpu();
            let a = gemm_only(&q, &x, dim, qb, nb);
            let (tg, cg) = (t.elapsed().as_secs_f64(), cpu() - c);
            best[i + 1] = (best[i + 1].0.min(tg), best[i + 1].1.min(cg));
            println!("round {round} gemm {qb}x{nb}: {tg:.2}s cpu {cg:.2}s ({a:.1})");
        }
    }
    let names = ["mine", "gemm 512x1024", "gemm 256x1024", "gemm 256x256"];
    for (name, (w, c)) in names.iter().zip(best) {
        println!(
            "best {name:14}: wall {w:.3}s cpu {c:.3}s, {:.1} GFLOP per cpu-second",
            flop / c / 1e9
        );
    }
}
