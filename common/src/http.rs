//! A minimal blocking HTTP/1.1 client for the operations endpoints on loopback (status polling by the
//! CLI and the tests). One request per connection, `Connection: close`, body read to the end.
//!
//! [`call_json`] is the one way a component, the configuration server or srctl calls another's JSON API:
//! every failure is an [`HttpError`], and a refusal carries its status and the server's message.

use anyhow::{bail, Context};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub fn request(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> anyhow::Result<(u16, String)> {
    request_with(addr, method, path, body, None)
}

/// [`request`] with an optional bearer token.
pub fn request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .with_context(|| format!("connecting to http://{addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.unwrap_or("");
    let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
    // One write, so the request leaves in as few segments as possible.
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).with_context(|| format!("reading the answer of http://{addr}{path}"))?;
    let text = String::from_utf8_lossy(&resp);
    let Some((head, rest)) = text.split_once("\r\n\r\n") else {
        bail!("http://{addr}{path}: answer has no header end")
    };
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .with_context(|| format!("http://{addr}{path}: bad status line"))?;
    let chunked = head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding: chunked"));
    let body = if chunked { dechunk(rest) } else { rest.to_string() };
    Ok((code, body))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(len.trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Why a call to a JSON API failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Nothing answered, or the connection broke.
    #[error("http://{addr}{path}: {reason}")]
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

/// Calls a JSON API: `body` sent as JSON with the bearer `token`; 200 with JSON is the answer.
pub fn call_json(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
    token: Option<&str>,
) -> Result<serde_json::Value, HttpError> {
    let body = body.map(|b| b.to_string());
    let (status, text) = request_with(addr, method, path, body.as_deref(), token)
        .map_err(|e| HttpError::Unreachable { addr, path: path.to_string(), reason: format!("{e:#}") })?;
    let json = serde_json::from_str::<serde_json::Value>(&text);
    if status != 200 {
        let message = json.ok().and_then(|v| v["error"].as_str().map(str::to_string)).unwrap_or(text);
        return Err(HttpError::Status { method: method.into(), path: path.into(), status, message });
    }
    json.map_err(|e| HttpError::NotJson { method: method.into(), path: path.into(), reason: e.to_string() })
}

/// GET a JSON document; a status other than 200 is an error carrying the body.
pub fn get_json(addr: SocketAddr, path: &str) -> anyhow::Result<serde_json::Value> {
    let (code, body) = request(addr, "GET", path, None)?;
    if code != 200 {
        bail!("GET http://{addr}{path}: HTTP {code}: {body}");
    }
    serde_json::from_str(&body).with_context(|| format!("GET http://{addr}{path}: not JSON"))
}

pub fn post_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let (code, text) = request(addr, "POST", path, Some(&body.to_string()))?;
    if code != 200 {
        bail!("POST http://{addr}{path}: HTTP {code}: {text}");
    }
    serde_json::from_str(&text).with_context(|| format!("POST http://{addr}{path}: not JSON"))
}
