//! Block checksums of a disk region arranged as a tree, so two sides can find the blocks that differ
//! while exchanging one hash per unchanged subtree.
//!
//! ```text
//! level 0: hash(block 0) hash(block 1) ... (XXH3-128 of each block, as rsync uses for its checksums)
//! level k: hash(FANOUT hashes of level k-1)             ... up to one root
//! ```
//! Holes (found with SEEK_DATA) are not read: they hash as blocks of zeroes. Both sides build the same
//! shape from (region length, block size), so node i of level k means the same blocks on both.

use crate::disk::DiskFile;

pub const FANOUT: u64 = 16;
/// A comparison covers the disk one region at a time (progress is kept per region).
pub const REGION: u64 = 64 << 20;

pub type Hash = [u8; 16];

/// The block checksum: XXH3-128. It finds changed blocks, not forgeries: both sides belong to one
/// deployment, and what travels is authenticated by TLS and sealed by the item's key.
pub fn digest(data: &[u8]) -> Hash {
    xxhash_rust::xxh3::xxh3_128(data).to_le_bytes()
}

/// The level holding the root of a tree over `leaves` leaves.
pub fn top_level(leaves: u64) -> usize {
    let (mut n, mut level) = (leaves.max(1), 0);
    while n > 1 {
        n = n.div_ceil(FANOUT);
        level += 1;
    }
    level
}

pub struct Tree {
    /// levels[0] are the leaves; the last level has one node.
    pub levels: Vec<Vec<Hash>>,
}

impl Tree {
    /// Hashes `offset..offset+len` of `disk` in blocks of `block` bytes (the last may be short).
    /// `read` reads a piece of the disk (callers take their locks in it).
    pub fn build(
        disk: &DiskFile,
        offset: u64,
        len: u64,
        block: u64,
        read: &dyn Fn(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<Tree> {
        let n = len.div_ceil(block);
        let mut leaves = Vec::with_capacity(n as usize);
        let zero_full = digest(&vec![0u8; block as usize]);
        const CHUNK: u64 = 1 << 20;
        let mut buf = vec![0u8; CHUNK.max(block) as usize];
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let piece = (CHUNK.max(block)).min(end - pos);
            let hole = disk.next_data(pos).is_none_or(|d| d >= pos + piece);
            if hole {
                let mut p = pos;
                while p < pos + piece {
                    let l = block.min(end - p);
                    leaves.push(if l == block { zero_full } else { digest(&vec![0u8; l as usize]) });
                    p += l;
                }
            } else {
                let b = &mut buf[..piece as usize];
                read(pos, b)?;
                for c in b.chunks(block as usize) {
                    leaves.push(digest(c));
                }
            }
            pos += piece;
        }
        Ok(Tree::from_leaves(leaves))
    }

    pub fn from_leaves(leaves: Vec<Hash>) -> Tree {
        let mut levels = vec![leaves];
        while levels.last().expect("a level").len() > 1 {
            let below = levels.last().expect("a level");
            let up: Vec<Hash> = below.chunks(FANOUT as usize).map(|c| digest(c.as_flattened())).collect();
            levels.push(up);
        }
        Tree { levels }
    }

    pub fn top(&self) -> usize {
        self.levels.len() - 1
    }

    /// Nodes `first..first+count` of `level` (clamped).
    pub fn nodes(&self, level: usize, first: u64, count: u64) -> &[Hash] {
        let Some(l) = self.levels.get(level) else { return &[] };
        let s = (first as usize).min(l.len());
        let e = (first.saturating_add(count) as usize).min(l.len());
        &l[s..e]
    }
}

/// The other side of a comparison: nodes `first..first+count` of `level` of its tree.
pub trait Fetch {
    fn fetch(
        &mut self,
        level: usize,
        first: u64,
        count: u64,
    ) -> impl std::future::Future<Output = anyhow::Result<Vec<Hash>>> + Send;
}

/// A tree at hand, as the other side (tests, local comparisons).
impl Fetch for &Tree {
    async fn fetch(&mut self, level: usize, first: u64, count: u64) -> anyhow::Result<Vec<Hash>> {
        Ok(self.nodes(level, first, count).to_vec())
    }
}

/// Walks `mine` against the other side's tree of the same shape, top down. Returns the leaves (block
/// indexes within the region) that differ.
pub async fn diff(mine: &Tree, other: &mut impl Fetch) -> anyhow::Result<Vec<u64>> {
    let mut frontier: Vec<(u64, u64)> = vec![(0, 1)];
    let mut level = mine.top();
    loop {
        let mut differing = Vec::new();
        for &(first, count) in &frontier {
            let theirs = other.fetch(level, first, count).await?;
            let ours = mine.nodes(level, first, count);
            anyhow::ensure!(
                theirs.len() == ours.len(),
                "the other side has {} nodes at level {level} from {first}, this side {}",
                theirs.len(),
                ours.len()
            );
            differing.extend(
                ours.iter().zip(&theirs).enumerate().filter(|(_, (a, b))| a != b).map(|(i, _)| first + i as u64),
            );
        }
        if level == 0 || differing.is_empty() {
            return Ok(if level == 0 { differing } else { Vec::new() });
        }
        // Children of the differing nodes, adjacent ones merged into one request.
        let below = mine.levels[level - 1].len() as u64;
        frontier.clear();
        for i in differing {
            let (s, e) = (i * FANOUT, ((i + 1) * FANOUT).min(below));
            match frontier.last_mut() {
                Some((f, c)) if *f + *c == s => *c += e - s,
                _ => frontier.push((s, e - s)),
            }
        }
        level -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn diff_finds_exactly_the_changed_blocks_with_few_hashes() {
        let leaves: Vec<Hash> = (0..5000u32).map(|i| digest(&i.to_le_bytes())).collect();
        let mine = Tree::from_leaves(leaves.clone());
        let mut other = leaves;
        for i in [0usize, 17, 18, 4095, 4999] {
            other[i] = digest(b"changed");
        }
        let theirs = Tree::from_leaves(other);
        struct Counting<'a>(&'a Tree, u64);
        impl Fetch for Counting<'_> {
            async fn fetch(&mut self, level: usize, first: u64, count: u64) -> anyhow::Result<Vec<Hash>> {
                self.1 += count;
                Ok(self.0.nodes(level, first, count).to_vec())
            }
        }
        let mut counting = Counting(&theirs, 0);
        let got = diff(&mine, &mut counting).await.unwrap();
        assert_eq!(got, vec![0, 17, 18, 4095, 4999]);
        assert!(counting.1 < 200, "{} hashes fetched for 5 changed blocks of 5000", counting.1);
        let same = diff(&mine, &mut &mine).await.unwrap();
        assert!(same.is_empty());
    }

    #[tokio::test]
    async fn holes_hash_as_zeroes() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        let fa = DiskFile::open_or_create(&a, 8 << 20).unwrap();
        let fb = DiskFile::open_or_create(&b, 8 << 20).unwrap();
        fb.write_at(3 << 20, &vec![0u8; 1 << 20]).unwrap(); // zeroes written, not a hole
        fb.write_at(5 << 20, &[1u8; 10]).unwrap();
        let ta = Tree::build(&fa, 0, 8 << 20, 4096, &|o, buf| fa.read_at(o, buf)).unwrap();
        let tb = Tree::build(&fb, 0, 8 << 20, 4096, &|o, buf| fb.read_at(o, buf)).unwrap();
        let got = diff(&ta, &mut &tb).await.unwrap();
        assert_eq!(got, vec![(5 << 20) / 4096]);
        assert_eq!(top_level(((8 << 20) / 4096) as u64), ta.top());
        assert_eq!((top_level(1), top_level(16), top_level(17)), (0, 1, 2));
    }
}
