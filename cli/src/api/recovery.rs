//! `srctl points`, `test-failover`, `export`, `failover`, `commit`, `reprotect`, `failback`.

use super::*;

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
    let mut j = follow_job(c, job, Some(item), json_out)?;
    let i = c.call("GET", &format!("/v1/items/{item}"), None)?;
    if json_out {
        // The job's record, with the machine description the text output shows.
        j["machine"] = i["failover"]["machine"].clone();
        println!("{}", serde_json::to_string_pretty(&j)?);
    } else {
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
