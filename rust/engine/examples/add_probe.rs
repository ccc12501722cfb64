//! Times `Index::add` of one 100,000 x 512 batch into an empty index for every dtype and
//! metric (best of N runs). `cargo run --release --example add_probe [reps] [filter]`.
use leanclip_engine::{DType, Index, Metric};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let filter = args.get(2).cloned().unwrap_or_default();
    let (n, dim) = (100_000usize, 512usize);
    // Deterministic pseudo-random unit-ish vectors (xorshift), no extra dependencies.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut data: Vec<f32> = (0..n * dim)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    for row in data.chunks_exact_mut(dim) {
        let inv = 1.0 / row.iter().map(|v| v * v).sum::<f32>().sqrt();
        row.iter_mut().for_each(|v| *v *= inv);
    }
    let keys: Vec<u64> = (0..n as u64).collect();
    for metric in [Metric::Ip, Metric::Cos] {
        for dtype in [DType::F32, DType::F16, DType::I8] {
            let name = format!("{} {}", dtype.name(), metric.name());
            if !name.contains(filter.as_str()) {
                continue;
            }
            let mut best = f64::INFINITY;
            for _ in 0..reps {
                let mut index = Index::new(dim, metric, dtype).unwrap();
                let t = Instant::now();
                index.add(&keys, &data).unwrap();
                best = best.min(t.elapsed().as_secs_f64());
                drop(index);
            }
            println!(
                "{name}: {:.0} vectors/s ({:.1} ms)",
                n as f64 / best,
                best * 1e3
            );
        }
    }
}
