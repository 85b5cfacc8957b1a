//! Balancing by policy: with `auto_balance_secs` set, a process server that comes back from a drain
//! gets its share of items again without anyone asking, and the replicas stay byte-identical.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use serde_json::Value;
use sr_tests::*;
use std::time::Duration;

#[test]
fn a_resumed_process_server_gets_its_share_back_by_the_automatic_balance() {
    let dir = test_dir();
    let cp = ControlPlane::create_with(&dir.path().join("cp"), "auto_balance_secs = 1\n").unwrap();
    let d = Deployment::on(cp, dir.path());
    let mut sites = Vec::new();
    let mut procs = Vec::new();
    for s in ["a-", "b-"] {
        let disk = dir.path().join(format!("{s}source.img"));
        make_disk(&disk, 8 << 20).unwrap();
        let local = d.site(&dir.path().join(s), s, &disk);
        for c in [Component::MasterTarget, Component::ProcessServer, Component::Agent] {
            procs.push(local.start(c).unwrap());
        }
        sites.push((local, disk));
    }
    let items: Vec<u64> = sites.iter().map(|(l, _)| d.protect(&l.node(Component::Agent))).collect();
    let ps_of = |id: u64| d.item(id)["process_server"].as_str().unwrap_or_default().to_string();

    // Drained, a-ps-1 gives its items to b-ps-1: both there.
    let out = d.srctl(&["process-servers", "drain", "a-ps-1", "--watch"]);
    assert!(out.contains("caught up through") || out.contains("nothing to move"), "{out}");
    assert_eq!(items.iter().map(|i| ps_of(*i)).collect::<Vec<_>>(), vec!["b-ps-1", "b-ps-1"]);
    // While it drains, the automatic balance leaves it alone; resumed, it gets one item back.
    d.srctl(&["process-servers", "resume", "a-ps-1"]);
    wait_for("the automatic balance to move an item to a-ps-1", Duration::from_secs(60), || {
        items.iter().any(|i| ps_of(*i) == "a-ps-1")
    });
    let mut on: Vec<String> = items.iter().map(|i| ps_of(*i)).collect();
    on.sort();
    assert_eq!(on, vec!["a-ps-1", "b-ps-1"]);

    // Writes after the moves reach the replicas, wherever they are.
    for ((local, disk), item) in sites.iter().zip(&items) {
        qemu_io(&local.agent_uri("disk0"), &["write -P 0x6b 1M 2M".into(), "flush".into()]).unwrap();
        let i: Value = d.item(*item);
        let mt = i["master_target"].as_str().unwrap().to_string();
        let (holder, _) = sites.iter().find(|(l, _)| l.node(Component::MasterTarget) == mt).unwrap();
        let replica = holder.root.join("mt").join("replicas").join(format!("item-{}-disk-1.img", i["stream"]));
        wait_for(&format!("item {item}'s replica equal to its source"), Duration::from_secs(60), || {
            replica.exists() && compare(disk.to_str().unwrap(), replica.to_str().unwrap()).is_ok()
        });
    }
    drop(procs);
}
