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
        crate::crashsafe::write_file(&key, key_pem.as_bytes())?;
        set_private(&key)?;
        crate::crashsafe::write_file(&cert, ca.cert_pem.as_bytes())?;
        Ok(ca)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn leaf_params(name: &str, role: Role, serial_no: u64) -> anyhow::Result<CertificateParams> {
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.subject_alt_names =
            vec![SanType::DnsName(role_name(role).try_into()?), SanType::DnsName("localhost".try_into()?)];
        p.distinguished_name.push(DnType::CommonName, name);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        p.serial_number = Some(serial(serial_no));
        p.not_before = OffsetDateTime::now_utc() - Duration::hours(1);
        p.not_after = OffsetDateTime::now_utc() + LEAF_VALIDITY;
        Ok(p)
    }

    /// Issues a certificate for a key held here (tests, single-host setups).
    pub fn issue_local(&self, name: &str, role: Role, serial_no: u64) -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let cert = Self::leaf_params(name, role, serial_no)?.signed_by(&key, &self.issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Issues a certificate for the key in a CSR. Only the CSR's public key is used: name, role and
    /// validity come from the caller.
    pub fn sign_csr(&self, csr_pem: &str, name: &str, role: Role, serial_no: u64) -> anyhow::Result<String> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| anyhow::anyhow!("not a valid certificate signing request: {e}"))?;
        csr.params = Self::leaf_params(name, role, serial_no)?;
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

/// A new key and a CSR for it (the CSR's names do not matter: the CA sets them).
pub fn make_csr(name: &str) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, name);
    let csr = p.serialize_request(&key)?;
    Ok((csr.pem()?, key.serialize_pem()))
}

/// Makes a key file readable by its owner only.
pub fn set_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))
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
        let pem = ca.sign_csr(&csr, "ps-1", Role::ProcessServer, 7).unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert!(crate::tls::peer_has_role(&der, Role::ProcessServer));
        assert!(!crate::tls::peer_has_role(&der, Role::MasterTarget));
        let again = Ca::load_or_create(d.path()).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        assert!(again.sign_csr("garbage", "x", Role::Agent, 8).is_err());
        assert!(again.crl_pem(&[7], 1).unwrap().contains("BEGIN X509 CRL"));
    }
}
