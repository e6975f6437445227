//! Memory sizes on the command line: `512M`, `2G`, `262144K`, `1073741824B`; a bare number
//! is MiB.

/// A size on the command line that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// No digits.
    #[error("invalid size '{0}': expected a number with an optional K/M/G/T suffix, e.g. 512M")]
    NoNumber(String),
    /// More digits than a u64 holds.
    #[error("invalid size '{0}': number too large")]
    NumberTooLarge(String),
    /// A suffix other than K, M, G, T (or B).
    #[error("invalid size '{size}': unknown unit '{unit}' (use K, M, G or T)")]
    UnknownUnit {
        /// The size as given.
        size: String,
        /// Its suffix.
        unit: String,
    },
    /// The number times the unit does not fit in 64 bits.
    #[error("invalid size '{0}': too large")]
    TooLarge(String),
}

/// Parses a size with an optional binary suffix (K, M, G, T; B for bytes); bare numbers
/// are MiB.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "M"),
    };
    if digits.is_empty() {
        return Err(SizeError::NoNumber(s.to_string()));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| SizeError::NumberTooLarge(s.to_string()))?;
    let shift = match unit
        .to_ascii_uppercase()
        .trim_end_matches("IB")
        .trim_end_matches('B')
    {
        "" if unit.eq_ignore_ascii_case("b") => 0,
        "K" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        _ => {
            return Err(SizeError::UnknownUnit {
                size: s.to_string(),
                unit: unit.to_string(),
            })
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::TooLarge(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_rejects_garbage() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("256").unwrap(), 256 << 20);
        assert_eq!(parse_size("4096K").unwrap(), 4 << 20);
        assert_eq!(parse_size("4096b").unwrap(), 4096);
        assert_eq!(parse_size("0").unwrap(), 0);
        for bad in [
            "",
            "M",
            "12Q",
            "-1G",
            "1.5G",
            "99999999999999999999G",
            "16777216T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
