//! `srctl keys`, `tokens`, `components`, `machines`: who may talk to the configuration server.

use super::*;

#[derive(Subcommand)]
pub enum KeysCmd {
    /// Creates a one-time registration key for a component role.
    Create {
        #[arg(long, value_parser = ["agent", "process-server", "master-target"])]
        role: String,
        /// Seconds until the key expires (the server's default when left out).
        #[arg(long)]
        ttl: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum TokensCmd {
    /// Creates an API token; its secret is shown once.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = ["reader", "operator", "admin"])]
        role: String,
    },
}

#[derive(Subcommand)]
pub enum NbdClientsCmd {
    /// Makes a key here and has the configuration server certify it in the NBD-client role; writes
    /// DIR/ca-cert.pem, client-cert.pem and client-key.pem, the layout libnbd and qemu read. Open a
    /// failover disk with `nbdinfo 'nbds://HOST:PORT/EXPORT?tls-certificates=DIR'`.
    Create {
        name: String,
        #[arg(long)]
        dir: std::path::PathBuf,
    },
}

#[derive(Subcommand)]
pub enum ComponentsCmd {
    List,
    /// Revokes a component's certificate.
    Revoke {
        name: String,
    },
}

pub fn keys(c: &Client, cmd: KeysCmd, json_out: bool) -> anyhow::Result<()> {
    let KeysCmd::Create { role, ttl } = cmd;
    let mut body = json!({ "role": role });
    if let Some(t) = ttl {
        body["ttl_seconds"] = json!(t);
    }
    let v = c.call("POST", "/v1/registration-keys", Some(body))?;
    print(&v, json_out, |v| v["key"].as_str().unwrap_or_default().to_string());
    Ok(())
}

pub fn tokens(c: &Client, cmd: TokensCmd, json_out: bool) -> anyhow::Result<()> {
    let TokensCmd::Create { name, role } = cmd;
    let v = c.call("POST", "/v1/tokens", Some(json!({ "name": name, "role": role })))?;
    print(&v, json_out, |v| v["token"].as_str().unwrap_or_default().to_string());
    Ok(())
}

pub fn nbd_clients(c: &Client, cmd: NbdClientsCmd, json_out: bool) -> anyhow::Result<()> {
    let NbdClientsCmd::Create { name, dir } = cmd;
    let (csr, key) = sr_common::ca::make_csr(&name)?;
    let v = c.call("POST", "/v1/nbd-clients", Some(json!({ "name": name, "csr_pem": csr })))?;
    let cert = v["certificate_pem"].as_str().context("answer lacks certificate_pem")?;
    let ca = v["ca_pem"].as_str().context("answer lacks ca_pem")?;
    sr_common::register::write_nbd_client_dir(&dir, ca, cert, &key)?;
    let out = json!({ "name": name, "serial": v["serial"], "dir": dir });
    print(&out, json_out, |_| format!("NBD client {name}: certificate, key and CA in {}", dir.display()));
    Ok(())
}

pub fn components(c: &Client, cmd: ComponentsCmd, json_out: bool) -> anyhow::Result<()> {
    let v = match cmd {
        ComponentsCmd::List => c.call("GET", "/v1/components", None)?,
        ComponentsCmd::Revoke { name } => c.call("POST", &format!("/v1/components/{name}/revoke"), None)?,
    };
    let line = |c: &Value| {
        format!(
            "{:<20} {:<15} {:<15} address {:<22} cache {} B, churn {} B/s, free {} B",
            c["name"].as_str().unwrap_or_default(),
            c["role"].as_str().unwrap_or_default(),
            c["health"].as_str().unwrap_or_default(),
            c["address"].as_str().unwrap_or("-"),
            c["load"]["cache_bytes"],
            c["load"]["churn_bytes_per_sec"],
            c["load"]["free_bytes"]
        )
    };
    print(&v, json_out, |v| if v.is_array() { rows(v, line) } else { line(v) });
    Ok(())
}

pub fn machines(c: &Client, json_out: bool) -> anyhow::Result<()> {
    let v = c.call("GET", "/v1/machines", None)?;
    print(&v, json_out, |v| {
        rows(v, |m| {
            let disks: Vec<String> = m["disks"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|d| {
                    format!(
                        "{} ({} MiB)",
                        d["name"].as_str().unwrap_or_default(),
                        d["size"].as_u64().unwrap_or(0) >> 20
                    )
                })
                .collect();
            format!("{:<20} {}", m["name"].as_str().unwrap_or_default(), disks.join(", "))
        })
    });
    Ok(())
}
