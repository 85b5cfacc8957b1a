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
//! record = header (56 bytes, little endian) + payload
//!   magic "SRU1" | crc32c(header[8..56]) | seq | capture time µs | offset | len | kind | pad
//!   | payload length u32 | crc32c(payload) | pad
//! kinds: old data (payload = the len old bytes), old zeroes (no payload), app-consistent point,
//!        bookmark, initial copy done (payload = tag)
//! ```
//!
//! Order of an apply: undo records written and fsynced, then the replica written and fsynced, then
//! the applied position committed in the state store. On open, records past the committed position
//! belong to a batch that did not commit: their old contents are written back (newest first), so the
//! replica is exactly the committed state again, and they are cut off. Nothing is kept for changes
//! before the initial copy finished: those states are not consistent and cannot be points.

use sr_common::disk::DiskFile;
use sr_common::types::Seq;
use sr_common::wire::{Batch, MarkerKind, Op};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
/// that a point is never read from undo bytes that changed on disk.
#[derive(Debug)]
pub struct PayloadCheck {
    /// Where the payload starts in its file, its length and its crc32c.
    pub pos: u64,
    pub len: u32,
    pub crc: u32,
    verified: std::sync::atomic::AtomicBool,
}

impl PayloadCheck {
    pub fn new(pos: u64, len: u32, crc: u32) -> PayloadCheck {
        PayloadCheck { pos, len, crc, verified: std::sync::atomic::AtomicBool::new(false) }
    }

    /// Reads the whole payload once and compares its checksum; an error says where it is corrupt.
    pub fn verify(&self, file: &File) -> std::io::Result<()> {
        use std::sync::atomic::Ordering;
        if self.verified.load(Ordering::Acquire) {
            return Ok(());
        }
        let mut buf = vec![0u8; self.len as usize];
        file.read_exact_at(&mut buf, self.pos)?;
        if crc32c::crc32c(&buf) != self.crc {
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

struct Segment {
    first: Seq,
    path: PathBuf,
    file: Arc<File>,
    bytes: u64,
    /// Last sequence number recorded in the segment (first - 1 while empty).
    last: Seq,
    /// Capture time of its first record (0 while empty).
    first_at: u64,
}

pub struct Undo {
    dir: PathBuf,
    /// Taking a failed batch's records back failed: nothing more may be appended until a restart.
    stuck: bool,
    segment_bytes: u64,
    segment_secs: u64,
    segments: VecDeque<Segment>,
    /// Every retained record, in sequence order.
    recs: VecDeque<Rec>,
    /// (seq, capture time made non-decreasing) of every retained change, in sequence order.
    times: VecDeque<(Seq, u64)>,
    marks: VecDeque<Mark>,
    /// Capture time of the newest change that expiry dropped: from then until the first retained
    /// change, the state is the oldest point's.
    floor_at: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum UndoError {
    #[error("undo journal i/o at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("undo journal corrupt at {path} offset {offset}: {reason}; the replica's points need a resync")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
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
    file: Arc<File>,
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
    /// cut short (its records are then removed).
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
        let mut u = Undo {
            stuck: false,
            dir: dir.to_path_buf(),
            segment_bytes,
            segment_secs,
            segments: VecDeque::new(),
            recs: VecDeque::new(),
            times: VecDeque::new(),
            marks: VecDeque::new(),
            floor_at: None,
        };
        let count = firsts.len();
        let mut tail: Vec<(Header, Vec<u8>)> = Vec::new();
        let mut rollback_from: Option<(usize, u64)> = None;
        for (i, first) in firsts.into_iter().enumerate() {
            let path = seg_path(dir, first);
            let file = Arc::new(OpenOptions::new().read(true).append(true).open(&path).map_err(io(&path))?);
            let len = file.metadata().map_err(io(&path))?.len();
            let mut seg = Segment {
                first,
                path: path.clone(),
                file: file.clone(),
                bytes: 0,
                last: Seq(first.0 - 1),
                first_at: 0,
            };
            let mut pos = 0u64;
            while pos < len {
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
                u.index(Pending { h, payload_pos, tag, file: file.clone() });
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
                std::fs::remove_file(&s.path).map_err(io(&s.path))?;
            }
            let s = u.segments.back().expect("segment");
            if pos == 0 && u.segments.len() == 1 && s.last < s.first {
                // The batch that started the journal did not commit: no points yet.
                let s = u.segments.pop_back().expect("segment");
                std::fs::remove_file(&s.path).map_err(io(&s.path))?;
            } else {
                s.file.set_len(pos).map_err(io(&s.path))?;
                s.file.sync_all().map_err(io(&s.path))?;
            }
            sr_common::crashsafe::fsync_dir(dir).map_err(io(dir))?;
        }
        Ok(u)
    }

    /// Adds a committed record to the in-memory index; returns it when it holds old contents.
    fn index(&mut self, p: Pending) -> Option<Rec> {
        let Pending { h, payload_pos, tag, file } = p;
        let at = self.times.back().map_or(h.at, |(_, t)| h.at.max(*t));
        if self.times.back().is_none_or(|(s, _)| *s != h.seq) {
            self.times.push_back((h.seq, at));
        }
        let old = match h.kind {
            KIND_DATA => {
                Old::Data { file, pos: payload_pos, check: Arc::new(PayloadCheck::new(payload_pos, h.plen, h.pcrc)) }
            }
            KIND_ZERO => Old::Zero,
            kind => {
                let kind = match kind {
                    KIND_APP => PointKind::AppConsistent,
                    KIND_BOOKMARK => PointKind::CrashConsistent,
                    KIND_INCONSISTENT_BEGIN => PointKind::InconsistentBegin,
                    KIND_INCONSISTENT_END => PointKind::InconsistentEnd,
                    _ => PointKind::InitialCopyDone,
                };
                self.marks.push_back(Mark { seq: h.seq, at_us: h.at, kind, tag });
                return None;
            }
        };
        let rec = Rec { seq: h.seq, offset: h.offset, len: h.len, old };
        self.recs.push_back(rec.clone());
        Some(rec)
    }

    /// True once the initial copy finished: from then on every change is recorded.
    pub fn active(&self) -> bool {
        !self.segments.is_empty()
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
        let (file, path, base) = (seg.file.clone(), seg.path.clone(), seg.bytes);
        let written = self
            .write_records(batch, start_at, disk, &file, base)
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

    /// Indexes the records of a committed batch; returns those holding old contents, for open views.
    pub fn commit(&mut self, pending: PendingBatch) -> Vec<Rec> {
        pending.records.into_iter().filter_map(|p| self.index(p)).collect()
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
        let path = seg.path.clone();
        let mut buf = Vec::new();
        for p in pending.records.iter().rev() {
            match p.h.kind {
                KIND_DATA => {
                    buf.resize(p.h.plen as usize, 0);
                    p.file.read_exact_at(&mut buf, p.payload_pos).map_err(io(&path))?;
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
        let seg = self.segments.back_mut().expect("active segment");
        seg.file.set_len(before.0).and_then(|_| seg.file.sync_data()).map_err(io(&seg.path))?;
        (seg.bytes, seg.last, seg.first_at) = before;
        if created && before.0 == 0 {
            // An empty segment the batch started must not stay: its name claims where points begin.
            let seg = self.segments.pop_back().expect("active segment");
            std::fs::remove_file(&seg.path).map_err(io(&seg.path))?;
            sr_common::crashsafe::fsync_dir(&self.dir).map_err(io(&self.dir))?;
        }
        self.stuck = false;
        Ok(())
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
        self.segments.push_back(Segment { first: next, path, file, bytes: 0, last: Seq(next.0 - 1), first_at: 0 });
        Ok(())
    }

    fn write_records(
        &self,
        batch: &Batch,
        start_at: usize,
        disk: &DiskFile,
        file: &Arc<File>,
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
            pending.push(Pending { h, payload_pos, tag, file: file.clone() });
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

    /// Records after `point`, in sequence order.
    pub fn after(&self, point: Seq) -> impl Iterator<Item = &Rec> {
        let from = self.recs.partition_point(|r| r.seq <= point);
        self.recs.range(from..)
    }

    /// The point at capture time `at_us`: the last change captured at or before it. `latest` is the
    /// applied position (returned when `at_us` is not before the newest recorded change).
    pub fn point_at(&self, at_us: u64, latest: Seq) -> Result<Seq, String> {
        if !self.active() {
            return Err("no recovery points yet: the initial copy has not finished".into());
        }
        match self.times.back() {
            Some((_, t)) if at_us >= *t => return Ok(latest),
            None => return Ok(latest),
            _ => {}
        }
        let i = self.times.partition_point(|(_, t)| *t <= at_us);
        if i == 0 {
            if self.floor_at.is_some_and(|f| at_us >= f) {
                return self.oldest().ok_or_else(|| "no recovery points".to_string());
            }
            let first = self.times.front().map_or(0, |(_, t)| *t);
            return Err(format!("{} is before the oldest retained point ({})", fmt_time(at_us), fmt_time(first)));
        }
        Ok(self.times[i - 1].0)
    }

    /// Capture time of the change at `seq` (or of the last one before it).
    pub fn time_of(&self, seq: Seq) -> Option<u64> {
        let i = self.times.partition_point(|(s, _)| *s <= seq);
        (i > 0).then(|| self.times[i - 1].1)
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
        Some((self.times.front()?.1, self.times.back()?.1))
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
            std::fs::remove_file(&s.path).map_err(io(&s.path))?;
            freed += s.bytes;
            let next_first = self.segments[0].first;
            while self.recs.front().is_some_and(|r| r.seq < next_first) {
                self.recs.pop_front();
            }
            while self.times.front().is_some_and(|(s, _)| *s < next_first) {
                self.floor_at = self.times.pop_front().map(|(_, t)| t);
            }
            while self.marks.front().is_some_and(|m| m.seq < next_first) {
                self.marks.pop_front();
            }
        }
        Ok(freed)
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
