//! Compression of a batch before it is sealed.
//!
//! ```text
//! Batch --zero writes become Zero markers--> rkyv bytes --zstd (or raw if it does not help)--> payload
//! payload = [codec u8][uncompressed length u32 LE][body]
//! ```
//!
//! Incompressible data passes raw so it costs no more than its size plus five bytes; a write made only
//! of zeroes becomes a `Zero` marker of a few bytes. Decompression is bounded by the frame limit, so a
//! forged length cannot make us allocate without end.

use crate::wire::{Batch, Op, WireError, MAX_FRAME};
use rkyv::rancor;
use rkyv::util::AlignedVec;

const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;
/// Level 1: on the shared cores of a process server, speed matters more than the last few percent.
pub const DEFAULT_LEVEL: i32 = 1;
/// Bytes of a batch tried first; when they do not shrink by an eighth the batch is sent raw.
const SAMPLE: usize = 64 * 1024;

/// Turns writes made only of zeroes into zero markers (same effect on the replica, no payload).
pub fn zero_writes_to_markers(batch: &mut Batch) -> u64 {
    let mut saved = 0;
    for c in &mut batch.changes {
        if let Op::Write { offset, data } = &c.op {
            if is_zero(data) {
                saved += data.len() as u64;
                c.op = Op::Zero { offset: *offset, len: data.len() as u64 };
            }
        }
    }
    saved
}

pub fn is_zero(buf: &[u8]) -> bool {
    let chunks = buf.chunks_exact(16);
    chunks.remainder().iter().all(|b| *b == 0)
        && chunks.into_iter().all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
}

/// Encodes a batch into a compressed payload.
pub fn compress(batch: &Batch, level: i32) -> Vec<u8> {
    let raw = rkyv::api::high::to_bytes_in::<_, rancor::Error>(batch, Vec::with_capacity(batch.size_hint()))
        .expect("serializing into memory cannot fail");
    // Compressing incompressible data costs as much CPU as compressing anything else: try a sample of
    // the data first (past the archive's first bytes, which are mostly headers).
    let sample_from = raw.len().saturating_sub(SAMPLE).min(4096);
    let sample = &raw[sample_from..(sample_from + SAMPLE).min(raw.len())];
    let pack = |z: &mut zstd::bulk::Compressor<'static>| {
        let worth_it =
            raw.len() <= 2 * SAMPLE || z.compress(sample).is_ok_and(|c| c.len() < sample.len() - sample.len() / 8);
        worth_it.then(|| z.compress(&raw).ok()).flatten().filter(|c| c.len() + 64 < raw.len())
    };
    let packed = if level <= KEEP_CONTEXT_UP_TO {
        ZSTD.with(|z| {
            let mut z = z.borrow_mut();
            let z = match &mut *z {
                Some((l, c)) if *l == level => c,
                slot => &mut slot.insert((level, zstd::bulk::Compressor::new(level).ok()?)).1,
            };
            pack(z)
        })
    } else {
        zstd::bulk::Compressor::new(level).ok().and_then(|mut z| pack(&mut z))
    };
    let (codec, body) = match &packed {
        Some(z) => (CODEC_ZSTD, z),
        None => (CODEC_RAW, &raw),
    };
    // Room for the seal's tag too, so sealing in place does not move the payload again.
    let mut out = Vec::with_capacity(5 + body.len() + TAG_ROOM);
    out.push(codec);
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Bytes an AES-GCM tag appends to a sealed payload.
const TAG_ROOM: usize = 16;

/// Levels whose compression context a thread keeps between batches. Higher levels' contexts take tens
/// of MiB each, and a process server may run many blocking threads: those are made per batch.
const KEEP_CONTEXT_UP_TO: i32 = 3;

thread_local! {
    /// One compression context a thread (and level), kept between batches: making one costs more than
    /// compressing a small batch.
    static ZSTD: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
}

/// Decodes a payload made by [`compress`], validating everything.
pub fn decompress(payload: &[u8]) -> Result<Batch, WireError> {
    let bad = |reason: String| WireError::Malformed { len: payload.len(), reason };
    if payload.len() < 5 {
        return Err(bad("payload shorter than its header".into()));
    }
    let codec = payload[0];
    let raw_len = u32::from_le_bytes(payload[1..5].try_into().expect("4 bytes")) as usize;
    if raw_len > MAX_FRAME {
        return Err(bad(format!("declared size {raw_len} exceeds the frame limit")));
    }
    let body = &payload[5..];
    let mut aligned = AlignedVec::<16>::with_capacity(raw_len);
    match codec {
        CODEC_RAW => {
            if body.len() != raw_len {
                return Err(bad(format!("raw body of {} bytes, header says {raw_len}", body.len())));
            }
            aligned.extend_from_slice(body);
        }
        CODEC_ZSTD => {
            let raw = zstd::bulk::decompress(body, raw_len).map_err(|e| bad(format!("zstd: {e}")))?;
            if raw.len() != raw_len {
                return Err(bad(format!("zstd gave {} bytes, header says {raw_len}", raw.len())));
            }
            aligned.extend_from_slice(&raw);
        }
        other => return Err(bad(format!("unknown codec {other}"))),
    }
    rkyv::from_bytes::<Batch, rancor::Error>(&aligned).map_err(|e| bad(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{DiskId, ItemId, Seq};

    fn batch(data: Vec<u8>) -> Batch {
        Batch::numbered(ItemId(1), DiskId(1), 1 << 30, Seq(1), [(0, Op::Write { offset: 0, data })])
    }

    #[test]
    fn compressible_round_trip_shrinks() {
        let b = batch(b"abcdefgh".repeat(4096));
        let p = compress(&b, DEFAULT_LEVEL);
        assert_eq!(p[0], CODEC_ZSTD);
        assert!(p.len() < 4096);
        assert_eq!(decompress(&p).unwrap(), b);
    }

    #[test]
    fn every_level_round_trips_with_kept_and_fresh_contexts_in_any_order() {
        let b = batch(b"abcdefgh".repeat(4096));
        for level in [1, 19, 1, 3, 2, 9, 1] {
            let p = compress(&b, level);
            assert_eq!(p[0], CODEC_ZSTD, "level {level}");
            assert!(p.len() < 4096, "level {level}");
            assert_eq!(decompress(&p).unwrap(), b, "level {level}");
            assert!(p.capacity() >= p.len() + TAG_ROOM, "room for the seal's tag");
        }
    }

    #[test]
    fn incompressible_passes_raw() {
        use rand::RngCore;
        let mut data = vec![0u8; 65536];
        rand::thread_rng().fill_bytes(&mut data);
        let b = batch(data);
        let p = compress(&b, DEFAULT_LEVEL);
        assert_eq!(p[0], CODEC_RAW);
        assert_eq!(decompress(&p).unwrap(), b);
    }

    #[test]
    fn large_batches_are_sampled() {
        use rand::RngCore;
        let mut data = vec![0u8; 1 << 20];
        rand::thread_rng().fill_bytes(&mut data);
        let b = batch(data);
        let p = compress(&b, DEFAULT_LEVEL);
        assert_eq!(p[0], CODEC_RAW, "random data is not compressed");
        assert_eq!(decompress(&p).unwrap(), b);
        let b = batch(b"0123456789abcdef".repeat(1 << 16));
        let p = compress(&b, DEFAULT_LEVEL);
        assert_eq!(p[0], CODEC_ZSTD);
        assert_eq!(decompress(&p).unwrap(), b);
    }

    #[test]
    fn zero_writes_become_markers() {
        let mut b = batch(vec![0; 1 << 20]);
        assert_eq!(zero_writes_to_markers(&mut b), 1 << 20);
        assert_eq!(b.changes[0].op, Op::Zero { offset: 0, len: 1 << 20 });
        let mut b = batch(vec![0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(zero_writes_to_markers(&mut b), 0);
    }

    #[test]
    fn forged_headers_are_errors() {
        let b = batch(b"x".repeat(100000));
        let mut p = compress(&b, DEFAULT_LEVEL);
        p[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decompress(&p).is_err());
        let mut p = compress(&b, DEFAULT_LEVEL);
        p[0] = 9;
        assert!(decompress(&p).is_err());
        assert!(decompress(&[1, 2]).is_err());
    }
}
