//! A recovery point served as a disk: the replica with, for each byte, the first undo record after the
//! point laid on top. Opening it costs nothing; each read asks the undo journal's index which records
//! after the point cover the bytes read (a few lookups per 64 KiB block), so batches applied while the
//! view is open are found too, and the view stays at its point while replication goes on. A writable
//! view keeps its writes in a copy-on-write overlay file of its own and never touches the replica.
//!
//! ```text
//! read(off, len): overlay block written? --> overlay file
//!                 else a record after the point covers it? --> undo segment (or zeroes)
//!                 else --> replica file
//! ```

use crate::replica::{Follower, Replica};
use crate::undo::{Old, Rec};
use sr_common::nbd::{Backend, BackendError};
use sr_common::types::Seq;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Byte ranges of the disk whose content at the point is in the undo journal.
#[derive(Default)]
pub struct ViewMap {
    /// start -> (end, old contents at `start`)
    pieces: BTreeMap<u64, (u64, Old)>,
}

impl ViewMap {
    /// Adds a record where no earlier record (one with a smaller sequence number) already covers:
    /// records must come in sequence order. Returns how many bytes it newly covers.
    pub fn add(&mut self, r: &Rec) -> u64 {
        let (start, end) = (r.offset, r.offset + r.len);
        let mut cursor = start;
        if let Some((_, (e, _))) = self.pieces.range(..=start).next_back() {
            cursor = cursor.max(*e);
        }
        if cursor >= end {
            return 0;
        }
        let mut gaps = Vec::new();
        for (&s, &(e, _)) in self.pieces.range(cursor..end) {
            if s > cursor {
                gaps.push((cursor, s));
            }
            cursor = cursor.max(e);
        }
        if cursor < end {
            gaps.push((cursor, end));
        }
        let mut added = 0;
        for (s, e) in gaps {
            added += e - s;
            self.pieces.insert(s, (e, crate::undo::advance(&r.old, s - start)));
        }
        added
    }

    /// How many bytes of `start..end` no piece covers.
    pub fn gaps(&self, start: u64, end: u64) -> u64 {
        if end <= start {
            return 0;
        }
        let first = self.pieces.range(..=start).next_back().filter(|(_, (e, _))| *e > start);
        let rest = self.pieces.range(start.saturating_add(1)..end);
        let covered: u64 = first.into_iter().chain(rest).map(|(s, (e, _))| (*e).min(end) - (*s).max(start)).sum();
        (end - start) - covered
    }

    pub fn pieces(&self) -> usize {
        self.pieces.len()
    }

    /// The (offset, length) ranges inside `start..end` where the point differs from the replica.
    pub fn ranges_within(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        if end <= start {
            return Vec::new();
        }
        let first = self.pieces.range(..=start).next_back().filter(|(_, (e, _))| *e > start);
        let rest = self.pieces.range(start.saturating_add(1)..end);
        first.into_iter().chain(rest).map(|(s, (e, _))| (*s, e - s)).collect()
    }

    /// The (offset, length) ranges where the point differs from the replica.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.pieces.iter().map(|(s, (e, _))| (*s, e - s)).collect()
    }

    /// Reads `buf` at `offset` from the pieces, and from `base` where none covers.
    pub fn read(
        &self,
        offset: u64,
        buf: &mut [u8],
        base: &dyn Fn(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        if buf.is_empty() {
            return Ok(());
        }
        let mut cursor = offset;
        let first = self.pieces.range(..=offset).next_back().filter(|(_, (e, _))| *e > offset);
        let rest = self.pieces.range(offset + 1..end);
        for (&s, (e, old)) in first.into_iter().chain(rest) {
            if s > cursor {
                base(cursor, &mut buf[(cursor - offset) as usize..(s - offset) as usize])?;
                cursor = s;
            }
            let to = (*e).min(end);
            let dst = &mut buf[(cursor - offset) as usize..(to - offset) as usize];
            match old {
                Old::Zero => dst.fill(0),
                Old::Data { file, pos, check } => {
                    check.verify(file)?;
                    file.read_exact_at(dst, pos + (cursor - s))?
                }
            }
            cursor = to;
        }
        if cursor < end {
            base(cursor, &mut buf[(cursor - offset) as usize..])?;
        }
        Ok(())
    }
}

pub const BLOCK: u64 = 4096;

/// Writes of a writable view: whole 4 KiB blocks in a sparse file, and which blocks are there.
pub struct Overlay {
    file: File,
    path: PathBuf,
    map_path: PathBuf,
    written: Mutex<Vec<u64>>,
}

impl Overlay {
    /// Opens (or creates) the overlay at `path`, with its block map beside it.
    pub fn open(path: PathBuf, size: u64) -> std::io::Result<Overlay> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        file.set_len(size)?;
        let map_path = path.with_extension("map");
        let words = size.div_ceil(BLOCK).div_ceil(64) as usize;
        let mut written = vec![0u64; words];
        if let Ok(bytes) = std::fs::read(&map_path) {
            for (w, c) in written.iter_mut().zip(bytes.chunks_exact(8)) {
                *w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            }
        }
        Ok(Overlay { file, path, map_path, written: Mutex::new(written) })
    }

    fn is_written(map: &[u64], block: u64) -> bool {
        map[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    /// The written blocks among `first..last`, as (offset, length) runs; words with no block written
    /// are skipped whole.
    fn runs(map: &[u64], first: u64, last: u64) -> Vec<(u64, u64)> {
        let last = last.min(map.len() as u64 * 64);
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut b = first;
        while b < last {
            if b.is_multiple_of(64) && map[(b / 64) as usize] == 0 {
                b += 64;
                continue;
            }
            if Self::is_written(map, b) {
                match out.last_mut() {
                    Some((o, l)) if *o + *l == b * BLOCK => *l += BLOCK,
                    _ => out.push((b * BLOCK, BLOCK)),
                }
            }
            b += 1;
        }
        out
    }

    /// Makes the overlay and its map durable.
    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()?;
        let map = self.written.lock().expect("overlay lock poisoned");
        let bytes: Vec<u8> = map.iter().flat_map(|w| w.to_le_bytes()).collect();
        drop(map);
        sr_common::crashsafe::write_file(&self.map_path, &bytes)
    }

    /// The 4 KiB blocks written, by index.
    pub fn blocks(&self) -> Vec<u64> {
        let map = self.written.lock().expect("overlay lock poisoned");
        let mut out = Vec::new();
        for (w, word) in map.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                out.push(w as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        out
    }

    pub fn read_block(&self, block: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.file.read_exact_at(buf, block * BLOCK)
    }

    pub fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
        let _ = std::fs::remove_file(&self.map_path);
    }
}

/// A recovery point of one replica, as an NBD export.
pub struct PointView {
    pub replica: Arc<Replica>,
    pub point: Seq,
    pub overlay: Option<Overlay>,
    /// A commit took the view over: writes are refused.
    pub closed: std::sync::atomic::AtomicBool,
}

impl PointView {
    /// Reads the point's contents (without the overlay).
    fn read_point(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let _r = self.replica.gate.read().expect("replica gate poisoned");
        let end = offset + buf.len() as u64;
        let reader = self.replica.undo.lock().expect("undo lock poisoned").reader();
        let map = reader.view_map(self.point, offset, end)?;
        map.read(offset, buf, &|o, b| self.replica.disk.read_at(o, b))
    }

    /// Refuses writes from now on; a write under way finishes first.
    pub fn close(&self) {
        let _in_flight = self.overlay.as_ref().map(|ov| ov.written.lock().expect("overlay lock poisoned"));
        self.closed.store(true, std::sync::atomic::Ordering::Release);
    }

    fn write_blocks(&self, offset: u64, data: Option<&[u8]>, len: u64) -> std::io::Result<()> {
        let ov = self.overlay.as_ref().expect("writable view");
        let mut map = ov.written.lock().expect("overlay lock poisoned");
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(std::io::Error::other("the failover was committed: this disk is a plain file now"));
        }
        let size = self.replica.disk.size();
        let (first, last) = (offset / BLOCK, (offset + len).div_ceil(BLOCK));
        let mut block = vec![0u8; BLOCK as usize];
        for b in first..last {
            let bs = b * BLOCK;
            let be = (bs + BLOCK).min(size);
            let blk = &mut block[..(be - bs) as usize];
            let (s, e) = (offset.max(bs), (offset + len).min(be));
            if s > bs || e < be {
                if Overlay::is_written(&map, b) {
                    ov.file.read_exact_at(blk, bs)?;
                } else {
                    self.read_point(bs, blk)?;
                }
            }
            let dst = &mut blk[(s - bs) as usize..(e - bs) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(s - offset) as usize..(e - offset) as usize]),
                None => dst.fill(0),
            }
            ov.file.write_all_at(blk, bs)?;
            map[(b / 64) as usize] |= 1 << (b % 64);
        }
        Ok(())
    }
}

impl Backend for PointView {
    fn size(&self) -> u64 {
        self.replica.disk.size()
    }
    fn read_only(&self) -> bool {
        self.overlay.is_none()
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let Some(ov) = &self.overlay else { return Ok(self.read_point(offset, buf)?) };
        let map = ov.written.lock().expect("overlay lock poisoned");
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let b = pos / BLOCK;
            let written = Overlay::is_written(&map, b);
            // Extend over following blocks in the same state.
            let mut to = ((b + 1) * BLOCK).min(end);
            while to < end && Overlay::is_written(&map, to / BLOCK) == written {
                to = ((to / BLOCK + 1) * BLOCK).min(end);
            }
            let dst = &mut buf[(pos - offset) as usize..(to - offset) as usize];
            if written {
                ov.file.read_exact_at(dst, pos)?;
            } else {
                self.read_point(pos, dst)?;
            }
            pos = to;
        }
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        if self.overlay.is_none() {
            return Err(BackendError::ReadOnly);
        }
        self.write_blocks(offset, Some(data), data.len() as u64)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }
    fn zero(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError> {
        if self.overlay.is_none() {
            return Err(BackendError::ReadOnly);
        }
        self.write_blocks(offset, None, len)?;
        if fua {
            self.flush()?;
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), BackendError> {
        if let Some(ov) = &self.overlay {
            ov.sync()?;
        }
        Ok(())
    }
    /// The replica's holes, less what the point's undo records and the overlay's blocks hold there.
    fn extents(&self, offset: u64, len: u64, max: usize) -> Result<Vec<sr_common::nbd::Extent>, BackendError> {
        let (ext, over) = {
            let written = self.overlay.as_ref().map(|ov| ov.written.lock().expect("overlay lock poisoned"));
            let _r = self.replica.gate.read().expect("replica gate poisoned");
            let ext = self.replica.disk.extents(offset, len, max);
            // Only the part the extents cover (a prefix when there are more than `max`), and in it
            // only the replica's holes: elsewhere the point is data whatever it holds.
            let end = offset + ext.iter().map(|e| e.len).sum::<u64>();
            let reader = self.replica.undo.lock().expect("undo lock poisoned").reader();
            let mut over = Vec::new();
            let mut pos = offset;
            for e in &ext {
                if e.hole {
                    over.extend(reader.covered(self.point, pos, pos + e.len).map_err(std::io::Error::from)?);
                }
                pos += e.len;
            }
            if let Some(w) = &written {
                over.extend(Overlay::runs(w, offset / BLOCK, end.div_ceil(BLOCK)));
            }
            (ext, over)
        };
        Ok(sr_common::disk::cover(&ext, offset, &over))
    }
}

impl Follower for PointView {
    fn point(&self) -> Seq {
        self.point
    }
}

impl Replica {
    /// Opens a view of the state at `point`, writable through `overlay` when given.
    pub fn open_view(self: &Arc<Self>, point: Seq, overlay: Option<Overlay>) -> anyhow::Result<Arc<PointView>> {
        let _r = self.gate.read().expect("replica gate poisoned");
        let undo = self.undo.lock().expect("undo lock poisoned");
        let applied = self.applied();
        let Some(oldest) = undo.oldest() else {
            anyhow::bail!("{}: no recovery points yet: the initial copy has not finished", self.key);
        };
        anyhow::ensure!(
            point >= oldest && point <= applied,
            "{}: point {point} is outside the retained range {oldest}..={applied}",
            self.key
        );
        let view = Arc::new(PointView {
            replica: self.clone(),
            point,
            overlay,
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        let follower: std::sync::Weak<dyn Follower> = Arc::downgrade(&view) as _;
        self.follow(follower);
        Ok(view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(seq: u64, offset: u64, len: u64, pos: u64, file: &Arc<File>) -> Rec {
        let mut payload = vec![0u8; len as usize];
        file.read_exact_at(&mut payload, pos).unwrap();
        let check = Arc::new(crate::undo::PayloadCheck::new(pos, len as u32, crc32c::crc32c(&payload)));
        Rec { seq: Seq(seq), offset, len, old: Old::Data { file: file.clone(), pos, check } }
    }

    #[test]
    fn ranges_within_a_window_and_written_runs_of_the_overlay() {
        let mut m = ViewMap::default();
        m.add(&Rec { seq: Seq(1), offset: 100, len: 50, old: Old::Zero });
        m.add(&Rec { seq: Seq(2), offset: 300, len: 10, old: Old::Zero });
        assert_eq!(m.ranges_within(0, 1000), vec![(100, 50), (300, 10)]);
        assert_eq!(m.ranges_within(120, 130), vec![(100, 50)], "a piece that starts before the window");
        assert_eq!(m.ranges_within(150, 300), vec![]);
        assert_eq!(m.ranges_within(5, 5), vec![]);
        let mut map = vec![0u64; 4];
        for b in [1u64, 2, 3, 63, 64, 130] {
            map[(b / 64) as usize] |= 1 << (b % 64);
        }
        assert_eq!(
            Overlay::runs(&map, 0, 256),
            vec![(BLOCK, 3 * BLOCK), (63 * BLOCK, 2 * BLOCK), (130 * BLOCK, BLOCK)]
        );
        assert_eq!(Overlay::runs(&map, 2, 64), vec![(2 * BLOCK, 2 * BLOCK), (63 * BLOCK, BLOCK)]);
        assert_eq!(Overlay::runs(&map, 200, 1 << 40), vec![], "past the map's end");
    }

    #[test]
    fn first_record_wins_and_gaps_read_the_base() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("u");
        std::fs::write(&p, (0..=255u8).collect::<Vec<_>>()).unwrap();
        let f = Arc::new(File::open(&p).unwrap());
        let mut m = ViewMap::default();
        m.add(&rec(5, 10, 10, 100, &f)); // 10..20 from file 100..
        m.add(&rec(6, 5, 30, 0, &f)); // only 5..10 and 20..35 are new
        m.add(&Rec { seq: Seq(7), offset: 40, len: 5, old: Old::Zero });
        let mut buf = vec![0u8; 50];
        m.read(0, &mut buf, &|o, b| {
            b.iter_mut().enumerate().for_each(|(i, x)| *x = 200u8.wrapping_add((o as usize + i) as u8));
            Ok(())
        })
        .unwrap();
        let base = |i: usize| 200u8.wrapping_add(i as u8);
        for (i, &got) in buf.iter().enumerate() {
            let want = match i {
                0..5 => base(i),
                5..10 => (i - 5) as u8,
                10..20 => 100 + (i - 10) as u8,
                20..35 => (15 + i - 20) as u8,
                35..40 => base(i),
                40..45 => 0,
                _ => base(i),
            };
            assert_eq!(got, want, "byte {i}");
        }
        let mut mid = vec![0u8; 7];
        m.read(12, &mut mid, &|_, b| {
            b.fill(9);
            Ok(())
        })
        .unwrap();
        assert_eq!(mid, vec![102, 103, 104, 105, 106, 107, 108]);
    }
}
