//! Traces leave by OTLP over HTTP when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` is set: a receiver
//! here gets the master target's `apply_batch` spans, flushed at a clean stop.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use sr_tests::*;
use std::time::Duration;

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
    let (addr, got) = http_receiver();
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
