//! Times `mine_hard_negatives` against the bare blocked matrix products it runs (same block
//! shapes, all cores, no top-k), alternately in one process, to split GEMM time from the rest.
//! `cargo run --release --example mine_probe -- [nq] [n]`.
use leanclip_engine::{mine_hard_negatives, DType, Metric, Queries, Rows};
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
                        m, w, dim, tile.as_mut_ptr(), 1, w as isize, false,
                        q[q0 * dim..].as_ptr(), 1, dim as isize,
                        x[r0 * dim..].as_ptr(), dim as isize, 1,
                        0.0, 1.0, false, false, false, gemm::Parallelism::None,
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
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().unwrap()).collect();
    let nq = args.first().copied().unwrap_or(8192);
    let n = args.get(1).copied().unwrap_or(20000);
    let dim = 512;
    let k = 10;
    let q = rand_rows(nq, dim, 1);
    let x = rand_rows(n, dim, 2);
    let qg: Vec<i64> = (0..nq as i64).map(|i| i / 5).collect();
    let cg: Vec<i64> = (0..n as i64).map(|i| i / 5).collect();
    let flop = 2.0 * (nq * n * dim) as f64;
    let shapes: Vec<(usize, usize)> = vec![(256, 1024), (128, 1024), (256, 256), (512, 512), (128, 512), (64, 1024)];
    let configs: Vec<(usize, usize)> = std::env::var("PROBE_CONFIGS")
        .map(|v| {
            v.split(',')
                .map(|c| {
                    let (a, b) = c.split_once('x').unwrap();
                    (a.parse().unwrap(), b.parse().unwrap())
                })
                .collect()
        })
        .unwrap_or_else(|_| vec![(256, 1024)]);
    let _ = &shapes;
    let mut best = vec![(f64::MAX, f64::MAX); configs.len() + 1];
    for round in 0..3 {
        for (ci, &(qb, nb)) in configs.iter().enumerate() {
            // SAFETY: single-threaded at this point (no rayon work in flight reads the env).
            unsafe {
                std::env::set_var("LEANCLIP_QB", qb.to_string());
                std::env::set_var("LEANCLIP_NB", nb.to_string());
                if ci % 2 == 1 {
                    std::env::set_var("LEANCLIP_OLDSCAN", "1");
                } else {
                    std::env::remove_var("LEANCLIP_OLDSCAN");
                }
            }
            let t = Instant::now();
            let c = cpu();
            let (ids, _) = mine_hard_negatives(
                Queries::F32(&q), Rows::F32(&x), dim, k, Some(&qg), Some(&cg), Metric::Ip, DType::F32,
            )
            .unwrap();
            let tm = t.elapsed().as_secs_f64();
            let cm = cpu() - c;
            best[ci] = (best[ci].0.min(tm), best[ci].1.min(cm));
            println!("round {round} mine {qb}x{nb}: {tm:.2}s cpu {cm:.2}s {:.1} GFLOPS/cpu (id0 {})", flop / cm / 1e9, ids[0]);
        }
        let t = Instant::now();
        let c = cpu();
        let a = gemm_only(&q, &x, dim, 256, 1024);
        let tg = t.elapsed().as_secs_f64();
        let cg = cpu() - c;
        let l = configs.len();
        best[l] = (best[l].0.min(tg), best[l].1.min(cg));
        println!("round {round} gemm-only 256x1024: {tg:.2}s cpu {cg:.2}s {:.1} GFLOPS/cpu ({a:.1})", flop / cg / 1e9);
    }
    for (ci, b) in best.iter().enumerate() {
        println!("best {:?}: wall {:.3}s cpu {:.3}s", configs.get(ci), b.0, b.1);
    }
}
