//! Two sites joined by an emulated WAN (`sr_devkit::netns`): each component in its own network
//! namespace, the sites' traffic through a userspace link with latency, loss, a bandwidth cap and
//! partitions. Skipped, with the reason printed, where network namespaces cannot be made.

use sr_devkit::netns::{Site, Topology};
use sr_devkit::wan::Impairment;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn topology_or_skip() -> bool {
    match Topology::available() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("SKIPPED: two-site tests need network namespaces: {why}");
            false
        }
    }
}

/// The link itself: a TCP round trip across it takes the latency asked, a partition stops
/// everything, healing it lets the same connection go on.
#[test]
fn wan_link_delays_and_partitions() {
    if !topology_or_skip() {
        return;
    }
    let wan = Impairment::wan(Duration::from_millis(40), 0.0, Some(100));
    let topo = Topology::create(&[("a1", Site::A), ("b1", Site::B)], wan, 1).unwrap();
    let b = topo.host("b1").v4;
    let server = topo.spawn_in("b1", move || {
        let l = std::net::TcpListener::bind((b, 7000)).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 1];
        while s.read_exact(&mut buf).is_ok() {
            s.write_all(&buf).unwrap();
        }
    });
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (rtx, rrx) = std::sync::mpsc::channel::<Duration>();
    let client = topo.spawn_in("a1", move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut s = loop {
            match std::net::TcpStream::connect((b, 7000)) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("connecting across the WAN: {e}"),
            }
        };
        s.set_nodelay(true).unwrap();
        let mut buf = [0u8; 1];
        while rx.recv().is_ok() {
            let t = Instant::now();
            s.write_all(b"x").unwrap();
            s.read_exact(&mut buf).unwrap();
            rtx.send(t.elapsed()).unwrap();
        }
    });
    let mut rtts = Vec::new();
    for _ in 0..5 {
        tx.send(()).unwrap();
        rtts.push(rrx.recv().unwrap());
    }
    eprintln!("round trips {rtts:?}");
    assert!(rtts.iter().all(|r| *r >= Duration::from_millis(40)), "{rtts:?}");
    topo.wan.set_partitioned(true);
    tx.send(()).unwrap();
    assert!(rrx.recv_timeout(Duration::from_secs(2)).is_err(), "an answer crossed a partitioned link");
    topo.wan.set_partitioned(false);
    let late = rrx.recv_timeout(Duration::from_secs(30)).expect("the connection went on after healing");
    eprintln!("round trip across the partition {late:?}");
    drop(tx);
    client.join().unwrap().unwrap();
    server.join().unwrap().unwrap();
    let c = topo.wan.counters();
    assert!(c[0].partitioned > 0 && c[0].frames > 10, "{c:?}");
}
