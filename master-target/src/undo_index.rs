//! The undo journal's index, on disk (redb): which record holds the old contents of which bytes, the
//! capture time of every retained change, the named points, and how far each segment is indexed. The
//! master target's memory then no longer grows with retention: a point 30 days back is found with a
//! few B-tree lookups, and a view reads it block by block instead of gathering every record after it.
//!
//! ```text
//! index.redb (beside the segments)
//!   recs    (seq, offset)          -> (len, kind, segment, payload position, payload crc32c)
//!   blocks  (block, seq, offset)   -> the same as recs: one row per 64 KiB block a record touches
//!   times   seq                    -> capture time µs (made non-decreasing)
//!   at      (capture time µs, seq) -> ()
//!   marks   seq                    -> (kind, capture time µs, tag)
//!   segs    segment first seq      -> (bytes indexed, last seq, first capture time)
//!   meta    "floor_at"             -> capture time of the newest change expiry dropped
//! ```
//!
//! The index only ever holds committed records (it is written after the applied position is), and
//! commits that do not start a segment are not synced: after a crash it is a consistent prefix, and
//! opening the journal indexes whatever the segments hold past `segs` (at most the active segment).

use crate::undo::UndoError;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};

/// Granularity of the `blocks` table.
pub const IDX_BLOCK: u64 = 64 << 10;
/// redb's page cache per replica: what bounds the index's share of the master target's memory.
const CACHE_BYTES: usize = 8 << 20;

/// A record's (length, kind, segment, payload position, payload crc32c).
type RecValue = (u64, u8, u64, u64, u32);
/// (seq, capture time µs) of a change.
pub type Timed = (u64, u64);

const RECS: TableDefinition<(u64, u64), RecValue> = TableDefinition::new("recs");
const BLOCKS: TableDefinition<(u64, u64, u64), RecValue> = TableDefinition::new("blocks");
const TIMES: TableDefinition<u64, u64> = TableDefinition::new("times");
const AT: TableDefinition<(u64, u64), ()> = TableDefinition::new("at");
const MARKS: TableDefinition<u64, (u8, u64, &str)> = TableDefinition::new("marks");
const SEGS: TableDefinition<u64, (u64, u64, u64)> = TableDefinition::new("segs");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// One indexed record that holds old contents (data or zeroes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexedRec {
    pub seq: u64,
    pub offset: u64,
    pub len: u64,
    pub kind: u8,
    /// First sequence number of its segment (the segment's name).
    pub seg: u64,
    pub pos: u64,
    pub crc: u32,
}

/// What one committed batch adds to the index.
#[derive(Default)]
pub struct Additions {
    pub recs: Vec<IndexedRec>,
    /// (seq, capture time, already made non-decreasing) of each change recorded.
    pub times: Vec<(u64, u64)>,
    /// (seq, kind, capture time, tag).
    pub marks: Vec<(u64, u8, u64, String)>,
    /// Segments whose indexed extent changed: (first, bytes, last seq, first capture time).
    pub segs: Vec<(u64, u64, u64, u64)>,
}

/// A segment's indexed extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegState {
    pub bytes: u64,
    pub last: u64,
    pub first_at: u64,
}

pub struct Index {
    /// `None` once closed after a failure (redb refuses every use of a database after a failed write).
    db: std::sync::RwLock<Option<Database>>,
    path: PathBuf,
}

impl Index {
    pub fn open(dir: &Path) -> Result<Index, UndoError> {
        let path = dir.join("index.redb");
        let db = Database::builder().set_cache_size(CACHE_BYTES).create(&path).map_err(|e| fail(&path, e))?;
        let ix = Index { db: std::sync::RwLock::new(Some(db)), path };
        ix.open_tables()?;
        Ok(ix)
    }

    fn err(&self) -> impl Fn(redb::Error) -> UndoError + '_ {
        move |e| fail(&self.path, e)
    }

    /// Closes the database (its file lock goes with it); every later use is an error.
    pub fn close(&self) {
        *self.db.write().expect("index lock poisoned") = None;
    }

    fn with<T>(&self, f: impl FnOnce(&Database) -> Result<T, redb::Error>) -> Result<T, UndoError> {
        let g = self.db.read().expect("index lock poisoned");
        let db = g.as_ref().ok_or_else(|| {
            UndoError::IndexBehind(format!("{} was closed after a failed write", self.path.display()))
        })?;
        f(db).map_err(self.err())
    }

    fn write<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>,
    ) -> Result<T, UndoError> {
        self.with(|db| {
            let mut tx = db.begin_write()?;
            tx.set_durability(durability)?;
            // A synced commit also saves redb's allocator state, so that opening after a crash does
            // not walk the whole index to rebuild it.
            tx.set_quick_repair(matches!(durability, Durability::Immediate));
            let out = f(&tx)?;
            tx.commit()?;
            Ok(out)
        })
    }

    fn read<T>(&self, f: impl FnOnce(&redb::ReadTransaction) -> Result<T, redb::Error>) -> Result<T, UndoError> {
        self.with(|db| f(&db.begin_read()?))
    }

    /// Forgets everything (the segments are indexed again from their first byte).
    pub fn wipe(&self) -> Result<(), UndoError> {
        self.write(Durability::Immediate, |tx| {
            let tables: Vec<_> = tx.list_tables()?.collect();
            for t in tables {
                tx.delete_table(t)?;
            }
            Ok(())
        })?;
        self.open_tables()
    }

    fn open_tables(&self) -> Result<(), UndoError> {
        self.write(Durability::Immediate, |tx| {
            tx.open_table(RECS)?;
            tx.open_table(BLOCKS)?;
            tx.open_table(TIMES)?;
            tx.open_table(AT)?;
            tx.open_table(MARKS)?;
            tx.open_table(SEGS)?;
            tx.open_table(META)?;
            Ok(())
        })
    }

    /// Every segment's indexed extent, by first sequence number.
    pub fn segments(&self) -> Result<std::collections::BTreeMap<u64, SegState>, UndoError> {
        self.read(|tx| {
            let t = tx.open_table(SEGS)?;
            let mut out = std::collections::BTreeMap::new();
            for row in t.iter()? {
                let (k, v) = row?;
                let (bytes, last, first_at) = v.value();
                out.insert(k.value(), SegState { bytes, last, first_at });
            }
            Ok(out)
        })
    }

    /// The named points and window edges, in sequence order: (seq, kind, capture time, tag).
    pub fn marks(&self) -> Result<Vec<(u64, u8, u64, String)>, UndoError> {
        self.read(|tx| {
            let t = tx.open_table(MARKS)?;
            let mut out = Vec::new();
            for row in t.iter()? {
                let (k, v) = row?;
                let (kind, at, tag) = v.value();
                out.push((k.value(), kind, at, tag.to_string()));
            }
            Ok(out)
        })
    }

    pub fn floor_at(&self) -> Result<Option<u64>, UndoError> {
        self.read(|tx| Ok(tx.open_table(META)?.get("floor_at")?.map(|v| v.value())))
    }

    /// (seq, capture time) of the oldest and the newest indexed change.
    pub fn time_bounds(&self) -> Result<Option<(Timed, Timed)>, UndoError> {
        self.read(|tx| {
            let t = tx.open_table(TIMES)?;
            let first = t.first()?.map(|(k, v)| (k.value(), v.value()));
            let last = t.last()?.map(|(k, v)| (k.value(), v.value()));
            Ok(first.zip(last))
        })
    }

    /// The last change captured at or before `at_us`, if any is indexed.
    pub fn seq_at(&self, at_us: u64) -> Result<Option<u64>, UndoError> {
        self.read(|tx| {
            let t = tx.open_table(AT)?;
            let found = t.range(..=(at_us, u64::MAX))?.next_back().transpose()?;
            Ok(found.map(|(k, _)| k.value().1))
        })
    }

    /// Capture time of the change at `seq`, or of the last one before it.
    pub fn time_of(&self, seq: u64) -> Result<Option<u64>, UndoError> {
        self.read(|tx| {
            let t = tx.open_table(TIMES)?;
            let found = t.range(..=seq)?.next_back().transpose()?;
            Ok(found.map(|(_, v)| v.value()))
        })
    }

    /// Adds a committed batch's records; `durable` syncs the index (and everything before it).
    pub fn add(&self, a: &Additions, durable: bool) -> Result<(), UndoError> {
        let durability = if durable { Durability::Immediate } else { Durability::None };
        self.write(durability, |tx| {
            let mut recs = tx.open_table(RECS)?;
            let mut blocks = tx.open_table(BLOCKS)?;
            for r in &a.recs {
                recs.insert((r.seq, r.offset), (r.len, r.kind, r.seg, r.pos, r.crc))?;
                for b in blocks_of(r.offset, r.len) {
                    blocks.insert((b, r.seq, r.offset), (r.len, r.kind, r.seg, r.pos, r.crc))?;
                }
            }
            let mut times = tx.open_table(TIMES)?;
            let mut at = tx.open_table(AT)?;
            for &(seq, t) in &a.times {
                times.insert(seq, t)?;
                at.insert((t, seq), ())?;
            }
            let mut marks = tx.open_table(MARKS)?;
            for (seq, kind, t, tag) in &a.marks {
                marks.insert(*seq, (*kind, *t, tag.as_str()))?;
            }
            let mut segs = tx.open_table(SEGS)?;
            for &(first, bytes, last, first_at) in &a.segs {
                segs.insert(first, (bytes, last, first_at))?;
            }
            Ok(())
        })
    }

    /// Removes everything about changes before `first` (the first sequence number of the oldest
    /// segment kept), and segments named before it. Returns the capture time of the newest change
    /// removed, which is also kept as `floor_at`.
    pub fn expire_below(&self, first: u64) -> Result<Option<u64>, UndoError> {
        self.write(Durability::Immediate, |tx| {
            let mut recs = tx.open_table(RECS)?;
            let mut blocks = tx.open_table(BLOCKS)?;
            for row in recs.extract_from_if(..(first, 0), |_, _| true)? {
                let (k, v) = row?;
                let (seq, offset) = k.value();
                let len = v.value().0;
                for b in blocks_of(offset, len) {
                    blocks.remove((b, seq, offset))?;
                }
            }
            let mut times = tx.open_table(TIMES)?;
            let mut at = tx.open_table(AT)?;
            let mut newest = None;
            for row in times.extract_from_if(..first, |_, _| true)? {
                let (k, v) = row?;
                at.remove((v.value(), k.value()))?;
                newest = Some(v.value());
            }
            tx.open_table(MARKS)?.retain_in(..first, |_, _| false)?;
            tx.open_table(SEGS)?.retain_in(..first, |_, _| false)?;
            let mut meta = tx.open_table(META)?;
            if let Some(t) = newest {
                meta.insert("floor_at", t)?;
            }
            Ok(newest)
        })
    }

    /// The records after `point` that hold the contents at `point` of some byte in `start..end`, in
    /// the order to lay them (per 64 KiB block, by sequence number); `take` is given each in turn and
    /// returns how many bytes of the block's part of `start..end` are now covered, so that a block
    /// stops being read once covered. Rows of a block that miss `start..end` are passed over without
    /// reading their record.
    pub fn covering(
        &self,
        point: u64,
        start: u64,
        end: u64,
        mut take: impl FnMut(u64, &IndexedRec) -> u64,
    ) -> Result<(), UndoError> {
        if end <= start {
            return Ok(());
        }
        self.read(|tx| {
            let blocks = tx.open_table(BLOCKS)?;
            let last = (end - 1) / IDX_BLOCK;
            let mut b = start / IDX_BLOCK;
            while b <= last {
                // The first row of block b (or a later one) after the point.
                let mut rows = blocks.range((b, point + 1, 0)..)?;
                let Some(row) = rows.next().transpose()? else { break };
                let (rb, rs, _) = row.0.value();
                if rb > last {
                    break;
                }
                if rb != b || rs <= point {
                    // Nothing after the point in block b: go to rb (whose rows after the point, if
                    // any, a fresh lookup finds).
                    b = if rb != b { rb } else { b + 1 };
                    continue;
                }
                let (ws, we) = (start.max(b * IDX_BLOCK), end.min((b + 1) * IDX_BLOCK));
                let want = we - ws;
                let mut row = Some(row);
                while let Some((k, v)) = row {
                    let (kb, seq, offset) = k.value();
                    if kb != b {
                        break;
                    }
                    let (len, kind, seg, pos, crc) = v.value();
                    if offset >= we || offset.saturating_add(len) <= ws {
                        row = rows.next().transpose()?;
                        continue;
                    }
                    if take(b, &IndexedRec { seq, offset, len, kind, seg, pos, crc }) >= want {
                        break;
                    }
                    row = rows.next().transpose()?;
                }
                b += 1;
            }
            Ok(())
        })
    }
}

/// The `IDX_BLOCK` blocks `offset..offset+len` touches.
fn blocks_of(offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
    offset / IDX_BLOCK..=(offset + len.max(1) - 1) / IDX_BLOCK
}

fn fail(path: &Path, e: impl Into<redb::Error>) -> UndoError {
    UndoError::Index { path: path.to_path_buf(), source: Box::new(e.into()) }
}
