//! NEON kernels (aarch64).

use std::arch::aarch64::*;

/// # Safety
/// The CPU must support NEON; `a` and `b` must have the same length.
#[target_feature(enable = "neon")]
pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [vdupq_n_f32(0.0); 4];
    let mut i = 0;
    while i + 16 <= n {
        for (j, acc_j) in acc.iter_mut().enumerate() {
            let off = i + 4 * j;
            *acc_j = vfmaq_f32(*acc_j, vld1q_f32(pa.add(off)), vld1q_f32(pb.add(off)));
        }
        i += 16;
    }
    let mut total = vaddvq_f32(vaddq_f32(
        vaddq_f32(acc[0], acc[1]),
        vaddq_f32(acc[2], acc[3]),
    ));
    while i < n {
        total += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    total
}

/// # Safety
/// The CPU must support NEON; `a` and `b` must have the same length.
#[target_feature(enable = "neon")]
pub unsafe fn l2_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len();
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc = [vdupq_n_f32(0.0); 2];
    let mut i = 0;
    while i + 8 <= n {
        for (j, acc_j) in acc.iter_mut().enumerate() {
            let off = i + 4 * j;
            let d = vsubq_f32(vld1q_f32(pa.add(off)), vld1q_f32(pb.add(off)));
            *acc_j = vfmaq_f32(*acc_j, d, d);
        }
        i += 8;
    }
    let mut total = vaddvq_f32(vaddq_f32(acc[0], acc[1]));
    while i < n {
        let d = *pa.add(i) - *pb.add(i);
        total += d * d;
        i += 1;
    }
    total
}
