//! A deterministic mini-fuzz of the IVF loader (the cargo-fuzz target `ivf_from_bytes` runs the
//! same checks open-ended): thousands of mutated saved files, with and without checksums
//! patched to match, must load into a consistent index or fail with `Error::File`, never panic.

mod ivf_exercise;

use ivf_exercise::{exercise, expect_file_error, fix_checksums};
use leanclip_engine::ivf::{IvfIndex, IvfParams};
use leanclip_engine::{DType, Metric};

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    // (metric, dtype, rerank, trained, pq): the last seed holds 4-bit codes.
    for (metric, dtype, rerank, train, pq) in [
        (Metric::Cos, DType::F32, 0, true, 0),
        (Metric::Ip, DType::F16, 0, true, 0),
        (Metric::L2, DType::I8, 3, true, 0),
        (Metric::Cos, DType::I8, 0, false, 0),
        (Metric::Ip, DType::I8, 0, true, 2),
    ] {
        let p = IvfParams {
            rerank,
            train_threshold: 0,
            pq,
            shortlist: 3,
            ..IvfParams::with_nlist(3)
        };
        let mut ivf = IvfIndex::new(4, metric, dtype, p).unwrap();
        let v: Vec<f32> = (0..40).map(|i| ((i * 7) % 9) as f32 - 4.0 + 0.25).collect();
        let keys: Vec<u64> = (0..10).map(|k| k * 11 + 1).collect();
        ivf.add(&keys, &v).unwrap();
        if train {
            ivf.train(&v).unwrap();
        }
        out.push(ivf.to_bytes());
    }
    out
}

#[test]
fn mutated_files_load_consistently_or_fail_with_a_file_error() {
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut accepted = 0;
    for seed in seeds() {
        exercise(&IvfIndex::from_bytes(&seed).unwrap(), &seed);
        for round in 0..3000 {
            let mut data = seed.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() as usize) % data.len();
                match next() % 4 {
                    0 => data[at] ^= 1 << (next() % 8),
                    1 => data[at] = next() as u8,
                    2 => data.truncate(at),
                    _ => data[at] = 0,
                }
                if data.is_empty() {
                    break;
                }
            }
            if round % 2 == 0 {
                fix_checksums(&mut data);
            }
            match IvfIndex::from_bytes(&data) {
                Ok(index) => {
                    accepted += 1;
                    exercise(&index, &data);
                }
                Err(e) => expect_file_error(&e),
            }
        }
    }
    // Patched mutations of values (vectors, scales, centroids) are valid files: some must load.
    assert!(
        accepted > 100,
        "only {accepted} mutated files were accepted"
    );
}
