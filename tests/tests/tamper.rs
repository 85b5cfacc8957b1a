//! Frames between process server and master target that were altered, truncated, replayed or
//! reordered: the real master target refuses each with a logged error and applies none of them.
//! This test plays the process server with the deployment's process-server certificate.

// Test code: a failed unwrap is a failed test, with its message.
#![allow(clippy::unwrap_used)]

use sr_common::seal::ItemKey;
use sr_common::tls::Identity;
use sr_common::types::{DiskId, ItemId, Seq};
use sr_common::wire::{self, Batch, Message, Op, Role, SealedBatch};
use sr_tests::*;

const SIZE: u64 = 8 << 20;

fn batch(first: u64, last: u64) -> Batch {
    let ops = (first..=last).map(|s| (s, Op::Write { offset: s * 65536, data: vec![s as u8; 4096] }));
    Batch::numbered(ItemId(1), DiskId(1), SIZE, Seq(first), ops)
}

fn seal(key: &ItemKey, b: &Batch) -> SealedBatch {
    let payload = sr_common::compress::compress(b, 3);
    key.seal(0, b.item, b.disk, b.disk_size, b.first, b.last, &payload)
}

struct Session {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    _conn: quinn::Connection,
}

async fn open(ep: &quinn::Endpoint, local: &Local) -> (Session, Seq) {
    let conn = sr_common::quic::connect(ep, local.addrs.mt_quic, Role::MasterTarget).await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    wire::write_msg(
        &mut send,
        &Message::Hello { version: wire::PROTOCOL_VERSION, role: Role::ProcessServer, node: "t".into() },
    )
    .await
    .unwrap();
    wire::check_hello(wire::expect_msg(&mut recv).await.unwrap(), Role::MasterTarget).unwrap();
    wire::write_msg(&mut send, &Message::Open { item: ItemId(1), disk: DiskId(1), disk_size: SIZE }).await.unwrap();
    let Message::Resume { next } = wire::expect_msg(&mut recv).await.unwrap() else { panic!("no Resume") };
    (Session { send, recv, _conn: conn }, next)
}

/// Sends raw frame bytes and expects the master target to refuse them with an error message.
async fn refused(ep: &quinn::Endpoint, local: &Local, frame: &[u8], what: &str) {
    let (mut s, _) = open(ep, local).await;
    s.send.write_all(frame).await.unwrap();
    let _ = s.send.finish();
    match wire::read_msg(&mut s.recv).await {
        Err(wire::WireError::Peer { message: msg, .. }) => eprintln!("{what}: refused: {msg}"),
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
    assert_eq!(tokio::task::block_in_place(|| local.applied(1)).unwrap(), 0, "{what}: nothing may be applied");
}

/// A static deployment of which only the master target will run.
fn master_target_only(dir: &std::path::Path) -> Local {
    let disk = dir.join("unused.img");
    make_disk(&disk, SIZE).unwrap();
    Local::create(&dir.join("dep"), vec![DiskSpec { id: 1, name: "d".into(), path: disk }], &Options::default())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn altered_truncated_replayed_and_reordered_frames_are_refused() {
    let dir = test_dir();
    let local = master_target_only(dir.path());
    let mt = tokio::task::block_in_place(|| local.start(Component::MasterTarget)).unwrap();
    let id = Identity::load(&local.tls("ps")).unwrap();
    let ep = sr_common::quic::client(&id).unwrap();
    let key = ItemKey::load(&local.key_file).unwrap();
    let b1 = seal(&key, &batch(1, 3));
    let b2 = seal(&key, &batch(4, 6));

    // Bit flips in the ciphertext, the nonce and every field bound into the associated data.
    let mut flips: Vec<(String, SealedBatch)> = Vec::new();
    for i in [0, b1.ciphertext.len() / 2, b1.ciphertext.len() - 1] {
        let mut t = b1.clone();
        t.ciphertext[i] ^= 0x10;
        flips.push((format!("ciphertext byte {i} flipped"), t));
    }
    let mut t = b1.clone();
    t.nonce[3] ^= 1;
    flips.push(("nonce flipped".into(), t));
    let mut t = b1.clone();
    t.last = Seq(2);
    flips.push(("last sequence number changed".into(), t));
    let mut t = b1.clone();
    t.disk_size ^= 1 << 20;
    flips.push(("disk size changed".into(), t));
    let mut t = b1.clone();
    t.ciphertext.truncate(t.ciphertext.len() - 7);
    flips.push(("ciphertext truncated".into(), t));
    let mut t = seal(&ItemKey::generate().1, &batch(1, 3));
    t.item = ItemId(1);
    flips.push(("sealed under another key".into(), t));
    let mut t = b1.clone();
    t.epoch = 1;
    flips.push(("key epoch changed (one the master target does not hold)".into(), t));
    for (what, t) in flips {
        refused(&ep, &local, &wire::encode(&Message::Sealed(t)), &what).await;
    }

    // Frame-level damage: a truncated frame, a flipped length prefix, garbage.
    let frame = wire::encode(&Message::Sealed(b1.clone()));
    refused(&ep, &local, &frame[..frame.len() / 2], "frame truncated").await;
    let mut f = frame.clone();
    f[3] ^= 0x80;
    refused(&ep, &local, &f, "length prefix flipped").await;
    let mut f = frame.clone();
    let n = f.len();
    f[n - 20] ^= 0xff;
    f[n - 60] ^= 0xff;
    refused(&ep, &local, &f, "archive bytes flipped").await;
    refused(&ep, &local, &[7u8; 64], "garbage").await;

    // Reordered: the second batch before the first.
    refused(&ep, &local, &wire::encode(&Message::Sealed(b2.clone())), "reordered").await;

    // The genuine first batch is applied once; replaying it changes nothing.
    let (mut s, next) = open(&ep, &local).await;
    assert_eq!(next, Seq(1));
    wire::write_msg(&mut s.send, &Message::Sealed(b1.clone())).await.unwrap();
    assert_eq!(wire::expect_msg(&mut s.recv).await.unwrap(), Message::AppliedAck { through: Seq(3) });
    wire::write_msg(&mut s.send, &Message::Sealed(b1.clone())).await.unwrap();
    assert_eq!(wire::expect_msg(&mut s.recv).await.unwrap(), Message::AppliedAck { through: Seq(3) });
    assert_eq!(tokio::task::block_in_place(|| local.applied(1)).unwrap(), 3);
    assert_eq!(
        tokio::task::block_in_place(|| check_apply_log(&local, 1)).unwrap(),
        3,
        "the replayed batch was not applied twice"
    );
    // Replay on a new session after a restart of the master target: still ignored.
    drop(s);
    mt.kill();
    let _mt = tokio::task::block_in_place(|| local.start(Component::MasterTarget)).unwrap();
    let (mut s, next) = open(&ep, &local).await;
    assert_eq!(next, Seq(4), "the applied position survived the crash");
    wire::write_msg(&mut s.send, &Message::Sealed(b1.clone())).await.unwrap();
    assert_eq!(wire::expect_msg(&mut s.recv).await.unwrap(), Message::AppliedAck { through: Seq(3) });
    assert_eq!(tokio::task::block_in_place(|| check_apply_log(&local, 1)).unwrap(), 3);

    // The replica holds exactly the first batch.
    let mut expect = vec![0u8; SIZE as usize];
    for sq in 1..=3u64 {
        expect[(sq * 65536) as usize..(sq * 65536 + 4096) as usize].fill(sq as u8);
    }
    assert!(std::fs::read(local.replica_path(1)).unwrap() == expect, "replica holds exactly batch 1..=3");

    // Every refusal was logged as an error and counted.
    let log = std::fs::read_to_string(local.log(Component::MasterTarget)).unwrap();
    assert!(log.matches("refused").count() >= 13, "master target log:\n{log}");
    let metrics = tokio::task::block_in_place(|| local.metrics(Component::MasterTarget)).unwrap();
    assert!(metrics.contains("sr_master_target_duplicate_batches_total 1"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_ca_and_wrong_role_are_refused() {
    let dir = test_dir();
    let local = master_target_only(dir.path());
    let _mt = tokio::task::block_in_place(|| local.start(Component::MasterTarget)).unwrap();
    // A certificate from another CA fails the handshake.
    let other = sr_common::tls::generate_deployment(&dir.path().join("other"), &[("ps", Role::ProcessServer)]).unwrap();
    let ep = sr_common::quic::client(&Identity::load(&other[0]).unwrap()).unwrap();
    assert!(sr_common::quic::connect(&ep, local.addrs.mt_quic, Role::MasterTarget).await.is_err());
    // An agent certificate of this deployment is not a process server: the connection is closed.
    let agent = Identity::load(&local.tls("agent")).unwrap();
    let ep = sr_common::quic::client(&agent).unwrap();
    let conn = sr_common::quic::connect(&ep, local.addrs.mt_quic, Role::MasterTarget).await.unwrap();
    let closed = tokio::time::timeout(std::time::Duration::from_secs(10), conn.closed()).await.unwrap();
    assert!(closed.to_string().contains("process-server role"), "{closed}");
}
