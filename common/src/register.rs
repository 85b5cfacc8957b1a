//! A component's side of registration: make a key and a CSR, trade them and a one-time registration
//! key for a certificate at the configuration server, and keep the results in a directory:
//! `ca.pem`, `NAME.pem` and `NAME.key` (created 0600).
//!
//! A registration key is `SECRET.FINGERPRINT`: the one-time secret and the SHA-256 fingerprint of
//! the deployment CA. The component has no CA yet, so it checks the configuration server against the
//! fingerprint (the server sends its CA with its certificate) before it sends the secret.

use crate::tls::TlsPaths;
use crate::wire::Role;
use anyhow::{bail, Context};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct RegisterArgs {
    /// The configuration server's API address (host:port).
    #[arg(long)]
    pub server: SocketAddr,
    /// The one-time registration key an admin created for this role.
    #[arg(long, env = "SR_REGISTRATION_KEY")]
    pub key: String,
    /// This component's name (letters, digits, '-', '_').
    #[arg(long)]
    pub name: String,
    /// Where to write the certificate, the key and the CA.
    #[arg(long)]
    pub dir: PathBuf,
    /// The QUIC address peers reach this component at, when it serves one. Its host also goes into
    /// the certificate, for clients that check the host they connect to (NBD over TLS).
    #[arg(long)]
    pub address: Option<String>,
    /// Another host name or IP address the certificate names (a Service name, a NAT address);
    /// repeatable.
    #[arg(long = "san")]
    pub sans: Vec<String>,
}

pub struct Registered {
    pub tls: TlsPaths,
}

/// A registration key as handed to a component: the one-time secret and the CA's fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationKey {
    pub secret: String,
    pub ca_fingerprint: String,
}

impl RegistrationKey {
    pub fn compose(secret: &str, ca_fingerprint: &str) -> String {
        format!("{secret}.{ca_fingerprint}")
    }

    pub fn parse(key: &str) -> anyhow::Result<RegistrationKey> {
        let Some((secret, fp)) = key.trim().split_once('.') else {
            bail!("the registration key has no CA fingerprint: expected SECRET.FINGERPRINT as `srctl keys create` prints it")
        };
        if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("the registration key's CA fingerprint is not 64 hex digits");
        }
        Ok(RegistrationKey { secret: secret.to_string(), ca_fingerprint: fp.to_ascii_lowercase() })
    }
}

pub fn register(role: Role, a: &RegisterArgs) -> anyhow::Result<Registered> {
    let key = RegistrationKey::parse(&a.key)?;
    let (csr, key_pem) = crate::ca::make_csr(&a.name)?;
    let body = serde_json::json!({
        "key": key.secret, "name": a.name, "csr_pem": csr, "address": a.address, "role": role.name(),
        "names": a.sans,
    });
    let client = crate::http::Client::new(crate::tls::ServerTrust::Pinned(&key.ca_fingerprint))?;
    let resp = client
        .post_json(a.server, "/v1/register", &body)
        .with_context(|| format!("registering {} with the configuration server at {}", a.name, a.server))?;
    let cert = resp["certificate_pem"].as_str().context("answer lacks certificate_pem")?;
    let ca = resp["ca_pem"].as_str().context("answer lacks ca_pem")?;
    if crate::ca::pem_fingerprint(ca)? != key.ca_fingerprint {
        bail!("the configuration server answered with another CA than the registration key names");
    }
    let der = CertificateDer::from_pem_slice(cert.as_bytes()).context("the issued certificate is not PEM")?;
    if !crate::tls::peer_has_role(&der, role) {
        bail!("the registration key was made for another role: this is a {}", role.name());
    }
    write(&a.dir, a.name.as_str(), ca, cert, &key_pem)
}

fn write(dir: &Path, name: &str, ca: &str, cert: &str, key: &str) -> anyhow::Result<Registered> {
    crate::ca::private_dir(dir)?;
    let tls = TlsPaths {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    crate::crashsafe::write_secret(&tls.key, key.as_bytes())?;
    crate::crashsafe::write_file(&tls.cert, cert.as_bytes())?;
    crate::crashsafe::write_file(&tls.ca, ca.as_bytes())?;
    Ok(Registered { tls })
}

/// Writes an NBD client's certificate where libnbd (`nbds://...?tls-certificates=DIR`) and qemu
/// (`tls-creds-x509,dir=DIR,endpoint=client`) look for it: `DIR/ca-cert.pem`, `client-cert.pem` and
/// `client-key.pem` (the directory and the key owner-only from their first byte).
pub fn write_nbd_client_dir(dir: &Path, ca: &str, cert: &str, key: &str) -> anyhow::Result<()> {
    crate::ca::private_dir(dir)?;
    crate::crashsafe::write_secret(&dir.join("client-key.pem"), key.as_bytes())?;
    crate::crashsafe::write_file(&dir.join("client-cert.pem"), cert.as_bytes())?;
    crate::crashsafe::write_file(&dir.join("ca-cert.pem"), ca.as_bytes())?;
    Ok(())
}

/// What a component's `register` subcommand does: register and report where the files went.
pub fn main(role: Role, a: &RegisterArgs) -> std::process::ExitCode {
    match register(role, a) {
        Ok(r) => {
            println!("registered {} as a {}", a.name, role.name());
            println!(
                "  certificate {}\n  key         {}\n  CA          {}",
                r.tls.cert.display(),
                r.tls.key.display(),
                r.tls.ca.display(),
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
