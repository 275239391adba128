//! Signed commits (`spec.verify`): the commit to apply must carry an SSH
//! signature (`git config gpg.format ssh`, namespace `git`) by one of the
//! GitSource's signing keys. Anything else — unsigned, OpenPGP, another
//! key, a signature over other bytes — is refused, naming which.

/// Checks commit `id` of `repo`; returns the fingerprint of the key that
/// signed it.
pub fn verify_commit(
    repo: &git2::Repository,
    id: git2::Oid,
    signers: &[ssh_key::PublicKey],
) -> Result<String, String> {
    let short = &id.to_string()[..12];
    let (signature, signed) = repo
        .extract_signature(&id, None)
        .map_err(|_| format!("commit {short} is not signed"))?;
    verify(&signature, &signed, signers).map_err(|e| format!("commit {short} {e}"))
}

/// Checks an armored signature over `signed`.
pub fn verify(
    signature: &[u8],
    signed: &[u8],
    signers: &[ssh_key::PublicKey],
) -> Result<String, String> {
    let text = String::from_utf8_lossy(signature);
    if text.contains("BEGIN PGP SIGNATURE") {
        return Err(
            "is signed with OpenPGP: Caravan verifies SSH signatures (git config gpg.format ssh)"
                .into(),
        );
    }
    let sig = ssh_key::SshSig::from_pem(text.trim())
        .map_err(|e| format!("carries a signature that cannot be read: {e}"))?;
    let by = sig.public_key().fingerprint(ssh_key::HashAlg::Sha256);
    let signer = signers
        .iter()
        .find(|k| k.key_data() == sig.public_key())
        .ok_or_else(|| {
            format!("is signed by key {by}, which is not a signing key of this GitSource")
        })?;
    signer
        .verify("git", signed, &sig)
        .map_err(|e| format!("has a signature by {by} that does not verify: {e}"))?;
    Ok(by.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ssh_key::{HashAlg, LineEnding, PrivateKey};

    fn key(seed: u8) -> PrivateKey {
        let pair = ssh_key::private::Ed25519Keypair::from_seed(&[seed; 32]);
        PrivateKey::from(pair)
    }

    fn sign(key: &PrivateKey, namespace: &str, data: &[u8]) -> Vec<u8> {
        key.sign(namespace, HashAlg::Sha512, data)
            .unwrap()
            .to_pem(LineEnding::LF)
            .unwrap()
            .into_bytes()
    }

    #[test]
    fn only_a_signature_by_a_listed_key_over_these_bytes_passes() {
        let (alice, mallory) = (key(1), key(2));
        let signers = [alice.public_key().clone()];
        let data = b"tree 4b825dc642cb6eb9a060e54bf8d69288fbee4904\n\nfleet\n";
        let by = verify(&sign(&alice, "git", data), data, &signers).unwrap();
        assert_eq!(
            by,
            alice.public_key().fingerprint(HashAlg::Sha256).to_string()
        );
        let e = verify(&sign(&mallory, "git", data), data, &signers).unwrap_err();
        assert!(e.contains("not a signing key"), "{e}");
        let e = verify(&sign(&alice, "git", data), b"tree other\n", &signers).unwrap_err();
        assert!(e.contains("does not verify"), "{e}");
        let e = verify(&sign(&alice, "file", data), data, &signers).unwrap_err();
        assert!(e.contains("does not verify"), "another namespace: {e}");
        let pgp = b"-----BEGIN PGP SIGNATURE-----\n\niQ\n-----END PGP SIGNATURE-----\n";
        let e = verify(pgp, data, &signers).unwrap_err();
        assert!(e.contains("OpenPGP"), "{e}");
        let e = verify(b"garbage", data, &signers).unwrap_err();
        assert!(e.contains("cannot be read"), "{e}");
    }
}
