//! Memory budgets from the command line: `8GiB`, `8GB`, `8G`, `512MiB`, `50%`.
//!
//! A size always carries its unit or a percent sign: a bare number was once read as a fraction
//! of RAM up to 1 and as bytes above it, so `1` meant all of RAM and `2` meant two bytes. Now it is
//! refused, with the accepted forms in the message.

/// A budget as written: bytes, or a percentage of a whole the caller knows (RAM for
/// `--mem-budget`, all experts resident for `--expert-budget`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Size {
    Bytes(u64),
    Percent(f64),
}

impl Size {
    /// Bytes, with percentages taken of `whole`.
    pub fn resolve(self, whole: u64) -> u64 {
        match self {
            Size::Bytes(b) => b,
            Size::Percent(p) => (whole as f64 * p / 100.0) as u64,
        }
    }
}

/// A `--mem-budget` / `--expert-budget` value: as written (for messages) and parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    pub text: String,
    pub size: Size,
}

impl Budget {
    /// For clap: a bare number or an unknown unit is an error that lists the accepted forms.
    pub fn parse(text: &str) -> Result<Budget, String> {
        Ok(Budget {
            text: text.trim().to_string(),
            size: parse_size(text)?,
        })
    }
}

/// The forms [`parse_size`] accepts, for messages.
pub const SIZE_FORMS: &str =
    "8GiB, 8GB, 8G (= 8GiB), 512MiB, 512MB, 512M, or a percentage such as 50%; \
units K, M, G, T, with B for powers of 1000 and iB for powers of 1024, any case";

/// Parses a size with a unit (`8GiB`, `8GB`, `8g`, `1.5T`, `4096B`) or a percentage (`50%`, of
/// a whole chosen by the caller). Single letters are binary (`8G` = `8GiB`), as in `free -g`,
/// Docker and the JVM; `GB` is decimal. A bare number is refused: its unit is ambiguous.
pub fn parse_size(text: &str) -> Result<Size, String> {
    let t = text.trim();
    let bad = |why: &str| format!("bad size {text:?}: {why}; use {SIZE_FORMS}");
    if let Some(p) = t.strip_suffix('%') {
        let f: f64 = p.trim().parse().map_err(|_| bad("not a number before %"))?;
        if !(f > 0.0 && f <= 100.0) {
            return Err(bad("a percentage is above 0 and at most 100"));
        }
        return Ok(Size::Percent(f));
    }
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| bad("not a number followed by a unit"))?;
    if !(n.is_finite() && n > 0.0) {
        return Err(bad("a size is above 0"));
    }
    const KI: f64 = 1024.0;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" => return Err(bad("a bare number has no unit")),
        "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "k" | "kib" => KI,
        "m" | "mib" => KI * KI,
        "g" | "gib" => KI * KI * KI,
        "t" | "tib" => KI * KI * KI * KI,
        _ => return Err(bad("unknown unit")),
    };
    let bytes = n * mult;
    if bytes < 1.0 || bytes >= u64::MAX as f64 {
        return Err(bad("out of range"));
    }
    Ok(Size::Bytes(bytes as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_need_a_unit_or_a_percent_sign() {
        let gib = 1u64 << 30;
        assert_eq!(parse_size("8GiB"), Ok(Size::Bytes(8 * gib)));
        assert_eq!(parse_size("8gib"), Ok(Size::Bytes(8 * gib)));
        assert_eq!(parse_size("8G"), Ok(Size::Bytes(8 * gib)));
        assert_eq!(parse_size("8GB"), Ok(Size::Bytes(8_000_000_000)));
        assert_eq!(parse_size("4gb"), Ok(Size::Bytes(4_000_000_000)));
        assert_eq!(parse_size("512 MiB"), Ok(Size::Bytes(512 << 20)));
        assert_eq!(parse_size("512m"), Ok(Size::Bytes(512 << 20)));
        assert_eq!(parse_size("512MB"), Ok(Size::Bytes(512_000_000)));
        assert_eq!(parse_size("1.5K"), Ok(Size::Bytes(1536)));
        assert_eq!(parse_size("2T"), Ok(Size::Bytes(2 << 40)));
        assert_eq!(parse_size("4096B"), Ok(Size::Bytes(4096)));
        assert_eq!(parse_size("50%"), Ok(Size::Percent(50.0)));
        assert_eq!(parse_size("50%").unwrap().resolve(16 * gib), 8 * gib);
        assert_eq!(parse_size("8GiB").unwrap().resolve(1), 8 * gib);
        // The old forms: a bare number meant a fraction of RAM up to 1 and bytes above it.
        for bare in ["1", "2", "0.5", "1000"] {
            let err = parse_size(bare).unwrap_err();
            assert!(
                err.contains("no unit") && err.contains("8GiB") && err.contains("50%"),
                "{err}"
            );
        }
        for bad in [
            "lots", "-3GB", "0GB", "150%", "0%", "8XB", "GB", "1e30TB", "0.1B",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
