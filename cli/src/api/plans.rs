//! `srctl plans` and `network-mappings`.

use super::*;

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
