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

/// Unix seconds at which a certificate expires (label `certificate`: `component` or `ca`).
pub const CERT_EXPIRY: &str = "sr_tls_certificate_expiry_timestamp_seconds";

/// A component's loaded identity: its chain, its key, the deployment's CA and its revocation list.
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Arc<RootCertStore>,
    /// The CA certificates themselves, to check the revocation list's signature.
    ca_ders: Vec<CertificateDer<'static>>,
    /// The deployment's current CRL and its number (empty until the configuration server supplied
    /// one). Only a newer list, signed by the CA, replaces it.
    crl: std::sync::RwLock<CrlState>,
    /// Where the list in force is kept across restarts.
    crl_file: Option<PathBuf>,
}

#[derive(Default)]
struct CrlState {
    number: u64,
    ders: Vec<CertificateRevocationListDer<'static>>,
    /// Counts changes, so TLS configurations built before a change are rebuilt.
    generation: u64,
    /// The HTTPS server configuration built for `generation`.
    https: Option<(u64, Arc<rustls::ServerConfig>)>,
    /// The NBD server configuration built for `generation`.
    nbd: Option<(u64, Arc<rustls::ServerConfig>)>,
}

/// Why a revocation list was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CrlError {
    #[error("the revocation list is empty")]
    Empty,
    #[error("the revocation list is not a PEM-encoded X.509 CRL: {0}")]
    Malformed(String),
    #[error("the revocation list is not signed by the deployment CA")]
    NotSigned,
    #[error("the revocation list is number {got}, older than number {have} already in force")]
    Older { got: u64, have: u64 },
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
        let ca_ders = CertificateDer::pem_file_iter(&paths.ca)
            .with_context(|| format!("reading CA certificate {}", paths.ca.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing CA certificate {}", paths.ca.display()))?;
        let id = Identity { chain, key, roots: Arc::new(roots), ca_ders, crl: Default::default(), crl_file: None };
        id.export_expiry();
        Ok(id)
    }

    /// Sets `sr_tls_certificate_expiry_timestamp_seconds` for this identity's own certificate
    /// (`certificate="component"`) and the deployment CA (`certificate="ca"`): Unix seconds of `notAfter`.
    pub fn export_expiry(&self) {
        let not_after = |der: &CertificateDer<'_>| {
            use x509_parser::prelude::FromDer;
            let (_, x) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
            Some(x.validity().not_after.timestamp() as f64)
        };
        for (which, der) in [("component", self.chain.first()), ("ca", self.ca_ders.first())] {
            if let Some(t) = der.and_then(not_after) {
                metrics::gauge!(CERT_EXPIRY, "certificate" => which).set(t);
            }
        }
    }

    /// Keeps the revocation list in force in `file`: the list kept there (when it is still valid)
    /// is in force from this start on, before the configuration server is reached, and every newer
    /// one is written there.
    pub fn keep_crl_in(mut self, file: PathBuf) -> Identity {
        if let Ok(pem) = std::fs::read_to_string(&file) {
            if let Err(e) = self.set_crl_pem(&pem) {
                tracing::warn!(file = %file.display(), error = %e, "the kept revocation list is not usable; waiting for a new one");
            }
        }
        self.crl_file = Some(file);
        self
    }

    /// Puts the revocation list `pem` in force; returns whether it changed anything. New handshakes
    /// check it. The list must be signed by the deployment CA and numbered at least as high as the
    /// one in force: an empty, foreign or older list (a replay) is refused and changes nothing.
    pub fn set_crl_pem(&self, pem: &str) -> Result<bool, CrlError> {
        let ders = CertificateRevocationListDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CrlError::Malformed(e.to_string()))?;
        let [der] = ders.as_slice() else {
            return Err(if ders.is_empty() {
                CrlError::Empty
            } else {
                CrlError::Malformed("more than one list".into())
            });
        };
        let number = crl_number(der)?;
        if !self.ca_signed(der) {
            return Err(CrlError::NotSigned);
        }
        let mut cur = self.crl.write().expect("crl lock poisoned");
        if number < cur.number {
            return Err(CrlError::Older { got: number, have: cur.number });
        }
        if cur.ders == ders {
            return Ok(false);
        }
        cur.number = number;
        cur.ders = ders;
        cur.generation += 1;
        drop(cur);
        if let Some(f) = &self.crl_file {
            if let Err(e) = crate::crashsafe::write_file(f, pem.as_bytes()) {
                tracing::warn!(file = %f.display(), error = %e, "keeping the revocation list failed");
            }
        }
        Ok(true)
    }

    /// The number of the revocation list in force (0: none yet).
    pub fn crl_number(&self) -> u64 {
        self.crl.read().expect("crl lock poisoned").number
    }

    /// Counts changes of the revocation list: a client built at an older generation is rebuilt.
    pub fn crl_generation(&self) -> u64 {
        self.crl.read().expect("crl lock poisoned").generation
    }

    fn crls(&self) -> Vec<CertificateRevocationListDer<'static>> {
        self.crl.read().expect("crl lock poisoned").ders.clone()
    }

    /// Whether one of our CA certificates signed the list.
    fn ca_signed(&self, der: &CertificateRevocationListDer<'_>) -> bool {
        use x509_parser::prelude::FromDer;
        let Ok((_, crl)) = x509_parser::revocation_list::CertificateRevocationList::from_der(der) else {
            return false;
        };
        self.ca_ders.iter().any(|ca| {
            x509_parser::certificate::X509Certificate::from_der(ca)
                .is_ok_and(|(_, ca)| crl.issuer() == ca.subject() && crl.verify_signature(ca.public_key()).is_ok())
        })
    }
}

/// The number a revocation list carries (its cRLNumber extension); a list without one is refused.
fn crl_number(der: &CertificateRevocationListDer<'_>) -> Result<u64, CrlError> {
    use x509_parser::prelude::FromDer;
    let (_, crl) = x509_parser::revocation_list::CertificateRevocationList::from_der(der)
        .map_err(|e| CrlError::Malformed(e.to_string()))?;
    let n = crl.crl_number().ok_or_else(|| CrlError::Malformed("it has no CRL number".into()))?;
    u64::try_from(n).map_err(|_| CrlError::Malformed("its CRL number does not fit 64 bits".into()))
}

/// Makes ring the process's default TLS provider, for libraries that build their own TLS
/// configuration (the OTLP exporter, the webhook client). Idempotent.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS 1.3 server configuration that demands a client certificate from the deployment CA.
pub fn server_config(id: &Identity) -> anyhow::Result<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(client_verifier(id, false)?)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .context("server certificate and key do not match")?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// A server-certificate verifier against the deployment CA and the revocation list in force.
fn server_verifier(id: &Identity) -> anyhow::Result<Arc<rustls::client::WebPkiServerVerifier>> {
    rustls::client::WebPkiServerVerifier::builder_with_provider(id.roots.clone(), provider())
        .with_crls(id.crls())
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status()
        .build()
        .context("building the server certificate verifier")
}

/// TLS 1.3 client configuration presenting our certificate and trusting only the deployment CA.
pub fn client_config(id: &Identity) -> anyhow::Result<rustls::ClientConfig> {
    let verifier = server_verifier(id)?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_webpki_verifier(verifier)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .context("client certificate and key do not match")?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// The HTTPS server configuration for the services' APIs: the server's chain (with the CA, so a
/// registering component can check the CA against its pinned fingerprint), TLS 1.3, and a client
/// certificate verified against the deployment CA and revocation list when one is offered. It is
/// optional at the TLS layer so `/healthz` and `/metrics` stay open; every API route demands the
/// caller's certificate (or an operator token) itself. Rebuilt only when the revocation list changed.
pub fn https_server_config(id: &Identity) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    cached_server_config(
        id,
        |c| &mut c.https,
        || {
            let mut chain = id.chain.clone();
            chain.extend(id.ca_ders.iter().filter(|ca| !chain.contains(ca)).cloned().collect::<Vec<_>>());
            let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13])?
                .with_client_cert_verifier(client_verifier(id, true)?)
                .with_single_cert(chain, id.key.clone_key())
                .context("server certificate and key do not match")?;
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(cfg)
        },
    )
}

/// Whether a client certificate accepted earlier still passes the checks, against the revocation
/// list in force now.
pub fn client_still_valid(id: &Identity, cert: &CertificateDer<'_>) -> bool {
    client_verifier(id, false)
        .is_ok_and(|v| v.verify_client_cert(cert, &[], rustls::pki_types::UnixTime::now()).is_ok())
}

/// A client-certificate verifier against the deployment CA and the revocation list in force;
/// `optional`: a client may also come without one.
fn client_verifier(
    id: &Identity,
    optional: bool,
) -> anyhow::Result<Arc<dyn rustls::server::danger::ClientCertVerifier>> {
    let b = rustls::server::WebPkiClientVerifier::builder_with_provider(id.roots.clone(), provider())
        .with_crls(id.crls())
        .only_check_end_entity_revocation()
        .allow_unknown_revocation_status();
    let b = if optional { b.allow_unauthenticated() } else { b };
    b.build().context("building the client certificate verifier")
}

/// The server configuration kept in `slot`, built again with `build` when the revocation list
/// changed since.
fn cached_server_config(
    id: &Identity,
    slot: impl Fn(&mut CrlState) -> &mut Option<(u64, Arc<rustls::ServerConfig>)>,
    build: impl FnOnce() -> anyhow::Result<rustls::ServerConfig>,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let generation = id.crl_generation();
    if let Some((g, cfg)) = slot(&mut id.crl.write().expect("crl lock poisoned")).as_ref() {
        if *g == generation {
            return Ok(cfg.clone());
        }
    }
    let cfg = Arc::new(build()?);
    *slot(&mut id.crl.write().expect("crl lock poisoned")) = Some((generation, cfg.clone()));
    Ok(cfg)
}

/// The NBD-over-TLS server configuration (after NBD_OPT_STARTTLS): TLS 1.3 or 1.2 (what qemu's and
/// libnbd's GnuTLS offer), and a client certificate from the deployment CA, checked against the
/// revocation list, required. Rebuilt only when the revocation list changed.
pub fn nbd_server_config(id: &Identity) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    cached_server_config(
        id,
        |c| &mut c.nbd,
        || {
            rustls::ServerConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
                .with_client_cert_verifier(client_verifier(id, false)?)
                .with_single_cert(id.chain.clone(), id.key.clone_key())
                .context("server certificate and key do not match")
        },
    )
}

/// Who the server must be, for an HTTPS client.
pub enum ServerTrust<'a> {
    /// A certificate from the deployment CA (and not revoked, as far as `Identity` knows) that names
    /// `role`; the client presents `Identity`'s certificate.
    Mutual(&'a Identity, Role),
    /// [`ServerTrust::Mutual`] for a server of any component role (agent, process server, master
    /// target): `srctl status`.
    AnyComponent(&'a Identity),
    /// A certificate from the CA in this PEM that names `role`; no client certificate (an operator,
    /// who authenticates with a token).
    Ca(&'a str, Role),
    /// A configuration server whose CA has this SHA-256 fingerprint (hex), before this component has
    /// the CA: registration. The server sends its CA with its chain.
    Pinned(&'a str),
    /// Any server: its CA is proven afterwards by the answer itself (a registration key's proof,
    /// [`crate::register::ca_proof`]). Nothing secret may be sent over such a connection.
    ProvenLater,
}

/// A TLS 1.3 client configuration for HTTPS (ALPN http/1.1) that checks the server as `trust` says,
/// whatever address it is reached at: the role name, not the host, is what its certificate must name.
pub fn https_client_config(trust: ServerTrust<'_>) -> anyhow::Result<rustls::ClientConfig> {
    let (verifier, identity): (Arc<dyn rustls::client::danger::ServerCertVerifier>, Option<&Identity>) = match trust {
        ServerTrust::Mutual(id, role) => (Arc::new(NamedServer::new(server_verifier(id)?, &[role])?), Some(id)),
        ServerTrust::AnyComponent(id) => {
            let roles = [Role::Agent, Role::ProcessServer, Role::MasterTarget];
            (Arc::new(NamedServer::new(server_verifier(id)?, &roles)?), Some(id))
        }
        ServerTrust::Ca(pem, role) => {
            let mut roots = RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                roots.add(ca.context("the CA file is not PEM")?).context("the CA certificate is not usable")?;
            }
            if roots.is_empty() {
                bail!("the CA file holds no certificate");
            }
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .context("building the server certificate verifier")?;
            (Arc::new(NamedServer::new(inner, &[role])?), None)
        }
        ServerTrust::Pinned(fingerprint) => {
            (Arc::new(PinnedCa { fingerprint: Some(fingerprint.to_ascii_lowercase()) }), None)
        }
        ServerTrust::ProvenLater => (Arc::new(PinnedCa { fingerprint: None }), None),
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut cfg = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .context("client certificate and key do not match")?,
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// Verifies the server's chain with webpki, for a role's name instead of the host it was reached
/// at (services are reached by address; their certificates name their role).
#[derive(Debug)]
struct NamedServer {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    names: Vec<ServerName<'static>>,
}

impl NamedServer {
    fn new(inner: Arc<rustls::client::WebPkiServerVerifier>, roles: &[Role]) -> anyhow::Result<NamedServer> {
        let names =
            roles.iter().map(|r| ServerName::try_from(role_name(*r)).context("role name")).collect::<Result<_, _>>()?;
        Ok(NamedServer { inner, names })
    }
}

impl rustls::client::danger::ServerCertVerifier for NamedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _reached_as: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if roles_of(end_entity).len() > 1 {
            return Err(rustls::Error::General("the server's certificate names more than one role".into()));
        }
        let mut last = rustls::Error::General("no role name to check".into());
        for name in &self.names {
            match self.inner.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
                Ok(v) => return Ok(v),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Registration's check of the configuration server: the chain it sends must hold a CA certificate
/// with the pinned fingerprint, and the server's certificate must chain to that CA and name the
/// configuration server's role.
#[derive(Debug)]
struct PinnedCa {
    /// None: any server ([`ServerTrust::ProvenLater`]); its handshake signature is still checked.
    fingerprint: Option<String>,
}

impl PinnedCa {
    fn verifier(&self, fingerprint: &str, intermediates: &[CertificateDer<'_>]) -> Result<NamedServer, rustls::Error> {
        let ca = intermediates.iter().find(|c| crate::ca::fingerprint(c) == fingerprint).ok_or_else(|| {
            rustls::Error::General("the server's CA does not have the fingerprint the registration key carries".into())
        })?;
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned()).map_err(|e| rustls::Error::General(format!("the pinned CA: {e}")))?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| rustls::Error::General(format!("the pinned CA: {e}")))?;
        NamedServer::new(inner, &[Role::ConfigServer]).map_err(|e| rustls::Error::General(e.to_string()))
    }
}

impl rustls::client::danger::ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        reached_as: &ServerName<'_>,
        ocsp: &[u8],
        now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match &self.fingerprint {
            Some(fp) => {
                self.verifier(fp, intermediates)?.verify_server_cert(end_entity, intermediates, reached_as, ocsp, now)
            }
            None => Ok(rustls::client::danger::ServerCertVerified::assertion()),
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &provider().signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider().signature_verification_algorithms.supported_schemes()
    }
}

/// Who a verified client certificate belongs to: the role its names carry, the component name (its
/// common name, which the CA wrote from the registration) and its serial number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub role: Role,
    pub name: String,
    pub serial: u64,
}

impl Peer {
    /// Reads a chain-verified certificate; `None` when it names no role or has no common name.
    pub fn of(cert: &CertificateDer<'_>) -> Option<Peer> {
        use x509_parser::prelude::FromDer;
        // A certificate naming two roles is nobody's.
        let [role] = roles_of(cert)[..] else { return None };
        let (_, x) = x509_parser::certificate::X509Certificate::from_der(cert).ok()?;
        let name = x.subject().iter_common_name().next()?.as_str().ok()?.to_string();
        let serial = u64::try_from(&x.tbs_certificate.serial).ok()?;
        Some(Peer { role, name, serial })
    }

    /// The header value a server passes a verified caller to its handlers with.
    pub fn header_value(&self) -> String {
        format!("{} {} {}", self.role.name(), self.name, self.serial)
    }

    pub fn from_header_value(v: &str) -> Option<Peer> {
        let mut it = v.split(' ');
        let role = Role::from_name(it.next()?)?;
        let name = it.next()?.to_string();
        let serial = it.next()?.parse().ok()?;
        Some(Peer { role, name, serial })
    }
}

/// The request header through which the HTTPS server hands the verified client certificate's
/// [`Peer`] to the handlers. The server removes any such header a client sent.
pub const PEER_HEADER: &str = "x-sr-peer";

/// Whether an already chain-verified peer certificate names `role`, and no other role.
pub fn peer_has_role(cert: &CertificateDer<'_>, role: Role) -> bool {
    roles_of(cert) == [role]
}

/// The roles a certificate names.
fn roles_of(cert: &CertificateDer<'_>) -> Vec<Role> {
    let Ok(ee) = webpki::EndEntityCert::try_from(cert) else { return Vec::new() };
    Role::ALL
        .into_iter()
        .filter(|r| {
            ServerName::try_from(role_name(*r)).is_ok_and(|name| ee.verify_is_valid_for_subject_name(&name).is_ok())
        })
        .collect()
}

/// Makes a new deployment CA and one certificate per (name, role) in `dir`:
/// `ca.pem`, and `NAME.pem` + `NAME.key` for each component. Returns the paths per name.
pub fn generate_deployment(dir: &Path, nodes: &[(&str, Role)]) -> anyhow::Result<Vec<TlsPaths>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (ca, ca_key) = crate::ca::Ca::create()?;
    let ca_path = dir.join("ca.pem");
    crate::crashsafe::write_file(&ca_path, ca.cert_pem().as_bytes())?;
    crate::crashsafe::write_secret(&dir.join("ca.key"), ca_key.as_bytes())?;
    let mut out = Vec::new();
    for (i, (name, role)) in nodes.iter().enumerate() {
        // One host: every server is reached on loopback.
        let names = ["127.0.0.1", "::1", "localhost"].map(String::from);
        let (cert, key) = ca.issue_local(name, *role, i as u64 + 1, &names)?;
        let paths = TlsPaths {
            ca: ca_path.clone(),
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        crate::crashsafe::write_file(&paths.cert, cert.as_bytes())?;
        crate::crashsafe::write_secret(&paths.key, key.as_bytes())?;
        out.push(paths);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(dir: &Path) -> (crate::ca::Ca, Identity) {
        let paths = generate_deployment(dir, &[("mt", Role::MasterTarget)]).unwrap();
        let ca = crate::ca::Ca::load_or_create(dir).unwrap();
        (ca, Identity::load(&paths[0]).unwrap())
    }

    #[test]
    fn only_a_signed_list_no_older_than_the_one_in_force_is_taken_and_it_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let (ca, id) = deployment(d.path());
        assert_eq!(id.set_crl_pem(""), Err(CrlError::Empty));
        assert!(matches!(
            id.set_crl_pem("-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n"),
            Err(CrlError::Malformed(_))
        ));
        let (other, _) = crate::ca::Ca::create().unwrap();
        assert_eq!(id.set_crl_pem(&other.crl_pem(&[1], 9).unwrap()), Err(CrlError::NotSigned));
        assert_eq!(id.crl_generation(), 0, "nothing refused changed anything");
        assert_eq!(id.set_crl_pem(&ca.crl_pem(&[5], 3).unwrap()), Ok(true));
        assert_eq!((id.crl_number(), id.crl_generation()), (3, 1));
        assert_eq!(id.set_crl_pem(&ca.crl_pem(&[], 2).unwrap()), Err(CrlError::Older { got: 2, have: 3 }), "a replay");
        assert_eq!(id.crl_number(), 3);
        // Kept across restarts: a new start has the list in force before any server is reached.
        let file = d.path().join("crl.pem");
        let paths =
            TlsPaths { ca: d.path().join("ca.pem"), cert: d.path().join("mt.pem"), key: d.path().join("mt.key") };
        let kept = Identity::load(&paths).unwrap().keep_crl_in(file.clone());
        assert_eq!(kept.set_crl_pem(&ca.crl_pem(&[5, 6], 4).unwrap()), Ok(true));
        let again = Identity::load(&paths).unwrap().keep_crl_in(file);
        assert_eq!(again.crl_number(), 4);
        assert_eq!(again.set_crl_pem(&ca.crl_pem(&[], 3).unwrap()), Err(CrlError::Older { got: 3, have: 4 }));
    }

    #[test]
    fn a_certificate_naming_two_roles_is_nobodys() {
        let (ca, _) = crate::ca::Ca::create().unwrap();
        let (pem, _) = ca.issue_local("x", Role::Agent, 1, &[]).unwrap();
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
        assert_eq!(Peer::of(&der).map(|p| p.role), Some(Role::Agent));
        assert!(ca.issue_local("x", Role::Agent, 2, &[role_name(Role::ConfigServer)]).is_err(), "the CA refuses it");
    }
}
