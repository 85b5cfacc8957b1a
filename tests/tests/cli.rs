//! srctl's own process handling: the services `srctl local` starts stop when it gets SIGTERM (as on
//! Ctrl-C), and die with it when it is killed outright.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use sr_tests::*;
use std::io::BufRead;
use std::time::Duration;

/// Starts `srctl local` on one disk under `dir`; the process and the endpoints it printed.
fn srctl_local(dir: &std::path::Path) -> (std::process::Child, serde_json::Value) {
    std::fs::create_dir_all(dir).unwrap();
    let disk = dir.join("disk.img");
    make_disk(&disk, 8 << 20).unwrap();
    let mut child = std::process::Command::new(sr_devkit::bin_dir().join("srctl"))
        .args(["local", "--dir"])
        .arg(dir.join("dep"))
        .arg("--disk")
        .arg(format!("disk0={}", disk.display()))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    (child, serde_json::from_str(&line).unwrap_or_else(|e| panic!("srctl local printed {line:?}: {e}")))
}

/// Whether any of the three services still answers.
fn any_up(dir: &std::path::Path, endpoints: &serde_json::Value) -> bool {
    let ca = dir.join("dep").join("certs").join("ca.pem");
    [(Component::Agent, "agent_http"), (Component::ProcessServer, "ps_http"), (Component::MasterTarget, "mt_http")]
        .iter()
        .any(|(c, k)| sr_devkit::healthy(*c, endpoints[k].as_str().unwrap().parse().unwrap(), &ca))
}

#[test]
fn srctl_local_stops_its_services_on_sigterm_and_they_die_with_it_when_killed() {
    let dir = test_dir();
    // SIGTERM: a clean stop of every service, and a clean exit.
    let (mut child, endpoints) = srctl_local(&dir.path().join("a"));
    assert!(any_up(&dir.path().join("a"), &endpoints));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert!(status.success(), "srctl local exited with {status} on SIGTERM");
    assert!(!any_up(&dir.path().join("a"), &endpoints), "a service outlived srctl local's SIGTERM");

    // SIGKILL: srctl gets no say; its services are told by the kernel and stop.
    let (mut child, endpoints) = srctl_local(&dir.path().join("b"));
    child.kill().unwrap();
    child.wait().unwrap();
    wait_for("the services of a killed srctl local to stop", Duration::from_secs(30), || {
        !any_up(&dir.path().join("b"), &endpoints)
    });
}
