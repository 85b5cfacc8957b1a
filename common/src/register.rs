//! A component's side of registration: make a key and a CSR, trade them and a one-time registration
//! key for a certificate at the configuration server, and keep the results in a directory:
//! `ca.pem`, `NAME.pem`, `NAME.key` and `NAME.token` (the component's API token).

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
    /// Where to write the certificate, key and token.
    #[arg(long)]
    pub dir: PathBuf,
    /// The QUIC address peers reach this component at, when it serves one.
    #[arg(long)]
    pub address: Option<String>,
}

pub struct Registered {
    pub tls: TlsPaths,
    pub token: PathBuf,
}

pub fn register(role: Role, a: &RegisterArgs) -> anyhow::Result<Registered> {
    let (csr, key_pem) = crate::ca::make_csr(&a.name)?;
    let body =
        serde_json::json!({ "key": a.key, "name": a.name, "csr_pem": csr, "address": a.address, "role": role.name() });
    let resp = crate::http::post_json(a.server, "/v1/register", &body)
        .with_context(|| format!("registering {} with the configuration server at {}", a.name, a.server))?;
    let cert = resp["certificate_pem"].as_str().context("answer lacks certificate_pem")?;
    let ca = resp["ca_pem"].as_str().context("answer lacks ca_pem")?;
    let token = resp["token"].as_str().context("answer lacks token")?;
    let der = CertificateDer::from_pem_slice(cert.as_bytes()).context("the issued certificate is not PEM")?;
    if !crate::tls::peer_has_role(&der, role) {
        bail!("the registration key was made for another role: this is a {}", role.name());
    }
    write(&a.dir, a.name.as_str(), ca, cert, &key_pem, token)
}

fn write(dir: &Path, name: &str, ca: &str, cert: &str, key: &str, token: &str) -> anyhow::Result<Registered> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tls = TlsPaths {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    let token_path = dir.join(format!("{name}.token"));
    crate::crashsafe::write_file(&tls.key, key.as_bytes())?;
    crate::ca::set_private(&tls.key)?;
    crate::crashsafe::write_file(&token_path, token.as_bytes())?;
    crate::ca::set_private(&token_path)?;
    crate::crashsafe::write_file(&tls.cert, cert.as_bytes())?;
    crate::crashsafe::write_file(&tls.ca, ca.as_bytes())?;
    Ok(Registered { tls, token: token_path })
}

/// What a component's `register` subcommand does: register and report where the files went.
pub fn main(role: Role, a: &RegisterArgs) -> std::process::ExitCode {
    match register(role, a) {
        Ok(r) => {
            println!("registered {} as a {}", a.name, role.name());
            println!(
                "  certificate {}\n  key         {}\n  CA          {}\n  token       {}",
                r.tls.cert.display(),
                r.tls.key.display(),
                r.tls.ca.display(),
                r.token.display()
            );
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
