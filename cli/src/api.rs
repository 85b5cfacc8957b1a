//! `srctl` commands that drive the configuration server's REST API: the client, output and job
//! following here; the commands in one module per noun beside it.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

mod access;
mod activity;
mod items;
mod plans;
mod policies;
mod recovery;
pub use access::*;
pub use activity::*;
pub use items::*;
pub use plans::*;
pub use policies::*;
pub use recovery::*;

#[derive(Args, Clone)]
pub struct Conn {
    /// The configuration server's API address (host:port).
    #[arg(long, env = "SR_SERVER", global = true)]
    server: Option<SocketAddr>,
    /// An API token.
    #[arg(long, env = "SR_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// A file holding the API token (for example the server's admin.token).
    #[arg(long, env = "SR_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// The deployment CA's certificate, to check the server with (the server's `DATA_DIR/ca/ca.pem`).
    /// Default: `ca/ca.pem` beside the token file, when there is one.
    #[arg(long, env = "SR_CA", global = true)]
    ca: Option<PathBuf>,
}

impl Conn {
    /// The `--ca` given.
    pub fn ca(&self) -> Option<&std::path::Path> {
        self.ca.as_deref()
    }
}

pub struct Client {
    server: SocketAddr,
    http: sr_common::http::Client,
}

fn https(ca: &std::path::Path, token: Option<&str>) -> anyhow::Result<sr_common::http::Client> {
    let pem = std::fs::read_to_string(ca).with_context(|| format!("reading the CA certificate {}", ca.display()))?;
    let c = sr_common::http::Client::new(sr_common::tls::ServerTrust::Ca(&pem, sr_common::wire::Role::ConfigServer))
        .with_context(|| format!("the CA certificate {}", ca.display()))?;
    Ok(match token {
        Some(t) => c.with_token(t),
        None => c,
    })
}

impl Client {
    pub fn with(server: SocketAddr, token: &str, ca: &std::path::Path) -> anyhow::Result<Client> {
        Ok(Client { server, http: https(ca, Some(token))? })
    }

    pub fn new(c: &Conn) -> anyhow::Result<Client> {
        let server = c.server.context("no configuration server: pass --server HOST:PORT or set SR_SERVER")?;
        let beside_token = c.token_file.as_ref().and_then(|f| f.parent()).map(|d| d.join("ca").join("ca.pem"));
        let ca = match (&c.ca, beside_token) {
            (Some(ca), _) => ca.clone(),
            (None, Some(ca)) if ca.exists() => ca,
            _ => bail!(
                "no CA to check the configuration server with: pass --ca FILE or set SR_CA \
                 (the server's DATA_DIR/ca/ca.pem)"
            ),
        };
        let token = match (&c.token, &c.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading token file {}", f.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        Ok(Client { server, http: https(&ca, token.as_deref())? })
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        match self.http.call_json(self.server, method, path, body.as_ref()) {
            Ok(v) => Ok(v),
            Err(e) => {
                let hint = match e.status() {
                    Some(401) => " (pass a valid token: --token, --token-file or SR_TOKEN)",
                    Some(403) => " (this token's role may not do that)",
                    _ => "",
                };
                bail!("{e}{hint}")
            }
        }
    }
}

fn print(v: &Value, json_out: bool, text: impl Fn(&Value) -> String) {
    if json_out {
        println!("{}", serde_json::to_string_pretty(v).expect("JSON prints"));
    } else {
        println!("{}", text(v));
    }
}

fn rows(v: &Value, f: impl Fn(&Value) -> String) -> String {
    let list: Vec<String> = v.as_array().into_iter().flatten().map(f).collect();
    if list.is_empty() {
        "(none)".into()
    } else {
        list.join("\n")
    }
}

/// Follows a job (and the item it enables) with a progress bar until it ends.
fn follow(c: &Client, job: u64, item: Option<u64>, json_out: bool) -> anyhow::Result<()> {
    let j = follow_job(c, job, item, json_out)?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&j)?);
    }
    Ok(())
}

/// Follows a job to its end (a progress bar and the item's states, unless `json_out`); the job's
/// final record.
fn follow_job(c: &Client, job: u64, item: Option<u64>, json_out: bool) -> anyhow::Result<serde_json::Value> {
    let bar = if json_out { ProgressBar::hidden() } else { ProgressBar::new(100) };
    bar.set_style(
        ProgressStyle::with_template("  {msg:32} [{bar:40}] {pos}%").expect("valid template").progress_chars("=> "),
    );
    let mut last_state = String::new();
    loop {
        let j = c.call("GET", &format!("/v1/jobs/{job}"), None)?;
        let mut msg = j["kind"].as_str().unwrap_or_default().to_string();
        if let Some(id) = item {
            let i = c.call("GET", &format!("/v1/items/{id}"), None)?;
            let name = i["state_name"].as_str().unwrap_or_default().to_string();
            if name != last_state {
                let pct = i["state"]["percent"].as_u64().map(|p| format!(" ({p}%)")).unwrap_or_default();
                let line = format!("  state: {}{pct}", name.replace('_', " "));
                if json_out {
                } else if bar.is_hidden() {
                    println!("{line}");
                } else {
                    bar.println(line);
                }
                last_state = name.clone();
            }
            msg = name.replace('_', " ");
        }
        bar.set_message(msg);
        bar.set_position(j["progress"].as_u64().unwrap_or(0));
        match j["state"].as_str() {
            Some("succeeded") => {
                bar.finish();
                return Ok(j);
            }
            Some("failed") => {
                bar.abandon();
                bail!("job {job} failed: {}", j["error"].as_str().unwrap_or("no reason given"));
            }
            _ => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}
