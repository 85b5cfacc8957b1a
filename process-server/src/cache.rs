//! The process server's durable cache of one stream: each batch an agent sent, compressed and sealed
//! under the item's data key (so the cache is encrypted at rest), in its own file, fsynced before the
//! agent is told it is durable, deleted once the master target applied it.
//!
//! ```text
//! cache/item-1-disk-1/
//!   00000000000000000001-00000000000000000042.batch   "SRS1" + rkyv SealedBatch + crc32c (4 bytes LE)
//!   00000000000000000043-00000000000000000090.batch
//! ```
//!
//! A file without the tag is a plaintext batch written by a release before batches were sealed at
//! rest; it is still read (and sealed when it is forwarded).

use sr_common::compress;
use sr_common::seal::{ItemKeys, SealError};
use sr_common::types::Seq;
use sr_common::wire::{Batch, SealedBatch, WireError};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone)]
pub struct Entry {
    pub first: Seq,
    pub last: Seq,
    pub bytes: u64,
    pub path: PathBuf,
}

/// The bytes cached across all streams of a process server, checked against its cache limit, and a
/// wake-up for agent sessions held back until some of it is freed.
#[derive(Default)]
pub struct CacheSpace {
    used: AtomicU64,
    freed: tokio::sync::Notify,
}

impl CacheSpace {
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn add(&self, bytes: u64) {
        self.used.fetch_add(bytes, Ordering::Relaxed);
    }

    fn sub(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
        self.freed.notify_waiters();
    }

    /// Resolves once some space is freed after the call (create it before looking at [`Self::used`]).
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }
}

pub struct StreamCache {
    dir: PathBuf,
    /// Files by first sequence number.
    entries: Mutex<BTreeMap<Seq, Entry>>,
    /// Bytes cached across all streams of this process server (for the cache limit).
    total: Arc<CacheSpace>,
}

fn name(first: Seq, last: Seq) -> String {
    format!("{:020}-{:020}.batch", first.0, last.0)
}

fn parse(name: &str) -> Option<(Seq, Seq)> {
    let (a, b) = name.strip_suffix(".batch")?.split_once('-')?;
    Some((Seq(a.parse().ok()?), Seq(b.parse().ok()?)))
}

impl StreamCache {
    pub fn open(dir: &Path, total: Arc<CacheSpace>) -> std::io::Result<StreamCache> {
        std::fs::create_dir_all(dir)?;
        let mut entries = BTreeMap::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let n = e.file_name().to_string_lossy().into_owned();
            if n.ends_with(".tmp") {
                // A batch whose write was cut short was never acknowledged: drop it.
                std::fs::remove_file(e.path())?;
                continue;
            }
            if let Some((first, last)) = parse(&n) {
                let bytes = e.metadata()?.len();
                total.add(bytes);
                entries.insert(first, Entry { first, last, bytes, path: e.path() });
            }
        }
        Ok(StreamCache { dir: dir.to_path_buf(), entries: Mutex::new(entries), total })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Seq, Entry>> {
        self.entries.lock().expect("cache lock poisoned")
    }

    /// Highest sequence number cached.
    pub fn last(&self) -> Option<Seq> {
        self.lock().values().next_back().map(|e| e.last)
    }

    pub fn bytes(&self) -> u64 {
        self.lock().values().map(|e| e.bytes).sum()
    }

    /// Makes a sealed batch durable. Blocking (fsyncs).
    pub fn put(&self, batch: &SealedBatch) -> std::io::Result<()> {
        // Serialized on its own (rkyv lays it out for offset 0), then put behind the tag.
        let body =
            rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(batch, Vec::new()).map_err(std::io::Error::other)?;
        let crc = crc32c::crc32c_append(crc32c::crc32c(SEALED_TAG), &body).to_le_bytes();
        let path = self.dir.join(name(batch.first, batch.last));
        sr_common::crashsafe::write_file_parts(&path, &[SEALED_TAG, &body, &crc])?;
        let len = (SEALED_TAG.len() + body.len() + crc.len()) as u64;
        self.total.add(len);
        let entry = Entry { first: batch.first, last: batch.last, bytes: len, path };
        let mut g = self.lock();
        match g.get(&batch.first) {
            // A longer batch from the same point is cached already (an older session of the agent
            // finished writing after a newer one): it holds all of this one, keep it.
            Some(old) if old.last > entry.last => {
                drop(g);
                std::fs::remove_file(&entry.path)?;
                self.total.sub(entry.bytes);
            }
            _ => {
                if let Some(old) = g.insert(batch.first, entry.clone()) {
                    // The same point written again (a reconnecting agent): the new file replaces the
                    // old one, which is removed unless it had the very same name.
                    drop(g);
                    if old.path != entry.path {
                        std::fs::remove_file(&old.path)?;
                    }
                    self.total.sub(old.bytes);
                }
            }
        }
        Ok(())
    }

    /// The cached batch holding `seq`, or else the first one after it.
    pub fn find(&self, seq: Seq) -> Option<Entry> {
        let g = self.lock();
        if let Some((_, e)) = g.range(..=seq).next_back() {
            if e.last >= seq {
                return Some(e.clone());
            }
        }
        g.range(seq..).next().map(|(_, e)| e.clone())
    }

    /// Reads and validates a cached batch. Blocking.
    pub fn read(entry: &Entry) -> Result<Cached, WireError> {
        use std::io::Read;
        // Read behind PAD bytes, so a sealed batch's archive (after its 4-byte tag) starts 16-aligned
        // where it lies, and is validated there without another copy.
        let mut f = std::fs::File::open(&entry.path)?;
        let len = f.metadata()?.len() as usize;
        if len > sr_common::wire::MAX_FRAME + 64 {
            return Err(WireError::Malformed {
                len,
                reason: format!("cache file {}: larger than any batch", entry.path.display()),
            });
        }
        let mut buf = rkyv::util::AlignedVec::<16>::with_capacity(PAD + len);
        buf.resize(PAD + len, 0);
        f.read_exact(&mut buf[PAD..])?;
        decode_in(&buf, PAD, entry.first, entry.last, &entry.path)
    }
}

/// Bytes before a cache file's contents in [`StreamCache::read`]'s buffer.
const PAD: usize = 12;

/// What a cache file holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Cached {
    Sealed(SealedBatch),
    /// Written by a release that cached plaintext.
    Plain(Batch),
}

/// The first bytes of a sealed cache file.
const SEALED_TAG: &[u8; 4] = b"SRS1";

/// Compresses and seals a batch under the current epoch of `key`: what the cache holds and the
/// master target receives. Returns it with the batch's payload bytes before compression.
pub fn seal_batch(key: &ItemKeys, level: i32, mut batch: Batch) -> Result<(SealedBatch, u64), SealError> {
    let raw_bytes = batch.payload_bytes();
    compress::zero_writes_to_markers(&mut batch);
    let payload = compress::compress(&batch, level);
    Ok((key.seal_owned(batch.item, batch.disk, batch.disk_size, batch.first, batch.last, payload)?, raw_bytes))
}

/// Validates and decodes the bytes of a cache file named for `first..=last` (its `path` for errors):
/// checksum, rkyv validation, the batch's own checks, and the name.
pub fn decode(bytes: &[u8], first: Seq, last: Seq, path: &Path) -> Result<Cached, WireError> {
    let mut buf = rkyv::util::AlignedVec::<16>::with_capacity(PAD + bytes.len());
    buf.resize(PAD, 0);
    buf.extend_from_slice(bytes);
    decode_in(&buf, PAD, first, last, path)
}

/// [`decode`] of the file's bytes at `buf[pad..]`, where `pad + 4` is a multiple of 16.
fn decode_in(buf: &[u8], pad: usize, first: Seq, last: Seq, path: &Path) -> Result<Cached, WireError> {
    let bytes = &buf[pad..];
    let bad = |reason: &str| WireError::Malformed {
        len: bytes.len(),
        reason: format!("cache file {}: {reason}", path.display()),
    };
    if bytes.len() < 4 {
        return Err(bad("shorter than its checksum"));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(bad("checksum mismatch"));
    }
    if let Some(sealed) = body.strip_prefix(SEALED_TAG) {
        let b = rkyv::from_bytes::<SealedBatch, rkyv::rancor::Error>(sealed).map_err(|e| bad(&e.to_string()))?;
        if b.first != first || b.last != last || b.last < b.first {
            return Err(bad("contents do not match the file name"));
        }
        return Ok(Cached::Sealed(b));
    }
    // A plaintext batch from an older release: its archive starts at the file's first byte.
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    let batch = rkyv::from_bytes::<Batch, rkyv::rancor::Error>(&aligned).map_err(|e| bad(&e.to_string()))?;
    batch.check()?;
    if batch.first != first || batch.last != last {
        return Err(bad("contents do not match the file name"));
    }
    Ok(Cached::Plain(batch))
}

impl StreamCache {
    /// Deletes batches entirely at or below `through`. Blocking.
    pub fn drop_through(&self, through: Seq) -> std::io::Result<u64> {
        let gone: Vec<Entry> = {
            let mut g = self.lock();
            let keys: Vec<Seq> = g.values().filter(|e| e.last <= through).map(|e| e.first).collect();
            keys.into_iter().filter_map(|k| g.remove(&k)).collect()
        };
        let mut freed = 0;
        for e in &gone {
            std::fs::remove_file(&e.path)?;
            freed += e.bytes;
        }
        self.total.sub(freed);
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sr_common::types::{DiskId, ItemId};
    use sr_common::wire::Op;

    fn plain(first: u64, last: u64) -> Batch {
        let ops = (first..=last).map(|s| (s, Op::Write { offset: s * 512, data: vec![s as u8; 512] }));
        Batch::numbered(ItemId(1), DiskId(1), 1 << 20, Seq(first), ops)
    }

    fn key() -> ItemKeys {
        ItemKeys::single(sr_common::seal::ItemKey::from_bytes(&[7; 32]))
    }

    fn batch(first: u64, last: u64) -> SealedBatch {
        seal_batch(&key(), 3, plain(first, last)).unwrap().0
    }

    /// The batch a cached one holds, opened with the item key.
    fn opened(c: Cached) -> Batch {
        match c {
            Cached::Sealed(s) => compress::decompress(&key().open(&s).unwrap()).unwrap(),
            Cached::Plain(b) => b,
        }
    }

    #[test]
    fn the_cache_holds_no_plaintext_and_still_reads_plaintext_files_of_earlier_releases() {
        let d = tempfile::tempdir().unwrap();
        let c = StreamCache::open(d.path(), Arc::new(CacheSpace::default())).unwrap();
        c.put(&batch(1, 4)).unwrap();
        let bytes = std::fs::read(&c.find(Seq(1)).unwrap().path).unwrap();
        assert!(!bytes.windows(512).any(|w| w == [3u8; 512]), "a write's data is in the cache file in clear");
        assert_eq!(opened(StreamCache::read(&c.find(Seq(1)).unwrap()).unwrap()), plain(1, 4));
        // An earlier release's plaintext file.
        let mut old = rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(&plain(5, 6), Vec::new()).unwrap();
        old.extend_from_slice(&crc32c::crc32c(&old).to_le_bytes());
        let path = d.path().join(name(Seq(5), Seq(6)));
        std::fs::write(&path, &old).unwrap();
        assert_eq!(decode(&old, Seq(5), Seq(6), &path).unwrap(), Cached::Plain(plain(5, 6)));
    }

    #[test]
    fn put_find_read_drop_and_reopen() {
        let d = tempfile::tempdir().unwrap();
        let total = Arc::new(CacheSpace::default());
        let c = StreamCache::open(d.path(), total.clone()).unwrap();
        c.put(&batch(1, 4)).unwrap();
        c.put(&batch(5, 9)).unwrap();
        assert_eq!(c.last(), Some(Seq(9)));
        assert_eq!(c.find(Seq(6)).unwrap().first, Seq(5));
        assert_eq!(c.find(Seq(0)).unwrap().first, Seq(1));
        assert!(c.find(Seq(10)).is_none());
        assert_eq!(opened(StreamCache::read(&c.find(Seq(2)).unwrap()).unwrap()), plain(1, 4));
        let before = total.used();
        c.drop_through(Seq(4)).unwrap();
        assert!(total.used() < before);
        drop(c);
        let total2 = Arc::new(CacheSpace::default());
        let c = StreamCache::open(d.path(), total2).unwrap();
        assert_eq!(c.find(Seq(1)).unwrap().first, Seq(5));
    }

    #[test]
    fn writing_a_batch_again_does_not_count_it_twice() {
        let d = tempfile::tempdir().unwrap();
        let total = Arc::new(CacheSpace::default());
        let c = StreamCache::open(d.path(), total.clone()).unwrap();
        c.put(&batch(1, 4)).unwrap();
        let once = total.used();
        c.put(&batch(1, 4)).unwrap();
        assert_eq!(total.used(), once);
        c.drop_through(Seq(4)).unwrap();
        assert_eq!(total.used(), 0);
    }

    #[test]
    fn batches_from_the_same_point_of_two_sessions_leave_the_longer_and_no_orphan() {
        let d = tempfile::tempdir().unwrap();
        let total = Arc::new(CacheSpace::default());
        let c = StreamCache::open(d.path(), total.clone()).unwrap();
        // The newer session's longer batch lands first, the older session's shorter one after it.
        c.put(&batch(1, 8)).unwrap();
        c.put(&batch(1, 4)).unwrap();
        assert_eq!(c.find(Seq(6)).map(|e| (e.first, e.last)), Some((Seq(1), Seq(8))), "no hole at 5..=8");
        let files = || std::fs::read_dir(d.path()).unwrap().count();
        assert_eq!(files(), 1, "the shorter copy is not left behind");
        let one = total.used();
        // The other order: the longer replaces the shorter, whose file goes.
        c.put(&batch(9, 10)).unwrap();
        c.put(&batch(9, 12)).unwrap();
        assert_eq!(files(), 2);
        assert_eq!(c.find(Seq(12)).map(|e| e.last), Some(Seq(12)));
        c.drop_through(Seq(12)).unwrap();
        assert_eq!((files(), total.used()), (0, 0), "the count matches the files: {one}");
    }

    #[test]
    fn corrupt_file_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let c = StreamCache::open(d.path(), Arc::new(CacheSpace::default())).unwrap();
        c.put(&batch(1, 4)).unwrap();
        let e = c.find(Seq(1)).unwrap();
        let mut b = std::fs::read(&e.path).unwrap();
        b[10] ^= 1;
        std::fs::write(&e.path, b).unwrap();
        assert!(StreamCache::read(&e).is_err());
    }

    /// A small deterministic generator (xorshift), for mutations.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn damaged_cache_bytes_are_errors_never_panics_or_wrong_batches() {
        let d = tempfile::tempdir().unwrap();
        let c = StreamCache::open(d.path(), Arc::new(CacheSpace::default())).unwrap();
        c.put(&batch(1, 4)).unwrap();
        let e = c.find(Seq(1)).unwrap();
        let good = std::fs::read(&e.path).unwrap();
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..3000 {
            let mut b = good.clone();
            for _ in 0..1 + next(&mut state) % 4 {
                let i = (next(&mut state) % b.len() as u64) as usize;
                b[i] ^= 1 << (next(&mut state) % 8);
            }
            if round % 2 == 0 {
                // With a valid checksum over the damage, so the rkyv validation is what must hold.
                let body = b.len() - 4;
                let crc = crc32c::crc32c(&b[..body]).to_le_bytes();
                b[body..].copy_from_slice(&crc);
            }
            if round % 7 == 0 {
                b.truncate((next(&mut state) % b.len() as u64) as usize);
            }
            match decode(&b, Seq(1), Seq(4), &e.path) {
                // Damage that survives decoding fails the seal's authentication, or is none at all.
                Ok(Cached::Sealed(s)) => {
                    assert_eq!((s.first, s.last), (Seq(1), Seq(4)));
                    if let Ok(p) = key().open(&s) {
                        assert_eq!(compress::decompress(&p).unwrap(), plain(1, 4));
                    }
                }
                Ok(Cached::Plain(got)) => {
                    got.check().unwrap();
                    assert_eq!((got.first, got.last), (Seq(1), Seq(4)));
                }
                Err(_) => {}
            }
        }
    }
}
