//! The parameters of an IVF index and their rules, one check per parameter: the constructor
//! and the file loader run them all ([`IvfParams::check`]), each setter runs its own. The
//! keywords given as names (`memory=`, `single_scan`) are parsed here too, so that the
//! binding only converts Python values.

use super::{
    pq, project, Preference, SingleScan, DEFAULT_SHORTLIST, DEFAULT_TRAIN_PER_LIST, MAX_LISTS,
};
use crate::error::{invalid, Result};
use crate::types::{DType, Metric};

/// The tunable parameters of an [`super::IvfIndex`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IvfParams {
    /// Lists once trained.
    pub nlist: usize,
    /// Lists scanned per query.
    pub nprobe: usize,
    /// Candidates re-scored from float32 copies (0: none kept, no re-ranking).
    pub rerank: usize,
    /// Seed of the k-means sampling and initialization.
    pub seed: u64,
    /// The index trains itself when it reaches this many vectors (0: only on `train`).
    pub train_threshold: usize,
    /// 4-bit product-quantization sub-quantizers (0: no codes; see `pq.rs`).
    pub pq: usize,
    /// With codes: candidates of the code scan re-scored from the stored rows, per query.
    pub shortlist: usize,
    /// Batches rank by the rows projected onto their top `scan_dims` principal directions
    /// (0: all dimensions; see `project.rs`). f16 / i8 under cos / ip only.
    pub scan_dims: usize,
}

impl IvfParams {
    /// Defaults for a given `nlist`: nprobe = max(1, nlist / 32), no re-ranking, seed 0,
    /// automatic training at 64 x nlist vectors.
    pub fn with_nlist(nlist: usize) -> Self {
        IvfParams {
            nlist,
            nprobe: (nlist / 32).max(1),
            rerank: 0,
            seed: 0,
            train_threshold: nlist.saturating_mul(DEFAULT_TRAIN_PER_LIST),
            pq: 0,
            shortlist: DEFAULT_SHORTLIST,
            scan_dims: 0,
        }
    }

    /// Every rule at once: what the constructor and the file loader check.
    pub(crate) fn check(&self, dim: usize, dtype: DType, metric: Metric) -> Result<()> {
        if self.nlist == 0 || self.nlist > MAX_LISTS {
            return invalid(format!(
                "nlist must be between 1 and {MAX_LISTS}, got {}",
                self.nlist
            ));
        }
        check_nprobe(self.nprobe)?;
        check_rerank(dtype, self.rerank)?;
        if let Some(msg) = pq::check_m(self.pq, dim) {
            return invalid(msg);
        }
        check_shortlist(self.shortlist)?;
        check_scan_dims(dim, dtype, metric, self.scan_dims)?;
        if self.train_threshold > 0 && self.train_threshold < self.nlist {
            return invalid(format!(
                "train_threshold must be 0 (train only on request) or at least nlist = {}, got {}",
                self.nlist, self.train_threshold
            ));
        }
        Ok(())
    }

    /// Sets `shortlist` (candidates of the code scan re-scored per query), which only an
    /// index with codes (`pq > 0`) has: the rule of the binding's constructor and of
    /// [`super::IvfIndex::set_shortlist`].
    pub fn set_shortlist(&mut self, shortlist: usize) -> Result<()> {
        check_shortlist_has_codes(self.pq)?;
        check_shortlist(shortlist)?;
        self.shortlist = shortlist;
        Ok(())
    }
}

impl Preference {
    /// The constructor's `recall=` (in (0, 1]) and `memory=` ("low" or "normal"; None is
    /// "normal"), checked.
    pub fn parse(recall: Option<f32>, memory: Option<&str>) -> Result<Preference> {
        if let Some(r) = recall {
            check_recall("recall", r)?;
        }
        let low_memory = match memory {
            None | Some("normal") => false,
            Some("low") => true,
            Some(other) => {
                return invalid(format!(
                    "memory must be \"low\" or \"normal\", got {other:?}"
                ))
            }
        };
        Ok(Preference { recall, low_memory })
    }
}

impl SingleScan {
    /// The scan named as `single_scan` takes it: "rows", "codes" or "product".
    pub fn parse(name: &str) -> Result<SingleScan> {
        match name {
            "rows" => Ok(SingleScan::Rows),
            "codes" => Ok(SingleScan::Codes),
            "product" => Ok(SingleScan::Product),
            other => invalid(format!(
                "single_scan must be \"rows\", \"codes\" or \"product\", got {other:?}"
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SingleScan::Rows => "rows",
            SingleScan::Codes => "codes",
            SingleScan::Product => "product",
        }
    }
}

/// A recall (the constructor's `recall=`, `tune`'s target) lies in (0, 1]; `what` names it.
pub(crate) fn check_recall(what: &str, recall: f32) -> Result<()> {
    // Written so that NaN fails too.
    if !(recall > 0.0 && recall <= 1.0) {
        return invalid(format!("{what} must be in (0, 1], got {recall}"));
    }
    Ok(())
}

/// `shortlist` counts candidates of the code scan: only an index with codes has one.
pub(crate) fn check_shortlist_has_codes(pq: usize) -> Result<()> {
    if pq == 0 {
        return invalid(
            "shortlist needs pq > 0: it is how many candidates of the code scan are re-scored",
        );
    }
    Ok(())
}

pub(crate) fn check_nprobe(nprobe: usize) -> Result<()> {
    if nprobe == 0 {
        return invalid("nprobe must be at least 1, got 0");
    }
    Ok(())
}

/// Re-ranking reads float32 copies of f16 / i8 rows: an f32 index's scan is already exact.
pub(crate) fn check_rerank(dtype: DType, rerank: usize) -> Result<()> {
    if rerank > 0 && dtype == DType::F32 {
        return invalid(
            "rerank needs dtype \"f16\" or \"i8\": with \"f32\" the scan is already exact",
        );
    }
    Ok(())
}

pub(crate) fn check_shortlist(shortlist: usize) -> Result<()> {
    if shortlist == 0 {
        return invalid("shortlist must be at least 1, got 0");
    }
    Ok(())
}

/// `scan_dims` is 0 (all dimensions) or fewer than `dim`, and only where batches re-score
/// their candidates from the rows (f16 / i8) by inner product (cos / ip).
pub(crate) fn check_scan_dims(
    dim: usize,
    dtype: DType,
    metric: Metric,
    scan_dims: usize,
) -> Result<()> {
    if scan_dims == 0 {
        return Ok(());
    }
    if scan_dims >= dim {
        return invalid(format!(
            "scan_dims must be 0 (all dimensions) or below dim = {dim}, got {scan_dims}"
        ));
    }
    if dim > project::MAX_SCAN_DIMS_DIM {
        return invalid(format!(
            "scan_dims needs dim <= {}, got dim = {dim}: the principal directions take a \
             dim x dim eigendecomposition (memory ~24 * dim^2 bytes, time ~dim^3); use \
             scan_dims=0",
            project::MAX_SCAN_DIMS_DIM
        ));
    }
    if dtype == DType::F32 {
        return invalid(
            "scan_dims needs dtype \"f16\" or \"i8\": their batches re-score the candidates \
             of the reduced scan from the stored rows; \"f32\" batches report the scan's scores",
        );
    }
    if metric == Metric::L2 {
        return invalid(
            "scan_dims needs metric \"cos\" or \"ip\": the principal directions rank by \
             inner product",
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ivf::{IvfConfig, IvfIndex};

    fn message<T: std::fmt::Debug>(r: Result<T>) -> String {
        r.expect_err("refused").to_string()
    }

    #[test]
    fn memory_is_low_or_normal() {
        let low = |m| Preference::parse(None, m).map(|p| p.low_memory);
        assert!(!low(None).unwrap());
        assert!(!low(Some("normal")).unwrap());
        assert!(low(Some("low")).unwrap());
        assert_eq!(
            message(low(Some("huge"))),
            "memory must be \"low\" or \"normal\", got \"huge\""
        );
        assert!(message(low(Some("LOW"))).contains("memory must be"));
    }

    #[test]
    fn recall_lies_in_zero_one_for_the_constructor_and_tune() {
        for ok in [1e-6, 0.5, 0.98, 1.0] {
            assert_eq!(Preference::parse(Some(ok), None).unwrap().recall, Some(ok));
        }
        for bad in [0.0, -0.5, 1.0001, f32::NAN, f32::INFINITY] {
            let m = message(Preference::parse(Some(bad), None));
            assert_eq!(m, format!("recall must be in (0, 1], got {bad}"));
            // The engine's constructor runs the same rule on a preference built by hand.
            let config = IvfConfig {
                pref: Preference {
                    recall: Some(bad),
                    low_memory: false,
                },
                ..IvfConfig::default()
            };
            assert_eq!(message(IvfIndex::from_config(8, Metric::Ip, config)), m);
            let mut index = IvfIndex::from_config(8, Metric::Ip, IvfConfig::default()).unwrap();
            assert_eq!(
                message(index.tune(bad, 10, None)),
                format!("target_recall must be in (0, 1], got {bad}")
            );
        }
    }

    #[test]
    fn single_scan_names_round_trip() {
        for scan in [SingleScan::Rows, SingleScan::Codes, SingleScan::Product] {
            assert_eq!(SingleScan::parse(scan.name()).unwrap(), scan);
        }
        assert_eq!(
            message(SingleScan::parse("graph")),
            "single_scan must be \"rows\", \"codes\" or \"product\", got \"graph\""
        );
    }

    #[test]
    fn shortlist_needs_codes_in_the_constructor_and_the_setter() {
        let want =
            "shortlist needs pq > 0: it is how many candidates of the code scan are re-scored";
        let config = IvfConfig {
            nlist: Some(4),
            shortlist: Some(50),
            ..IvfConfig::default()
        };
        assert_eq!(message(IvfIndex::from_config(8, Metric::Ip, config)), want);
        let mut params = IvfParams::with_nlist(4);
        assert_eq!(message(params.set_shortlist(50)), want);
        params.pq = 4;
        params.set_shortlist(50).unwrap();
        assert_eq!(params.shortlist, 50);
        assert_eq!(
            message(params.set_shortlist(0)),
            "shortlist must be at least 1, got 0"
        );
    }
}
