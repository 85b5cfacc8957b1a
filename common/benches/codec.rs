//! Throughput of the per-byte work on the data path, one 4 MiB batch at a time: wire framing,
//! compression, sealing. `cargo bench -p sr-common --bench codec`; prints MiB/s per stage.

use rand::{RngCore, SeedableRng};
use sr_common::compress;
use sr_common::seal::ItemKey;
use sr_common::types::{DiskId, ItemId, Seq};
use sr_common::wire::{self, Batch, Message, Op};
use std::hint::black_box;
use std::time::{Duration, Instant};

const BATCH: usize = 4 << 20;

fn batch(mut data_of: impl FnMut(usize) -> Vec<u8>) -> Batch {
    let ops = (0..64).map(|i| (0, Op::Write { offset: (i * 65536) as u64, data: data_of(i) }));
    Batch::numbered(ItemId(1), DiskId(1), 1 << 30, Seq(1), ops)
}

/// Runs `f` for about a second and prints the rate over `bytes` per call.
fn measure(name: &str, bytes: usize, mut f: impl FnMut()) {
    f();
    let start = Instant::now();
    let mut n = 0u32;
    while start.elapsed() < Duration::from_secs(1) {
        f();
        n += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{name:<44} {:>8.0} MiB/s", (bytes as f64 * n as f64) / secs / (1 << 20) as f64);
}

fn main() {
    sr_common::service::tune_allocator(sr_common::service::KEEP_FREE_BYTES);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let random = batch(|_| {
        let mut v = vec![0u8; 65536];
        rng.fill_bytes(&mut v);
        v
    });
    let text = batch(|i| {
        format!("line {i} of a log file with some repeated words\n").into_bytes().repeat(2000)[..65536].to_vec()
    });
    let (_, key) = ItemKey::generate();

    let frame = wire::encode(&Message::Batch(random.clone()));
    measure("wire encode (4 MiB batch)", BATCH, || {
        black_box(wire::encode(&Message::Batch(black_box(&random).clone())));
    });
    measure("wire decode + validate", BATCH, || {
        black_box(wire::decode(&frame[4..]).expect("valid frame"));
    });
    for (name, b) in [("random", &random), ("text", &text)] {
        let payload = compress::compress(b, compress::DEFAULT_LEVEL);
        println!("{name}: compressed to {:.2}% of the raw batch", 100.0 * payload.len() as f64 / BATCH as f64);
        measure(&format!("compress level {} ({name})", compress::DEFAULT_LEVEL), BATCH, || {
            black_box(compress::compress(black_box(b), compress::DEFAULT_LEVEL));
        });
        measure(&format!("decompress + validate ({name})"), BATCH, || {
            black_box(compress::decompress(black_box(&payload)).expect("valid payload"));
        });
    }
    let payload = compress::compress(&random, compress::DEFAULT_LEVEL);
    let sealed = key.seal(0, ItemId(1), DiskId(1), 1 << 30, Seq(1), Seq(64), &payload);
    measure("seal AES-256-GCM", payload.len(), || {
        black_box(key.seal(0, ItemId(1), DiskId(1), 1 << 30, Seq(1), Seq(64), black_box(&payload)));
    });
    measure("open AES-256-GCM", payload.len(), || {
        black_box(key.open(black_box(&sealed)).expect("authentic"));
    });
    measure("crc32c", BATCH, || {
        black_box(crc32c::crc32c(black_box(&frame)));
    });
}
