//! The one HTTPS client every part uses to call another's API (components to the configuration
//! server, the configuration server to components, srctl, the tests): reqwest over rustls, the
//! server checked as a [`ServerTrust`] says, and every failure an [`HttpError`].
//!
//! It blocks: async callers run it in `spawn_blocking`. A [`Client`] is cheap to clone and keeps its
//! connections.

use crate::tls::{https_client_config, ServerTrust};
use anyhow::Context;
use std::net::SocketAddr;
use std::time::Duration;

/// Why a call to a JSON API failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Nothing answered, the TLS handshake failed (the server is not who it must be, or refused our
    /// certificate), or the connection broke.
    #[error("https://{addr}{path}: {reason}")]
    Unreachable { addr: SocketAddr, path: String, reason: String },
    /// It answered with another status than 200; `message` is its `{"error": ...}` (else its body).
    #[error("{method} {path}: HTTP {status}: {message}")]
    Status { method: String, path: String, status: u16, message: String },
    /// It answered 200 with something that is not JSON.
    #[error("{method} {path}: the answer is not JSON: {reason}")]
    NotJson { method: String, path: String, reason: String },
}

impl HttpError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// What the server said (or why nothing answered), without the request.
    pub fn message(&self) -> String {
        match self {
            HttpError::Status { message, .. } => message.clone(),
            e => e.to_string(),
        }
    }
}

/// The largest answer a call reads.
pub const MAX_ANSWER: u64 = 64 << 20;

/// An HTTPS client for one kind of server (see [`ServerTrust`]), with an optional bearer token.
/// Made anywhere; its connections are set up at the first request (which must not run on an async
/// task: see the module's note).
#[derive(Clone)]
pub struct Client {
    tls: std::sync::Arc<rustls::ClientConfig>,
    http: std::sync::Arc<std::sync::OnceLock<reqwest::blocking::Client>>,
    token: Option<String>,
}

impl Client {
    pub fn new(trust: ServerTrust<'_>) -> anyhow::Result<Client> {
        let tls = std::sync::Arc::new(https_client_config(trust)?);
        Ok(Client { tls, http: Default::default(), token: None })
    }

    fn http(&self) -> Result<&reqwest::blocking::Client, String> {
        if let Some(c) = self.http.get() {
            return Ok(c);
        }
        let c = reqwest::blocking::Client::builder()
            .tls_backend_preconfigured((*self.tls).clone())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(120))
            .no_proxy()
            // Our own APIs never redirect: a redirect would only lead a call somewhere else.
            .redirect(reqwest::redirect::Policy::none())
            .https_only(true)
            .build()
            .map_err(|e| format!("building the HTTPS client: {}", chain(&e)))?;
        Ok(self.http.get_or_init(|| c))
    }

    /// The same client sending `Authorization: Bearer <token>`.
    pub fn with_token(mut self, token: &str) -> Client {
        self.token = Some(token.trim().to_string());
        self
    }

    /// The same client sending no token.
    pub fn without_token(mut self) -> Client {
        self.token = None;
        self
    }

    /// One request; the status and body of whatever answered.
    pub fn request(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), HttpError> {
        let unreachable = |reason: String| HttpError::Unreachable { addr, path: path.to_string(), reason };
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| unreachable(e.to_string()))?;
        let mut req = self.http().map_err(unreachable)?.request(method, format!("https://{addr}{path}"));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(b.to_string());
        }
        let resp = req.send().map_err(|e| unreachable(chain(&e)))?;
        let status = resp.status().as_u16();
        // An answer is read up to MAX_ANSWER bytes: a peer cannot make the caller hold more.
        let mut body = Vec::new();
        std::io::Read::read_to_end(&mut std::io::Read::take(resp, MAX_ANSWER + 1), &mut body)
            .map_err(|e| unreachable(e.to_string()))?;
        if body.len() as u64 > MAX_ANSWER {
            return Err(unreachable(format!("the answer is larger than {MAX_ANSWER} bytes")));
        }
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Calls a JSON API: `body` sent as JSON; 200 with JSON is the answer.
    pub fn call_json(
        &self,
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, HttpError> {
        let body = body.map(|b| b.to_string());
        let (status, text) = self.request(addr, method, path, body.as_deref())?;
        let json = serde_json::from_str::<serde_json::Value>(&text);
        if status != 200 {
            let message = json.ok().and_then(|v| v["error"].as_str().map(str::to_string)).unwrap_or(text);
            return Err(HttpError::Status { method: method.into(), path: path.into(), status, message });
        }
        json.map_err(|e| HttpError::NotJson { method: method.into(), path: path.into(), reason: e.to_string() })
    }

    pub fn get_json(&self, addr: SocketAddr, path: &str) -> Result<serde_json::Value, HttpError> {
        self.call_json(addr, "GET", path, None)
    }

    pub fn post_json(
        &self,
        addr: SocketAddr,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<serde_json::Value, HttpError> {
        self.call_json(addr, "POST", path, Some(body))
    }
}

/// An error with its causes (reqwest's top-level message alone says only "error sending request").
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// POSTs `body` as JSON to an operator's webhook URL (`https://` checked against the system's
/// trusted roots, or `http://`); any 2xx answer is taken.
pub fn post_webhook(url: &str, body: &serde_json::Value) -> anyhow::Result<()> {
    crate::tls::install_default_provider();
    let client = reqwest::blocking::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .context("building the webhook client")?;
    let resp = client
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body.to_string())
        .send()
        .map_err(|e| anyhow::anyhow!("{url}: {}", chain(&e)))?;
    if !resp.status().is_success() {
        anyhow::bail!("{url}: HTTP {}", resp.status());
    }
    Ok(())
}
