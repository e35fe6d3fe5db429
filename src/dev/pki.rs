//! Certificates for `ultrasync dev --tls`: a private CA and one certificate signed by
//! it for `localhost`, 127.0.0.1 and ::1, presented by the gateway (`wss://`,
//! `https://`) and by the managed nats-servers (client port, and routes with
//! `--cluster 3`, hence server and client use). Made with rcgen on the first start
//! and kept in the data folder, so a client that trusts the CA keeps trusting it
//! across restarts; delete the folder for new ones. The CA's key is not kept.

use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// The PEM files, absolute paths.
#[derive(Debug, Clone)]
pub struct DevTls {
    /// What clients trust.
    pub ca: PathBuf,
    /// The certificate for localhost, 127.0.0.1 and ::1.
    pub cert: PathBuf,
    /// Its private key (0600).
    pub key: PathBuf,
}

/// The files in `dir`: the ones there when all three are, else new ones.
pub fn ensure(dir: &Path) -> anyhow::Result<DevTls> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir)?;
    let tls = DevTls {
        ca: dir.join("ca.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
    };
    if [&tls.ca, &tls.cert, &tls.key].iter().all(|p| p.is_file()) {
        return Ok(tls);
    }
    let (ca, cert, key) = generate()?;
    write(&tls.key, &key, 0o600)?;
    write(&tls.cert, &cert, 0o644)?;
    write(&tls.ca, &ca, 0o644)?;
    Ok(tls)
}

/// A new CA and a certificate signed by it: (CA PEM, certificate PEM, key PEM).
fn generate() -> anyhow::Result<(String, String, String)> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "ultrasync dev CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let issuer = CertifiedIssuer::self_signed(ca, KeyPair::generate()?)?;

    let mut leaf = CertificateParams::new(vec!["localhost".to_owned()])?;
    leaf.distinguished_name
        .push(DnType::CommonName, "ultrasync dev");
    leaf.subject_alt_names.extend([
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ]);
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = KeyPair::generate()?;
    let cert = leaf.signed_by(&key, &issuer)?;
    Ok((issuer.pem(), cert.pem(), key.serialize_pem()))
}

/// Writes `text` to a new `path` with `mode` (never briefly wider).
fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    let _ = std::fs::remove_file(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn made_once_then_kept_and_the_key_is_owner_only() {
        let dir = tempfile::tempdir().expect("dir");
        let first = ensure(dir.path()).expect("make");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&first.key), 0o600);
        assert_eq!(mode(&first.ca), 0o644);
        let ca = std::fs::read_to_string(&first.ca).expect("ca");
        assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"));
        let again = ensure(dir.path()).expect("reuse");
        assert_eq!(std::fs::read_to_string(&again.ca).expect("ca"), ca, "kept");

        // One file missing: all new, consistent again.
        std::fs::remove_file(&first.key).expect("rm");
        let new = ensure(dir.path()).expect("remake");
        assert_ne!(std::fs::read_to_string(&new.ca).expect("ca"), ca);
        assert_eq!(mode(&new.key), 0o600);
    }
}
