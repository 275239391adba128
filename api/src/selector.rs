//! Kubernetes label selectors (`matchLabels` and `matchExpressions`), as a
//! DistributionJob aims at agents: the semantics of the API server's own
//! (`In`, `NotIn`, `Exists`, `DoesNotExist`; every requirement must hold) —
//! except that an empty selector is refused instead of matching everything:
//! a selector written in another shape (`{role: kiosk}`, whose unknown
//! fields the API server prunes) must not become "every agent".

use std::collections::BTreeMap;

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};

/// Whether `labels` satisfy `selector`, or why the selector is not one.
pub fn matches(
    selector: &LabelSelector,
    labels: &BTreeMap<String, String>,
) -> Result<bool, String> {
    validate(selector)?;
    let by_label = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expression = selector.match_expressions.iter().flatten().all(|r| {
        let value = labels.get(&r.key);
        let values = r.values.as_deref().unwrap_or_default();
        match r.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            _ => value.is_none(), // DoesNotExist (validated)
        }
    });
    Ok(by_label && by_expression)
}

/// Refuses what the API server would (an unknown operator, `In`/`NotIn`
/// without values, `Exists`/`DoesNotExist` with values), and an empty
/// selector.
pub fn validate(selector: &LabelSelector) -> Result<(), String> {
    let empty = selector.match_labels.as_ref().is_none_or(|m| m.is_empty())
        && selector
            .match_expressions
            .as_ref()
            .is_none_or(|e| e.is_empty());
    if empty {
        return Err(
            "an empty selector (no matchLabels, no matchExpressions) would pick every agent: \
             give it labels, or name the sites"
                .into(),
        );
    }
    for r in selector.match_expressions.iter().flatten() {
        let has_values = r.values.as_ref().is_some_and(|v| !v.is_empty());
        match (r.operator.as_str(), has_values) {
            ("In" | "NotIn", true) | ("Exists" | "DoesNotExist", false) => {}
            ("In" | "NotIn", false) => {
                return Err(format!(
                    "key {}: operator {} needs values",
                    r.key, r.operator
                ))
            }
            ("Exists" | "DoesNotExist", true) => {
                return Err(format!(
                    "key {}: operator {} takes no values",
                    r.key, r.operator
                ))
            }
            (other, _) => {
                return Err(format!(
                    "key {}: unknown operator {other:?} (In, NotIn, Exists, DoesNotExist)",
                    r.key
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn selector(labels: &[(&str, &str)], exprs: &[(&str, &str, &[&str])]) -> LabelSelector {
        LabelSelector {
            match_labels: (!labels.is_empty()).then(|| {
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect()
            }),
            match_expressions: (!exprs.is_empty()).then(|| {
                exprs
                    .iter()
                    .map(|(k, op, vs)| LabelSelectorRequirement {
                        key: k.to_string(),
                        operator: op.to_string(),
                        values: (!vs.is_empty())
                            .then(|| vs.iter().map(|v| v.to_string()).collect()),
                    })
                    .collect()
            }),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selectors_match_as_the_api_server_matches_them() {
        let kiosk = labels(&[("role", "kiosk"), ("os", "linux")]);
        let desk = labels(&[("role", "desk"), ("os", "windows"), ("ring", "canary")]);
        fn m(s: &LabelSelector, l: &BTreeMap<String, String>) -> bool {
            matches(s, l).unwrap()
        }
        assert!(m(&selector(&[("role", "kiosk")], &[]), &kiosk));
        assert!(!m(&selector(&[("role", "kiosk")], &[]), &desk));
        let linuxish = selector(&[], &[("os", "In", &["linux", "freebsd"])]);
        assert!(m(&linuxish, &kiosk) && !m(&linuxish, &desk));
        let not_windows = selector(&[], &[("os", "NotIn", &["windows"])]);
        assert!(m(&not_windows, &kiosk) && !m(&not_windows, &desk));
        assert!(
            m(&not_windows, &labels(&[])),
            "NotIn holds without the label"
        );
        let canary = selector(&[], &[("ring", "Exists", &[])]);
        assert!(!m(&canary, &kiosk) && m(&canary, &desk));
        let no_ring = selector(&[], &[("ring", "DoesNotExist", &[])]);
        assert!(m(&no_ring, &kiosk) && !m(&no_ring, &desk));
        // Every requirement must hold.
        let both = selector(&[("role", "desk")], &[("os", "In", &["linux"])]);
        assert!(!m(&both, &kiosk) && !m(&both, &desk));
    }

    #[test]
    fn a_selector_the_api_server_would_refuse_is_refused_by_name() {
        let e = |s: LabelSelector| matches(&s, &labels(&[])).unwrap_err();
        assert!(e(selector(&[], &[("os", "Like", &["l*"])])).contains("unknown operator \"Like\""));
        assert!(e(selector(&[], &[("os", "In", &[])])).contains("needs values"));
        assert!(e(selector(&[], &[("os", "Exists", &["x"])])).contains("takes no values"));
        assert!(e(selector(&[], &[])).contains("an empty selector"));
    }
}
