//! A qcow2 (version 3) image writer for exports: data clusters are appended as they are read, zero
//! clusters are left unallocated, and the tables (L2, L1, refcounts) follow the data; the header is
//! written last, so a crash mid-export leaves a file no reader takes for a finished image.
//!
//! ```text
//! cluster 0: header | data clusters ... | L2 tables | L1 table | refcount table | refcount blocks
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt;

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
/// L2 entries per table (8 bytes each).
const L2_ENTRIES: u64 = CLUSTER / 8;
/// 16-bit refcounts: entries per refcount block.
const RC_ENTRIES: u64 = CLUSTER / 2;
const COPIED: u64 = 1 << 63;

pub struct Qcow2Writer {
    file: File,
    size: u64,
    /// Next free cluster index.
    next: u64,
    /// L2 tables by index, filled as data clusters are written.
    l2: std::collections::BTreeMap<u64, Vec<u64>>,
}

impl Qcow2Writer {
    pub const CLUSTER: u64 = CLUSTER;

    pub fn new(file: File, size: u64) -> Qcow2Writer {
        Qcow2Writer { file, size, next: 1, l2: std::collections::BTreeMap::new() }
    }

    /// Writes the guest cluster at `offset` (a multiple of [`Self::CLUSTER`]); `data` may be short at the
    /// end of the disk. All-zero clusters should not be passed: they read as zeroes unallocated.
    pub fn write_cluster(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        debug_assert!(offset.is_multiple_of(CLUSTER) && data.len() as u64 <= CLUSTER);
        let host = self.next * CLUSTER;
        self.file.write_all_at(data, host)?;
        self.next += 1;
        let idx = offset / CLUSTER;
        let table = self.l2.entry(idx / L2_ENTRIES).or_insert_with(|| vec![0; L2_ENTRIES as usize]);
        table[(idx % L2_ENTRIES) as usize] = host | COPIED;
        Ok(())
    }

    /// Writes the tables and the header and syncs the file.
    pub fn finish(mut self) -> std::io::Result<()> {
        let be = |v: &[u64]| v.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>();
        let l1_size = self.size.div_ceil(CLUSTER * L2_ENTRIES).max(1);
        let mut l1 = vec![0u64; l1_size as usize];
        let tables = std::mem::take(&mut self.l2);
        for (i, t) in tables {
            let host = self.next * CLUSTER;
            self.file.write_all_at(&be(&t), host)?;
            self.next += 1;
            l1[i as usize] = host | COPIED;
        }
        let l1_offset = self.next * CLUSTER;
        let l1_clusters = (l1_size * 8).div_ceil(CLUSTER);
        self.file.write_all_at(&be(&l1), l1_offset)?;
        self.next += l1_clusters;
        // The refcount structures count themselves too: grow them until they cover every cluster.
        let (mut rb, mut rt) = (1u64, 1u64);
        loop {
            let total = self.next + rt + rb;
            let need_rb = total.div_ceil(RC_ENTRIES);
            let need_rt = (need_rb * 8).div_ceil(CLUSTER);
            if need_rb <= rb && need_rt <= rt {
                break;
            }
            rb = rb.max(need_rb);
            rt = rt.max(need_rt);
        }
        let rt_offset = self.next * CLUSTER;
        let rb_first = self.next + rt;
        let total = rb_first + rb;
        let table: Vec<u64> = (0..rb).map(|i| (rb_first + i) * CLUSTER).collect();
        self.file.write_all_at(&be(&table), rt_offset)?;
        for b in 0..rb {
            let mut block = vec![0u8; CLUSTER as usize];
            for e in 0..RC_ENTRIES {
                if b * RC_ENTRIES + e < total {
                    block[(e * 2) as usize..(e * 2 + 2) as usize].copy_from_slice(&1u16.to_be_bytes());
                }
            }
            self.file.write_all_at(&block, (rb_first + b) * CLUSTER)?;
        }
        self.file.set_len(total * CLUSTER)?;
        self.file.sync_all()?;
        let mut h = Vec::with_capacity(112);
        h.extend_from_slice(b"QFI\xfb");
        h.extend_from_slice(&3u32.to_be_bytes()); // version
        h.extend_from_slice(&0u64.to_be_bytes()); // backing file offset
        h.extend_from_slice(&0u32.to_be_bytes()); // backing file size
        h.extend_from_slice(&CLUSTER_BITS.to_be_bytes());
        h.extend_from_slice(&self.size.to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes()); // no encryption
        h.extend_from_slice(&(l1_size as u32).to_be_bytes());
        h.extend_from_slice(&l1_offset.to_be_bytes());
        h.extend_from_slice(&rt_offset.to_be_bytes());
        h.extend_from_slice(&(rt as u32).to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes()); // snapshots
        h.extend_from_slice(&0u64.to_be_bytes()); // snapshots offset
        h.extend_from_slice(&0u64.to_be_bytes()); // incompatible features
        h.extend_from_slice(&0u64.to_be_bytes()); // compatible features
        h.extend_from_slice(&0u64.to_be_bytes()); // autoclear features
        h.extend_from_slice(&4u32.to_be_bytes()); // refcount order: 16 bits
        h.extend_from_slice(&104u32.to_be_bytes()); // header length
        h.extend_from_slice(&[0u8; 8]); // end of header extensions
        self.file.write_all_at(&h, 0)?;
        self.file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qemu(args: &[&str]) -> String {
        let out = std::process::Command::new(args[0]).args(&args[1..]).output().expect("qemu-utils installed");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn clusters_across_several_l2_tables_read_back_and_check_clean() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("x.qcow2");
        let size = (4u64 << 30) + 1536; // not a whole number of clusters
        let mut w = Qcow2Writer::new(File::create(&path).unwrap(), size);
        w.write_cluster(0, &[1u8; CLUSTER as usize]).unwrap();
        w.write_cluster(600 << 20, &[7u8; CLUSTER as usize]).unwrap();
        w.write_cluster(size / CLUSTER * CLUSTER, &[9u8; 1536]).unwrap();
        w.finish().unwrap();
        let p = path.to_str().unwrap();
        qemu(&["qemu-img", "check", "-f", "qcow2", p]);
        let info = qemu(&["qemu-img", "info", "--output", "json", p]);
        assert!(info.contains(&format!("\"virtual-size\": {size}")), "{info}");
        let reads = [
            "read -P 1 0 64k",
            "read -P 0 64k 64k",
            "read -P 7 600M 64k",
            "read -P 0 1G 64k",
            &format!("read -P 9 {} 1536", size / CLUSTER * CLUSTER),
        ];
        for r in reads {
            let out = qemu(&["qemu-io", "-f", "qcow2", "-c", r, p]);
            assert!(!out.contains("Pattern verification failed"), "{r}: {out}");
        }
    }
}
