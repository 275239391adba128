//! The rules names must follow, checked in one place: Kubernetes object
//! names, Service names, label values (host IDs) and package names (which
//! become directory names on endpoints). Each returns what is wrong.

/// A DNS-1123 subdomain, as Kubernetes requires of object names.
pub fn object_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("missing".into());
    }
    if name.len() > 253 {
        return Err(format!("{name:?} is longer than 253 characters"));
    }
    if name.split('.').all(|label| dns_label(label, 63)) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} must be lowercase letters, digits, '-' and '.', starting and ending alphanumeric"
        ))
    }
}

/// A DNS-1035 label, as Kubernetes requires of Service names.
pub fn service_name(name: &str) -> Result<(), String> {
    if dns_label(name, 63) && name.starts_with(|c: char| c.is_ascii_lowercase()) {
        Ok(())
    } else {
        Err(format!(
            "{name:?} must be at most 63 lowercase letters, digits and '-', starting with a letter"
        ))
    }
}

/// A name a server is reached by, for its certificate: an IP address or a
/// DNS name (lowercase, as DNS-1123 subdomains are).
pub fn hostname(name: &str) -> Result<(), String> {
    if name.parse::<std::net::IpAddr>().is_ok() || object_name(name).is_ok() {
        Ok(())
    } else {
        Err(format!(
            "hostname {name:?} is neither an IP address nor a lowercase DNS name"
        ))
    }
}

/// A host ID: 8 to 63 characters of `[a-z0-9-]`, alphanumeric at both
/// ends, so that it is also a label value.
pub fn host_id(id: &str) -> Result<(), String> {
    if id.len() >= 8 && dns_label(id, 63) {
        Ok(())
    } else {
        Err(
            "hostId must be 8 to 63 characters of [a-z0-9-], starting and ending alphanumeric"
                .into(),
        )
    }
}

/// A package name: one plain path component (it names the package's
/// directory in the install root), not hidden.
pub fn package_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "package name {name:?} is not a safe directory name"
        ))
    }
}

/// Lowercase alphanumerics and '-', at most `max` long, alphanumeric at both ends.
fn dns_label(label: &str, max: usize) -> bool {
    !label.is_empty()
        && label.len() <= max
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_names_follow_kubernetes_rules() {
        assert!(object_name("hello-1.0.0").is_ok());
        assert!(object_name("Hello").is_err());
        assert!(object_name("-x").is_err());
        assert!(object_name("a..b").is_err());
        assert_eq!(object_name(""), Err("missing".into()));
        assert!(object_name(&"a".repeat(254)).is_err());
    }

    #[test]
    fn service_names_start_with_a_letter_and_fit_a_dns_label() {
        assert!(service_name("hq-relay").is_ok());
        assert!(service_name("1hq-relay").is_err());
        assert!(service_name("hq.relay").is_err());
        assert!(service_name(&format!("{}-relay", "a".repeat(57))).is_ok());
        assert!(service_name(&format!("{}-relay", "a".repeat(58))).is_err());
    }

    #[test]
    fn host_ids_are_label_values() {
        assert!(host_id("0123456789abcdef").is_ok());
        assert!(host_id("../../etc").is_err());
        assert!(host_id("-abcdefgh").is_err(), "not a valid label value");
        assert!(host_id("short").is_err());
        assert!(host_id(&"a".repeat(64)).is_err());
    }

    #[test]
    fn package_names_are_one_plain_path_component() {
        assert!(package_name("hello_world-2.0+x").is_ok());
        for bad in ["", ".hidden", "..", "a/b", "a b", "café"] {
            assert!(package_name(bad).is_err(), "{bad:?}");
        }
    }
}
