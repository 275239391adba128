//! A document served to long-polls: the value, its JSON body serialized once,
//! and a strong validator (ETag) of that body.

use serde::Serialize;
use sha2::{Digest as _, Sha256};

#[derive(Debug)]
pub struct Document<T> {
    pub value: T,
    /// The serialized `value`, served as is.
    pub body: bytes::Bytes,
    /// Strong validator of `body`: answers `If-None-Match`.
    pub etag: String,
}

impl<T: Serialize> Document<T> {
    pub fn new(value: T) -> Self {
        let (body, etag) = serialize(&value);
        Self { value, body, etag }
    }
}

/// `value` serialized, and a strong validator (ETag) of those bytes.
pub fn serialize<T: Serialize>(value: &T) -> (bytes::Bytes, String) {
    let body = bytes::Bytes::from(serde_json::to_vec(value).expect("wire types serialize"));
    let etag = etag_of(&body);
    (body, etag)
}

/// A strong validator (ETag) of `body`.
pub fn etag_of(body: &[u8]) -> String {
    format!("\"{}\"", &hex::encode(Sha256::digest(body))[..32])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_values_have_equal_etags_and_others_do_not() {
        let a = Document::new(vec!["x"]);
        assert_eq!(a.etag, Document::new(vec!["x"]).etag);
        assert_ne!(a.etag, Document::new(vec!["y"]).etag);
        assert_eq!(&a.body[..], br#"["x"]"#);
    }
}
