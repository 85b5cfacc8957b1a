//! `srctl` commands that drive the configuration server's REST API.

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
}

pub struct Client {
    server: SocketAddr,
    token: Option<String>,
}

impl Client {
    pub fn with(server: SocketAddr, token: String) -> Client {
        Client { server, token: Some(token) }
    }

    pub fn new(c: &Conn) -> anyhow::Result<Client> {
        let server = c.server.context("no configuration server: pass --server HOST:PORT or set SR_SERVER")?;
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
        Ok(Client { server, token })
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let b = body.map(|v| v.to_string());
        let (code, text) =
            sr_common::http::request_with(self.server, method, path, b.as_deref(), self.token.as_deref())?;
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
        if code != 200 {
            let msg = v["error"].as_str().map(str::to_string).unwrap_or(text);
            let hint = match code {
                401 => " (pass a valid token: --token, --token-file or SR_TOKEN)",
                403 => " (this token's role may not do that)",
                _ => "",
            };
            bail!("{method} {path}: HTTP {code}: {msg}{hint}");
        }
        Ok(v)
    }
}

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
pub enum ComponentsCmd {
    List,
    /// Revokes a component's certificate.
    Revoke {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum PoliciesCmd {
    List,
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        rpo_secs: Option<u64>,
        #[arg(long)]
        retention_hours: Option<u64>,
        #[arg(long)]
        crash_interval_secs: Option<u64>,
        #[arg(long)]
        app_interval_secs: Option<u64>,
        #[arg(long)]
        journal_limit_percent: Option<u8>,
        #[arg(long)]
        compression_level: Option<i32>,
        #[arg(long)]
        bandwidth_limit_mbps: Option<u64>,
        /// Automatic resyncs run only in this UTC window, like 22:00-06:00.
        #[arg(long)]
        resync_window: Option<String>,
    },
    Delete {
        id: String,
    },
}

#[derive(Subcommand)]
pub enum ItemsCmd {
    List,
    Show { id: u64 },
}

/// Which recovery point: the latest when no flag is given.
#[derive(clap::Args, Debug, Default)]
pub struct PointArgs {
    /// The newest app-consistent point common to every disk.
    #[arg(long, conflicts_with_all = ["time", "tag", "seq", "latest_bookmark"])]
    pub latest_app: bool,
    /// The newest named point (app- or crash-consistent bookmark).
    #[arg(long, conflicts_with_all = ["time", "tag", "seq"])]
    pub latest_bookmark: bool,
    /// The state at this instant (RFC 3339, like 2026-11-28T10:00:00Z).
    #[arg(long, conflicts_with_all = ["tag", "seq"])]
    pub time: Option<String>,
    /// A named point.
    #[arg(long, conflicts_with = "seq")]
    pub tag: Option<String>,
    /// A sequence number (items with one disk).
    #[arg(long)]
    pub seq: Option<u64>,
}

impl PointArgs {
    /// Whether any point option was given.
    pub fn given(&self) -> bool {
        self.latest_app || self.latest_bookmark || self.time.is_some() || self.tag.is_some() || self.seq.is_some()
    }

    pub fn spec(&self) -> Value {
        if self.latest_app {
            json!("latest-app-consistent")
        } else if self.latest_bookmark {
            json!("latest-bookmark")
        } else if let Some(t) = &self.time {
            json!({ "time": t })
        } else if let Some(t) = &self.tag {
            json!({ "tag": t })
        } else if let Some(s) = self.seq {
            json!({ "seq": s })
        } else {
            json!("latest")
        }
    }
}

#[derive(Subcommand)]
pub enum JobsCmd {
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        #[arg(long)]
        target: Option<String>,
    },
    Show {
        id: u64,
    },
    /// Follows a job with a progress bar until it ends; fails when the job fails.
    Watch {
        id: u64,
    },
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

pub fn policies(c: &Client, cmd: PoliciesCmd, json_out: bool) -> anyhow::Result<()> {
    let v = match cmd {
        PoliciesCmd::List => c.call("GET", "/v1/policies", None)?,
        PoliciesCmd::Create {
            name,
            rpo_secs,
            retention_hours,
            crash_interval_secs,
            app_interval_secs,
            journal_limit_percent,
            compression_level,
            bandwidth_limit_mbps,
            resync_window,
        } => {
            let mut b = json!({ "name": name });
            let mut set = |k: &str, v: Option<Value>| {
                if let Some(v) = v {
                    b[k] = v;
                }
            };
            set("rpo_threshold_secs", rpo_secs.map(Value::from));
            set("retention_hours", retention_hours.map(Value::from));
            set("crash_consistent_interval_secs", crash_interval_secs.map(Value::from));
            set("app_consistent_interval_secs", app_interval_secs.map(Value::from));
            set("journal_limit_percent", journal_limit_percent.map(Value::from));
            set("compression_level", compression_level.map(Value::from));
            set("bandwidth_limit_mbps", bandwidth_limit_mbps.map(Value::from));
            set("resync_window", resync_window.map(Value::from));
            c.call("POST", "/v1/policies", Some(b))?
        }
        PoliciesCmd::Delete { id } => c.call("DELETE", &format!("/v1/policies/{id}"), None)?,
    };
    let line = |p: &Value| {
        format!(
            "{:<14} {:<16} RPO {} s, retention {} h, journal {}%",
            p["id"].as_str().unwrap_or_default(),
            p["name"].as_str().unwrap_or_default(),
            p["rpo_threshold_secs"],
            p["retention_hours"],
            p["journal_limit_percent"]
        )
    };
    print(&v, json_out, |v| if v.is_array() { rows(v, line) } else { line(v) });
    Ok(())
}

fn item_line(i: &Value) -> String {
    let state = &i["state"];
    let pct = state["percent"].as_u64().map(|p| format!(" ({p}%)")).unwrap_or_default();
    format!(
        "item {:<4} {:<16} {:<22} PS {:<10} MT {:<10} RPO {}",
        i["id"],
        i["machine"].as_str().unwrap_or_default(),
        format!("{}{pct}", i["state_name"].as_str().unwrap_or_default()),
        i["process_server"].as_str().unwrap_or("-"),
        i["master_target"].as_str().unwrap_or("-"),
        i["rpo_seconds"].as_u64().map(|r| format!("{r} s")).unwrap_or("-".into())
    )
}

pub fn items(c: &Client, cmd: ItemsCmd, json_out: bool) -> anyhow::Result<()> {
    let v = match cmd {
        ItemsCmd::List => c.call("GET", "/v1/items", None)?,
        ItemsCmd::Show { id } => c.call("GET", &format!("/v1/items/{id}"), None)?,
    };
    print(&v, json_out, |v| if v.is_array() { rows(v, item_line) } else { item_line(v) });
    Ok(())
}

pub fn protect(c: &Client, machine: &str, policy: &str, watch: bool, json_out: bool) -> anyhow::Result<()> {
    let v = c.call("POST", "/v1/items", Some(json!({ "machine": machine, "policy": policy })))?;
    let item = v["item"]["id"].as_u64().context("answer without item id")?;
    let job = v["job"].as_u64().context("answer without job id")?;
    if !watch {
        print(&v, json_out, |v| format!("{}\njob {job}", item_line(&v["item"])));
        return Ok(());
    }
    if !json_out {
        println!("item {item}: enabling protection (job {job})");
    }
    follow(c, job, Some(item), json_out)
}

pub fn resync(c: &Client, item: u64, watch: bool, full: bool, json_out: bool) -> anyhow::Result<()> {
    let v = c.call("POST", &format!("/v1/items/{item}/resync{}", if full { "?full=true" } else { "" }), None)?;
    let job = v["job"].as_u64().context("answer without job id")?;
    if !watch {
        print(&v, json_out, |v| format!("{}\njob {job}", item_line(&v["item"])));
        return Ok(());
    }
    if !json_out {
        println!("item {item}: resynchronizing (job {job})");
    }
    follow(c, job, None, json_out)
}

pub fn unprotect(c: &Client, item: u64, json_out: bool) -> anyhow::Result<()> {
    let v = c.call("DELETE", &format!("/v1/items/{item}"), None)?;
    print(&v, json_out, |v| format!("{}\njob {}", item_line(&v["item"]), v["job"]));
    Ok(())
}

/// Follows a job (and the item it enables) with a progress bar until it ends.
fn follow(c: &Client, job: u64, item: Option<u64>, json_out: bool) -> anyhow::Result<()> {
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
                if json_out {
                    println!("{}", serde_json::to_string_pretty(&j)?);
                }
                return Ok(());
            }
            Some("failed") => {
                bar.abandon();
                bail!("job {job} failed: {}", j["error"].as_str().unwrap_or("no reason given"));
            }
            _ => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

pub fn jobs(c: &Client, cmd: JobsCmd, json_out: bool) -> anyhow::Result<()> {
    let line = |j: &Value| {
        format!(
            "job {:<5} {:<20} {:<10} {:<10} {:>3}% {}",
            j["id"],
            j["kind"].as_str().unwrap_or_default(),
            j["target"].as_str().unwrap_or_default(),
            j["state"].as_str().unwrap_or_default(),
            j["progress"],
            j["error"].as_str().unwrap_or_default()
        )
    };
    match cmd {
        JobsCmd::List { state, kind, target } => {
            let mut q = Vec::new();
            for (k, v) in [("state", state), ("kind", kind), ("target", target)] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", v.replace(' ', "%20")));
                }
            }
            let path = if q.is_empty() { "/v1/jobs".to_string() } else { format!("/v1/jobs?{}", q.join("&")) };
            let v = c.call("GET", &path, None)?;
            print(&v, json_out, |v| rows(v, line));
        }
        JobsCmd::Show { id } => {
            let v = c.call("GET", &format!("/v1/jobs/{id}"), None)?;
            print(&v, json_out, |j| {
                let steps: Vec<String> = j["steps"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        format!(
                            "  - {:<44} {}",
                            s["name"].as_str().unwrap_or_default(),
                            s["state"].as_str().unwrap_or_default()
                        )
                    })
                    .collect();
                format!("{}\n{}", line(j), steps.join("\n"))
            });
        }
        JobsCmd::Watch { id } => follow(c, id, None, json_out)?,
    }
    Ok(())
}

pub fn events(c: &Client, json_out: bool) -> anyhow::Result<()> {
    let v = c.call("GET", "/v1/events", None)?;
    print(&v, json_out, |v| {
        rows(v, |e| {
            format!(
                "{} {:<8} {:<16} {}",
                e["time"],
                e["severity"].as_str().unwrap_or_default(),
                e["subject"].as_str().unwrap_or_default(),
                e["message"].as_str().unwrap_or_default()
            )
        })
    });
    Ok(())
}

pub fn points(c: &Client, item: u64, json_out: bool) -> anyhow::Result<()> {
    let v = c.call("GET", &format!("/v1/items/{item}/points"), None)?;
    print(&v, json_out, |v| {
        let mut out = Vec::new();
        for d in v["disks"].as_array().into_iter().flatten() {
            out.push(format!(
                "disk {}: points from {} (seq {}) to {} (seq {}); undo journal {} MiB",
                d["disk"],
                d["oldest_time"].as_str().unwrap_or("-"),
                d["oldest_seq"],
                d["latest_time"].as_str().unwrap_or("-"),
                d["latest_seq"],
                d["undo_bytes"].as_u64().unwrap_or(0) >> 20
            ));
            for w in d["inconsistent"].as_array().into_iter().flatten() {
                out.push(format!(
                    "  not crash-consistent after seq {} ({}) {} ({:.0} s): blocks copied in block order; \
                     latest resolves to before it",
                    w["begin_seq"],
                    w["begin_time"].as_str().unwrap_or("-"),
                    if w["open"] == true {
                        "until now".to_string()
                    } else {
                        format!("until seq {} ({})", w["end_seq"], w["end_time"].as_str().unwrap_or("-"))
                    },
                    w["seconds"].as_f64().unwrap_or(0.0)
                ));
            }
            for m in d["named"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|m| !matches!(m["kind"].as_str(), Some("inconsistent-begin" | "inconsistent-end")))
            {
                out.push(format!(
                    "  {:<28} {:<18} {:<30} seq {}",
                    m["time"].as_str().unwrap_or("-"),
                    m["kind"].as_str().unwrap_or("-"),
                    m["tag"].as_str().unwrap_or("-"),
                    m["seq"]
                ));
            }
        }
        out.join("\n")
    });
    Ok(())
}

pub fn test_failover(c: &Client, item: u64, point: &PointArgs, cleanup: bool, json_out: bool) -> anyhow::Result<()> {
    if cleanup {
        let v = c.call("POST", &format!("/v1/items/{item}/test-failover/cleanup"), None)?;
        print(&v, json_out, |v| format!("test failover of item {item} cleaned up (job {})", v["job"]));
        return Ok(());
    }
    let v = c.call("POST", &format!("/v1/items/{item}/test-failover"), Some(json!({ "point": point.spec() })))?;
    print(&v, json_out, |v| {
        let m = &v["machine"];
        let mut out = vec![format!(
            "test failover of item {item} is up (job {}): {} with {} CPUs, {} MiB",
            v["job"],
            m["name"].as_str().unwrap_or("-"),
            m["cpus"],
            m["memory_bytes"].as_u64().unwrap_or(0) >> 20
        )];
        for d in m["disks"].as_array().into_iter().flatten() {
            out.push(format!(
                "  disk {} {:<12} {}  at {} (seq {})",
                d["id"],
                d["name"].as_str().unwrap_or("-"),
                d["uri"].as_str().unwrap_or("-"),
                d["point_time"].as_str().unwrap_or("-"),
                d["point_seq"]
            ));
        }
        for n in m["network_interfaces"].as_array().into_iter().flatten() {
            out.push(format!(
                "  nic {} {} {}",
                n["name"].as_str().unwrap_or("-"),
                n["mac"].as_str().unwrap_or("-"),
                n["addresses"]
            ));
        }
        out.join("\n")
    });
    Ok(())
}

pub fn export(
    c: &Client,
    item: u64,
    disk: u64,
    path: &str,
    format: &str,
    point: &PointArgs,
    json_out: bool,
) -> anyhow::Result<()> {
    let body = json!({ "disk": disk, "path": path, "point": point.spec(), "format": format });
    let v = c.call("POST", &format!("/v1/items/{item}/export"), Some(body))?;
    let job = v["job"].as_u64().context("answer without job id")?;
    if !json_out {
        println!("exporting disk {disk} of item {item} to {path} (job {job})");
    }
    follow(c, job, None, json_out)
}

fn describe_machine(m: &Value) -> String {
    let mut out = vec![format!(
        "  machine {} with {} CPUs, {} MiB",
        m["name"].as_str().unwrap_or("-"),
        m["cpus"],
        m["memory_bytes"].as_u64().unwrap_or(0) >> 20
    )];
    for d in m["disks"].as_array().into_iter().flatten() {
        let at = d["uri"].as_str().or(d["path"].as_str()).unwrap_or("-");
        out.push(format!(
            "  disk {} {:<12} {at}  (seq {})",
            d["id"],
            d["name"].as_str().unwrap_or("-"),
            d["point_seq"]
        ));
    }
    for n in m["network_interfaces"].as_array().into_iter().flatten() {
        out.push(format!(
            "  nic {} {} {} on {}",
            n["name"].as_str().unwrap_or("-"),
            n["mac"].as_str().unwrap_or("-"),
            n["addresses"],
            n["networks"]
        ));
    }
    out.join("\n")
}

pub fn failover(
    c: &Client,
    item: u64,
    planned: bool,
    point: &PointArgs,
    change: bool,
    json_out: bool,
) -> anyhow::Result<()> {
    if change {
        let v = c.call("POST", &format!("/v1/items/{item}/failover/point"), Some(json!({ "point": point.spec() })))?;
        print(&v, json_out, |v| {
            format!("item {item}: disks up at the new point (job {})\n{}", v["job"], describe_machine(&v["machine"]))
        });
        return Ok(());
    }
    let mut body = json!({ "planned": planned });
    if !planned {
        body["point"] = point.spec();
    }
    let v = c.call("POST", &format!("/v1/items/{item}/failover"), Some(body))?;
    let job = v["job"].as_u64().context("answer without job id")?;
    if !json_out {
        println!("{} failover of item {item} (job {job})", if planned { "planned" } else { "unplanned" });
    }
    follow(c, job, Some(item), json_out)?;
    let i = c.call("GET", &format!("/v1/items/{item}"), None)?;
    if !json_out {
        println!("failed over; `srctl commit {item}` makes it final\n{}", describe_machine(&i["failover"]["machine"]));
    }
    Ok(())
}

pub fn commit(c: &Client, item: u64, json_out: bool) -> anyhow::Result<()> {
    let v = c.call("POST", &format!("/v1/items/{item}/commit"), None)?;
    print(&v, json_out, |v| {
        let mut out = vec![format!("failover of item {item} committed (job {})", v["job"])];
        for d in v["disks"].as_array().into_iter().flatten() {
            out.push(format!(
                "  disk {} is now {} ({} KiB rewritten at the commit)",
                d["disk"],
                d["path"].as_str().unwrap_or("-"),
                d["changed_bytes"].as_u64().unwrap_or(0) >> 10
            ));
        }
        out.push(format!("front them with an agent on this site, then `srctl reprotect {item} --machine NAME`"));
        out.join("\n")
    });
    Ok(())
}

pub fn reprotect(
    c: &Client,
    item: u64,
    machine: Option<String>,
    master_target: Option<String>,
    process_server: Option<String>,
    json_out: bool,
) -> anyhow::Result<()> {
    let body = json!({ "machine": machine, "master_target": master_target, "process_server": process_server });
    let v = c.call("POST", &format!("/v1/items/{item}/reprotect"), Some(body))?;
    let job = v["job"].as_u64().context("answer without job id")?;
    if !json_out {
        println!(
            "reprotect of item {item} (job {job}): {} -> {}",
            v["item"]["machine"].as_str().unwrap_or("-"),
            v["item"]["master_target"].as_str().unwrap_or("-")
        );
    }
    follow(c, job, Some(item), json_out)
}

pub fn failback(c: &Client, item: u64, json_out: bool) -> anyhow::Result<()> {
    let v = c.call("POST", &format!("/v1/items/{item}/failback"), None)?;
    let job = v["job"].as_u64().context("answer without job id")?;
    if !json_out {
        println!("failback of item {item} (job {job})");
    }
    follow(c, job, Some(item), json_out)
}

#[derive(clap::Subcommand)]
pub enum PlansCmd {
    List,
    /// Create a plan from a JSON file: {"name": .., "groups": [{"items": [1, 2], "pre": [{"script":
    /// {"command": "..", "timeout_secs": 60}}], "post": [{"manual": {"instruction": ".."}}]}]}
    Create {
        #[arg(long)]
        file: PathBuf,
    },
    Delete {
        plan: String,
    },
    /// Fail the whole plan over, group by group; follows the job.
    Failover {
        plan: String,
        #[arg(long, value_parser = ["test", "planned", "unplanned"])]
        kind: String,
        #[command(flatten)]
        point: PointArgs,
    },
    /// Continue a plan waiting at a manual action.
    Resume {
        plan: String,
    },
    /// Mark every machine of the plan at one consistent moment now.
    ConsistencyPoint {
        plan: String,
    },
}

pub fn plans(c: &Client, cmd: PlansCmd, json_out: bool) -> anyhow::Result<()> {
    match cmd {
        PlansCmd::List => {
            let v = c.call("GET", "/v1/plans", None)?;
            print(&v, json_out, |v| {
                rows(v, |p| {
                    format!(
                        "plan {} {:<20} {} group(s)",
                        p["id"].as_str().unwrap_or("-"),
                        p["name"].as_str().unwrap_or("-"),
                        p["groups"].as_array().map_or(0, |g| g.len())
                    )
                })
            });
        }
        PlansCmd::Create { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let body: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", file.display()))?;
            let v = c.call("POST", "/v1/plans", Some(body))?;
            print(&v, json_out, |v| {
                format!("plan {} created ({})", v["name"].as_str().unwrap_or("-"), v["id"].as_str().unwrap_or("-"))
            });
        }
        PlansCmd::Delete { plan } => {
            let v = c.call("DELETE", &format!("/v1/plans/{plan}"), None)?;
            print(&v, json_out, |_| format!("plan {plan} deleted"));
        }
        PlansCmd::Failover { plan, kind, point } => {
            let mut body = json!({ "kind": kind });
            if kind == "unplanned" && point.given() {
                body["point"] = point.spec();
            }
            let v = c.call("POST", &format!("/v1/plans/{plan}/failover"), Some(body))?;
            let job = v["job"].as_u64().context("answer without job id")?;
            if !json_out {
                println!(
                    "{kind} failover of plan {plan} (job {job}); a manual action waits for `srctl plans resume {plan}`"
                );
            }
            follow(c, job, None, json_out)?;
        }
        PlansCmd::Resume { plan } => {
            let v = c.call("POST", &format!("/v1/plans/{plan}/resume"), None)?;
            print(&v, json_out, |_| format!("plan {plan} resumed"));
        }
        PlansCmd::ConsistencyPoint { plan } => {
            let v = c.call("POST", &format!("/v1/plans/{plan}/consistency-point"), None)?;
            print(&v, json_out, |v| {
                format!("consistency point {} on every machine of plan {plan}", v["tag"].as_str().unwrap_or("-"))
            });
        }
    }
    Ok(())
}

#[derive(clap::Subcommand)]
pub enum NetMapCmd {
    List,
    /// Map a source network to a target network (addresses keep their host part unless a rule says).
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        source: String,
        #[arg(long)]
        target: String,
        #[arg(long, default_value = "")]
        target_network: String,
        #[arg(long)]
        gateway: Option<String>,
        /// SOURCE_IP=TARGET_IP, repeatable.
        #[arg(long = "rule")]
        rules: Vec<String>,
    },
    Delete {
        mapping: String,
    },
}

pub fn netmaps(c: &Client, cmd: NetMapCmd, json_out: bool) -> anyhow::Result<()> {
    match cmd {
        NetMapCmd::List => {
            let v = c.call("GET", "/v1/network-mappings", None)?;
            print(&v, json_out, |v| {
                rows(v, |m| {
                    format!(
                        "{} {:<16} {} -> {} ({})",
                        m["id"].as_str().unwrap_or("-"),
                        m["name"].as_str().unwrap_or("-"),
                        m["source"].as_str().unwrap_or("-"),
                        m["target"].as_str().unwrap_or("-"),
                        m["target_network"].as_str().unwrap_or("-")
                    )
                })
            });
        }
        NetMapCmd::Create { name, source, target, target_network, gateway, rules } => {
            let mut rs = Vec::new();
            for r in rules {
                let (a, b) = r.split_once('=').with_context(|| format!("--rule {r:?}: write SOURCE_IP=TARGET_IP"))?;
                rs.push(json!({ "source": a, "target": b }));
            }
            let body = json!({ "name": name, "source": source, "target": target, "target_network": target_network, "gateway": gateway, "rules": rs });
            let v = c.call("POST", "/v1/network-mappings", Some(body))?;
            print(&v, json_out, |v| {
                format!(
                    "network mapping {} created ({})",
                    v["name"].as_str().unwrap_or("-"),
                    v["id"].as_str().unwrap_or("-")
                )
            });
        }
        NetMapCmd::Delete { mapping } => {
            let v = c.call("DELETE", &format!("/v1/network-mappings/{mapping}"), None)?;
            print(&v, json_out, |_| format!("network mapping {mapping} deleted"));
        }
    }
    Ok(())
}
