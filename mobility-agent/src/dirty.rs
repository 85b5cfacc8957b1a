//! A persistent dirty-block bitmap: which blocks of a disk the replica may lack. It takes over from the
//! journal when the journal reaches its limit, and holds the result of a checksum comparison; the
//! blocks it names are later copied into the journal (read under the disk's lock, like the initial
//! copy) and shipped. Its size is bounded by the disk's: one bit per block.
//!
//! ```text
//! dirty-D.map = magic "SRD1" | block size u32 | disk size u64 | words (u64 LE, bit b = block b)
//! ```
//! A bit set for a write is durable (written and fdatasynced) before the write reaches the disk, so a
//! crash can never leave a changed block the replica is not told about. Cleared bits are written when
//! the journal holding their copies is durable ([`DirtyMap::persist`]); a crash before then only means
//! the block is copied again.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"SRD1";
const HEADER: u64 = 16;

pub struct DirtyMap {
    path: PathBuf,
    file: File,
    block: u64,
    blocks: u64,
    words: Vec<u64>,
    count: u64,
}

impl DirtyMap {
    /// Opens the map at `path` for a disk of `disk_size` bytes, creating an empty one when missing.
    pub fn open(path: &Path, disk_size: u64, block: u64) -> anyhow::Result<DirtyMap> {
        use anyhow::Context;
        anyhow::ensure!(
            block >= 512 && block.is_power_of_two(),
            "dirty block size {block} must be a power of two >= 512"
        );
        let blocks = disk_size.div_ceil(block);
        let nwords = blocks.div_ceil(64) as usize;
        let exists = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening dirty map {}", path.display()))?;
        let mut words = vec![0u64; nwords];
        if exists {
            let mut head = [0u8; HEADER as usize];
            file.read_exact_at(&mut head, 0).with_context(|| format!("reading {}", path.display()))?;
            let (b, size) = (
                u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")) as u64,
                u64::from_le_bytes(head[8..16].try_into().expect("8 bytes")),
            );
            anyhow::ensure!(
                &head[0..4] == MAGIC && b == block && size == disk_size,
                "dirty map {} is for another disk or block size ({b} bytes, disk {size}); the disk needs a full resync",
                path.display()
            );
            let mut raw = vec![0u8; nwords * 8];
            file.read_exact_at(&mut raw, HEADER).with_context(|| format!("reading {}", path.display()))?;
            for (w, c) in words.iter_mut().zip(raw.chunks_exact(8)) {
                *w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            }
        } else {
            let mut head = Vec::with_capacity(HEADER as usize);
            head.extend_from_slice(MAGIC);
            head.extend_from_slice(&(block as u32).to_le_bytes());
            head.extend_from_slice(&disk_size.to_le_bytes());
            file.write_all_at(&head, 0)?;
            file.set_len(HEADER + nwords as u64 * 8)?;
            file.sync_all()?;
            if let Some(dir) = path.parent() {
                sr_common::crashsafe::fsync_dir(dir)?;
            }
        }
        let count = words.iter().map(|w| w.count_ones() as u64).sum();
        Ok(DirtyMap { path: path.to_path_buf(), file, block, blocks, words, count })
    }

    pub fn block(&self) -> u64 {
        self.block
    }

    /// Dirty blocks.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn dirty_bytes(&self) -> u64 {
        self.count * self.block
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Marks the blocks of `offset..offset+len` dirty, durably when any was clean.
    pub fn mark(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let (first, last) = (offset / self.block, ((offset + len).div_ceil(self.block)).min(self.blocks));
        let mut changed = false;
        for b in first..last {
            let (w, bit) = ((b / 64) as usize, 1u64 << (b % 64));
            if self.words[w] & bit == 0 {
                self.words[w] |= bit;
                self.count += 1;
                changed = true;
            }
        }
        if changed {
            let (w0, w1) = ((first / 64) as usize, ((last - 1) / 64) as usize);
            let bytes: Vec<u8> = self.words[w0..=w1].iter().flat_map(|w| w.to_le_bytes()).collect();
            self.file.write_all_at(&bytes, HEADER + w0 as u64 * 8)?;
            self.file.sync_data()?;
        }
        Ok(())
    }

    /// Marks every block dirty (the history is lost: everything must be compared or copied).
    pub fn mark_all(&mut self) -> std::io::Result<()> {
        self.mark(0, self.blocks * self.block)
    }

    /// The first run of dirty blocks at or after block `from`, at most `max` blocks: (first, count).
    pub fn next_run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        let mut b = from;
        while b < self.blocks {
            let w = self.words[(b / 64) as usize] >> (b % 64);
            if w == 0 {
                b = (b / 64 + 1) * 64;
                continue;
            }
            b += w.trailing_zeros() as u64;
            break;
        }
        if b >= self.blocks {
            return None;
        }
        let mut n = 0;
        while b + n < self.blocks && n < max && self.is_dirty(b + n) {
            n += 1;
        }
        Some((b, n))
    }

    pub fn is_dirty(&self, b: u64) -> bool {
        self.words[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// Clears blocks in memory; [`DirtyMap::persist`] writes them once their copies are durable.
    pub fn clear(&mut self, first: u64, n: u64) {
        for b in first..first + n {
            let (w, bit) = ((b / 64) as usize, 1u64 << (b % 64));
            if self.words[w] & bit != 0 {
                self.words[w] &= !bit;
                self.count -= 1;
            }
        }
    }

    /// Writes the whole map and makes it durable.
    pub fn persist(&self) -> std::io::Result<()> {
        let bytes: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        self.file.write_all_at(&bytes, HEADER)?;
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_reopen_and_runs_are_found() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m");
        let mut m = DirtyMap::open(&p, 10 << 20, 4096).unwrap();
        m.mark(4096 * 3 + 10, 8192).unwrap(); // blocks 3, 4, 5
        m.mark(4096 * 200, 1).unwrap();
        assert_eq!(m.count(), 4);
        drop(m);
        let mut m = DirtyMap::open(&p, 10 << 20, 4096).unwrap();
        assert_eq!(m.count(), 4);
        assert_eq!(m.next_run(0, 100), Some((3, 3)));
        assert_eq!(m.next_run(4, 1), Some((4, 1)));
        assert_eq!(m.next_run(6, 100), Some((200, 1)));
        m.clear(3, 3);
        m.persist().unwrap();
        drop(m);
        let m = DirtyMap::open(&p, 10 << 20, 4096).unwrap();
        assert_eq!((m.count(), m.next_run(0, 100)), (1, Some((200, 1))));
        assert!(DirtyMap::open(&p, 20 << 20, 4096).is_err(), "a map of another disk is refused");
    }
}
