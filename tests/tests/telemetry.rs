//! Traces leave by OTLP over HTTP when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` is set: a receiver
//! here gets the master target's `apply_batch` spans, flushed at a clean stop.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use sr_tests::*;
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Accepts HTTP requests and keeps their raw bytes.
fn receiver() -> (std::net::SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let g = g.clone();
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 65536];
                loop {
                    let n = s.read(&mut buf).unwrap_or(0);
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).to_string();
                    let need = text.split_once("\r\n\r\n").map(|(head, _)| {
                        let len = head
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                            })
                            .and_then(|v| v.parse::<usize>().ok())
                            .unwrap_or(0);
                        head.len() + 4 + len
                    });
                    if n == 0 || need.is_some_and(|need| req.len() >= need) {
                        break;
                    }
                }
                g.lock().unwrap().push(req);
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            });
        }
    });
    (addr, got)
}

#[test]
fn master_target_spans_reach_an_otlp_receiver() {
    let dir = test_dir();
    let disk = dir.path().join("source.img");
    make_disk(&disk, 16 << 20).unwrap();
    let local = Local::create(
        &dir.path().join("dep"),
        vec![DiskSpec { id: 1, name: "d".into(), path: disk }],
        &Options::default(),
    )
    .unwrap();
    let (addr, got) = receiver();
    let endpoint = format!("http://{addr}");
    let mt = local
        .start_env(
            Component::MasterTarget,
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint), ("OTEL_BSP_SCHEDULE_DELAY", "200")],
        )
        .unwrap();
    let _ps = local.start(Component::ProcessServer).unwrap();
    let _agent = local.start(Component::Agent).unwrap();
    run("qemu-io", &["-f", "raw", "-c", "write -P 0x33 0 1M", "-c", "flush", &local.agent_uri("d")]).unwrap();
    wait_caught_up(&local, Duration::from_secs(60)).unwrap();
    mt.stop().unwrap();
    let reqs = got.lock().unwrap().clone();
    let traces: Vec<&Vec<u8>> = reqs.iter().filter(|r| r.starts_with(b"POST /v1/traces")).collect();
    assert!(
        !traces.is_empty(),
        "no OTLP request: {:?}",
        reqs.iter().map(|r| String::from_utf8_lossy(&r[..r.len().min(200)]).to_string()).collect::<Vec<_>>()
    );
    let body: Vec<u8> = traces.iter().flat_map(|r| r.iter().copied()).collect();
    let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"application/x-protobuf"), "OTLP over HTTP carries protobuf");
    assert!(has(b"apply_batch"), "the apply_batch span was exported");
    assert!(has(b"master-target"), "the service name was exported");
}
