//! `srctl jobs` and `events`: what the configuration server did.

use super::*;

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
