//! The deployment's certificates and mutual TLS with role checks.
//!
//! Every component holds a certificate signed by the deployment CA. Its role is written as a DNS name
//! in the certificate's subject alternative names (`agent.role.sr`, `process-server.role.sr`, ...):
//! a client checks the server's role by connecting to that name, and a server checks the client's role
//! with [`peer_has_role`]. A certificate from another CA fails the handshake (UnknownIssuer).

use crate::wire::Role;
use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName};
use rustls::RootCertStore;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const ALPN: &[u8] = b"sr/1";

pub use crate::ca::role_name;

/// Paths of one component's certificate material.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A component's loaded identity: its chain, its key, the deployment's CA and its revocation list.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Arc<RootCertStore>,
    /// The deployment's current CRL (empty until the configuration server supplied one).
    crls: std::sync::RwLock<Vec<CertificateRevocationListDer<'static>>>,
}

impl Identity {
    pub fn load(paths: &TlsPaths) -> anyhow::Result<Identity> {
        let chain = CertificateDer::pem_file_iter(&paths.cert)
            .with_context(|| format!("reading certificate {}", paths.cert.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing certificate {}", paths.cert.display()))?;
        if chain.is_empty() {
            bail!("certificate file {} holds no certificate", paths.cert.display());
        }
        let key = PrivateKeyDer::from_pem_file(&paths.key)
            .with_context(|| format!("reading private key {}", paths.key.display()))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(&paths.ca)
            .with_context(|| format!("reading CA certificate {}", paths.ca.display()))?
        {
            let ca = ca.with_context(|| format!("parsing CA certificate {}", paths.ca.display()))?;
            roots.add(ca).with_context(|| format!("CA certificate {} is not usable", paths.ca.display()))?;
        }
        if roots.is_empty() {
            bail!("CA file {} holds no certificate", paths.ca.display());
        }
        Ok(Identity { chain, key, roots: Arc::new(roots), crls: Default::default() })
    }

    /// Replaces the revocation list with `pem`; returns whether it changed. New handshakes check it.
    pub fn set_crl_pem(&self, pem: &str) -> anyhow::Result<bool> {
        let crls = CertificateRevocationListDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("the revocation list is not PEM")?;
        let mut cur = self.crls.write().expect("crl lock poisoned");
        let changed = *cur != crls;
        *cur = crls;
        Ok(changed)
    }

    fn crls(&self) -> Vec<CertificateRevocationListDer<'static>> {
        self.crls.read().expect("crl lock poisoned").clone()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 server configuration that demands a client certificate from the deployment CA.
pub fn server_config(id: &Identity) -> anyhow::Result<rustls::ServerConfig> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider())
        .with_crls(id.crls())
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .context("building the client certificate verifier")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .context("server certificate and key do not match")?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// TLS 1.3 client configuration presenting our certificate and trusting only the deployment CA.
pub fn client_config(id: &Identity) -> anyhow::Result<rustls::ClientConfig> {
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(id.roots.clone(), provider())
        .with_crls(id.crls())
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .context("building the server certificate verifier")?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .context("client certificate and key do not match")?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// Whether an already chain-verified peer certificate names `role`.
pub fn peer_has_role(cert: &CertificateDer<'_>, role: Role) -> bool {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else { return false };
    let Ok(name) = ServerName::try_from(role_name(role)) else { return false };
    ee.verify_is_valid_for_subject_name(&name).is_ok()
}

/// Makes a new deployment CA and one certificate per (name, role) in `dir`:
/// `ca.pem`, and `NAME.pem` + `NAME.key` for each component. Returns the paths per name.
pub fn generate_deployment(dir: &Path, nodes: &[(&str, Role)]) -> anyhow::Result<Vec<TlsPaths>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (ca, ca_key) = crate::ca::Ca::create()?;
    let ca_path = dir.join("ca.pem");
    crate::crashsafe::write_file(&ca_path, ca.cert_pem().as_bytes())?;
    crate::crashsafe::write_file(&dir.join("ca.key"), ca_key.as_bytes())?;
    crate::ca::set_private(&dir.join("ca.key"))?;
    let mut out = Vec::new();
    for (i, (name, role)) in nodes.iter().enumerate() {
        let (cert, key) = ca.issue_local(name, *role, i as u64 + 1)?;
        let paths = TlsPaths {
            ca: ca_path.clone(),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        crate::crashsafe::write_file(&paths.cert, cert.as_bytes())?;
        crate::crashsafe::write_file(&paths.key, key.as_bytes())?;
        crate::ca::set_private(&paths.key)?;
        out.push(paths);
    }
    Ok(out)
}
