//! Memory sizes on the command line: `512M`, `2G`, `262144K`, `1073741824B`; a bare number
//! is MiB.

/// Parses a size with an optional binary suffix (K, M, G, T; B for bytes); bare numbers
/// are MiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "M"),
    };
    if digits.is_empty() {
        return Err(format!(
            "invalid size '{s}': expected a number with an optional K/M/G/T suffix, e.g. 512M"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size '{s}': number too large"))?;
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
            return Err(format!(
                "invalid size '{s}': unknown unit '{unit}' (use K, M, G or T)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("invalid size '{s}': too large"))
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
