//! Scan capture, for a disk the agent cannot front with NBD: at an interval the disk's block checksums
//! are compared with the map of what was last shipped, and the blocks that changed go into the dirty
//! map; the copy thread ships them and records their checksums in the map as it reads them, so the map
//! always describes what the replica was sent. The first scan starts from a map of zero blocks: it is
//! the initial copy.
//!
//! ```text
//! scan-D.map = magic "SRS1" | block size u32 | disk size u64 | 16-byte checksums, one per block
//! every interval: read a chunk under the journal's lock --> checksum each block --> differs from the
//!                 map? --> dirty map (durable) --> copy thread: read, journal, map[block] = checksum
//! ```

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"SRS1";
const HEADER: u64 = 16;

pub use sr_common::merkle::digest as checksum;
pub type Sum = sr_common::merkle::Hash;

pub struct ScanMap {
    path: PathBuf,
    file: File,
    pub block: u64,
    pub sums: Vec<Sum>,
}

impl ScanMap {
    /// Opens the map, or starts one where every block is zeroes (what an empty replica holds).
    pub fn open(path: &Path, disk_size: u64, block: u64) -> anyhow::Result<ScanMap> {
        use anyhow::Context;
        let n = disk_size.div_ceil(block) as usize;
        let exists = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .with_context(|| format!("opening scan map {}", path.display()))?;
        let mut sums = Vec::with_capacity(n);
        if exists {
            let mut head = [0u8; HEADER as usize];
            file.read_exact_at(&mut head, 0)?;
            let b = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes")) as u64;
            let size = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
            anyhow::ensure!(
                &head[0..4] == MAGIC && b == block && size == disk_size,
                "scan map {} is for another disk or block size; delete it to start over with a full scan",
                path.display()
            );
            let mut raw = vec![0u8; n * 16];
            file.read_exact_at(&mut raw, HEADER).with_context(|| format!("reading {}", path.display()))?;
            sums.extend(raw.chunks_exact(16).map(|c| <Sum>::try_from(c).expect("16 bytes")));
        } else {
            let zero = checksum(&vec![0u8; block as usize]);
            let tail = disk_size - (n as u64 - 1) * block;
            sums.resize(n, zero);
            if tail != block {
                sums[n - 1] = checksum(&vec![0u8; tail as usize]);
            }
        }
        let map = ScanMap { path: path.to_path_buf(), file, block, sums };
        if !exists {
            let mut head = Vec::new();
            head.extend_from_slice(MAGIC);
            head.extend_from_slice(&(block as u32).to_le_bytes());
            head.extend_from_slice(&disk_size.to_le_bytes());
            map.file.write_all_at(&head, 0)?;
            map.persist()?;
        }
        Ok(map)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records the checksums of blocks read from `offset` for shipping.
    pub fn record(&mut self, offset: u64, data: &[u8]) {
        let first = (offset / self.block) as usize;
        for (i, c) in data.chunks(self.block as usize).enumerate() {
            if let Some(s) = self.sums.get_mut(first + i) {
                *s = checksum(c);
            }
        }
    }

    pub fn persist(&self) -> std::io::Result<()> {
        self.file.write_all_at(self.sums.as_flattened(), HEADER)?;
        self.file.sync_data()
    }
}
