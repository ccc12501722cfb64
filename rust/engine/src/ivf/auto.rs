//! The layout an IVF index chooses for itself from its data ("say the recall you need, not
//! the knobs").
//!
//! An index created without some of its knobs chooses them when it is trained, from what it
//! holds then; every knob given explicitly is kept as given:
//! - `nlist` from the number of vectors: about 2 sqrt(n), a power of two, at least 32 vectors
//!   a list (faiss's guidance is 1-16 sqrt(n); the benchmark's sweeps put the best batch
//!   throughput at a recall of 0.95-0.99 near 2 sqrt(n));
//! - `pq` codes and `scan_dims` from the spectrum of a sample (the eigenvalues of its second
//!   moment, as `project.rs` computes its directions): where few directions hold most of the
//!   variance, batches rank by those (`scan_dims`: the fewest multiple of 16 keeping 90% of it,
//!   if that is at most half the dimensions) and single queries scan 4-bit codes (`pq = dim /
//!   4`, if the top half of the directions keeps at least 65%: on data without structure, such
//!   as uniform random vectors, codes rank neighbours too poorly for any short shortlist);
//! - the storage dtype (at construction, as rows are stored from the first add): f16, unless
//!   the caller prefers low memory or asks for a recall below 0.95, where i8 rows (half the
//!   bytes) cost a probe or two more.
//!
//! `tune` (tune.rs) then sets nprobe and shortlist for a target recall.

use super::IvfIndex;
use crate::error::{invalid, Result};
use crate::types::{DType, Metric};

/// Recall at or above which the automatic dtype is f16. i8 rounding caps recall@10 even with
/// every list scanned (measured against the float32 vectors' answer at 200,000: 0.97 on the
/// power-law and near-duplicate mixtures, 0.98 on the clusters), and at 0.95 i8 lists needed
/// 18-20 probes where f16 lists needed 11-12 (at 0.9: 7-9 against 6-7).
pub const F16_RECALL: f32 = 0.95;
/// Vectors at which an index choosing its own `nlist` trains itself (the default nlist's
/// threshold, 64 x 1024).
pub const AUTO_TRAIN_THRESHOLD: usize = 64 * 1024;
/// Fewest vectors per list `nlist_for` allows.
const MIN_PER_LIST: usize = 32;
/// Share of the variance the `scan_dims` directions keep.
const SCAN_VARIANCE: f64 = 0.90;
/// Codes only where the top half of the directions keeps at least this share.
const CODES_VARIANCE: f64 = 0.65;
/// Rows of the training sample the spectrum is computed from.
pub(crate) const SPECTRUM_SAMPLE: usize = 8 * 1024;

/// What the caller prefers when the index chooses its dtype.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Preference {
    /// The recall the caller means to ask `tune` for (None: no preference).
    pub recall: Option<f32>,
    /// Smallest rows over recall.
    pub low_memory: bool,
}

/// Which knobs an index chooses itself at training (the others were given).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AutoKnobs {
    pub nlist: bool,
    pub nprobe: bool,
    pub pq: bool,
    pub scan_dims: bool,
}

impl AutoKnobs {
    pub(crate) fn bits(self) -> u8 {
        (self.nlist as u8)
            | (self.nprobe as u8) << 1
            | (self.pq as u8) << 2
            | (self.scan_dims as u8) << 3
    }
    pub(crate) fn from_bits(b: u8) -> Option<Self> {
        (b & !0xF == 0).then_some(AutoKnobs {
            nlist: b & 1 != 0,
            nprobe: b & 2 != 0,
            pq: b & 4 != 0,
            scan_dims: b & 8 != 0,
        })
    }
    pub fn any(self) -> bool {
        self.bits() != 0
    }
}

/// The dtype for a preference, and why.
pub fn dtype_for(pref: Preference) -> (DType, String) {
    if pref.low_memory {
        return (
            DType::I8,
            "dtype=i8: memory=\"low\" (1 byte a dimension)".into(),
        );
    }
    match pref.recall {
        Some(r) if r < F16_RECALL => (
            DType::I8,
            format!("dtype=i8: recall {r} < {F16_RECALL} (half f16's bytes, a probe or two more)"),
        ),
        Some(r) => (DType::F16, format!("dtype=f16: recall {r} >= {F16_RECALL} (i8 rounding caps recall near 0.97 and needs more lists from 0.95)")),
        None => (
            DType::F16,
            "dtype=f16: the default (recall to 0.99 and beyond; memory=\"low\" or recall < 0.95 picks i8)".into(),
        ),
    }
}

/// Lists for `n` vectors: the power of two nearest 2 sqrt(n), halved until each list holds
/// at least 32 vectors on average.
pub fn nlist_for(n: usize) -> usize {
    let mut nlist = 1usize << (2.0 * (n.max(1) as f64).sqrt()).log2().round().max(0.0) as u32;
    while nlist > 1 && n < MIN_PER_LIST * nlist {
        nlist /= 2;
    }
    nlist.min(super::MAX_LISTS)
}

/// Share of the total variance kept by the top 1, 2, ... directions of `sample` (rows of
/// `dim` values; uncentered second moment, as inner products rank).
pub(crate) fn kept_variance(sample: &[f32], dim: usize) -> Vec<f64> {
    let m = sample.len() / dim;
    let mut moment = vec![0f64; dim * dim];
    // dim^2 m / 2 multiply-adds: 0.6 G at 384-d and 8,192 rows, once per training.
    for row in sample.chunks_exact(dim) {
        for i in 0..dim {
            let a = row[i] as f64;
            if a == 0.0 {
                continue;
            }
            let out = &mut moment[i * dim..i * dim + i + 1];
            for (o, &b) in out.iter_mut().zip(&row[..=i]) {
                *o += a * b as f64;
            }
        }
    }
    let sym = nalgebra::DMatrix::<f64>::from_fn(dim, dim, |i, j| {
        let (a, b) = if j <= i { (i, j) } else { (j, i) };
        moment[a * dim + b] / m.max(1) as f64
    });
    let mut ev: Vec<f64> = sym
        .symmetric_eigenvalues()
        .iter()
        .map(|v| v.max(0.0))
        .collect();
    ev.sort_by(|a, b| b.total_cmp(a));
    let total: f64 = ev.iter().sum::<f64>().max(f64::MIN_POSITIVE);
    let mut acc = 0.0;
    ev.iter()
        .map(|v| {
            acc += v;
            acc / total
        })
        .collect()
}

/// `scan_dims` for a spectrum: the fewest multiple of 16 keeping 90% of the variance, if at
/// most half the dimensions (else 0: all). Only f16 / i8 under cos / ip re-score a reduced
/// scan, so 0 elsewhere.
pub fn scan_dims_for(kept: &[f64], dtype: DType, metric: Metric) -> (usize, String) {
    let dim = kept.len();
    if dtype == DType::F32 || metric == Metric::L2 || dim < 64 {
        return (
            0,
            "scan_dims=0: batches rank by all dimensions (f32, l2 or dim < 64)".into(),
        );
    }
    let need = kept
        .iter()
        .position(|&k| k >= SCAN_VARIANCE)
        .map_or(dim, |i| i + 1);
    let d = need.div_ceil(16) * 16;
    if d <= dim / 2 {
        (
            d,
            format!(
                "scan_dims={d}: the top {d} of {dim} directions keep {:.0}% of the variance",
                100.0 * kept[d - 1]
            ),
        )
    } else {
        (
            0,
            format!(
                "scan_dims=0: 90% of the variance needs {need} of {dim} directions (more than half)"
            ),
        )
    }
}

/// `pq` for a spectrum: `dim / 4` sub-quantizers (dim / 8 bytes a vector) where the top half
/// of the directions keeps at least 65% of the variance and `dim / 4` is a valid `pq`.
pub fn pq_for(kept: &[f64]) -> (usize, String) {
    let dim = kept.len();
    let half = kept[(dim / 2).max(1) - 1];
    if half < CODES_VARIANCE {
        return (
            0,
            format!(
                "pq=0: the top half of the directions keeps {:.0}% of the variance (< 65%: \
                 little structure, codes would need a shortlist as long as the lists)",
                100.0 * half
            ),
        );
    }
    let m = dim / 4;
    if m == 0 || super::pq::check_m(m, dim).is_some() {
        return (
            0,
            format!("pq=0: dim / 4 = {m} is not a valid pq for dim {dim}"),
        );
    }
    (
        m,
        format!(
            "pq={m}: single queries scan 4-bit codes ({} bytes a vector; the top half of the \
             directions keeps {:.0}% of the variance)",
            m / 2,
            100.0 * half
        ),
    )
}

/// The knobs a caller gives (None: not given). An index given its `nlist` is laid out by
/// hand: what else is not given takes the fixed defaults (f32 rows, no codes, all dimensions,
/// nprobe nlist / 32, training at 64 x nlist vectors), as before the index chose for itself.
/// Without `nlist` every knob not given is chosen: dtype now (from `pref`), nlist when the
/// index trains (at 65,536 vectors unless `train_threshold` says otherwise), pq and scan_dims
/// from the training sample's spectrum, nprobe by `tune` (nlist / 32 until then).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct IvfConfig {
    pub dtype: Option<DType>,
    pub nlist: Option<usize>,
    pub nprobe: Option<usize>,
    pub rerank: usize,
    pub seed: u64,
    pub train_threshold: Option<usize>,
    pub pq: Option<usize>,
    pub shortlist: Option<usize>,
    pub scan_dims: Option<usize>,
    pub pref: Preference,
}

impl IvfIndex {
    /// An index from what the caller gave (see [`IvfConfig`]).
    pub fn from_config(dim: usize, metric: Metric, c: IvfConfig) -> Result<IvfIndex> {
        if let Some(r) = c.pref.recall {
            super::params::check_recall("recall", r)?;
        }
        let manual = c.nlist.is_some();
        let mut why = Vec::new();
        let dtype = match c.dtype {
            Some(d) => d,
            None if manual => DType::F32,
            None => {
                let (d, w) = dtype_for(c.pref);
                why.push(w);
                d
            }
        };
        let nlist = c.nlist.unwrap_or(super::IvfParams::with_nlist(1024).nlist);
        let mut p = super::IvfParams::with_nlist(nlist);
        let knobs = AutoKnobs {
            nlist: !manual,
            nprobe: !manual && c.nprobe.is_none(),
            pq: !manual && c.pq.is_none(),
            scan_dims: !manual && c.scan_dims.is_none(),
        };
        if let Some(np) = c.nprobe {
            p.nprobe = np;
        }
        p.rerank = c.rerank;
        p.seed = c.seed;
        p.train_threshold = match c.train_threshold {
            Some(t) => t,
            None if manual => p.train_threshold,
            None => AUTO_TRAIN_THRESHOLD,
        };
        p.pq = c.pq.unwrap_or(0);
        if let Some(s) = c.shortlist {
            // Codes chosen automatically get their shortlist from `tune`.
            super::params::check_shortlist_has_codes(c.pq.unwrap_or(0))?;
            p.shortlist = s;
        }
        p.scan_dims = c.scan_dims.unwrap_or(0);
        if !manual && p.train_threshold > 0 && p.train_threshold < p.nlist {
            // The placeholder nlist must not refuse a small threshold: nlist is chosen then.
            p.nlist = nlist_for(p.train_threshold);
        }
        Ok(IvfIndex::new(dim, metric, dtype, p)?.with_auto(knobs, why))
    }
}

/// How single queries (fewer than 8 in a call) scan their lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SingleScan {
    /// The rows, with the single-query kernels: exact scores.
    Rows,
    /// The 4-bit codes, then the best `shortlist` re-scored from the rows.
    Codes,
    /// As a batch does: the lists' packed copies (i8 with VNNI, `scan_dims` directions) by the
    /// product, then the best `k + margin` re-scored from the rows. The copy is a fraction of
    /// an f16 row's bytes, which is what a single query's scan is bound by.
    Product,
}

/// What an index chose itself, and what `tune` set beyond `IvfParams`.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct AutoState {
    pub(crate) knobs: AutoKnobs,
    /// Lists a single query (fewer than 8 per call) scans; 0: `nprobe`.
    pub(crate) nprobe_single: usize,
    /// Single queries scan as batches do ([`SingleScan::Product`]) where the lists have a
    /// packed copy smaller than their rows.
    pub(crate) single_product: bool,
    /// (target recall, k) of the last `tune`.
    pub(crate) tuned: Option<(f32, usize)>,
    /// One line per choice made, for `repr` (not saved: a loaded index says what it chose).
    pub(crate) why: Vec<String>,
}

impl IvfIndex {
    /// An index that chooses `knobs` itself at training (`nlist` from the vector count,
    /// `pq` and `scan_dims` from the spectrum; nprobe follows nlist until `tune` sets it).
    /// `why` is the reason for choices already made (the dtype).
    pub fn with_auto(mut self, knobs: AutoKnobs, why: Vec<String>) -> Self {
        self.auto.knobs = knobs;
        self.auto.why = why;
        self
    }

    /// The knobs this index chooses itself.
    pub fn auto_knobs(&self) -> AutoKnobs {
        self.auto.knobs
    }

    /// Why each automatic choice was made (one line each).
    pub fn auto_reasons(&self) -> Vec<String> {
        if self.auto.why.is_empty() && self.auto.knobs.any() && self.is_trained() {
            return vec!["chosen at training (reasons are not saved)".into()];
        }
        self.auto.why.clone()
    }

    /// How single queries scan: by the product where set and the lists' packed copy is
    /// smaller than their rows (an i8 or bf16 product, or `scan_dims`), else their codes if
    /// the index has them, else the rows.
    pub fn single_scan(&self) -> SingleScan {
        if self.auto.single_product && self.product_scan_fits() {
            SingleScan::Product
        } else if self.has_codes() {
            SingleScan::Codes
        } else {
            SingleScan::Rows
        }
    }

    /// Whether single queries can scan by the product: the lists' packed copy is smaller than
    /// their rows (an i8 or bf16 product, or `scan_dims` directions), under cos / ip (the
    /// product ranks by inner product).
    pub(crate) fn product_scan_fits(&self) -> bool {
        let reduced = super::scan::batch_product(self.dtype) != crate::matmul::Product::F32
            || self.params.scan_dims > 0;
        reduced && self.metric != Metric::L2
    }

    /// Sets how single queries scan: `Product` (where [`Self::product_scan_fits`]), or
    /// `Codes` / `Rows`, which is what an index with / without codes scans otherwise.
    pub fn set_single_scan(&mut self, scan: SingleScan) -> Result<()> {
        match scan {
            SingleScan::Product if !self.product_scan_fits() => invalid(
                "single_scan \"product\" needs a packed copy smaller than the rows: f16 or i8 \
                 rows under cos / ip, with an i8 or bf16 batch product on this CPU or scan_dims > 0",
            ),
            SingleScan::Codes if self.params.pq == 0 => {
                invalid("single_scan \"codes\" needs pq > 0 (an index with 4-bit codes)")
            }
            SingleScan::Rows if self.params.pq > 0 => invalid(
                "single_scan \"rows\": this index has codes (pq > 0), which single queries scan \
                 unless they scan by the product",
            ),
            _ => {
                self.auto.single_product = scan == SingleScan::Product;
                Ok(())
            }
        }
    }

    /// Lists a single query scans.
    pub fn nprobe_single(&self) -> usize {
        match self.auto.nprobe_single {
            0 => self.params.nprobe,
            p => p,
        }
    }

    /// Sets the lists a single query scans (batches keep `nprobe`).
    pub fn set_nprobe_single(&mut self, nprobe: usize) -> Result<()> {
        if nprobe == 0 {
            return invalid("nprobe_single must be at least 1, got 0");
        }
        self.auto.nprobe_single = nprobe;
        Ok(())
    }

    /// (target recall, k) of the last `tune`, kept with the index.
    pub fn tuned(&self) -> Option<(f32, usize)> {
        self.auto.tuned
    }

    /// Lists a search of `nq` queries scans.
    pub(crate) fn nprobe_for(&self, nq: usize) -> usize {
        if nq < crate::search::GEMM_MIN_QUERIES {
            self.nprobe_single()
        } else {
            self.params.nprobe
        }
    }

    /// Before training on `n` vectors: an automatic nlist (and the nprobe that follows it).
    pub(crate) fn choose_nlist(&mut self, n: usize) {
        if !self.auto.knobs.nlist {
            return;
        }
        let nlist = nlist_for(n);
        self.params.nlist = nlist;
        self.auto
            .why
            .retain(|w| !w.starts_with("nlist=") && !w.starts_with("nprobe="));
        self.auto.why.push(format!(
            "nlist={nlist}: the power of two nearest 2 sqrt(n) for n={n}, at least {MIN_PER_LIST} a list"
        ));
        if self.auto.knobs.nprobe && self.auto.tuned.is_none() {
            self.params.nprobe = (nlist / 32).max(1);
            self.auto.why.push(format!(
                "nprobe={}: nlist / 32 until tune(target_recall) sets it",
                self.params.nprobe
            ));
        }
    }

    /// Drops the codes (tune measured them slower than the rows): `pq` 0, codebooks and
    /// every list's codes freed.
    pub(crate) fn drop_codes(&mut self) {
        self.params.pq = 0;
        self.params.shortlist = super::DEFAULT_SHORTLIST;
        self.codebooks = None;
        for list in &mut self.lists {
            list.codes = None;
        }
    }

    /// With the training sample: automatic pq and scan_dims from its spectrum.
    pub(crate) fn choose_from_spectrum(&mut self, sample: &[f32]) {
        let knobs = self.auto.knobs;
        if !(knobs.pq || knobs.scan_dims) || sample.is_empty() {
            return;
        }
        let rows = (sample.len() / self.dim).min(SPECTRUM_SAMPLE);
        let kept = kept_variance(&sample[..rows * self.dim], self.dim);
        self.auto
            .why
            .retain(|w| !w.starts_with("pq=") && !w.starts_with("scan_dims="));
        if knobs.pq {
            let (pq, why) = pq_for(&kept);
            self.params.pq = pq;
            self.auto.why.push(why);
        }
        if knobs.scan_dims {
            let (d, why) = scan_dims_for(&kept, self.dtype, self.metric);
            self.params.scan_dims = d;
            self.directions = Default::default();
            self.auto.why.push(why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nlist_is_about_two_sqrt_n_and_lists_hold_32() {
        assert_eq!(nlist_for(200_000), 1024);
        assert_eq!(nlist_for(1_000_000), 2048);
        assert_eq!(nlist_for(65_536), 512);
        assert_eq!(nlist_for(1000), 16); // 2 sqrt = 63 -> 64, halved to 31 per list... 16
        assert_eq!(nlist_for(10), 1);
        assert_eq!(nlist_for(0), 1);
    }

    #[test]
    fn spectrum_rules() {
        // 64-d rows living in 8 directions: codes and 16 scan dims.
        let dim = 64;
        let mut rng = crate::ivf::kmeans::Rng::new(3);
        let mut sample = vec![0f32; 2000 * dim];
        for row in sample.chunks_exact_mut(dim) {
            for v in row.iter_mut().take(8) {
                *v = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
        }
        let kept = kept_variance(&sample, dim);
        assert!(kept[7] > 0.999, "{:?}", &kept[..9]);
        assert_eq!(scan_dims_for(&kept, DType::F16, Metric::Cos).0, 16);
        assert_eq!(scan_dims_for(&kept, DType::F32, Metric::Cos).0, 0);
        assert_eq!(scan_dims_for(&kept, DType::I8, Metric::L2).0, 0);
        assert_eq!(pq_for(&kept).0, 16);
        // Isotropic rows: neither.
        for v in sample.iter_mut() {
            *v = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        }
        let kept = kept_variance(&sample, dim);
        assert_eq!(scan_dims_for(&kept, DType::F16, Metric::Cos).0, 0);
        assert_eq!(pq_for(&kept).0, 0);
    }

    #[test]
    fn dtype_from_preference() {
        assert_eq!(dtype_for(Preference::default()).0, DType::F16);
        let low = Preference {
            low_memory: true,
            ..Default::default()
        };
        assert_eq!(dtype_for(low).0, DType::I8);
        let r = |r| Preference {
            recall: Some(r),
            low_memory: false,
        };
        assert_eq!(dtype_for(r(0.9)).0, DType::I8);
        assert_eq!(dtype_for(r(0.95)).0, DType::F16);
        assert_eq!(dtype_for(r(0.99)).0, DType::F16);
    }

    #[test]
    fn knob_bits_round_trip() {
        let k = AutoKnobs {
            nlist: true,
            nprobe: false,
            pq: true,
            scan_dims: true,
        };
        assert_eq!(AutoKnobs::from_bits(k.bits()), Some(k));
        assert_eq!(AutoKnobs::from_bits(0x10), None);
    }
}
