//! `srctl policies`: replication policies.

use super::*;

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
