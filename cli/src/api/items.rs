//! `srctl items`, `protect`, `resync`, `unprotect`: replicated items and their protection.

use super::*;

#[derive(Subcommand)]
pub enum ItemsCmd {
    List,
    Show { id: u64 },
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
