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

#[cfg(test)]
mod tests {
    #[test]
    fn numeric_parts_compare_as_numbers() {
        assert!(super::cmp("1.10.0", "1.9.9").is_gt());
        assert!(super::cmp("2.0", "2.0.1").is_lt());
        assert!(super::cmp("1.0.0", "1.0.0").is_eq());
    }
}
