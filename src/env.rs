//! The process's environment, read one way everywhere: the machine's cores, and the numeric
//! `FLASHPACK_*` switches that tune the runtime (measurements; each documents its own).

use std::str::FromStr;
use std::sync::OnceLock;

/// Cores of this machine (cached; 1 when unknown).
pub fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The variable `name` parsed as a number (surrounding spaces ignored); `None` when it is unset
/// or does not parse.
pub fn number<T: FromStr>(name: &str) -> Option<T> {
    parse(std::env::var(name).ok().as_deref())
}

/// A variable's value as a number: surrounding spaces ignored, `None` unless it parses.
fn parse<T: FromStr>(value: Option<&str>) -> Option<T> {
    value?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_parse_trimmed_and_anything_else_is_none() {
        assert_eq!(parse::<usize>(Some(" 64 ")), Some(64));
        assert_eq!(parse::<f64>(Some("0.5")), Some(0.5));
        assert_eq!(parse::<usize>(Some("lots")), None);
        assert_eq!(parse::<usize>(Some("-1")), None);
        assert_eq!(parse::<usize>(None), None);
        assert_eq!(number::<usize>("FLASHPACK_TEST_ENV_NEVER_SET"), None);
        assert!(cores() >= 1);
    }
}
