//! The undo journal of a replica: before a batch overwrites a range of the replica, the range's old
//! contents are appended here, tagged with the sequence number and capture time of the change that
//! overwrote it. The replica file stays the latest applied state (failover at the latest point needs
//! no replay); the state at any retained point `p` is the replica with, for each byte, the first undo
//! record after `p` that covers it laid on top (see [`crate::view`]); expiring points is deleting the
//! oldest segments.
//!
//! ```text
//! undo/item-I-disk-D/
//!   00000000000000000042.undo   records of seq 42.. (named by the first seq it may hold)
//!   index.redb                  the records' index (see crate::undo_index)
//! record = header (56 bytes, little endian) + payload
//!   magic "SRU1" | crc32c(header[8..56]) | seq | capture time µs | offset | len | kind | pad
//!   | payload length u32 | crc32c(payload) | pad
//! kinds: old data (payload = the len old bytes), old zeroes (no payload), app-consistent point,
//!        bookmark, initial copy done (payload = tag)
//! ```
//!
//! The index of the records (which record holds which old bytes, capture times, named points) is
//! on disk, in redb ([`crate::undo_index`]): memory does not grow with retention, only with the
//! number of segments (four words each) and of named points.
//!
//! Order of an apply: undo records written and fsynced, then the replica written and fsynced, then
//! the applied position committed in the state store, then the records indexed. On open, records past the committed position
//! belong to a batch that did not commit: their old contents are written back (newest first), so the
//! replica is exactly the committed state again, and they are cut off. Nothing is kept for changes
//! before the initial copy finished: those states are not consistent and cannot be points.

use crate::undo_index::{Additions, Index, IndexedRec, IDX_BLOCK};
use crate::view::ViewMap;
use sr_common::disk::DiskFile;
use sr_common::types::Seq;
use sr_common::wire::{Batch, MarkerKind, Op};
use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const MAGIC: u32 = u32::from_le_bytes(*b"SRU1");
const HEADER: usize = 56;
/// Old contents are captured in pieces of at most this many bytes.
const CHUNK: u64 = 1 << 20;

const KIND_DATA: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_APP: u8 = 3;
const KIND_BOOKMARK: u8 = 4;
const KIND_COPY_DONE: u8 = 5;
const KIND_INCONSISTENT_BEGIN: u8 = 6;
const KIND_INCONSISTENT_END: u8 = 7;

/// Where the old contents of one undo record are.
#[derive(Clone)]
pub enum Old {
    Zero,
    /// In `file` from byte `pos`; `check` is the whole record's payload checksum.
    Data {
        file: Arc<File>,
        pos: u64,
        check: Arc<PayloadCheck>,
    },
}

/// A record payload's checksum, checked the first time any part of it is read (then remembered), so
/// that a point is never read from undo bytes that changed on disk; with the header the index expects,
/// the record's header is read with it and must be that one.
#[derive(Debug)]
pub struct PayloadCheck {
    /// Where the payload starts in its file, its length and its crc32c.
    pub pos: u64,
    pub len: u32,
    pub crc: u32,
    /// (seq, offset, length, kind) the header before the payload must carry.
    expect: Option<(u64, u64, u64, u8)>,
    verified: std::sync::atomic::AtomicBool,
}

impl PayloadCheck {
    pub fn new(pos: u64, len: u32, crc: u32) -> PayloadCheck {
        PayloadCheck { pos, len, crc, expect: None, verified: std::sync::atomic::AtomicBool::new(false) }
    }

    fn of(r: &IndexedRec) -> PayloadCheck {
        let plen = if r.kind == KIND_DATA { r.len as u32 } else { 0 };
        PayloadCheck { expect: Some((r.seq, r.offset, r.len, r.kind)), ..PayloadCheck::new(r.pos, plen, r.crc) }
    }

    /// Reads the whole payload once (and its header, when expected) and compares its checksum; an
    /// error says where it is corrupt.
    pub fn verify(&self, file: &File) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        if self.verified.load(Ordering::Acquire) {
            return Ok(());
        }
        let head = if self.expect.is_some() { HEADER } else { 0 };
        let start = self.pos.checked_sub(head as u64).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "an undo index row points before its segment's start")
        })?;
        let mut all = vec![0u8; head + self.len as usize];
        file.read_exact_at(&mut all, start)?;
        if let Some((seq, offset, len, kind)) = self.expect {
            let hb: &[u8; HEADER] = all[..HEADER].try_into().expect("header bytes");
            let same = decode_header(hb).is_ok_and(|h| {
                h.seq.0 == seq
                    && h.offset == offset
                    && h.len == len
                    && h.kind == kind
                    && h.plen == self.len
                    && h.pcrc == self.crc
            });
            if !same {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "the undo record at offset {start} is not the one the index names (seq {seq} at {offset}): \
                         the index or the segment is damaged; remove index.redb and restart the master target to \
                         index the segments again"
                    ),
                ));
            }
        }
        let buf = &all[head..];
        if crc32c::crc32c(buf) != self.crc {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "undo record payload at offset {} does not match its checksum: this recovery point is damaged; \
                     choose a later point, or resync the item",
                    self.pos
                ),
            ));
        }
        self.verified.store(true, Ordering::Release);
        Ok(())
    }
}

/// One record's range and where its old contents are.
#[derive(Clone)]
pub struct Rec {
    pub seq: Seq,
    pub offset: u64,
    pub len: u64,
    pub old: Old,
}

/// Kind of a named recovery point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PointKind {
    AppConsistent,
    CrashConsistent,
    InitialCopyDone,
    /// Blocks arrive in block order from here: not a point to use (see [`Undo::window_at`]).
    InconsistentBegin,
    /// Crash-consistent again from here.
    InconsistentEnd,
}

impl PointKind {
    /// A named point an operator may choose (not a window's edge or the initial copy's end).
    pub fn named(self) -> bool {
        matches!(self, PointKind::AppConsistent | PointKind::CrashConsistent)
    }
}

/// A stretch of the stream whose points are not crash-consistent: changes after `begin` and before
/// `end` were copied in block order. `begin` is `None` when it started before the oldest retained
/// point; `end` is `None` while it is still open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub begin: Option<(Seq, u64)>,
    pub end: Option<(Seq, u64)>,
}

impl Window {
    /// Whether the state at `seq` lies inside (the edges themselves are consistent).
    pub fn contains(&self, seq: Seq) -> bool {
        self.begin.is_none_or(|(b, _)| seq > b) && self.end.is_none_or(|(e, _)| seq < e)
    }
}

/// A named point: a marker the agent put in the stream.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Mark {
    pub seq: Seq,
    pub at_us: u64,
    pub kind: PointKind,
    pub tag: String,
}

/// A segment's extent; its file is opened when read (see [`Undo::file`]).
struct Segment {
    first: Seq,
    bytes: u64,
    /// Last sequence number recorded in the segment (first - 1 while empty).
    last: Seq,
    /// Capture time of its first record (0 while empty).
    first_at: u64,
}

/// Payload checks remembered: (segment, payload position) -> check.
type Checks = HashMap<(u64, u64), Arc<PayloadCheck>>;

/// Older segments' files opened for reading: name -> (file, last use).
#[derive(Default)]
struct OpenFiles {
    open: HashMap<Seq, (Arc<File>, u64)>,
    tick: u64,
}

/// Segment files kept open for reading per disk, most recently used last (reading a whole point
/// visits the segments in block order, not one after the other).
const OPEN_FILES: usize = 128;
/// Payload checks remembered (a record's payload is read whole once, then trusted).
const CHECKS: usize = 16 * 1024;

pub struct Undo {
    dir: PathBuf,
    /// Taking a failed batch's records back failed: nothing more may be appended until a restart.
    stuck: bool,
    segment_bytes: u64,
    segment_secs: u64,
    /// Every retained segment, oldest first: a few words each, whatever the records.
    segments: VecDeque<Segment>,
    /// The last segment's file, appended to.
    active: Option<Arc<File>>,
    /// Older segments' files, opened when a view reads them.
    files: Arc<Mutex<OpenFiles>>,
    checks: Arc<Mutex<Checks>>,
    /// Which records hold which old bytes, capture times and points, on disk.
    index: Arc<Index>,
    /// Named points and window edges (one per marker in the stream, not per change).
    marks: VecDeque<Mark>,
    /// (seq, capture time made non-decreasing) of the oldest and the newest retained change.
    first_time: Option<(Seq, u64)>,
    last_time: Option<(Seq, u64)>,
    /// Capture time of the newest change that expiry dropped: from then until the first retained
    /// change, the state is the oldest point's.
    floor_at: Option<u64>,
    /// Why the index misses committed records (its write failed): points are refused, and applying
    /// stops, until the journal is opened again ([`Undo::reopen`]), which indexes them from the
    /// segments. A failed redb write may also have lost its earlier unsynced commits, so nothing short
    /// of that can say what the index still holds.
    behind: Option<String>,
    /// Segments were deleted but their rows not yet: the next expiry removes them.
    expiry_due: bool,
}

/// What opening reads from the index.
struct Loaded {
    index: Index,
    indexed: std::collections::BTreeMap<u64, crate::undo_index::SegState>,
    floor_at: Option<u64>,
    bounds: Option<(crate::undo_index::Timed, crate::undo_index::Timed)>,
    marks: Vec<(u64, u8, u64, String)>,
}

impl Loaded {
    /// Opens the index of the segments `firsts` (of lengths `lens`), trimmed to them: rows of
    /// segments that expiry deleted before a crash are dropped, and an index that claims more than
    /// the segments hold, lists segments that are not there, or holds records past the applied
    /// position (which only the segments can roll back) is emptied, to be built again.
    fn read(dir: &Path, firsts: &[Seq], lens: &[u64], applied: Seq) -> Result<Loaded, UndoError> {
        let index = Index::open(dir)?;
        let mut indexed = index.segments()?;
        if let Some(first) = firsts.first() {
            if indexed.keys().next().is_some_and(|k| *k < first.0) {
                index.expire_below(first.0)?;
                indexed = index.segments()?;
            }
        }
        let claims_too_much = firsts.iter().zip(lens).any(|(f, len)| indexed.get(&f.0).is_some_and(|s| s.bytes > *len));
        let foreign = indexed.keys().any(|k| firsts.binary_search(&Seq(*k)).is_err());
        let ahead = indexed.values().any(|s| s.last > applied.0);
        if claims_too_much || foreign || ahead {
            tracing::warn!(dir = %dir.display(), claims_too_much, foreign, ahead, "the undo index does not match the segments: indexing them again");
            index.wipe()?;
            indexed.clear();
        }
        Ok(Loaded { floor_at: index.floor_at()?, bounds: index.time_bounds()?, marks: index.marks()?, index, indexed })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UndoError {
    #[error("undo journal i/o at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("undo journal corrupt at {path} offset {offset}: {reason}; the replica's points need a resync")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    #[error("undo journal index {path}: {source}")]
    Index { path: PathBuf, source: Box<redb::Error> },
    #[error("the undo journal's index missed a batch ({0}); its points are refused until it is indexed again from the segments (at the next expiry tick, or a restart)")]
    IndexBehind(String),
    #[error("point {point} is older than the oldest retained point {oldest}: its undo records expired")]
    Expired { point: Seq, oldest: Seq },
}

impl From<UndoError> for std::io::Error {
    fn from(e: UndoError) -> std::io::Error {
        match e {
            UndoError::Io { source, .. } => source,
            e => std::io::Error::other(e),
        }
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> UndoError + '_ {
    move |source| UndoError::Io { path: path.to_path_buf(), source }
}

fn seg_path(dir: &Path, first: Seq) -> PathBuf {
    dir.join(format!("{:020}.undo", first.0))
}

/// The records of a batch written and fsynced but not yet committed, with what the active segment was
/// before them, so that a failed apply can take them back ([`Undo::abort`]).
pub struct PendingBatch {
    records: Vec<Pending>,
    /// The active segment before the batch: its bytes, last seq and first capture time.
    before: (u64, Seq, u64),
    /// The batch started the segment (it held nothing before).
    created: bool,
}

impl PendingBatch {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// A record written and fsynced but not yet part of a committed batch.
pub struct Pending {
    h: Header,
    payload_pos: u64,
    tag: String,
    /// Its segment's first sequence number.
    seg: Seq,
}

struct Header {
    seq: Seq,
    at: u64,
    offset: u64,
    len: u64,
    kind: u8,
    plen: u32,
    pcrc: u32,
}

fn encode_header(h: &Header) -> [u8; HEADER] {
    let mut b = [0u8; HEADER];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[8..16].copy_from_slice(&h.seq.0.to_le_bytes());
    b[16..24].copy_from_slice(&h.at.to_le_bytes());
    b[24..32].copy_from_slice(&h.offset.to_le_bytes());
    b[32..40].copy_from_slice(&h.len.to_le_bytes());
    b[40] = h.kind;
    b[44..48].copy_from_slice(&h.plen.to_le_bytes());
    b[48..52].copy_from_slice(&h.pcrc.to_le_bytes());
    let crc = crc32c::crc32c(&b[8..]);
    b[4..8].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode_header(b: &[u8; HEADER]) -> Result<Header, String> {
    let u32_at = |a: usize| u32::from_le_bytes(b[a..a + 4].try_into().expect("4 bytes"));
    let u64_at = |a: usize| u64::from_le_bytes(b[a..a + 8].try_into().expect("8 bytes"));
    if u32_at(0) != MAGIC {
        return Err(format!("bad magic {:#x}", u32_at(0)));
    }
    if crc32c::crc32c(&b[8..]) != u32_at(4) {
        return Err("header checksum mismatch".into());
    }
    let h = Header {
        seq: Seq(u64_at(8)),
        at: u64_at(16),
        offset: u64_at(24),
        len: u64_at(32),
        kind: b[40],
        plen: u32_at(44),
        pcrc: u32_at(48),
    };
    let ok = match h.kind {
        KIND_DATA => h.plen as u64 == h.len && h.len <= CHUNK,
        KIND_ZERO => h.plen == 0,
        KIND_APP | KIND_BOOKMARK | KIND_COPY_DONE => h.len == 0 && h.plen <= 4096,
        KIND_INCONSISTENT_BEGIN | KIND_INCONSISTENT_END => h.len == 0 && h.plen == 0,
        _ => false,
    };
    if !ok {
        return Err(format!("record kind {} with length {} and payload {} is not valid", h.kind, h.len, h.plen));
    }
    Ok(h)
}

fn point_kind(kind: u8) -> PointKind {
    match kind {
        KIND_APP => PointKind::AppConsistent,
        KIND_BOOKMARK => PointKind::CrashConsistent,
        KIND_INCONSISTENT_BEGIN => PointKind::InconsistentBegin,
        KIND_INCONSISTENT_END => PointKind::InconsistentEnd,
        _ => PointKind::InitialCopyDone,
    }
}

/// Old contents of one piece, being captured for a batch.
struct Capture<'a> {
    disk: &'a DiskFile,
    batch: &'a Batch,
}

impl Capture<'_> {
    /// The bytes `offset..offset+buf.len()` as they were just before change `index` of the batch:
    /// the replica (not yet touched by this batch) with the batch's earlier changes laid on top.
    /// Returns false when they are all zero (then `buf` is left zeroed).
    fn before(&self, index: usize, offset: u64, buf: &mut [u8]) -> std::io::Result<bool> {
        let end = offset + buf.len() as u64;
        if self.disk.next_data(offset).is_some_and(|d| d < end) {
            self.disk.read_at(offset, buf)?;
        } else {
            buf.fill(0);
        }
        for c in &self.batch.changes[..index] {
            let (o, l, data) = match &c.op {
                Op::Write { offset, data } => (*offset, data.len() as u64, Some(data)),
                Op::Zero { offset, len } => (*offset, *len, None),
                Op::Marker { .. } => continue,
            };
            let (s, e) = (o.max(offset), (o + l).min(end));
            if s >= e {
                continue;
            }
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(s - o) as usize..(e - o) as usize]),
                None => dst.fill(0),
            }
        }
        Ok(!sr_common::compress::is_zero(buf))
    }
}

impl Undo {
    /// Opens the undo journal in `dir`, rolling the replica back to `applied` when a batch past it was
    /// cut short (its records are then removed). Only what the index does not hold yet is read: the
    /// active segment's tail after a crash, or every segment of a journal written before the index.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        segment_secs: u64,
        applied: Seq,
        disk: &DiskFile,
    ) -> Result<Undo, UndoError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut firsts = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io(dir))? {
            let e = e.map_err(io(dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_suffix(".undo").and_then(|n| n.parse::<u64>().ok()) {
                firsts.push(Seq(n));
            }
        }
        firsts.sort();
        let mut lens = Vec::with_capacity(firsts.len());
        for first in &firsts {
            let path = seg_path(dir, *first);
            lens.push(std::fs::metadata(&path).map_err(io(&path))?.len());
        }
        // The index is derived from the segments: one that cannot be read is built again from them.
        let loaded = match Loaded::read(dir, &firsts, &lens, applied) {
            Ok(l) => l,
            Err(UndoError::Index { source, .. })
                if matches!(*source, redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch) =>
            {
                return Err(UndoError::Io {
                    path: dir.join("index.redb"),
                    source: std::io::Error::other(
                        "the undo journal is open elsewhere (is another master target using this data directory?)",
                    ),
                });
            }
            Err(e @ UndoError::Io { .. }) => return Err(e),
            // The volume failing (full, or I/O errors), not the file's contents: the index stays, and
            // opening is tried again later.
            Err(UndoError::Index { path, source })
                if match &*source {
                    redb::Error::Io(e) => {
                        !matches!(e.kind(), std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof)
                    }
                    redb::Error::PreviousIo => true,
                    _ => false,
                } =>
            {
                let source = match *source {
                    redb::Error::Io(e) => e,
                    other => std::io::Error::other(other.to_string()),
                };
                return Err(UndoError::Io { path, source });
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "the undo index is not usable: indexing the segments again");
                let path = dir.join("index.redb");
                std::fs::remove_file(&path).map_err(io(&path))?;
                Loaded::read(dir, &firsts, &lens, applied)?
            }
        };
        let Loaded { index, indexed, floor_at, bounds, marks } = loaded;
        let mut u = Undo {
            stuck: false,
            dir: dir.to_path_buf(),
            segment_bytes,
            segment_secs,
            segments: VecDeque::new(),
            active: None,
            files: Arc::new(Mutex::new(OpenFiles::default())),
            checks: Arc::new(Mutex::new(HashMap::new())),
            index: Arc::new(index),
            marks: VecDeque::new(),
            first_time: None,
            last_time: None,
            floor_at,
            behind: None,
            expiry_due: false,
        };
        if let Some(((fs, ft), (ls, lt))) = bounds {
            u.first_time = Some((Seq(fs), ft));
            u.last_time = Some((Seq(ls), lt));
        }
        for (seq, kind, at, tag) in marks {
            u.marks.push_back(Mark { seq: Seq(seq), at_us: at, kind: point_kind(kind), tag });
        }
        let count = firsts.len();
        let mut tail: Vec<(Header, Vec<u8>)> = Vec::new();
        let mut rollback_from: Option<(usize, u64)> = None;
        let mut fresh = Additions::default();
        for (i, (first, len)) in firsts.into_iter().zip(lens).enumerate() {
            let path = seg_path(dir, first);
            let known = indexed.get(&first.0).copied();
            let mut seg = Segment {
                first,
                bytes: known.map_or(0, |s| s.bytes),
                last: known.map_or(Seq(first.0 - 1), |s| Seq(s.last)),
                first_at: known.map_or(0, |s| s.first_at),
            };
            let mut pos = seg.bytes;
            let file = if pos < len || i + 1 == count {
                Some(Arc::new(OpenOptions::new().read(true).append(true).open(&path).map_err(io(&path))?))
            } else {
                None
            };
            while pos < len {
                let file = file.as_ref().expect("opened");
                let mut hb = [0u8; HEADER];
                let header = file
                    .read_exact_at(&mut hb, pos)
                    .map_err(|e| e.to_string())
                    .and_then(|_| decode_header(&hb))
                    .and_then(|h| {
                        if pos + HEADER as u64 + h.plen as u64 <= len {
                            Ok(h)
                        } else {
                            Err("short payload".into())
                        }
                    });
                let h = match header {
                    Ok(h) => h,
                    Err(reason) => {
                        if rollback_from.is_none() && i + 1 != count {
                            return Err(UndoError::Corrupt { path, offset: pos, reason });
                        }
                        // A torn append of a batch that never committed.
                        rollback_from.get_or_insert((i, pos));
                        break;
                    }
                };
                if h.seq < seg.last || h.seq < first {
                    return Err(UndoError::Corrupt {
                        path,
                        offset: pos,
                        reason: format!("record of seq {} after seq {} in a segment from {first}", h.seq, seg.last),
                    });
                }
                if h.seq > applied || rollback_from.is_some() {
                    rollback_from.get_or_insert((i, pos));
                    let mut payload = vec![0u8; h.plen as usize];
                    file.read_exact_at(&mut payload, pos + HEADER as u64).map_err(io(&path))?;
                    if crc32c::crc32c(&payload) != h.pcrc {
                        break;
                    }
                    pos += (HEADER + payload.len()) as u64;
                    tail.push((h, payload));
                    continue;
                }
                let payload_pos = pos + HEADER as u64;
                pos = payload_pos + h.plen as u64;
                seg.bytes = pos;
                seg.last = h.seq;
                if seg.first_at == 0 {
                    seg.first_at = h.at.max(1);
                }
                let tag = if matches!(h.kind, KIND_DATA | KIND_ZERO) {
                    String::new()
                } else {
                    let mut t = vec![0u8; h.plen as usize];
                    file.read_exact_at(&mut t, payload_pos).map_err(io(&path))?;
                    String::from_utf8_lossy(&t).into_owned()
                };
                u.stage(&mut fresh, Pending { h, payload_pos, tag, seg: first });
                if fresh.recs.len() + fresh.times.len() >= 64 * 1024 {
                    // A journal indexed for the first time: in pieces, not all in memory at once.
                    fresh.segs.push((first.0, seg.bytes, seg.last.0, seg.first_at));
                    u.index.add(&std::mem::take(&mut fresh), false)?;
                }
            }
            if known.is_none_or(|k| k.bytes != seg.bytes) {
                fresh.segs.push((first.0, seg.bytes, seg.last.0, seg.first_at));
            }
            if i + 1 == count {
                u.active = file;
            }
            u.segments.push_back(seg);
        }
        if let Some((seg_idx, pos)) = rollback_from {
            for (h, payload) in tail.iter().rev() {
                let r = match h.kind {
                    KIND_DATA => disk.write_at(h.offset, payload),
                    KIND_ZERO => disk.zero(h.offset, h.len),
                    _ => Ok(()),
                };
                r.map_err(io(disk.path()))?;
            }
            disk.sync().map_err(io(disk.path()))?;
            tracing::warn!(dir = %dir.display(), records = tail.len(), "rolled back a batch that did not commit");
            while u.segments.len() > seg_idx + 1 {
                let s = u.segments.pop_back().expect("segment");
                let path = seg_path(dir, s.first);
                std::fs::remove_file(&path).map_err(io(&path))?;
            }
            let s = u.segments.back().expect("segment");
            let path = seg_path(dir, s.first);
            if pos == 0 && u.segments.len() == 1 && s.last < s.first {
                // The batch that started the journal did not commit: no points yet.
                u.segments.pop_back();
                std::fs::remove_file(&path).map_err(io(&path))?;
                u.active = None;
            } else {
                let file = Arc::new(OpenOptions::new().read(true).append(true).open(&path).map_err(io(&path))?);
                file.set_len(pos).map_err(io(&path))?;
                file.sync_all().map_err(io(&path))?;
                u.active = Some(file);
            }
            sr_common::crashsafe::fsync_dir(dir).map_err(io(dir))?;
        }
        // Not the segments the rollback removed: a row for a segment that is gone means a foreign index.
        fresh.segs.retain(|(first, ..)| u.segments.iter().any(|s| s.first.0 == *first));
        u.index.add(&fresh, true)?;
        Ok(u)
    }

    /// Adds a committed record to what the index is to be given, and to the marks kept in memory.
    fn stage(&mut self, a: &mut Additions, p: Pending) {
        let Pending { h, payload_pos, tag, seg } = p;
        let at = self.last_time.map_or(h.at, |(_, t)| h.at.max(t));
        if self.last_time.is_none_or(|(s, _)| s != h.seq) {
            a.times.push((h.seq.0, at));
            self.last_time = Some((h.seq, at));
            self.first_time.get_or_insert((h.seq, at));
        }
        match h.kind {
            KIND_DATA | KIND_ZERO => a.recs.push(IndexedRec {
                seq: h.seq.0,
                offset: h.offset,
                len: h.len,
                kind: h.kind,
                seg: seg.0,
                pos: payload_pos,
                crc: h.pcrc,
            }),
            kind => {
                a.marks.push((h.seq.0, kind, h.at, tag.clone()));
                self.marks.push_back(Mark { seq: h.seq, at_us: h.at, kind: point_kind(kind), tag });
            }
        }
    }

    /// True once the initial copy finished: from then on every change is recorded.
    pub fn active(&self) -> bool {
        !self.segments.is_empty()
    }

    fn active_file(&self) -> &Arc<File> {
        self.active.as_ref().expect("the active segment is open")
    }

    /// Writes the undo records of `batch` (which follows the applied position) and makes them durable.
    /// Once the batch is applied and committed, [`Undo::commit`] indexes them; if applying it fails,
    /// [`Undo::abort`] takes them back. A failure here leaves the journal as it was before the call.
    pub fn record_batch(&mut self, batch: &Batch, disk: &DiskFile) -> Result<PendingBatch, UndoError> {
        let none = PendingBatch { records: Vec::new(), before: (0, Seq::ZERO, 0), created: false };
        let start_at = if self.active() {
            0
        } else {
            match batch.changes.iter().position(|c| matches!(c.op, Op::Marker { kind: MarkerKind::InitialCopyDone })) {
                Some(i) => i,
                None => return Ok(none),
            }
        };
        let first = &batch.changes[start_at];
        let segments_before = self.segments.len();
        self.rotate_if_due(first.seq, first.at)?;
        let seg = self.segments.back().expect("active segment");
        let created = self.segments.len() > segments_before;
        let before = (seg.bytes, seg.last, seg.first_at);
        let (path, base, name) = (seg_path(&self.dir, seg.first), seg.bytes, seg.first);
        let file = self.active_file().clone();
        let written = self
            .write_records(batch, start_at, disk, &file, name, base)
            .and_then(|r| crate::failpoint::check("undo.sync").and_then(|_| file.sync_data()).map(|_| r));
        let (bytes, pending) = match written {
            Ok(v) => v,
            Err(e) => {
                self.take_back(before, created)?;
                return Err(io(&path)(e));
            }
        };
        let seg = self.segments.back_mut().expect("active segment");
        seg.bytes = base + bytes;
        if let Some(p) = pending.last() {
            seg.last = p.h.seq;
        }
        if seg.first_at == 0 {
            seg.first_at = pending.first().map_or(0, |p| p.h.at.max(1));
        }
        Ok(PendingBatch { records: pending, before, created })
    }

    /// Indexes the records of a committed batch. An error leaves the index behind the journal: points
    /// are refused ([`UndoError::IndexBehind`]) and nothing more is indexed until [`Undo::reopen`].
    pub fn commit(&mut self, pending: PendingBatch) -> Result<(), UndoError> {
        if let Some(why) = &self.behind {
            return Err(UndoError::IndexBehind(why.clone()));
        }
        let created = pending.created;
        if pending.records.is_empty() && !created {
            return Ok(());
        }
        let mut a = Additions::default();
        for p in pending.records {
            self.stage(&mut a, p);
        }
        if let Some(seg) = self.segments.back() {
            a.segs.push((seg.first.0, seg.bytes, seg.last.0, seg.first_at));
        }
        // A batch that starts a segment syncs the index: after a crash, only the active segment's
        // records can be missing from it.
        let r = crate::failpoint::check("undo.index").map_err(io(&self.dir)).and_then(|_| self.index.add(&a, created));
        if let Err(e) = &r {
            self.behind = Some(e.to_string());
            self.index.close();
        }
        r
    }

    /// The index missed a committed batch: only opening the journal again catches it up.
    pub fn index_behind(&self) -> bool {
        self.behind.is_some()
    }

    /// Opens the journal again, as a restart does (the index is caught up from the segments; records
    /// past `applied` are rolled back from the replica).
    pub fn reopen(&mut self, applied: Seq, disk: &DiskFile) -> Result<(), UndoError> {
        self.index.close();
        *self = Undo::open(&self.dir, self.segment_bytes, self.segment_secs, applied, disk)?;
        Ok(())
    }

    /// Applying a batch failed after its records were written: puts the old contents they hold back
    /// onto the replica (newest first), makes it durable, and takes the records out of the journal, so
    /// that a retry finds the replica and the journal as they were before the batch. An error here
    /// leaves the records in place, which is what a restart rolls back from ([`Undo::open`]).
    pub fn abort(&mut self, pending: PendingBatch, disk: &DiskFile) -> Result<(), UndoError> {
        let Some(seg) = self.segments.back() else { return Ok(()) };
        if pending.records.is_empty() {
            return Ok(());
        }
        let path = seg_path(&self.dir, seg.first);
        let file = self.active_file().clone();
        let mut buf = Vec::new();
        for p in pending.records.iter().rev() {
            match p.h.kind {
                KIND_DATA => {
                    buf.resize(p.h.plen as usize, 0);
                    file.read_exact_at(&mut buf, p.payload_pos).map_err(io(&path))?;
                    if crc32c::crc32c(&buf) != p.h.pcrc {
                        return Err(UndoError::Corrupt {
                            path,
                            offset: p.payload_pos,
                            reason: "an undo record read back for a rollback does not match its checksum".into(),
                        });
                    }
                    disk.write_at(p.h.offset, &buf).map_err(io(disk.path()))?;
                }
                KIND_ZERO => disk.zero(p.h.offset, p.h.len).map_err(io(disk.path()))?,
                _ => {}
            }
        }
        crate::failpoint::check("undo.abort").and_then(|_| disk.sync()).map_err(io(disk.path()))?;
        self.take_back(pending.before, pending.created)
    }

    /// Truncates the active segment back to `before` (bytes, last, first capture time), and removes it
    /// when the batch had started it.
    fn take_back(&mut self, before: (u64, Seq, u64), created: bool) -> Result<(), UndoError> {
        // Cleared only when the journal is as it was again.
        self.stuck = true;
        let file = self.active_file().clone();
        let seg = self.segments.back_mut().expect("active segment");
        let path = seg_path(&self.dir, seg.first);
        file.set_len(before.0).and_then(|_| file.sync_data()).map_err(io(&path))?;
        (seg.bytes, seg.last, seg.first_at) = before;
        if created && before.0 == 0 {
            // An empty segment the batch started must not stay: its name claims where points begin.
            self.segments.pop_back();
            std::fs::remove_file(&path).map_err(io(&path))?;
            sr_common::crashsafe::fsync_dir(&self.dir).map_err(io(&self.dir))?;
            self.active = self.segments.back().map(|s| self.open_segment(s.first)).transpose()?;
        }
        self.stuck = false;
        Ok(())
    }

    fn open_segment(&self, first: Seq) -> Result<Arc<File>, UndoError> {
        let path = seg_path(&self.dir, first);
        Ok(Arc::new(OpenOptions::new().read(true).append(true).open(&path).map_err(io(&path))?))
    }

    /// A batch's records could not be taken back: the journal may hold records past the applied
    /// position, which only a restart's rollback removes.
    pub fn needs_restart(&self) -> bool {
        self.stuck
    }

    /// Starts a new segment (named `next`) when the active one is full or old, or when there is none.
    fn rotate_if_due(&mut self, next: Seq, at: u64) -> Result<(), UndoError> {
        let due = match self.segments.back() {
            None => true,
            Some(s) => {
                s.bytes >= self.segment_bytes
                    || (s.first_at > 0 && at.saturating_sub(s.first_at) >= self.segment_secs * 1_000_000)
            }
        };
        if !due {
            return Ok(());
        }
        if let Some(s) = self.segments.back() {
            if s.bytes == 0 {
                return Ok(());
            }
        }
        let path = seg_path(&self.dir, next);
        let file =
            Arc::new(OpenOptions::new().read(true).append(true).create_new(true).open(&path).map_err(io(&path))?);
        sr_common::crashsafe::fsync_dir(&self.dir).map_err(io(&self.dir))?;
        self.segments.push_back(Segment { first: next, bytes: 0, last: Seq(next.0 - 1), first_at: 0 });
        self.active = Some(file);
        Ok(())
    }

    fn write_records(
        &self,
        batch: &Batch,
        start_at: usize,
        disk: &DiskFile,
        file: &Arc<File>,
        seg: Seq,
        base: u64,
    ) -> std::io::Result<(u64, Vec<Pending>)> {
        let cap = Capture { disk, batch };
        let mut w = std::io::BufWriter::with_capacity(1 << 20, &**file);
        let mut written = 0u64;
        let mut pending = Vec::new();
        let mut buf = vec![0u8; CHUNK as usize];
        let mut put = |h: Header, payload: &[u8], tag: String, w: &mut std::io::BufWriter<&File>| {
            w.write_all(&encode_header(&h))?;
            w.write_all(payload)?;
            crate::failpoint::check("undo.write")?;
            let payload_pos = base + written + HEADER as u64;
            written += (HEADER + payload.len()) as u64;
            pending.push(Pending { h, payload_pos, tag, seg });
            std::io::Result::Ok(())
        };
        for (i, c) in batch.changes.iter().enumerate().skip(start_at) {
            let (offset, len) = match &c.op {
                Op::Write { offset, data } => (*offset, data.len() as u64),
                Op::Zero { offset, len } => (*offset, *len),
                Op::Marker { kind } => {
                    let (kind, tag) = match kind {
                        MarkerKind::AppConsistent { tag } => (KIND_APP, tag.as_str()),
                        MarkerKind::Bookmark { tag } => (KIND_BOOKMARK, tag.as_str()),
                        MarkerKind::InitialCopyDone => (KIND_COPY_DONE, ""),
                        MarkerKind::InconsistentBegin => (KIND_INCONSISTENT_BEGIN, ""),
                        MarkerKind::InconsistentEnd => (KIND_INCONSISTENT_END, ""),
                        MarkerKind::Flush => continue,
                    };
                    let mut end = tag.len().min(4096);
                    while !tag.is_char_boundary(end) {
                        end -= 1;
                    }
                    let tag = &tag[..end];
                    let h = Header {
                        seq: c.seq,
                        at: c.at,
                        offset: 0,
                        len: 0,
                        kind,
                        plen: tag.len() as u32,
                        pcrc: crc32c::crc32c(tag.as_bytes()),
                    };
                    put(h, tag.as_bytes(), tag.to_string(), &mut w)?;
                    continue;
                }
            };
            let mut o = offset;
            while o < offset + len {
                let n = (offset + len - o).min(CHUNK);
                let piece = &mut buf[..n as usize];
                let data = cap.before(i, o, piece)?;
                let h = Header {
                    seq: c.seq,
                    at: c.at,
                    offset: o,
                    len: n,
                    kind: if data { KIND_DATA } else { KIND_ZERO },
                    plen: if data { n as u32 } else { 0 },
                    pcrc: if data { crc32c::crc32c(piece) } else { 0 },
                };
                put(h, if data { piece } else { &[] }, String::new(), &mut w)?;
                o += n;
            }
        }
        w.flush()?;
        drop(w);
        Ok((written, pending))
    }

    /// The oldest retained point (every record after it is kept), or `None` before the initial copy
    /// finished.
    pub fn oldest(&self) -> Option<Seq> {
        self.segments.front().map(|s| Seq(s.first.0 - 1))
    }

    /// Where the contents at `point` of `start..end` differ from the replica ([`Reader::view_map`]).
    pub fn view_map(&self, point: Seq, start: u64, end: u64) -> Result<ViewMap, UndoError> {
        self.reader().view_map(point, start, end)
    }

    /// What reading points needs, to use without the journal's lock.
    pub fn reader(&self) -> Reader {
        Reader {
            index: self.index.clone(),
            files: self.files.clone(),
            checks: self.checks.clone(),
            dir: self.dir.clone(),
            active: self.segments.back().zip(self.active.clone()).map(|(s, f)| (s.first, f)),
            behind: self.behind.clone(),
            oldest: self.oldest(),
        }
    }

    /// The point at capture time `at_us`: the last change captured at or before it. `latest` is the
    /// applied position (returned when `at_us` is not before the newest recorded change).
    pub fn point_at(&self, at_us: u64, latest: Seq) -> Result<Seq, String> {
        if !self.active() {
            return Err("no recovery points yet: the initial copy has not finished".into());
        }
        match self.last_time {
            Some((_, t)) if at_us >= t => return Ok(latest),
            None => return Ok(latest),
            _ => {}
        }
        let found = self.index.seq_at(at_us).map_err(|e| e.to_string())?;
        match found {
            Some(seq) if self.first_time.is_some_and(|(first, _)| seq >= first.0) => Ok(Seq(seq)),
            _ => {
                if self.floor_at.is_some_and(|f| at_us >= f) {
                    return self.oldest().ok_or_else(|| "no recovery points".to_string());
                }
                let first = self.first_time.map_or(0, |(_, t)| t);
                Err(format!("{} is before the oldest retained point ({})", fmt_time(at_us), fmt_time(first)))
            }
        }
    }

    /// Capture time of the change at `seq` (or of the last one before it).
    pub fn time_of(&self, seq: Seq) -> Option<u64> {
        if self.first_time.is_none_or(|(first, _)| seq < first) {
            return None;
        }
        match self.index.time_of(seq.0) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, "reading a capture time from the undo index");
                None
            }
        }
    }

    pub fn marks(&self) -> impl Iterator<Item = &Mark> {
        self.marks.iter()
    }

    /// The retained stretches whose points are not crash-consistent, oldest first.
    pub fn windows(&self) -> Vec<Window> {
        windows(self.marks.iter().map(|m| (m.kind, m.seq, m.at_us)))
    }

    /// The window the state at `seq` lies in, if any.
    pub fn window_at(&self, seq: Seq) -> Option<Window> {
        self.windows().into_iter().find(|w| w.contains(seq))
    }

    /// Time range of the retained changes (oldest, newest), µs.
    pub fn time_range(&self) -> Option<(u64, u64)> {
        Some((self.first_time?.1, self.last_time?.1))
    }

    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Deletes whole segments holding only records at or before `keep_after` (that point and newer
    /// ones stay readable). The active segment is never deleted. Returns bytes freed.
    pub fn expire_through(&mut self, keep_after: Seq) -> Result<u64, UndoError> {
        let mut freed = 0;
        while self.segments.len() > 1 && self.segments[1].first.0 - 1 <= keep_after.0 {
            let s = self.segments.pop_front().expect("segment");
            let path = seg_path(&self.dir, s.first);
            std::fs::remove_file(&path).map_err(io(&path))?;
            self.files.lock().expect("files lock poisoned").open.remove(&s.first);
            freed += s.bytes;
        }
        if freed == 0 && !self.expiry_due {
            return Ok(0);
        }
        // The files go first: an index that still lists them after a crash is trimmed at open.
        self.expiry_due = true;
        sr_common::crashsafe::fsync_dir(&self.dir).map_err(io(&self.dir))?;
        let next_first = self.segments[0].first;
        while self.marks.front().is_some_and(|m| m.seq < next_first) {
            self.marks.pop_front();
        }
        self.checks.lock().expect("checks lock poisoned").retain(|(seg, _), _| *seg >= next_first.0);
        if let Some(t) = self.index.expire_below(next_first.0)? {
            self.floor_at = Some(t);
        }
        self.expiry_due = false;
        self.first_time = self.index.time_bounds()?.map(|((s, t), _)| (Seq(s), t));
        if self.first_time.is_none() {
            self.last_time = None;
        }
        Ok(freed)
    }
}

/// What reading a point needs, taken from the journal under its lock and used without it: the
/// replica's gate keeps batches out meanwhile, expiry keeps what open views need, and the index is
/// read in a snapshot (so views on several connections read in parallel).
pub struct Reader {
    index: Arc<Index>,
    files: Arc<Mutex<OpenFiles>>,
    checks: Arc<Mutex<Checks>>,
    dir: PathBuf,
    /// The active segment's name and file.
    active: Option<(Seq, Arc<File>)>,
    behind: Option<String>,
    oldest: Option<Seq>,
}

impl Reader {
    /// Where the contents at `point` of `start..end` differ from the replica: for each byte, the first
    /// record after the point that covers it. Costs a few index lookups per 64 KiB block touched by
    /// records after the point, whatever the retention.
    pub fn view_map(&self, point: Seq, start: u64, end: u64) -> Result<ViewMap, UndoError> {
        self.lay(point, start, end, true)
    }

    /// The ranges inside `start..end` that some record after `point` covers (where the point may
    /// differ from the replica), without reading any record: what block status needs.
    pub fn covered(&self, point: Seq, start: u64, end: u64) -> Result<Vec<(u64, u64)>, UndoError> {
        Ok(self.lay(point, start, end, false)?.ranges())
    }

    /// Lays the first record after `point` over each byte of `start..end`; with `read_records` false,
    /// every piece says zeroes (only where pieces lie is wanted, and no record is opened).
    fn lay(&self, point: Seq, start: u64, end: u64, read_records: bool) -> Result<ViewMap, UndoError> {
        if let Some(why) = &self.behind {
            return Err(UndoError::IndexBehind(why.clone()));
        }
        // Records after an expired point may be gone: an error, never the replica's bytes instead.
        match self.oldest {
            Some(oldest) if point < oldest => return Err(UndoError::Expired { point, oldest }),
            _ => {}
        }
        let mut map = ViewMap::default();
        let mut failed = None;
        let mut block = u64::MAX;
        let mut covered = 0;
        self.index.covering(point.0, start, end, |b, r| {
            if b != block {
                (block, covered) = (b, 0);
            }
            // The record's part inside this block and inside start..end.
            let s = r.offset.max(start).max(b * IDX_BLOCK);
            let e = (r.offset + r.len).min(end).min((b + 1) * IDX_BLOCK);
            if s >= e || map.gaps(s, e) == 0 {
                return covered;
            }
            let old = if read_records {
                match self.old_of(r) {
                    Ok(old) => advance(&old, s - r.offset),
                    Err(err) => {
                        failed.get_or_insert(err);
                        return u64::MAX;
                    }
                }
            } else {
                Old::Zero
            };
            covered += map.add(&Rec { seq: Seq(r.seq), offset: s, len: e - s, old });
            covered
        })?;
        match failed {
            Some(e) => Err(e),
            None => Ok(map),
        }
    }

    /// Where an indexed record's old contents are. A record's header in its segment must say what the index says (a damaged index row is an
    /// error, never another record's bytes): checked with the payload when it is first read
    /// ([`PayloadCheck`]), and at once for a record of zeroes (which has no payload to read).
    fn old_of(&self, r: &IndexedRec) -> Result<Old, UndoError> {
        if r.len == 0 || r.len > CHUNK || !matches!(r.kind, KIND_DATA | KIND_ZERO) {
            return Err(UndoError::Corrupt {
                path: self.dir.join("index.redb"),
                offset: 0,
                reason: format!(
                    "an index row names a record of kind {} and length {} (seq {}): remove index.redb and restart \
                     the master target to index the segments again",
                    r.kind, r.len, r.seq
                ),
            });
        }
        let file = self.file(Seq(r.seg))?;
        let known = self.checks.lock().expect("checks lock poisoned").get(&(r.seg, r.pos)).cloned();
        // Only the check of this very row: two rows naming one place (one of them damaged) never
        // share one.
        let plen = if r.kind == KIND_DATA { r.len as u32 } else { 0 };
        let known =
            known.filter(|c| c.expect == Some((r.seq, r.offset, r.len, r.kind)) && c.crc == r.crc && c.len == plen);
        let check = match known {
            Some(c) => c,
            None => {
                let c = Arc::new(PayloadCheck::of(r));
                if r.kind != KIND_DATA {
                    let path = seg_path(&self.dir, Seq(r.seg));
                    c.verify(&file).map_err(|e| match e.kind() {
                        std::io::ErrorKind::InvalidData => {
                            UndoError::Corrupt { path, offset: r.pos, reason: e.to_string() }
                        }
                        _ => UndoError::Io { path, source: e },
                    })?;
                }
                let mut checks = self.checks.lock().expect("checks lock poisoned");
                if checks.len() >= CHECKS {
                    checks.clear();
                }
                checks.insert((r.seg, r.pos), c.clone());
                c
            }
        };
        if r.kind != KIND_DATA {
            return Ok(Old::Zero);
        }
        Ok(Old::Data { file, pos: r.pos, check })
    }

    /// The file of the segment named `first`, for reading.
    fn file(&self, first: Seq) -> Result<Arc<File>, UndoError> {
        if let Some((_, f)) = self.active.as_ref().filter(|(a, _)| *a == first) {
            return Ok(f.clone());
        }
        let mut files = self.files.lock().expect("files lock poisoned");
        files.tick += 1;
        let tick = files.tick;
        if let Some((f, used)) = files.open.get_mut(&first) {
            *used = tick;
            return Ok(f.clone());
        }
        let path = seg_path(&self.dir, first);
        let file = Arc::new(File::open(&path).map_err(io(&path))?);
        if files.open.len() >= OPEN_FILES {
            let coldest = files.open.iter().min_by_key(|(_, (_, used))| *used).map(|(s, _)| *s);
            coldest.and_then(|s| files.open.remove(&s));
        }
        files.open.insert(first, (file.clone(), tick));
        Ok(file)
    }
}

pub(crate) fn advance(old: &Old, by: u64) -> Old {
    match old {
        Old::Zero => Old::Zero,
        Old::Data { file, pos, check } => Old::Data { file: file.clone(), pos: pos + by, check: check.clone() },
    }
}

pub fn fmt_time(us: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(us as i128 * 1000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| format!("{us} µs"))
}

/// Pairs the window edges among `marks` (kind, seq, capture time, in stream order). A second begin
/// inside an open window is a no-op. The agent writes an end only after its beginning, so an end seen
/// before any beginning means the window began before the oldest retained point (expiry dropped it).
pub fn windows(marks: impl Iterator<Item = (PointKind, Seq, u64)>) -> Vec<Window> {
    let mut out = Vec::new();
    let mut open: Option<Option<(Seq, u64)>> = None;
    let mut first_edge = true;
    for (kind, seq, at) in marks {
        match kind {
            PointKind::InconsistentBegin if open.is_none() => open = Some(Some((seq, at))),
            PointKind::InconsistentEnd if open.is_none() && first_edge => {
                out.push(Window { begin: None, end: Some((seq, at)) })
            }
            PointKind::InconsistentEnd => {
                if let Some(begin) = open.take() {
                    out.push(Window { begin, end: Some((seq, at)) });
                }
            }
            _ => continue,
        }
        first_edge = false;
    }
    if let Some(begin) = open {
        out.push(Window { begin, end: None });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_edges_pair_up_and_repeats_are_harmless() {
        use PointKind::{AppConsistent as A, InconsistentBegin as B, InconsistentEnd as E};
        let w = |b: Option<u64>, e: Option<u64>| Window {
            begin: b.map(|s| (Seq(s), s * 10)),
            end: e.map(|s| (Seq(s), s * 10)),
        };
        let run = |m: &[(PointKind, u64)]| windows(m.iter().map(|(k, s)| (*k, Seq(*s), s * 10)));
        assert_eq!(run(&[(A, 1)]), vec![]);
        assert_eq!(run(&[(B, 5), (A, 7), (E, 9)]), vec![w(Some(5), Some(9))]);
        assert_eq!(run(&[(B, 5), (B, 6), (E, 9), (E, 12)]), vec![w(Some(5), Some(9))], "repeats after a restart");
        assert_eq!(run(&[(E, 3), (B, 5)]), vec![w(None, Some(3)), w(Some(5), None)], "begun before the oldest point");
        assert_eq!(run(&[(B, 2), (E, 3), (E, 4)]), vec![w(Some(2), Some(3))], "a repeated end is nothing");
        let open = w(Some(5), None);
        assert!(!open.contains(Seq(5)) && open.contains(Seq(6)) && open.contains(Seq(1 << 40)));
        let closed = w(Some(5), Some(9));
        assert!(!closed.contains(Seq(5)) && closed.contains(Seq(8)) && !closed.contains(Seq(9)));
        assert!(w(None, Some(3)).contains(Seq(1)));
    }
}
