//! Single-thread GFLOPS (GOPS for i8) of the score-tile products: the engine's own packed
//! kernels at every level this CPU has, against the `gemm` crate (stable: AVX2/FMA kernels only;
//! its AVX-512 kernels need its `nightly` feature) and `matrixmultiply`.
//! `cargo run --release --example gemm_probe [m n k]`.
use leanclip_engine::kernels::{available_levels, Level};
use leanclip_engine::matmul::{self, PackedQueries, Product, Src, Workspace};

/// This thread's CPU time: on a shared machine, time spent descheduled does not count.
fn thread_cpu_secs() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

fn time(flops: f64, mut f: impl FnMut()) -> f64 {
    // Best of several short rounds: the machine may be shared, and the best round is the
    // closest to the uncontended speed.
    f();
    let reps = (1e9 / flops).ceil().max(1.0) as usize;
    (0..7)
        .map(|_| {
            let t = thread_cpu_secs();
            for _ in 0..reps {
                f();
            }
            flops * reps as f64 / (thread_cpu_secs() - t) / 1e9
        })
        .fold(0.0, f64::max)
}

/// The probe's inputs: queries `a` (m x k), rows `b` (n x k) in each storage type, and output `c`.
struct Inputs {
    m: usize,
    n: usize,
    k: usize,
    a: Vec<f32>,
    b: Vec<f32>,
    b16: Vec<half::f16>,
    bi8: Vec<i8>,
    scales: Vec<f32>,
    c: Vec<f32>,
}

impl Inputs {
    fn new(m: usize, n: usize, k: usize) -> Self {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let b: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104729) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let b16 = b.iter().map(|&v| half::f16::from_f32(v)).collect();
        let bi8 = b.iter().map(|&v| (v * 254.0) as i8).collect();
        Inputs {
            m,
            n,
            k,
            a,
            b,
            b16,
            bi8,
            scales: vec![1.0f32 / 254.0; n],
            c: vec![0f32; m * n],
        }
    }

    fn flops(&self) -> f64 {
        2.0 * (self.m * self.n * self.k) as f64
    }
}

/// The `gemm` crate's f32 product, GFLOPS.
fn gemm_crate(x: &mut Inputs) -> f64 {
    let (m, n, k, flops) = (x.m, x.n, x.k, x.flops());
    let (a, b, c) = (&x.a, &x.b, &mut x.c);
    time(flops, || unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            k as isize,
            1,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    })
}

/// `matrixmultiply`'s sgemm, GFLOPS.
fn matrixmultiply_sgemm(x: &mut Inputs) -> f64 {
    let (m, n, k, flops) = (x.m, x.n, x.k, x.flops());
    let (a, b, c) = (&x.a, &x.b, &mut x.c);
    time(flops, || unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            1,
            k as isize,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        )
    })
}

/// The engine's products at one kernel level: f32 (packing the queries each call, and packed
/// once), f16 rows, and bf16 / i8 where the level has them.
fn engine_level(level: Level, x: &mut Inputs, ws: &mut Workspace) {
    let (m, n, k, flops) = (x.m, x.n, x.k, x.flops());
    let (a, b, b16, c) = (&x.a, &x.b, &x.b16, &mut x.c);
    let name = level.name();
    let g = time(flops, || {
        let pa = PackedQueries::new(Product::F32, level, m, k, a);
        pa.scores(Src::F32(b), n, c, n, ws)
    });
    println!("leanclip {name:7} (packing queries each call) f32: {g:6.1} GFLOPS");
    let pa = PackedQueries::new(Product::F32, level, m, k, a);
    let g = time(flops, || pa.scores(Src::F32(b), n, c, n, ws));
    println!("leanclip {name:7}              f32: {g:6.1} GFLOPS");
    let g = time(flops, || {
        let pa = PackedQueries::new(Product::F32, level, m, k, a);
        pa.scores(Src::F16(b16), n, c, n, ws)
    });
    println!("leanclip {name:7} f16 rows (F16C) f32: {g:6.1} GFLOPS");
    if matmul::has_bf16_product(level) {
        let pa = PackedQueries::new(Product::Bf16, level, m, k, a);
        let g = time(flops, || pa.scores(Src::F32(b), n, c, n, ws));
        println!("leanclip {name:7}             bf16: {g:6.1} GFLOPS");
    }
    if matmul::has_i8_product(level) {
        let pa = PackedQueries::new(Product::I8, level, m, k, a);
        let src = Src::I8 {
            data: &x.bi8,
            scales: &x.scales,
        };
        let g = time(flops, || pa.scores(src, n, c, n, ws));
        println!("leanclip {name:7}          i8 VNNI: {g:6.1} GOPS");
    }
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (m, n, k) = if args.len() == 3 {
        (args[0], args[1], args[2])
    } else {
        (512, 1024, 512)
    };
    let mut x = Inputs::new(m, n, k);
    let mut ws = Workspace::default();
    println!("shape m {m} n {n} k {k}, single thread, GFLOPS per CPU-second of this thread");
    let only = std::env::var("PROBE_ONLY").ok();
    let run = |name: &str| only.as_deref().is_none_or(|o| name.contains(o));
    let g = if run("crate") {
        gemm_crate(&mut x)
    } else {
        0.0
    };
    println!("gemm crate 0.18 (stable)      f32: {g:6.1} GFLOPS");
    let g = if run("matrixmultiply") {
        matrixmultiply_sgemm(&mut x)
    } else {
        0.0
    };
    println!("matrixmultiply                f32: {g:6.1} GFLOPS");
    for level in available_levels() {
        if level != Level::Scalar && run(level.name()) {
            engine_level(level, &mut x, &mut ws);
        }
    }
}
