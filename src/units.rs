//! Byte counts for people, in decimal units (1 GB = 10^9 bytes), as every report prints them.
//!
//! One formatter; each report keeps the precision it has always printed with, named here as a
//! [`Style`], so CLI output stays the same byte for byte.

/// A decimal unit of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Kb,
    Mb,
    Gb,
}

impl Unit {
    fn size(self) -> f64 {
        match self {
            Unit::Kb => 1e3,
            Unit::Mb => 1e6,
            Unit::Gb => 1e9,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Unit::Kb => "KB",
            Unit::Mb => "MB",
            Unit::Gb => "GB",
        }
    }
}

/// The units a report writes, largest first, each with its decimals: a count takes the first
/// unit it reaches, or the last.
#[derive(Clone, Copy, Debug)]
pub struct Style(&'static [(Unit, usize)]);

impl Style {
    /// GB with two decimals from 1 GB, else MB with one: the runtime's messages.
    pub const RUN: Style = Style(&[(Unit::Gb, 2), (Unit::Mb, 1)]);
    /// GB and MB with two decimals, else KB with one: pack sizes (`inspect`, the model card).
    pub const PACK: Style = Style(&[(Unit::Gb, 2), (Unit::Mb, 2), (Unit::Kb, 1)]);
    /// Always GB, three decimals: the conversion report.
    pub const GB3: Style = Style(&[(Unit::Gb, 3)]);
}

/// `n` bytes as `style` writes them: `1.50 GB`, `12.3 MB`.
pub fn bytes(n: u64, style: Style) -> String {
    let b = n as f64;
    let (unit, decimals) = style
        .0
        .iter()
        .copied()
        .find(|(u, _)| b >= u.size())
        .or_else(|| style.0.last().copied())
        .unwrap_or((Unit::Gb, 2));
    format!("{:.*} {}", decimals, b / unit.size(), unit.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The strings the four formatters this one replaced printed (run's `fmt_bytes`, inspect's
    /// `gib`, the model card's `size`, convert's `gb`).
    #[test]
    fn each_style_prints_as_before() {
        assert_eq!(bytes(1_500_000_000, Style::RUN), "1.50 GB");
        assert_eq!(bytes(1_000_000_000, Style::RUN), "1.00 GB");
        assert_eq!(bytes(999_999_999, Style::RUN), "1000.0 MB");
        assert_eq!(bytes(50_000, Style::RUN), "0.1 MB");
        assert_eq!(bytes(0, Style::RUN), "0.0 MB");
        assert_eq!(bytes(2_345_678_901, Style::PACK), "2.35 GB");
        assert_eq!(bytes(12_345_678, Style::PACK), "12.35 MB");
        assert_eq!(bytes(1_000_000, Style::PACK), "1.00 MB");
        assert_eq!(bytes(999_999, Style::PACK), "1000.0 KB");
        assert_eq!(bytes(1_234, Style::PACK), "1.2 KB");
        assert_eq!(bytes(12_345_678, Style::GB3), "0.012 GB");
        assert_eq!(bytes(3_000_000_000, Style::GB3), "3.000 GB");
    }
}
