//! `srctl items`, `protect`, `resync`, `unprotect`: replicated items and their protection.

use super::*;

#[derive(Subcommand)]
pub enum ItemsCmd {
    List,
    Show {
        id: u64,
    },
    /// Moves an item to another process server (with no loss: the agent sends the new one whatever
    /// the old one had not forwarded).
    Move {
        id: u64,
        /// The process server to move to. Default: the least busy other one.
        #[arg(long)]
        to: Option<String>,
        /// Follow the move until the replica caught up through the new process server.
        #[arg(long)]
        watch: bool,
    },
}

/// Process servers: drain one before removing it, balance items after adding one.
#[derive(clap::Subcommand, Debug)]
pub enum ProcessServersCmd {
    /// Gives a process server no new items and moves its items to the others (before scaling down).
    Drain {
        name: String,
        /// Follow the moves until each item caught up through its new process server.
        #[arg(long)]
        watch: bool,
    },
    /// Ends a drain: the process server takes new items again.
    Resume { name: String },
    /// Moves items from the busiest process servers to the least busy (after scaling out).
    Balance {
        #[arg(long)]
        watch: bool,
    },
}

/// Prints the moves an answer lists and, with `watch`, follows each job to its end.
fn moves(c: &Client, v: &Value, watch: bool, json_out: bool) -> anyhow::Result<()> {
    let list = v["moves"].as_array().context("answer without moves")?;
    if !watch || json_out {
        print(v, json_out, |_| {
            if list.is_empty() {
                return "nothing to move".to_string();
            }
            rows(&v["moves"], |m| {
                format!("item {:<4} {} -> {}  job {}", m["item"], str_of(&m["from"]), str_of(&m["to"]), m["job"])
            })
        });
        if !watch {
            return Ok(());
        }
    }
    if list.is_empty() && !json_out {
        println!("nothing to move");
    }
    for m in list {
        let job = m["job"].as_u64().context("a move without job id")?;
        if !json_out {
            println!("item {}: {} -> {} (job {job})", m["item"], str_of(&m["from"]), str_of(&m["to"]));
        }
        follow_job(c, job, m["item"].as_u64(), json_out)?;
        if !json_out {
            println!("item {}: caught up through {}", m["item"], str_of(&m["to"]));
        }
    }
    Ok(())
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

pub fn process_servers(c: &Client, cmd: ProcessServersCmd, json_out: bool) -> anyhow::Result<()> {
    match cmd {
        ProcessServersCmd::Drain { name, watch } => {
            let v = c.call("POST", &format!("/v1/process-servers/{name}/drain"), None)?;
            moves(c, &v, watch, json_out)
        }
        ProcessServersCmd::Resume { name } => {
            let v = c.call("POST", &format!("/v1/process-servers/{name}/resume"), None)?;
            print(&v, json_out, |_| format!("process server {name} takes new items again"));
            Ok(())
        }
        ProcessServersCmd::Balance { watch } => {
            let v = c.call("POST", "/v1/process-servers/balance", None)?;
            moves(c, &v, watch, json_out)
        }
    }
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
        ItemsCmd::Move { id, to, watch } => {
            let body = json!({ "process_server": to });
            let v = c.call("POST", &format!("/v1/items/{id}/move"), Some(body))?;
            return moves(c, &v, watch, json_out);
        }
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
