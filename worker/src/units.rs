//! Durations and byte sizes as people write them: `250ms`, `1.5s`, `10MiB`.
//!
//! One grammar for the worker's command line and Usher's config file, so a
//! value that works in one works in the other.
//!
//! - A **duration** is a decimal number and a unit: `ns`, `us`, `ms`, `s`,
//!   `m` (minutes) or `h`, e.g. `250ms`, `1.5s`, `.5s`, `2m`. The unit is
//!   required: a bare `5` could mean anything.
//! - A **size** is a whole number of bytes with an optional unit: `B`;
//!   binary `K`/`KiB`, `M`/`MiB`, `G`/`GiB` (1024, 1024², 1024³); decimal
//!   `KB`, `MB`, `GB` (1000, 1000², 1000³).
//!
//! Units are case-insensitive (`10mib`, `5S`), and space is allowed around
//! the value and between number and unit (`5 s`). A value too large for a
//! [`Duration`] or a `u64` is an error, never a wrapped or saturated value.
//! Durations are computed in integers, so `{n}ms` is exactly `n`
//! milliseconds; digits finer than a nanosecond are dropped.

use std::time::Duration;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Parses a duration: `250ms`, `5s`, `1.5s`, `2m`, `1h`, `100us`, `10ns`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("duration `{s}` needs a unit (ms, s, m or h), e.g. `5s`"))?;
    let (number, unit) = s.split_at(split);
    let not_a_duration = || format!("`{s}` is not a duration (expected e.g. 250ms, 5s, 2m)");
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if (whole.is_empty() && fraction.is_empty()) || fraction.contains('.') {
        return Err(not_a_duration());
    }
    let unit_nanos: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "ns" => 1,
        "us" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => {
            return Err(format!(
                "unknown duration unit `{}` in `{s}` (use ms, s, m or h)",
                unit.trim()
            ))
        }
    };
    let out_of_range = || format!("duration `{s}` is out of range");
    let whole: u64 = match whole {
        "" => 0,
        w => w.parse().map_err(|_| out_of_range())?,
    };
    // u64 × u64 always fits in u128, and so does adding less than one unit.
    let nanos = u128::from(whole) * u128::from(unit_nanos) + fraction_of(fraction, unit_nanos);
    let secs = u64::try_from(nanos / NANOS_PER_SEC).map_err(|_| out_of_range())?;
    Ok(Duration::new(secs, (nanos % NANOS_PER_SEC) as u32))
}

/// `⌊0.fraction × unit⌋`, exactly, for a string of decimal digits: long
/// multiplication from the last digit, where the carry out of the first
/// digit is the integer part.
fn fraction_of(fraction: &str, unit: u64) -> u128 {
    fraction.bytes().rev().fold(0u128, |carry, digit| {
        (u128::from(digit - b'0') * u128::from(unit) + carry) / 10
    })
}

/// Parses a size in bytes: `1024`, `512B`, `64KiB`, `10MiB`, `1GiB`, `10MB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    if number.is_empty() {
        return Err(format!("`{s}` is not a size (expected e.g. 64KiB, 10MiB)"));
    }
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        _ => {
            return Err(format!(
                "unknown size unit `{}` in `{s}` (use B, KiB, MiB or GiB)",
                unit.trim()
            ))
        }
    };
    let out_of_range = || format!("size `{s}` is out of range");
    let n: u64 = number.parse().map_err(|_| out_of_range())?;
    n.checked_mul(multiplier).ok_or_else(out_of_range)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Result<Duration, String> {
        Ok(Duration::from_millis(n))
    }

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration("250ms"), ms(250));
        assert_eq!(parse_duration("5s"), ms(5000));
        assert_eq!(parse_duration("2m"), ms(120_000));
        assert_eq!(parse_duration("1h"), ms(3_600_000));
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_duration("10ns"), Ok(Duration::from_nanos(10)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
    }

    #[test]
    fn decimals_are_exact() {
        assert_eq!(parse_duration("1.5s"), ms(1500));
        assert_eq!(parse_duration(".5s"), ms(500));
        assert_eq!(parse_duration("5.s"), ms(5000));
        assert_eq!(parse_duration("0.25h"), ms(900_000));
        assert_eq!(parse_duration("0.1s"), ms(100));
        assert_eq!(parse_duration("1.0000000019s"), Ok(Duration::new(1, 1)));
        assert_eq!(parse_duration("0.5ns"), Ok(Duration::ZERO));
        let long = format!("1.{}s", "9".repeat(400));
        assert_eq!(parse_duration(&long), Ok(Duration::new(1, 999_999_999)));
    }

    /// Through `f64` seconds these were a nanosecond off above ~97 days.
    #[test]
    fn whole_numbers_are_exact_at_any_size() {
        let n = (1u64 << 23) * 1000 + 1;
        assert_eq!(parse_duration(&format!("{n}ms")), ms(n));
        let n = u64::MAX / 1000;
        assert_eq!(parse_duration(&format!("{n}ms")), ms(n));
        assert_eq!(
            parse_duration(&format!("{}s", u64::MAX)),
            Ok(Duration::from_secs(u64::MAX))
        );
        assert_eq!(
            parse_duration(&format!("{}.5s", u64::MAX)),
            Ok(Duration::new(u64::MAX, 500_000_000))
        );
        assert_eq!(
            parse_duration(&format!("{}ns", u64::MAX)),
            Ok(Duration::from_nanos(u64::MAX))
        );
    }

    #[test]
    fn units_are_case_insensitive_and_space_is_allowed() {
        for s in ["5s", "5S", "5 s", " 5s ", "5000MS", "5000 Ms"] {
            assert_eq!(parse_duration(s), ms(5000), "{s}");
        }
        assert_eq!(parse_duration("2M"), ms(120_000));
        assert_eq!(parse_duration("1H"), ms(3_600_000));
        assert_eq!(parse_duration("3US"), Ok(Duration::from_micros(3)));
    }

    #[test]
    fn bad_durations_are_errors() {
        for bad in [
            "",
            "5",
            "s",
            "-1s",
            "+5s",
            ".s",
            "1..2s",
            "1.2.3s",
            "1,5s",
            "1e3s",
            "inf s",
            "NaNs",
            "5 parsecs",
            "5sec",
            "10mib",
            "5 s s",
            "\u{661}s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert!(parse_duration("5").unwrap_err().contains("needs a unit"));
    }

    #[test]
    fn durations_too_large_are_errors() {
        for bad in [
            format!("{}s", u128::from(u64::MAX) + 1),
            format!("{}m", u64::MAX),
            format!("{}h", u64::MAX),
            format!("{}ms", "9".repeat(400)),
        ] {
            let e = parse_duration(&bad).unwrap_err();
            assert!(e.contains("out of range"), "{bad}: {e}");
        }
    }

    #[test]
    fn sizes_in_every_unit() {
        assert_eq!(parse_size("1024"), Ok(1024));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("10MiB"), Ok(10 << 20));
        assert_eq!(parse_size("10M"), Ok(10 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("64KB"), Ok(64_000));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert_eq!(parse_size("3GB"), Ok(3_000_000_000));
    }

    #[test]
    fn size_units_are_case_insensitive_and_space_is_allowed() {
        for s in ["10MiB", "10mib", "10MIB", "10 MiB", " 10 mib ", "10m"] {
            assert_eq!(parse_size(s), Ok(10 << 20), "{s}");
        }
        for s in ["2mb", "2MB", "2Mb", "2 mB"] {
            assert_eq!(parse_size(s), Ok(2_000_000), "{s}");
        }
        assert_eq!(parse_size("64kB"), Ok(64_000));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("7b"), Ok(7));
    }

    #[test]
    fn bad_sizes_are_errors() {
        for bad in [
            "", "MiB", "10 XB", "-1", "+1", "1.5MiB", "64KB!", "10MiBs", "10Ki", "1e3", "1TiB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        for bad in [
            format!("{}", u128::from(u64::MAX) + 1),
            format!("{}KiB", u64::MAX),
            "17179869184GiB".to_string(),
        ] {
            let e = parse_size(&bad).unwrap_err();
            assert!(e.contains("out of range"), "{bad}: {e}");
        }
        assert_eq!(parse_size(&u64::MAX.to_string()), Ok(u64::MAX));
    }
}
