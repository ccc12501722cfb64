//! Metric and storage type names shared by the index and mining.

use crate::error::{invalid, Result};

/// How scores are computed. Cos and Ip are similarities (higher first), L2 is the squared
/// Euclidean distance (lower first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Metric {
    Cos,
    Ip,
    L2,
}

impl Metric {
    /// Every metric, in code order (the names are exported to Python as `METRICS`).
    pub const ALL: [Metric; 3] = [Metric::Cos, Metric::Ip, Metric::L2];

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "cos" => Ok(Metric::Cos),
            "ip" => Ok(Metric::Ip),
            "l2" => Ok(Metric::L2),
            other => invalid(format!(
                "unknown metric {other:?}: expected one of \"cos\", \"ip\", \"l2\""
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Metric::Cos => "cos",
            Metric::Ip => "ip",
            Metric::L2 => "l2",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            Metric::Cos => 0,
            Metric::Ip => 1,
            Metric::L2 => 2,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.code() == code)
    }

    /// Internal scores are "higher is better"; L2 distances are stored negated.
    #[inline]
    pub(crate) fn to_external(self, internal: f32) -> f32 {
        match self {
            Metric::L2 => -internal,
            _ => internal,
        }
    }

    /// The score reported where fewer than k results exist (the worst possible).
    pub fn missing_score(self) -> f32 {
        match self {
            Metric::L2 => f32::INFINITY,
            _ => f32::NEG_INFINITY,
        }
    }
}

/// Storage type of the vectors.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F16,
    I8,
}

impl DType {
    /// Every storage type, in code order (the names are exported to Python as `DTYPES`).
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::I8];

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "f32" => Ok(DType::F32),
            "f16" => Ok(DType::F16),
            "i8" => Ok(DType::I8),
            other => invalid(format!(
                "unknown dtype {other:?}: expected one of \"f32\", \"f16\", \"i8\""
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::I8 => "i8",
        }
    }

    pub(crate) fn code(self) -> u8 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::I8 => 2,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.code() == code)
    }

    /// Bytes per stored element.
    pub fn element_size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
            DType::I8 => 1,
        }
    }
}
