//! Package versions: how Caravan orders them (to pick a job's highest
//! version, and to refuse a downgrade the signed desired state does not ask
//! for).

/// Orders versions numerically where both parts are numbers (`1.10` > `1.9`).
pub fn cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let parts = |v: &str| {
        v.split(['.', '-', '+'])
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(&pb) {
        let ord = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(x), Ok(y)) => x.cmp(&y),
            _ => x.cmp(y),
        };
        if ord.is_ne() {
            return ord;
        }
    }
    pa.len().cmp(&pb.len())
}

/// Reads a package version as a semantic version, leniently: `1` and
/// `1.2` are `1.0.0` and `1.2.0`, and a leading `v` is dropped.
pub fn semantic(version: &str) -> Result<semver::Version, String> {
    let v = version.strip_prefix('v').unwrap_or(version);
    // The numeric core is what may be short; pre-release and build stay.
    let end = v.find(['-', '+']).unwrap_or(v.len());
    let (core, rest) = v.split_at(end);
    let padded = match core.matches('.').count() {
        0 => format!("{core}.0.0{rest}"),
        1 => format!("{core}.0{rest}"),
        _ => v.to_string(),
    };
    semver::Version::parse(&padded)
        .map_err(|e| format!("version {version:?} is not a semantic version: {e}"))
}

/// Reads a version range (`>=1.2, <2`, `^1.4`, `~2.0.1`, `1.x`, `*`).
pub fn range(range: &str) -> Result<semver::VersionReq, String> {
    semver::VersionReq::parse(range)
        .map_err(|e| format!("version range {range:?} cannot be read: {e}"))
}

/// Whether `version` is in `range`.
pub fn in_range(version: &str, range: &str) -> Result<bool, String> {
    Ok(self::range(range)?.matches(&semantic(version)?))
}

#[cfg(test)]
mod tests {
    #[test]
    fn versions_in_a_range_are_read_leniently_and_bad_ones_named() {
        use super::in_range;
        assert_eq!(in_range("1.4.2", ">=1.2, <2"), Ok(true));
        assert_eq!(in_range("2.0", ">=1.2, <2"), Ok(false));
        assert_eq!(in_range("1.2", "^1.2.0"), Ok(true));
        assert_eq!(in_range("v3", "3.x"), Ok(true));
        assert_eq!(in_range("1.3.0-rc1", ">=1.2"), Ok(false));
        let bad = in_range("1.2.x", "*").unwrap_err();
        assert!(bad.contains("\"1.2.x\" is not a semantic version"), "{bad}");
        let bad = in_range("1.2.0", ">>1").unwrap_err();
        assert!(
            bad.contains("version range \">>1\" cannot be read"),
            "{bad}"
        );
    }

    #[test]
    fn numeric_parts_compare_as_numbers() {
        assert!(super::cmp("1.10.0", "1.9.9").is_gt());
        assert!(super::cmp("2.0", "2.0.1").is_lt());
        assert!(super::cmp("1.0.0", "1.0.0").is_eq());
    }
}
