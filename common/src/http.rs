//! A minimal blocking HTTP/1.1 client for the operations endpoints on loopback (status polling by the
//! CLI and the tests). One request per connection, `Connection: close`, body read to the end.

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
