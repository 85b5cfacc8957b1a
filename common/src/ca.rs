//! The deployment's certificate authority: issues role certificates (from a CSR at registration, or
//! from a local key for tests and single-host setups) and signs the revocation list.
//!
//! A certificate's role is the DNS name `ROLE.role.sr` in its subject alternative names (see
//! [`crate::tls`]); the CA writes it from the registration key's role and never copies names from a CSR.

use crate::wire::Role;
use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevokedCertParams, SanType,
    SerialNumber,
};
use std::path::Path;
use time::{Duration, OffsetDateTime};

/// The DNS name that marks a certificate as belonging to `role`: what the CA writes into every
/// certificate it signs, and what peers check.
pub fn role_name(role: Role) -> String {
    format!("{}.role.sr", role.name())
}

/// How long an issued certificate is valid.
pub const LEAF_VALIDITY: Duration = Duration::days(397);

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

fn serial(n: u64) -> SerialNumber {
    // A leading zero byte keeps the DER integer positive.
    let mut b = vec![0u8];
    b.extend_from_slice(&n.to_be_bytes());
    SerialNumber::from_slice(&b)
}

impl Ca {
    /// A new CA. Returns it with its private key in PEM.
    pub fn create() -> anyhow::Result<(Ca, String)> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        p.distinguished_name.push(DnType::CommonName, "site recovery deployment CA");
        p.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
        p.not_after = OffsetDateTime::now_utc() + Duration::days(3650);
        let key = KeyPair::generate()?;
        let cert = p.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok((Ca { issuer: Issuer::new(p, key), cert_pem: cert.pem() }, key_pem))
    }

    /// Loads `ca.pem` and `ca.key` from `dir`, or makes and saves a new CA there.
    pub fn load_or_create(dir: &Path) -> anyhow::Result<Ca> {
        let (cert, key) = (dir.join("ca.pem"), dir.join("ca.key"));
        if cert.exists() {
            let cert_pem = std::fs::read_to_string(&cert).with_context(|| format!("reading {}", cert.display()))?;
            let key_pem = std::fs::read_to_string(&key).with_context(|| format!("reading {}", key.display()))?;
            let kp = KeyPair::from_pem(&key_pem).with_context(|| format!("{} is not a private key", key.display()))?;
            let issuer = Issuer::from_ca_cert_pem(&cert_pem, kp)
                .with_context(|| format!("{} is not a CA certificate", cert.display()))?;
            return Ok(Ca { issuer, cert_pem });
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (ca, key_pem) = Ca::create()?;
        crate::crashsafe::write_secret(&key, key_pem.as_bytes())?;
        crate::crashsafe::write_file(&cert, ca.cert_pem.as_bytes())?;
        Ok(ca)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn leaf_params(name: &str, role: Role, serial_no: u64) -> anyhow::Result<CertificateParams> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.subject_alt_names = vec![SanType::DnsName(role_name(role).try_into()?)];
        p.distinguished_name.push(DnType::CommonName, name);
        // Key encipherment too: qemu's TLS client and server refuse a certificate whose (critical)
        // key usage lacks it, whatever the key type.
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.serial_number = Some(serial(serial_no));
        p.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
        p.not_after = OffsetDateTime::now_utc() + LEAF_VALIDITY;
        Ok(p)
    }

    /// Issues a certificate for a key held here (the configuration server's own, tests, single-host
    /// setups), valid for the role's name and for `names` (host names or IP addresses).
    pub fn issue_local(
        &self,
        name: &str,
        role: Role,
        serial_no: u64,
        names: &[String],
    ) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut p = Self::leaf_params(name, role, serial_no)?;
        add_names(&mut p, names)?;
        let cert = p.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues a certificate for the key in a CSR. Only the CSR's public key is used: name, role,
    /// the extra `names` (host names or IP addresses the component is reached at) and validity come
    /// from the caller.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        name: &str,
        role: Role,
        serial_no: u64,
        names: &[String],
    ) -> anyhow::Result<String> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| anyhow::anyhow!("not a valid certificate signing request: {e}"))?;
        csr.params = Self::leaf_params(name, role, serial_no)?;
        add_names(&mut csr.params, names)?;
        Ok(csr.signed_by(&self.issuer)?.pem())
    }

    /// A CRL listing `revoked` serial numbers, signed by this CA.
    pub fn crl_pem(&self, revoked: &[u64], number: u64) -> anyhow::Result<String> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(7),
            crl_number: serial(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: serial(*s),
                    revocation_time: now - Duration::minutes(5),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

/// Whether `n` is an IP address or a DNS host name (labels of letters, digits and '-') that a
/// certificate may carry besides its role: never a role's name (`*.role.sr`), which only the CA
/// writes, from the registration key's role.
pub fn valid_host_name(n: &str) -> bool {
    let lower = n.to_ascii_lowercase();
    if lower == "role.sr" || lower.ends_with(".role.sr") || lower.ends_with(".role.sr.") {
        return false;
    }
    n.parse::<std::net::IpAddr>().is_ok()
        || (n.len() <= 253
            && n.split('.').all(|l| {
                (1..=63).contains(&l.len())
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            }))
}

/// Adds host names and IP addresses to a certificate's subject alternative names.
fn add_names(p: &mut CertificateParams, names: &[String]) -> anyhow::Result<()> {
    for n in names {
        if !valid_host_name(n) {
            anyhow::bail!("{n:?} is neither a host name nor an IP address");
        }
        p.subject_alt_names.push(match n.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(n.clone().try_into().with_context(|| format!("{n:?} is not a DNS name"))?),
        });
    }
    Ok(())
}

/// The host names and IP addresses a server reached at `address` (`host:port`) is known by.
pub fn names_of_address(address: &str) -> Vec<String> {
    match address.parse::<std::net::SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => Vec::new(),
        Ok(a) => vec![a.ip().to_string()],
        Err(_) => {
            address.rsplit_once(':').map(|(h, _)| vec![h.trim_matches(['[', ']']).to_string()]).unwrap_or_default()
        }
    }
}

/// When the first certificate in `pem` expires (Unix seconds).
pub fn not_after(pem: &str) -> Option<u64> {
    use rustls::pki_types::pem::PemObject;
    use x509_parser::prelude::FromDer;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let (_, x) = x509_parser::certificate::X509Certificate::from_der(&der).ok()?;
    u64::try_from(x.validity().not_after.timestamp()).ok()
}

/// A new key and a CSR for it (the CSR's names do not matter: the CA sets them).
pub fn make_csr(name: &str) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, name);
    let csr = p.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// Creates `dir` (and its parents) and makes it reachable by its owner only: where a service keeps
/// keys, tokens, its store or cached disk data.
pub fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {} to its owner", dir.display()))
}

/// SHA-256 of a certificate's DER bytes, hex: what a registration key pins the CA by.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

/// The SHA-256 fingerprint of the first certificate in `pem`.
pub fn pem_fingerprint(pem: &str) -> anyhow::Result<String> {
    use rustls::pki_types::pem::PemObject;
    let der = rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).context("not a PEM certificate")?;
    Ok(fingerprint(&der))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    #[test]
    fn csr_is_signed_with_the_callers_role_and_survives_reload() {
        let d = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(d.path()).unwrap();
        let (csr, _key) = make_csr("ps-1").unwrap();
        let pem = ca.sign_csr(&csr, "ps-1", Role::ProcessServer, 7, &["10.0.0.5".into()]).unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert!(crate::tls::peer_has_role(&der, Role::ProcessServer));
        assert!(!crate::tls::peer_has_role(&der, Role::MasterTarget));
        let again = Ca::load_or_create(d.path()).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        assert!(again.sign_csr("garbage", "x", Role::Agent, 8, &[]).is_err());
        assert!(again.sign_csr(&csr, "x", Role::Agent, 8, &["not a name!".into()]).is_err());
        assert_eq!(names_of_address("10.1.2.3:4000"), vec!["10.1.2.3"]);
        assert_eq!(names_of_address("[::1]:4000"), vec!["::1"]);
        assert_eq!(names_of_address("mt-0.mt.sr.svc:4000"), vec!["mt-0.mt.sr.svc"]);
        assert!(names_of_address("0.0.0.0:4000").is_empty());
        // A registrant may not name itself into another role.
        for n in ["config-server.role.sr", "MASTER-TARGET.ROLE.SR", "x.role.sr.", "role.sr"] {
            assert!(!valid_host_name(n), "{n}");
            assert!(again.sign_csr(&csr, "x", Role::Agent, 9, &[n.to_string()]).is_err(), "{n}");
        }
        assert!(valid_host_name("mt-0.mt.sr.svc") && valid_host_name("10.0.0.1") && valid_host_name("::1"));
        assert!(again.crl_pem(&[7], 1).unwrap().contains("BEGIN X509 CRL"));
    }
}
