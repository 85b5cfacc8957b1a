//! A component's side of registration: make a key and a CSR, trade them and a one-time registration
//! key for a certificate at the configuration server, and keep the results in a directory:
//! `ca.pem`, `NAME.pem` and `NAME.key` (created 0600).
//!
//! A registration key is `SECRET.FINGERPRINT`: the one-time secret and the SHA-256 fingerprint of
//! the deployment CA. The component has no CA yet, so it checks the configuration server against the
//! fingerprint (the server sends its CA with its certificate) before it sends the secret.
//!
//! A key may also be the secret alone (a key made before the CA existed, as a Helm chart makes them).
//! The component then asks for the CA by the key's public id (the first 12 hex digits of the
//! secret's SHA-256) and takes it only with a proof that the server holds the key:
//! HMAC-SHA256 keyed with the secret's SHA-256 over the CA's fingerprint ([`ca_proof`]). Only the
//! public id travels before the CA is proven; the secret travels after, to the proven server.

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
    #[arg(long, env = "SR_REGISTRATION_KEY", hide_env_values = true)]
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

/// A registration key as handed to a component: the one-time secret and, when the key carries it,
/// the CA's fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistrationKey {
    pub secret: String,
    pub ca_fingerprint: Option<String>,
}

/// The SHA-256 of a secret (hex): what the configuration server keeps of keys and tokens.
pub fn secret_hash(secret: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()))
}

/// A registration key's public id: the first 12 hex digits of its secret's hash.
pub fn key_id(secret: &str) -> String {
    secret_hash(secret)[..12].to_string()
}

/// The proof that whoever sends a CA with this fingerprint holds the key whose secret hashes to
/// `secret_hash` (hex): HMAC-SHA256 keyed with the hash's bytes, over the fingerprint's text, hex.
pub fn ca_proof(secret_hash: &str, ca_fingerprint: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret_hash.as_bytes());
    hex::encode(ring::hmac::sign(&key, ca_fingerprint.as_bytes()).as_ref())
}

/// Whether `proof` is [`ca_proof`] of `secret` for `ca_fingerprint` (in constant time).
pub fn ca_proof_holds(secret: &str, ca_fingerprint: &str, proof: &str) -> bool {
    let Ok(tag) = hex::decode(proof) else { return false };
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret_hash(secret).as_bytes());
    ring::hmac::verify(&key, ca_fingerprint.as_bytes(), &tag).is_ok()
}

/// Whether a secret alone is strong enough to be a registration key: at least 32 letters, digits,
/// `-` or `_` (`srctl keys create` makes 64 hex digits, the Helm chart 40 letters and digits). Its id
/// travels before the server is proven, so it must not be guessable from the id.
pub fn strong_secret(secret: &str) -> bool {
    secret.len() >= 32
        && secret.len() <= 256
        && secret.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl RegistrationKey {
    pub fn compose(secret: &str, ca_fingerprint: &str) -> String {
        format!("{secret}.{ca_fingerprint}")
    }

    pub fn parse(key: &str) -> anyhow::Result<RegistrationKey> {
        let Some((secret, fp)) = key.trim().split_once('.') else {
            if !strong_secret(key.trim()) {
                bail!("the registration key is neither SECRET.FINGERPRINT, as `srctl keys create` prints it, nor a secret of at least 32 letters and digits");
            }
            return Ok(RegistrationKey { secret: key.trim().to_string(), ca_fingerprint: None });
        };
        if fp.len() != 64 || !fp.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("the registration key's CA fingerprint is not 64 hex digits");
        }
        Ok(RegistrationKey { secret: secret.to_string(), ca_fingerprint: Some(fp.to_ascii_lowercase()) })
    }
}

/// The deployment CA's fingerprint for a key without one: asked by the key's id, taken only with
/// the server's proof that it holds the key.
pub fn proven_ca_fingerprint(server: SocketAddr, secret: &str) -> anyhow::Result<String> {
    let client = crate::http::Client::new(crate::tls::ServerTrust::ProvenLater)?;
    let resp = client
        .post_json(server, "/v1/register/ca", &serde_json::json!({ "key_id": key_id(secret) }))
        .with_context(|| format!("asking the configuration server at {server} for its CA"))?;
    let ca = resp["ca_pem"].as_str().context("answer lacks ca_pem")?;
    let proof = resp["proof"].as_str().context("answer lacks proof")?;
    let fingerprint = crate::ca::pem_fingerprint(ca)?;
    if !ca_proof_holds(secret, &fingerprint, proof) {
        bail!(
            "the server at {server} could not prove it holds the registration key: its CA is not trusted and the \
             secret was not sent. Check the address, or use the key with its CA fingerprint (SECRET.FINGERPRINT)"
        );
    }
    Ok(fingerprint)
}

pub fn register(role: Role, a: &RegisterArgs) -> anyhow::Result<Registered> {
    let key = RegistrationKey::parse(&a.key)?;
    let fingerprint = match key.ca_fingerprint {
        Some(fp) => fp,
        None => proven_ca_fingerprint(a.server, &key.secret)?,
    };
    let (csr, key_pem) = crate::ca::make_csr(&a.name)?;
    let body = serde_json::json!({
        "key": key.secret, "name": a.name, "csr_pem": csr, "address": a.address, "role": role.name(),
        "names": a.sans,
    });
    let client = crate::http::Client::new(crate::tls::ServerTrust::Pinned(&fingerprint))?;
    let resp = client
        .post_json(a.server, "/v1/register", &body)
        .with_context(|| format!("registering {} with the configuration server at {}", a.name, a.server))?;
    let cert = resp["certificate_pem"].as_str().context("answer lacks certificate_pem")?;
    let ca = resp["ca_pem"].as_str().context("answer lacks ca_pem")?;
    if crate::ca::pem_fingerprint(ca)? != fingerprint {
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
    // The certificate last: once it is there, so are the key and the CA (an entrypoint checks it).
    crate::crashsafe::write_file(&tls.ca, ca.as_bytes())?;
    crate::crashsafe::write_secret(&tls.key, key.as_bytes())?;
    crate::crashsafe::write_file(&tls.cert, cert.as_bytes())?;
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn keys_with_and_without_a_fingerprint() {
        let fp = "AB".repeat(32);
        let k = RegistrationKey::parse(&format!(" s3cret.{fp}\n")).unwrap();
        assert_eq!(k, RegistrationKey { secret: "s3cret".into(), ca_fingerprint: Some(fp.to_ascii_lowercase()) });
        let alone = "Zx9".repeat(11);
        assert_eq!(RegistrationKey::parse(&alone).unwrap().ca_fingerprint, None);
        for weak in ["short", "", &"a".repeat(31), "has space in it and is long enough to pass", &"é".repeat(30)] {
            assert!(RegistrationKey::parse(weak).is_err(), "{weak:?}");
        }
        assert!(RegistrationKey::parse("s.notahexfingerprint").is_err());
    }

    #[test]
    fn the_ca_proof_binds_the_secret_and_the_fingerprint() {
        let (secret, fp) = ("k".repeat(32), "0f".repeat(32));
        let proof = ca_proof(&secret_hash(&secret), &fp);
        assert!(ca_proof_holds(&secret, &fp, &proof));
        assert!(!ca_proof_holds(&"j".repeat(32), &fp, &proof), "another secret");
        assert!(!ca_proof_holds(&secret, &"1f".repeat(32), &proof), "another CA");
        assert!(!ca_proof_holds(&secret, &fp, &proof[2..]), "a cut proof");
        assert!(!ca_proof_holds(&secret, &fp, "zz"), "not hex");
        // The id is public: it is not the proof's key.
        assert_eq!(key_id(&secret).len(), 12);
        assert!(secret_hash(&secret).starts_with(&key_id(&secret)));
    }
}
