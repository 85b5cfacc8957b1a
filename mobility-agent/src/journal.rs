//! The agent's durable change journal: every change of a protected disk, in order, with a per-disk
//! sequence number, kept until the process server acknowledges it as durable.
//!
//! ```text
//! journal/
//!   00000000000000000001.seg   records seq 1..=k       (closed, fsynced at rotation)
//!   0000000000000000000k+1.seg records seq k+1..       (active, appended)
//! record = header (48 bytes, little endian) + payload
//!   magic "SRJ2" | crc32c(header[8..] + payload) | seq | offset | arg | kind | pad | payload length
//!   | capture time (µs since the Unix epoch)
//! ```
//!
//! A segment written by this release starts with a 64-byte header (magic "SRJS" | crc32c(header[8..]) |
//! first seq | salt | pad), and its records' checksums are seeded with the salt, a random number drawn
//! each time the file is (re)used. Trimmed segments are kept as spares (`*.spare`, at most
//! [`MAX_SPARES`]) and reused at the next rotation, so appends overwrite blocks the file system already
//! holds and a FLUSH's fdatasync has no file size or allocation to commit. A reused file still holds
//! its previous records past the new ones: under the new salt they fail their checksum, so a scan
//! stops at the true end, and nothing a guest wrote into a record's payload can pass as a record. A
//! segment without the header (earlier releases) is read as before: unsalted, ending where the file ends.
//!
//! A segment's name is the sequence number of its first record, so the next sequence number survives
//! even when every record has been trimmed. Beside the segments, `redo.mark` holds the redo mark: every
//! record up to it is known to be on the disk (see the redo rule in `mode.rs`). It is two fixed 32-byte
//! slots written in place and alternately (magic "SRRM" | crc32c | generation | seq | pad), the valid
//! one with the higher generation counting, so updating it never needs free space and a torn update
//! leaves the previous mark. Appends are one `write` each (the header and payload
//! together); a FLUSH fsyncs the active segment. On open, a torn or corrupt tail of the last segment
//! (an append cut short by a crash) is cut off; corruption anywhere else is fatal, never skipped.

use sr_common::types::Seq;
use sr_common::wire::{MarkerKind, Op};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: u32 = u32::from_le_bytes(*b"SRJ2");
const HEADER: usize = 48;
/// A segment is closed and a new one started past this size.
pub const SEGMENT_BYTES: u64 = 32 << 20;

const MAX_PAYLOAD: u32 = sr_common::wire::MAX_WRITE as u32;

const SEG_MAGIC: u32 = u32::from_le_bytes(*b"SRJS");
/// Bytes of a segment's header; its records follow.
const SEG_HEADER: u64 = 64;
/// Trimmed segments kept for reuse, at most.
pub const MAX_SPARES: usize = 2;

const KIND_WRITE: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_FLUSH: u8 = 3;
const KIND_APP: u8 = 4;
const KIND_COPY_DONE: u8 = 5;
const KIND_BOOKMARK: u8 = 6;
const KIND_INCONSISTENT_BEGIN: u8 = 7;
const KIND_INCONSISTENT_END: u8 = 8;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal i/o at {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("journal corrupt at {path} offset {offset}: {reason}; the disk needs a resync")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io { path: path.to_path_buf(), source }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: Seq,
    /// When the change was captured, in µs since the Unix epoch (the source's clock).
    pub at: u64,
    pub op: Op,
}

impl Record {
    /// Bytes this record takes in a segment.
    pub fn encoded_len(&self) -> u64 {
        HEADER as u64
            + match &self.op {
                Op::Write { data, .. } => data.len() as u64,
                Op::Marker { kind: MarkerKind::AppConsistent { tag } | MarkerKind::Bookmark { tag } } => {
                    tag.len() as u64
                }
                _ => 0,
            }
    }
}

fn encode(seed: u32, seq: Seq, at: u64, op: &Op) -> Vec<u8> {
    let (kind, offset, arg, payload): (u8, u64, u64, &[u8]) = match op {
        Op::Write { offset, data } => (KIND_WRITE, *offset, data.len() as u64, data),
        Op::Zero { offset, len } => (KIND_ZERO, *offset, *len, &[]),
        Op::Marker { kind: MarkerKind::Flush } => (KIND_FLUSH, 0, 0, &[]),
        Op::Marker { kind: MarkerKind::AppConsistent { tag } } => (KIND_APP, 0, 0, tag.as_bytes()),
        Op::Marker { kind: MarkerKind::Bookmark { tag } } => (KIND_BOOKMARK, 0, 0, tag.as_bytes()),
        Op::Marker { kind: MarkerKind::InitialCopyDone } => (KIND_COPY_DONE, 0, 0, &[]),
        Op::Marker { kind: MarkerKind::InconsistentBegin } => (KIND_INCONSISTENT_BEGIN, 0, 0, &[]),
        Op::Marker { kind: MarkerKind::InconsistentEnd } => (KIND_INCONSISTENT_END, 0, 0, &[]),
    };
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&encode_header(seed, seq, at, kind, offset, arg, payload));
    out.extend_from_slice(payload);
    out
}

/// Writes `head` then `tail` at byte `pos` with as few `writev` calls as the kernel allows.
fn write_all_vectored(mut f: &File, pos: u64, mut head: &[u8], mut tail: &[u8]) -> std::io::Result<()> {
    use std::io::{IoSlice, Seek};
    f.seek(std::io::SeekFrom::Start(pos))?;
    while !head.is_empty() || !tail.is_empty() {
        let n = match f.write_vectored(&[IoSlice::new(head), IoSlice::new(tail)]) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            r => r?,
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let from_head = n.min(head.len());
        head = &head[from_head..];
        tail = &tail[n - from_head..];
    }
    Ok(())
}

/// The checksum seed of a segment's records: its salt's, or 0 for a segment of an earlier release.
fn seed(salt: Option<u64>) -> u32 {
    salt.map_or(0, |s| crc32c::crc32c(&s.to_le_bytes()))
}

/// The header of a record whose payload is `payload` (checksummed, not copied), in a segment whose
/// checksum seed is `seed`.
fn encode_header(seed: u32, seq: Seq, at: u64, kind: u8, offset: u64, arg: u64, payload: &[u8]) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    h[8..16].copy_from_slice(&seq.0.to_le_bytes());
    h[16..24].copy_from_slice(&offset.to_le_bytes());
    h[24..32].copy_from_slice(&arg.to_le_bytes());
    h[32] = kind;
    h[36..40].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    h[40..48].copy_from_slice(&at.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c_append(seed, &h[8..]), payload);
    h[4..8].copy_from_slice(&crc.to_le_bytes());
    h
}

/// A segment header: where its records start and the salt their checksums are seeded with.
fn encode_segment_header(first: Seq, salt: u64) -> [u8; SEG_HEADER as usize] {
    let mut h = [0u8; SEG_HEADER as usize];
    h[0..4].copy_from_slice(&SEG_MAGIC.to_le_bytes());
    h[8..16].copy_from_slice(&first.0.to_le_bytes());
    h[16..24].copy_from_slice(&salt.to_le_bytes());
    let crc = crc32c::crc32c(&h[8..]);
    h[4..8].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Reads a segment's header: `Ok(None)` for a segment of an earlier release (no header; its records
/// start at byte 0), else its salt, checked against the first seq its name gives.
fn read_segment_header(path: &Path, first: Seq) -> Result<Option<u64>, JournalError> {
    let mut f = File::open(path).map_err(io(path))?;
    let mut h = [0u8; SEG_HEADER as usize];
    let mut got = 0;
    while got < h.len() {
        match f.read(&mut h[got..]).map_err(io(path))? {
            0 => break,
            n => got += n,
        }
    }
    let corrupt = |reason: String| JournalError::Corrupt { path: path.to_path_buf(), offset: 0, reason };
    let magic = (got >= 4).then(|| u32::from_le_bytes(h[0..4].try_into().expect("4 bytes")));
    match magic {
        Some(SEG_MAGIC) => {}
        // An earlier release's segment: empty (or shorter than a magic), or a record first.
        None | Some(MAGIC) => return Ok(None),
        // Neither: a damaged header, which must not pass for an unsalted segment whose records then
        // look torn (they would be cut off).
        Some(other) => return Err(corrupt(format!("segment starts with {other:#x}, neither a header nor a record"))),
    }
    if got < h.len() || crc32c::crc32c(&h[8..]) != u32::from_le_bytes(h[4..8].try_into().expect("4 bytes")) {
        return Err(corrupt("segment header damaged".into()));
    }
    let named = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    if named != first.0 {
        return Err(corrupt(format!("segment header says it starts at {named}, its name says {first}")));
    }
    Ok(Some(u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"))))
}

/// Outcome of reading a segment from some byte offset.
pub struct ScanEnd {
    /// Offset just past the last good record.
    pub good_end: u64,
    /// Why reading stopped before the end of the range, if it did.
    pub error: Option<String>,
}

/// Reads records of one segment from `start` up to `end` bytes, calling `f` with each record and the
/// offset just past it. `f` returns false to stop early.
pub fn scan(
    path: &Path,
    start: u64,
    end: u64,
    salt: Option<u64>,
    mut f: impl FnMut(Record, u64) -> bool,
) -> Result<ScanEnd, JournalError> {
    let seed = seed(salt);
    let mut file = File::open(path).map_err(io(path))?;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(start)).map_err(io(path))?;
    let mut r = BufReader::with_capacity(1 << 20, file.take(end.saturating_sub(start)));
    let mut pos = start;
    loop {
        if pos == end {
            return Ok(ScanEnd { good_end: pos, error: None });
        }
        let mut h = [0u8; HEADER];
        if let Err(e) = r.read_exact(&mut h) {
            return Ok(ScanEnd { good_end: pos, error: Some(format!("short header: {e}")) });
        }
        let word = |a: usize| u64::from_le_bytes(h[a..a + 8].try_into().expect("8 bytes"));
        let magic = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
        let plen = u32::from_le_bytes(h[36..40].try_into().expect("4 bytes"));
        if magic != MAGIC {
            return Ok(ScanEnd { good_end: pos, error: Some(format!("bad magic {magic:#x}")) });
        }
        if plen > MAX_PAYLOAD {
            return Ok(ScanEnd { good_end: pos, error: Some(format!("payload length {plen} too large")) });
        }
        let mut payload = vec![0u8; plen as usize];
        if let Err(e) = r.read_exact(&mut payload) {
            return Ok(ScanEnd { good_end: pos, error: Some(format!("short payload: {e}")) });
        }
        let mut c = crc32c::crc32c_append(seed, &h[8..]);
        c = crc32c::crc32c_append(c, &payload);
        if c != crc {
            return Ok(ScanEnd { good_end: pos, error: Some("checksum mismatch".into()) });
        }
        let (seq, offset, arg, kind) = (Seq(word(8)), word(16), word(24), h[32]);
        let op = match kind {
            KIND_WRITE if arg == plen as u64 => Op::Write { offset, data: payload },
            KIND_ZERO => Op::Zero { offset, len: arg },
            KIND_FLUSH => Op::Marker { kind: MarkerKind::Flush },
            KIND_APP => {
                Op::Marker { kind: MarkerKind::AppConsistent { tag: String::from_utf8_lossy(&payload).into_owned() } }
            }
            KIND_BOOKMARK => {
                Op::Marker { kind: MarkerKind::Bookmark { tag: String::from_utf8_lossy(&payload).into_owned() } }
            }
            KIND_COPY_DONE => Op::Marker { kind: MarkerKind::InitialCopyDone },
            KIND_INCONSISTENT_BEGIN => Op::Marker { kind: MarkerKind::InconsistentBegin },
            KIND_INCONSISTENT_END => Op::Marker { kind: MarkerKind::InconsistentEnd },
            _ => return Ok(ScanEnd { good_end: pos, error: Some(format!("unknown record kind {kind}")) }),
        };
        pos += HEADER as u64 + plen as u64;
        if !f(Record { seq, at: word(40), op }, pos) {
            return Ok(ScanEnd { good_end: pos, error: None });
        }
    }
}

#[derive(Debug, Clone)]
pub struct Segment {
    pub first: Seq,
    /// Last sequence number in the segment; `first - 1` while it is empty.
    pub last: Seq,
    pub path: PathBuf,
    /// Where its records end (its header included).
    pub bytes: u64,
    /// Where its records start: past its header, or 0 in a segment of an earlier release.
    pub start: u64,
    /// The salt its records' checksums are seeded with (`None`: a segment of an earlier release).
    pub salt: Option<u64>,
}

/// The redo mark's file: two slots, written alternately in place.
struct RedoMark {
    path: PathBuf,
    file: File,
    generation: u64,
    seq: Seq,
    /// A block-order window was opened (its InconsistentBegin is in the journal, or was shipped) and
    /// not closed yet: kept here because the Begin record may be trimmed long before the End is due.
    window: bool,
}

const MARK_MAGIC: u32 = u32::from_le_bytes(*b"SRRM");
const MARK_SLOT: usize = 32;

impl RedoMark {
    fn open(dir: &Path) -> Result<RedoMark, JournalError> {
        use std::os::unix::fs::FileExt;
        let path = dir.join("redo.mark");
        if !path.exists() {
            // Born whole (both slots valid, through the crash-safe path), so a mark file without a valid
            // slot is always damage, never a creation cut short.
            let mut raw = encode_mark(0, Seq::ZERO, false).to_vec();
            raw.extend_from_slice(&encode_mark(1, Seq::ZERO, false));
            sr_common::crashsafe::write_file(&path, &raw).map_err(io(&path))?;
        }
        let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io(&path))?;
        let mut raw = [0u8; 2 * MARK_SLOT];
        file.read_exact_at(&mut raw, 0).map_err(io(&path))?;
        let best = raw.chunks_exact(MARK_SLOT).filter_map(decode_mark).max_by_key(|(generation, _, _)| *generation);
        let Some((generation, seq, window)) = best else {
            return Err(JournalError::Corrupt {
                path,
                offset: 0,
                reason: "neither slot of the redo mark is valid".into(),
            });
        };
        Ok(RedoMark { path, file, generation, seq, window })
    }

    /// Durably records that every record up to `seq` is on the disk.
    fn set(&mut self, seq: Seq) -> Result<(), JournalError> {
        self.write(seq, self.window)
    }

    fn set_window(&mut self, open: bool) -> Result<(), JournalError> {
        if open == self.window {
            return Ok(());
        }
        self.write(self.seq, open)
    }

    fn write(&mut self, seq: Seq, window: bool) -> Result<(), JournalError> {
        use std::os::unix::fs::FileExt;
        let generation = self.generation + 1;
        let slot = encode_mark(generation, seq, window);
        let at = (generation % 2) * MARK_SLOT as u64;
        self.file.write_all_at(&slot, at).map_err(io(&self.path))?;
        self.file.sync_data().map_err(io(&self.path))?;
        self.generation = generation;
        self.seq = seq;
        self.window = window;
        Ok(())
    }
}

fn encode_mark(generation: u64, seq: Seq, window: bool) -> [u8; MARK_SLOT] {
    let mut slot = [0u8; MARK_SLOT];
    slot[0..4].copy_from_slice(&MARK_MAGIC.to_le_bytes());
    slot[8..16].copy_from_slice(&generation.to_le_bytes());
    slot[16..24].copy_from_slice(&seq.0.to_le_bytes());
    slot[24] = u8::from(window);
    let crc = crc32c::crc32c(&slot[8..]);
    slot[4..8].copy_from_slice(&crc.to_le_bytes());
    slot
}

/// A slot's (generation, seq, window open), or `None` when it does not hold a valid mark.
fn decode_mark(slot: &[u8]) -> Option<(u64, Seq, bool)> {
    let word = |a: usize| u64::from_le_bytes(slot[a..a + 8].try_into().expect("8 bytes"));
    let magic = u32::from_le_bytes(slot[0..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(slot[4..8].try_into().expect("4 bytes"));
    (magic == MARK_MAGIC && crc == crc32c::crc32c(&slot[8..])).then(|| (word(8), Seq(word(16)), slot[24] == 1))
}

pub struct Journal {
    dir: PathBuf,
    /// The volume is full: applied space is given back as soon as possible ([`Journal::set_urgent`]).
    urgent: bool,
    /// A change bypassed the journal (it went to the dirty map): whatever is appended next belongs to a
    /// stretch the replica receives in block order, so an InconsistentBegin marker goes first.
    window_pending: bool,
    /// An InconsistentBegin marker was appended and its InconsistentEnd not yet.
    window_open: bool,
    /// Why the journal takes no more appends (a torn append that could not be cut off), until restart.
    broken: Option<String>,
    /// Every record up to this one is on the disk: a restart redoes only what follows.
    mark: RedoMark,
    /// The newest change record (a write or zeroing; markers change nothing on the disk).
    last_change: Seq,
    segments: Vec<Segment>,
    /// The active segment, shared so a FLUSH can fsync it without holding the disk's lock.
    active: Arc<File>,
    next: Seq,
    bytes: u64,
    /// Bytes appended since the journal was opened or reset (those present at open included).
    logical: u64,
    /// (seq, `logical` just after it), about every [`MARK_EVERY`] bytes: how much follows a position.
    marks: std::collections::VecDeque<(Seq, u64)>,
    /// How many times the journal started over ([`Journal::reset`]) since it was opened: a reader
    /// whose snapshot is from an earlier one read files that may have been replaced under it.
    incarnation: u64,
    /// The active segment's checksum seed.
    seed: u32,
    /// Trimmed segment files kept for reuse (see the module's header).
    spares: Vec<PathBuf>,
}

/// Spacing of the position marks that measure how many bytes follow a sequence number.
const MARK_EVERY: u64 = 64 << 10;

fn seg_path(dir: &Path, first: Seq) -> PathBuf {
    dir.join(format!("{:020}.seg", first.0))
}

fn spare_path(dir: &Path, first: Seq) -> PathBuf {
    dir.join(format!("{:020}.spare", first.0))
}

/// Makes a segment file for records from `first` on at `path` with a fresh salt: from a spare when there
/// is one (its old records stay behind the new ones, invalid under the new salt), else a new file. The
/// header is durable before the file takes the segment's name, so a crash leaves either no segment or
/// a whole one. Returns the open file and the salt.
///
/// `plain`: a segment without a header (as earlier releases wrote), which takes no data block until a
/// record comes: what a full volume can still hold when a fully applied segment must be replaced.
fn make_segment(
    dir: &Path,
    path: &Path,
    first: Seq,
    spare: Option<PathBuf>,
    plain: bool,
) -> Result<(File, Option<u64>), JournalError> {
    use std::os::unix::fs::FileExt;
    if plain {
        let f = OpenOptions::new().write(true).create(true).truncate(true).open(path).map_err(io(path))?;
        sr_common::crashsafe::fsync_dir(dir).map_err(io(dir))?;
        return Ok((f, None));
    }
    let salt: u64 = rand::random();
    let (from, f) = match spare {
        Some(spare) => {
            // The rename that made it a spare must be durable before its header changes: else a crash
            // could leave the old segment's name on a file whose header names another first seq.
            sr_common::crashsafe::fsync_dir(dir).map_err(io(dir))?;
            let f = OpenOptions::new().write(true).open(&spare).map_err(io(&spare))?;
            (spare, f)
        }
        None => {
            let tmp = path.with_extension("seg.tmp");
            let f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(io(&tmp))?;
            (tmp, f)
        }
    };
    f.write_all_at(&encode_segment_header(first, salt), 0).map_err(io(&from))?;
    f.sync_data().map_err(io(&from))?;
    std::fs::rename(&from, path).map_err(io(path))?;
    sr_common::crashsafe::fsync_dir(dir).map_err(io(dir))?;
    Ok((f, Some(salt)))
}

impl Journal {
    /// Opens (or creates) the journal in `dir`, recovering from a torn tail.
    pub fn open(dir: &Path) -> Result<Journal, JournalError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut firsts = Vec::new();
        let mut spares = Vec::new();
        for e in std::fs::read_dir(dir).map_err(io(dir))? {
            let e = e.map_err(io(dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name.strip_suffix(".seg").and_then(|n| n.parse::<u64>().ok()) {
                firsts.push(Seq(n));
            } else if name.ends_with(".spare") {
                spares.push(e.path());
            } else if name.ends_with(".seg.tmp") {
                // A new segment whose header was not durable yet: it never held a record.
                std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
            }
        }
        firsts.sort();
        spares.sort();
        while spares.len() > MAX_SPARES {
            let p = spares.pop().expect("a spare");
            std::fs::remove_file(&p).map_err(io(&p))?;
        }
        let mut mark = RedoMark::open(dir)?;
        if firsts.is_empty() {
            // A new journal, or one a reset emptied before it could clear the mark: nothing is on the disk
            // from it yet.
            if mark.seq != Seq::ZERO {
                mark.write(Seq::ZERO, false)?;
            }
            let path = seg_path(dir, Seq(1));
            make_segment(dir, &path, Seq(1), spares.pop(), false)?;
            firsts.push(Seq(1));
        }
        let mut segments = Vec::new();
        let count = firsts.len();
        let mut logical = 0u64;
        let mut marks = std::collections::VecDeque::new();
        let mut last_change = Seq::ZERO;
        // The last window edge still in the journal (it wins over the mark's flag, which follows it).
        let mut last_edge = None;
        for (i, first) in firsts.into_iter().enumerate() {
            let path = seg_path(dir, first);
            let len = std::fs::metadata(&path).map_err(io(&path))?.len();
            let salt = read_segment_header(&path, first)?;
            let start = if salt.is_some() { SEG_HEADER } else { 0 };
            let mut expect = first;
            let mut seq_error = None;
            let before = logical;
            let mut last_mark = marks.back().map_or(0, |m: &(Seq, u64)| m.1);
            let end = scan(&path, start, len, salt, |rec, after| {
                if rec.seq != expect {
                    seq_error = Some(format!("record has seq {} where {} was expected", rec.seq, expect));
                    return false;
                }
                if before + after - start - last_mark >= MARK_EVERY {
                    last_mark = before + after - start;
                    marks.push_back((rec.seq, last_mark));
                }
                match rec.op {
                    Op::Write { .. } | Op::Zero { .. } => last_change = rec.seq,
                    Op::Marker { kind: MarkerKind::InconsistentBegin } => last_edge = Some(true),
                    Op::Marker { kind: MarkerKind::InconsistentEnd } => last_edge = Some(false),
                    _ => {}
                }
                expect = expect.next();
                true
            })?;
            let mut good = end.good_end;
            if let Some(reason) = seq_error {
                // A record with a valid checksum but the wrong sequence number is not a torn write.
                return Err(JournalError::Corrupt { path, offset: good, reason });
            }
            // A reused segment's earlier records follow its own: a closed one ends where its records stop
            // (the next segment's first seq checks that none are missing).
            let stale = salt.is_some() && i + 1 != count;
            if let Some(reason) = end.error.filter(|_| !stale) {
                if i + 1 != count {
                    return Err(JournalError::Corrupt { path, offset: good, reason });
                }
                // The last segment is cut where its records stop, so no record past a torn one can ever
                // be read as following a newer one appended here.
                if salt.is_some() {
                    tracing::debug!(path = %path.display(), offset = good, len, reason, "cutting the journal's end");
                } else {
                    tracing::warn!(path = %path.display(), offset = good, len, reason, "cutting a torn journal tail");
                }
                let f = OpenOptions::new().write(true).open(&path).map_err(io(&path))?;
                f.set_len(good).map_err(io(&path))?;
                f.sync_all().map_err(io(&path))?;
                good = good.min(len);
            }
            if let Some(prev) = segments.last() {
                let prev: &Segment = prev;
                if prev.last.next() != first {
                    return Err(JournalError::Corrupt {
                        path,
                        offset: 0,
                        reason: format!("segment starts at {first} but the previous one ends at {}", prev.last),
                    });
                }
            }
            segments.push(Segment { first, last: Seq(expect.0 - 1), path, bytes: good, start, salt });
            logical += good - start;
            while marks.back().is_some_and(|m| m.1 > logical) {
                marks.pop_back();
            }
        }
        let last = segments.last().expect("at least one segment");
        let active = OpenOptions::new().write(true).open(&last.path).map_err(io(&last.path))?;
        let active_seed = seed(last.salt);
        let next = last.last.next();
        let bytes = segments.iter().map(|s| s.bytes - s.start).sum();
        if mark.seq > last.last {
            return Err(JournalError::Corrupt {
                path: mark.path.clone(),
                offset: 0,
                reason: format!("redo mark {} is past the journal's last record {}", mark.seq, last.last),
            });
        }
        Ok(Journal {
            dir: dir.to_path_buf(),
            urgent: false,
            window_pending: false,
            window_open: last_edge.unwrap_or(mark.window),
            broken: None,
            mark,
            last_change,
            segments,
            active: Arc::new(active),
            next,
            bytes,
            logical,
            marks,
            incarnation: 0,
            seed: active_seed,
            spares,
        })
    }

    /// Appends one change and returns its sequence number. The bytes are in the kernel when this returns;
    /// they are durable after the next [`Journal::sync_handle`] fsync.
    pub fn append(&mut self, op: &Op) -> Result<Seq, JournalError> {
        if !matches!(op, Op::Marker { kind: MarkerKind::InconsistentEnd }) {
            self.open_window_if_due()?;
        }
        let rec = encode(self.seed, self.next, sr_common::types::now_micros(), op);
        let change = matches!(op, Op::Write { .. } | Op::Zero { .. });
        let seq = self.append_parts(&rec, &[], change)?;
        if matches!(op, Op::Marker { kind: MarkerKind::InitialCopyDone }) && self.window_open {
            // A replica keeps nothing before this marker: a window open across it begins again after it.
            self.window_open = false;
            self.window_pending = true;
        }
        Ok(seq)
    }

    /// [`Journal::append`] of a write: the header and the caller's data go out in one `writev`,
    /// without copying the data.
    pub fn append_write(&mut self, offset: u64, data: &[u8]) -> Result<Seq, JournalError> {
        self.open_window_if_due()?;
        let now = sr_common::types::now_micros();
        let header = encode_header(self.seed, self.next, now, KIND_WRITE, offset, data.len() as u64, data);
        self.append_parts(&header, data, true)
    }

    /// The record after a bypass opens the window: its marker goes in before the caller's record
    /// (which is encoded with its sequence number only after this).
    fn open_window_if_due(&mut self) -> Result<(), JournalError> {
        if self.window_pending && !self.window_open {
            let now = sr_common::types::now_micros();
            let begin = encode(self.seed, self.next, now, &Op::Marker { kind: MarkerKind::InconsistentBegin });
            self.append_parts(&begin, &[], false)?;
            self.window_open = true;
            self.mark.set_window(true)?;
        }
        Ok(())
    }

    fn append_parts(&mut self, head: &[u8], tail: &[u8], change: bool) -> Result<Seq, JournalError> {
        let seq = self.next;
        let len = (head.len() + tail.len()) as u64;
        let active = self.segments.last_mut().expect("at least one segment");
        if let Some(reason) = &self.broken {
            return Err(JournalError::Corrupt {
                path: active.path.clone(),
                offset: active.bytes,
                reason: reason.clone(),
            });
        }
        if let Err(e) = write_all_vectored(&self.active, active.bytes, head, tail) {
            // Undo a partial append so the segment stays a clean run of records. If even that fails,
            // nothing more may follow the torn bytes (a restart cuts them off, and would cut whatever
            // followed too): the journal takes no more appends until then.
            if let Err(t) = self.active.set_len(active.bytes) {
                let reason = format!("a torn append could not be cut off ({t}); restart the agent to recover");
                tracing::error!(path = %active.path.display(), error = %t, "journal append torn and not cut off");
                self.broken = Some(reason);
            }
            return Err(JournalError::Io { path: active.path.clone(), source: e });
        }
        active.bytes += len;
        active.last = seq;
        if change {
            self.last_change = seq;
        }
        self.bytes += len;
        self.logical += len;
        if self.logical - self.marks.back().map_or(0, |m| m.1) >= MARK_EVERY {
            self.marks.push_back((seq, self.logical));
        }
        self.next = seq.next();
        if active.bytes >= SEGMENT_BYTES {
            // The record is in; a rotation that fails is tried again at the next append.
            if let Err(e) = self.rotate() {
                tracing::warn!(error = %e, "journal segment rotation failed; retrying at the next append");
            }
        }
        Ok(seq)
    }

    fn rotate(&mut self) -> Result<(), JournalError> {
        let old = self.segments.last().expect("at least one segment").path.clone();
        if let Err(e) = self.active.sync_data() {
            // A failed fsync is reported once: trying again would report success for data that may be
            // gone. The journal takes no more appends until a restart.
            self.fail(format!("an fsync of {} failed ({e}); restart the agent to recover", old.display()));
            return Err(io(&old)(e));
        }
        let path = seg_path(&self.dir, self.next);
        // On a full volume a new segment must need no data block (see `make_segment`).
        let spare = if self.urgent { None } else { self.spares.pop() };
        let (f, salt) = match make_segment(&self.dir, &path, self.next, spare.clone(), self.urgent) {
            Ok(v) => v,
            // A spare that cannot be reused is dropped (the next rotation makes a new file).
            Err(e) => {
                if let Some(p) = spare {
                    let _ = std::fs::remove_file(&p);
                }
                return Err(e);
            }
        };
        self.active = Arc::new(f);
        self.seed = seed(salt);
        let start = if salt.is_some() { SEG_HEADER } else { 0 };
        self.segments.push(Segment { first: self.next, last: Seq(self.next.0 - 1), path, bytes: start, start, salt });
        Ok(())
    }

    /// A write or fsync of the journal failed in a way that may have lost records: it takes no more
    /// appends until the agent restarts (and its FLUSHes make the disk durable instead).
    pub fn fail(&mut self, reason: String) {
        tracing::error!(dir = %self.dir.display(), reason, "the journal takes no more changes");
        self.broken = Some(reason);
    }

    /// Whether [`Journal::fail`] stopped the journal.
    pub fn failed(&self) -> bool {
        self.broken.is_some()
    }

    /// The active segment's file, to fsync outside the disk's lock. Closed segments were fsynced when
    /// they were closed.
    pub fn sync_handle(&self) -> Arc<File> {
        self.active.clone()
    }

    /// Drops every record and starts again at sequence number 1 (a new protection of the disk).
    /// The caller made the disk hold every record for good first (the journal is sealed): a FLUSH
    /// made changes durable in the journal only.
    pub fn reset(&mut self) -> Result<(), JournalError> {
        debug_assert!(self.sealed(), "a journal dropped before the disk held its records");
        // Oldest first, so a failure part way leaves a journal that still opens (a run of newer segments).
        while let Some(s) = self.segments.first() {
            std::fs::remove_file(&s.path).map_err(io(&s.path))?;
            if self.segments.len() == 1 {
                break;
            }
            self.segments.remove(0);
        }
        self.segments.clear();
        self.broken = None;
        self.window_pending = false;
        self.window_open = false;
        // The mark goes back to 0 before a record of the new journal exists (a crash before this line
        // leaves no segment, and opening an empty journal clears the mark too).
        sr_common::crashsafe::fsync_dir(&self.dir).map_err(io(&self.dir))?;
        self.mark.write(Seq::ZERO, false)?;
        self.last_change = Seq::ZERO;
        let path = seg_path(&self.dir, Seq(1));
        let (f, salt) = make_segment(&self.dir, &path, Seq(1), self.spares.pop(), false)?;
        self.active = Arc::new(f);
        self.seed = seed(salt);
        let start = if salt.is_some() { SEG_HEADER } else { 0 };
        self.segments.push(Segment { first: Seq(1), last: Seq(0), path, bytes: start, start, salt });
        self.next = Seq(1);
        self.bytes = 0;
        self.logical = 0;
        self.incarnation += 1;
        self.marks.clear();
        Ok(())
    }

    /// A change bypassed the journal: the next record opens a block-order window.
    pub fn note_bypass(&mut self) {
        self.window_pending = true;
    }

    /// Every block that bypassed the journal is in it again: closes the window (an InconsistentEnd
    /// marker) if one is open; the end of a window is only ever written after its beginning, so a
    /// receiver may take an end whose beginning it no longer has as "inconsistent since before".
    /// Returns the marker's seq.
    pub fn end_window(&mut self) -> Result<Option<Seq>, JournalError> {
        self.window_pending = false;
        if !self.window_open {
            return Ok(None);
        }
        let seq = self.append(&Op::Marker { kind: MarkerKind::InconsistentEnd })?;
        self.window_open = false;
        self.mark.set_window(false)?;
        Ok(Some(seq))
    }

    /// Whether a block-order window is open or about to open.
    pub fn in_window(&self) -> bool {
        self.window_open || self.window_pending
    }

    /// Every record up to this one is known to be on the disk.
    pub fn on_disk(&self) -> Seq {
        self.mark.seq
    }

    /// Whether the redo mark covers every change record: a change may reach the disk without a journal
    /// record and no restart will redo an older record over it.
    pub fn sealed(&self) -> bool {
        self.mark.seq >= self.last_change
    }

    /// Records durably that the disk holds every record in the journal (the caller made the disk
    /// durable first, under the lock it holds for the journal). The journal is made durable too, so a
    /// crash cannot keep the disk's copy of a change but lose the journal's.
    pub fn mark_on_disk(&mut self) -> Result<(), JournalError> {
        let active = self.segments.last().expect("at least one segment");
        self.active.sync_data().map_err(io(&active.path))?;
        self.mark.set(self.last_seq())
    }

    /// Deletes closed segments whose records are all at or below `through`. Returns bytes freed.
    /// While the journal's volume is full (`urgent`), a fully applied active segment is closed and
    /// deleted at once, not only once it grew to a full segment (a small volume would otherwise stay
    /// full for good). Otherwise segments go when they are full, which costs no extra fsyncs.
    pub fn set_urgent(&mut self, urgent: bool) {
        self.urgent = urgent;
    }

    fn reclaims_active(&self, through: Seq) -> bool {
        let active = self.segments.last().expect("at least one segment");
        self.urgent && through >= self.last_seq() && active.bytes > active.start
    }

    /// Whether [`Journal::trim_through`] would delete any record.
    pub fn trims_anything(&self, through: Seq) -> bool {
        self.reclaims_active(through) || (self.segments.len() > 1 && self.segments[0].last <= through)
    }

    pub fn trim_through(&mut self, through: Seq) -> Result<u64, JournalError> {
        while self.urgent && !self.spares.is_empty() {
            // The volume is full: spares give their space back first.
            let p = self.spares.pop().expect("a spare");
            std::fs::remove_file(&p).map_err(io(&p))?;
        }
        if self.reclaims_active(through) {
            self.rotate()?;
        }
        let mut freed = 0;
        while self.segments.len() > 1 && self.segments[0].last <= through {
            let s = self.segments.remove(0);
            if self.urgent || self.spares.len() >= MAX_SPARES {
                std::fs::remove_file(&s.path).map_err(io(&s.path))?;
            } else {
                // Kept for the next rotation (see the module's header). Its header changes only after the
                // directory made the rename durable (`make_segment`).
                let spare = spare_path(&self.dir, s.first);
                std::fs::rename(&s.path, &spare).map_err(io(&s.path))?;
                self.spares.push(spare);
            }
            freed += s.bytes - s.start;
        }
        self.bytes -= freed;
        // Keep the newest mark at or below `through`: it measures what follows the applied position.
        while self.marks.len() > 1 && self.marks[1].0 <= through {
            self.marks.pop_front();
        }
        Ok(freed)
    }

    /// About how many bytes of records follow `after` (never fewer than there are; at most
    /// [`MARK_EVERY`] more).
    pub fn bytes_after(&self, after: Seq) -> u64 {
        if after >= self.last_seq() {
            return 0;
        }
        let i = self.marks.partition_point(|m| m.0 <= after);
        let base = if i == 0 { self.logical - self.bytes.min(self.logical) } else { self.marks[i - 1].1 };
        self.logical.saturating_sub(base)
    }

    pub fn segments(&self) -> Vec<Segment> {
        self.segments.clone()
    }
    /// How many times the journal started over since it was opened.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }
    /// Sequence number of the oldest change still held.
    pub fn first_seq(&self) -> Seq {
        self.segments[0].first
    }
    /// Sequence number of the newest change (0 when none was ever written).
    pub fn last_seq(&self) -> Seq {
        Seq(self.next.0 - 1)
    }
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

/// The error for a segment of a snapshot that stopped reading at `offset`: damage, unless the file was
/// trimmed and reused since the snapshot (its name is gone or its salt changed), which a new read of
/// the journal gets past.
fn read_error(s: &Segment, offset: u64, reason: String) -> JournalError {
    let replaced = match read_segment_header(&s.path, s.first) {
        Ok(salt) => salt != s.salt,
        Err(JournalError::Io { source, .. }) => source.kind() == std::io::ErrorKind::NotFound,
        Err(_) => false,
    };
    if replaced {
        let why = format!("segment trimmed and reused while it was read ({reason}); read the journal again");
        return JournalError::Io { path: s.path.clone(), source: std::io::Error::other(why) };
    }
    JournalError::Corrupt { path: s.path.clone(), offset, reason }
}

/// Reads every record at or after `from`, in order, across segments (a snapshot taken by the caller).
pub fn read_from(segments: &[Segment], from: Seq, mut f: impl FnMut(Record) -> bool) -> Result<(), JournalError> {
    let start = segments.iter().rposition(|s| s.first <= from).unwrap_or(0);
    for s in &segments[start..] {
        if s.last < from {
            continue;
        }
        let mut go_on = true;
        let end = scan(&s.path, s.start, s.bytes, s.salt, |rec, _| {
            if rec.seq < from {
                return true;
            }
            go_on = f(rec);
            go_on
        })?;
        if let Some(reason) = end.error {
            return Err(read_error(s, end.good_end, reason));
        }
        if !go_on {
            break;
        }
    }
    Ok(())
}

/// Where a reader of the journal stands: the next record to read and, once known, its position.
#[derive(Debug, Clone, Copy)]
pub struct Cursor {
    pub next: Seq,
    pos: Option<(Seq, u64)>,
}

impl Cursor {
    pub fn at(next: Seq) -> Cursor {
        Cursor { next, pos: None }
    }
}

/// Reads records from `cursor` on, across segments of a snapshot, until about `max_bytes` are collected.
pub fn read_batch(segments: &[Segment], cursor: &mut Cursor, max_bytes: u64) -> Result<Vec<Record>, JournalError> {
    let mut out = Vec::new();
    let mut bytes = 0u64;
    let Some(mut idx) = segments.iter().rposition(|s| s.first <= cursor.next) else { return Ok(out) };
    let mut start = match cursor.pos {
        Some((first, byte)) if first == segments[idx].first => byte,
        _ => segments[idx].start,
    };
    loop {
        let s = &segments[idx];
        let mut full = false;
        let end = scan(&s.path, start, s.bytes, s.salt, |rec, after| {
            start = after;
            if rec.seq < cursor.next {
                return true;
            }
            bytes += rec.encoded_len();
            cursor.next = rec.seq.next();
            out.push(rec);
            full = bytes >= max_bytes;
            !full
        })?;
        if let Some(reason) = end.error {
            return Err(read_error(s, end.good_end, reason));
        }
        cursor.pos = Some((s.first, start));
        if full || idx + 1 == segments.len() || segments[idx + 1].first != cursor.next {
            return Ok(out);
        }
        idx += 1;
        start = segments[idx].start;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(offset: u64, byte: u8, len: usize) -> Op {
        Op::Write { offset, data: vec![byte; len] }
    }

    fn all(j: &Journal, from: u64) -> Vec<Record> {
        let mut v = Vec::new();
        read_from(&j.segments(), Seq(from), |r| {
            v.push(r);
            true
        })
        .unwrap();
        v
    }

    #[test]
    fn a_reset_is_told_apart_from_damage() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        for i in 0..8 {
            j.append(&write(i * 4096, 1, 4096)).unwrap();
        }
        let (before, snapshot) = (j.incarnation(), j.segments());
        // A new protection starts over while a reader holds the old snapshot.
        j.mark_on_disk().unwrap();
        j.reset().unwrap();
        j.append(&write(0, 2, 512)).unwrap();
        let mut c = Cursor::at(Seq(1));
        // The file under the old name has another salt now: not damage, a file replaced under the reader.
        assert!(matches!(read_batch(&snapshot, &mut c, 1 << 20), Err(JournalError::Io { .. })));
        assert_ne!(j.incarnation(), before, "the reader can tell the journal started over");
    }

    #[test]
    fn append_reopen_read() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        assert_eq!(j.append(&write(0, 1, 4096)).unwrap(), Seq(1));
        assert_eq!(j.append(&Op::Zero { offset: 8192, len: 1 << 20 }).unwrap(), Seq(2));
        assert_eq!(j.append(&Op::Marker { kind: MarkerKind::AppConsistent { tag: "t".into() } }).unwrap(), Seq(3));
        drop(j);
        let j = Journal::open(d.path()).unwrap();
        assert_eq!(j.last_seq(), Seq(3));
        let recs = all(&j, 2);
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].op, Op::Zero { offset: 8192, len: 1 << 20 });
    }

    #[test]
    fn torn_tail_is_cut_and_sequence_continues() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        j.append(&write(0, 1, 4096)).unwrap();
        j.append(&write(4096, 2, 4096)).unwrap();
        let path = j.segments()[0].path.clone();
        drop(j);
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 100).unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        assert_eq!(j.last_seq(), Seq(1));
        assert_eq!(j.append(&write(0, 3, 10)).unwrap(), Seq(2));
    }

    fn spares(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".spare"))
            .count()
    }

    #[test]
    fn trimmed_segments_are_reused_and_their_old_records_never_read_as_new() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        // Records of one size, so a reused segment's old records lie exactly where new ones would.
        let per_segment = SEGMENT_BYTES.div_ceil((1 << 20) + HEADER as u64);
        for i in 0..per_segment * 3 {
            j.append(&write(i << 20, i as u8, 1 << 20)).unwrap();
        }
        assert_eq!(j.segments().len(), 4);
        let through = j.segments()[1].last;
        j.mark_on_disk().unwrap();
        j.trim_through(through).unwrap();
        assert_eq!(spares(d.path()), MAX_SPARES, "trimmed segments are kept");
        // Fill the active segment and start two more: both come from the spares.
        let before = j.last_seq();
        while j.segments().len() < 4 {
            let n = j.last_seq().0;
            j.append(&write(n << 20, n as u8, 1 << 20)).unwrap();
        }
        assert_eq!(spares(d.path()), 0, "the spares were reused");
        // Three records into the reused active segment, where the old ones are longer.
        for _ in 0..3 {
            let n = j.last_seq().0;
            j.append(&write(n << 20, n as u8, 1 << 20)).unwrap();
        }
        let active = j.segments().last().unwrap().clone();
        assert!(std::fs::metadata(&active.path).unwrap().len() > active.bytes, "old records follow the new");
        let expect = all(&j, through.0 + 1);
        let last = j.last_seq();
        assert!(last > before);
        drop(j);
        let mut j = Journal::open(d.path()).expect("old records past the end are the end, not damage");
        assert_eq!(j.last_seq(), last);
        assert_eq!(all(&j, through.0 + 1), expect, "exactly the records written, none of the old ones");
        assert_eq!(std::fs::metadata(&active.path).unwrap().len(), active.bytes, "the end is cut at open");
        // A closed reused segment keeps its old records past its end, and still reopens.
        let n = j.last_seq().0;
        assert_eq!(j.append(&write(n << 20, 1, 1 << 20)).unwrap(), last.next());
        drop(j);
        let j = Journal::open(d.path()).unwrap();
        assert_eq!(j.last_seq(), last.next());
        for r in all(&j, through.0 + 1) {
            let Op::Write { offset, data } = &r.op else { panic!("a write") };
            assert_eq!(data.len(), 1 << 20, "seq {}", r.seq);
            assert!(*offset == (r.seq.0 - 1) << 20 || r.seq == last.next(), "seq {} at {offset}", r.seq);
        }
    }

    #[test]
    fn a_record_past_a_torn_one_is_cut_at_open_and_never_revived() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        for i in 1..=3u8 {
            j.append(&write(u64::from(i) << 12, i, 4096)).unwrap();
        }
        let seg = j.segments()[0].clone();
        drop(j);
        // The second record's payload did not reach the disk; the third's did (no FLUSH covered them).
        let second = seg.start + (HEADER + 4096) as u64 + HEADER as u64 + 10;
        let f = OpenOptions::new().write(true).open(&seg.path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"X", second).unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        assert_eq!(j.last_seq(), Seq(1));
        // A record of the same size takes seq 2: the old third record (seq 3, valid) starts right after it.
        assert_eq!(j.append(&write(0, 9, 4096)).unwrap(), Seq(2));
        drop(j);
        let j = Journal::open(d.path()).unwrap();
        assert_eq!(j.last_seq(), Seq(2), "the old third record is gone, not read as the new one's successor");
    }

    #[test]
    fn a_segment_of_an_earlier_release_still_opens_and_continues() {
        let d = tempfile::tempdir().unwrap();
        // Unsalted records from byte 0, no header: what earlier releases wrote.
        let mut bytes = Vec::new();
        for i in 1..=3u64 {
            bytes.extend(encode(0, Seq(i), 7, &write(i, i as u8, 100)));
        }
        std::fs::write(seg_path(d.path(), Seq(1)), &bytes).unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        assert_eq!(j.last_seq(), Seq(3));
        assert_eq!(all(&j, 1).len(), 3);
        assert_eq!(j.bytes(), bytes.len() as u64);
        assert_eq!(j.append(&write(0, 4, 100)).unwrap(), Seq(4), "appends continue it, unsalted");
        while j.segments().len() < 2 {
            j.append(&write(0, 5, 1 << 20)).unwrap();
        }
        let last = j.last_seq();
        drop(j);
        let j = Journal::open(d.path()).unwrap();
        assert_eq!(j.last_seq(), last);
        assert_eq!(j.segments()[0].salt, None);
        assert!(j.segments()[1].salt.is_some(), "a new segment is of this release");
        assert_eq!(all(&j, 1).len() as u64, last.0);
    }

    #[test]
    fn a_reader_of_a_segment_reused_since_its_snapshot_is_told_to_read_again_not_that_it_is_damaged() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        for i in 0..3 {
            j.append(&write(0, i, 4096)).unwrap();
        }
        let snapshot = j.segments();
        j.mark_on_disk().unwrap();
        j.reset().unwrap();
        for i in 0..3 {
            j.append(&write(0, 9 - i, 4096)).unwrap();
        }
        // The same name now holds another salt's records.
        let e = read_from(&snapshot, Seq(1), |_| true).unwrap_err();
        assert!(matches!(e, JournalError::Io { .. }), "{e}");
        // Gone altogether: the same.
        std::fs::remove_file(&snapshot[0].path).unwrap();
        let e = read_batch(&snapshot, &mut Cursor::at(Seq(1)), 1 << 20).unwrap_err();
        assert!(matches!(e, JournalError::Io { .. }), "{e}");
    }

    #[test]
    fn a_damaged_segment_header_is_an_error_not_an_empty_segment() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        j.append(&write(0, 1, 4096)).unwrap();
        j.mark_on_disk().unwrap();
        let path = j.segments()[0].path.clone();
        drop(j);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[0, 0, 0, 0], 0).unwrap();
        assert!(matches!(Journal::open(d.path()), Err(JournalError::Corrupt { .. })));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), SEG_HEADER + 48 + 4096, "nothing was cut");
    }

    #[test]
    fn corrupt_middle_segment_is_fatal() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        for i in 0..12 {
            j.append(&write(0, i, 4 << 20)).unwrap();
        }
        assert!(j.segments().len() >= 2);
        let first = j.segments()[0].path.clone();
        drop(j);
        let mut bytes = std::fs::read(&first).unwrap();
        bytes[100] ^= 0xff;
        std::fs::write(&first, bytes).unwrap();
        assert!(matches!(Journal::open(d.path()), Err(JournalError::Corrupt { .. })));
    }

    #[test]
    fn cursor_reads_across_segments_in_batches() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        for i in 0..40u8 {
            j.append(&write(0, i, 3 << 20)).unwrap();
        }
        assert!(j.segments().len() >= 3);
        let mut c = Cursor::at(Seq(2));
        let mut seen = Vec::new();
        loop {
            let b = read_batch(&j.segments(), &mut c, 8 << 20).unwrap();
            if b.is_empty() {
                break;
            }
            assert!(b.len() <= 3);
            seen.extend(b.into_iter().map(|r| r.seq.0));
        }
        assert_eq!(seen, (2..=40).collect::<Vec<_>>());
    }

    #[test]
    fn reset_starts_over_at_one_and_survives_reopen() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        for i in 0..12 {
            j.append(&write(0, i, 4 << 20)).unwrap();
        }
        j.mark_on_disk().unwrap();
        j.reset().unwrap();
        assert_eq!((j.last_seq(), j.bytes(), j.segments().len()), (Seq(0), 0, 1));
        assert_eq!(j.append(&write(0, 1, 10)).unwrap(), Seq(1));
        drop(j);
        let j = Journal::open(d.path()).unwrap();
        assert_eq!(j.last_seq(), Seq(1));
    }

    #[test]
    fn bytes_after_a_position_are_measured_across_reopen() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        for i in 0..100 {
            j.append(&write(0, i, 10_000)).unwrap();
        }
        let rec = 10_000 + HEADER as u64;
        let all = j.bytes_after(Seq(0));
        assert_eq!(all, 100 * rec);
        let after_50 = j.bytes_after(Seq(50));
        assert!(after_50 >= 50 * rec && after_50 <= 50 * rec + MARK_EVERY, "{after_50}");
        assert_eq!(j.bytes_after(Seq(100)), 0);
        drop(j);
        let j = Journal::open(d.path()).unwrap();
        let again = j.bytes_after(Seq(50));
        assert!(again >= 50 * rec && again <= 50 * rec + MARK_EVERY, "{again}");
    }

    #[test]
    fn trim_keeps_next_sequence_across_restart() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        for i in 0..20 {
            j.append(&write(0, i, 4 << 20)).unwrap();
        }
        let last = j.last_seq();
        let freed = j.trim_through(last).unwrap();
        assert!(freed > 0);
        assert_eq!(j.segments().len(), 1);
        drop(j);
        let mut j = Journal::open(d.path()).unwrap();
        assert_eq!(j.last_seq(), last);
        assert_eq!(j.append(&write(0, 9, 1)).unwrap(), last.next());
    }

    #[test]
    fn the_redo_mark_survives_reopen_resets_with_the_journal_and_a_torn_slot_keeps_the_older() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        assert!(j.sealed(), "an empty journal holds nothing the disk lacks");
        j.append(&write(0, 1, 4096)).unwrap();
        assert!(!j.sealed());
        j.mark_on_disk().unwrap();
        j.append(&Op::Marker { kind: MarkerKind::Flush }).unwrap();
        assert!(j.sealed(), "a marker changes nothing on the disk");
        j.append(&write(0, 2, 4096)).unwrap();
        j.mark_on_disk().unwrap();
        assert_eq!(j.on_disk(), Seq(3));
        drop(j);
        let j = Journal::open(d.path()).unwrap();
        assert_eq!(j.on_disk(), Seq(3));
        assert!(j.sealed());
        drop(j);
        // The newest slot torn: the previous mark counts (redoing more is safe; less never happens).
        use std::os::unix::fs::FileExt;
        let f = OpenOptions::new().write(true).open(d.path().join("redo.mark")).unwrap();
        let newest = (Journal::open(d.path()).unwrap().mark.generation % 2) * 32;
        f.write_all_at(&[0xff; 8], newest + 16).unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        assert_eq!(j.on_disk(), Seq(1));
        j.mark_on_disk().unwrap();
        assert_eq!(j.on_disk(), Seq(3));
        j.reset().unwrap();
        assert_eq!(j.on_disk(), Seq::ZERO, "a new journal starts unmarked");
        j.append(&write(0, 3, 4096)).unwrap();
        assert!(!j.sealed());
        drop(j);
        // Both slots bad is corruption, never a silent 'nothing to redo'.
        f.write_all_at(&[0u8; 64], 0).unwrap();
        assert!(matches!(Journal::open(d.path()), Err(JournalError::Corrupt { .. })));
        f.write_all_at(&[0xa5; 64], 0).unwrap();
        assert!(matches!(Journal::open(d.path()), Err(JournalError::Corrupt { .. })));
    }

    #[test]
    fn a_reset_cut_short_before_the_mark_was_cleared_starts_unmarked() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        j.append(&write(0, 1, 4096)).unwrap();
        j.mark_on_disk().unwrap();
        drop(j);
        // Every segment removed, the mark still at 1.
        for e in std::fs::read_dir(d.path()).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "seg") {
                std::fs::remove_file(p).unwrap();
            }
        }
        let j = Journal::open(d.path()).unwrap();
        assert_eq!(j.on_disk(), Seq::ZERO);
    }

    #[test]
    fn a_fully_applied_active_segment_returns_its_space_at_once() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        for i in 0..3 {
            j.append(&write(0, i, 1 << 20)).unwrap();
        }
        let last = j.last_seq();
        assert_eq!(j.trim_through(last).unwrap(), 0, "the active segment stays while the volume has room");
        j.set_urgent(true);
        assert!(j.trim_through(Seq(last.0 - 1)).unwrap() == 0, "a record not applied keeps the segment");
        assert!(j.trim_through(last).unwrap() >= 3 << 20);
        assert_eq!(j.bytes(), 0);
        assert_eq!(spares(d.path()), 0, "a full volume keeps no spares");
        assert_eq!(j.segments()[0].salt, None, "the new segment needs no data block for a header");
        drop(j);
        let mut j = Journal::open(d.path()).unwrap();
        assert_eq!(j.append(&write(0, 9, 1)).unwrap(), last.next());
    }

    /// A small deterministic generator (xorshift), for mutations.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    #[test]
    fn damaged_segment_bytes_are_errors_or_a_cut_tail_never_panics() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        for i in 0..20u8 {
            j.append(&write(u64::from(i) * 4096, i, 1000 + usize::from(i) * 300)).unwrap();
            j.append(&Op::Marker { kind: MarkerKind::Bookmark { tag: format!("t{i}") } }).unwrap();
        }
        drop(j);
        let seg = seg_path(d.path(), Seq(1));
        let good = std::fs::read(&seg).unwrap();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..500 {
            let mut b = good.clone();
            for _ in 0..1 + next(&mut state) % 4 {
                let i = (next(&mut state) % b.len() as u64) as usize;
                b[i] = next(&mut state) as u8;
            }
            let t = tempfile::tempdir().unwrap();
            std::fs::write(seg_path(t.path(), Seq(1)), &b).unwrap();
            // A damaged record is where the journal ends (a torn tail); what comes before reads back.
            if let Ok(j) = Journal::open(t.path()) {
                let mut n = 0u64;
                read_from(&j.segments(), Seq(1), |r| {
                    assert_eq!(r.seq, Seq(n + 1));
                    n += 1;
                    true
                })
                .unwrap();
                assert_eq!(Seq(n), j.last_seq());
            }
        }
    }

    #[test]
    fn an_open_window_survives_restarts_and_trimming_and_closes_once() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        j.append(&write(0, 1, 4096)).unwrap();
        j.note_bypass();
        assert!(j.in_window());
        let after = j.append(&write(0, 2, 1 << 20)).unwrap();
        let kinds = |j: &Journal| {
            let mut k = Vec::new();
            read_from(&j.segments(), j.first_seq(), |r| {
                if let Op::Marker { kind } = r.op {
                    k.push((r.seq, kind));
                }
                true
            })
            .unwrap();
            k
        };
        assert_eq!(kinds(&j), vec![(Seq(after.0 - 1), MarkerKind::InconsistentBegin)], "the begin goes first");
        drop(j);
        // Known open from the journal's own records...
        let mut j = Journal::open(d.path()).unwrap();
        assert!(j.in_window());
        // ...and from the mark once they are trimmed away.
        j.set_urgent(true);
        j.trim_through(j.last_seq()).unwrap();
        drop(j);
        let mut j = Journal::open(d.path()).unwrap();
        assert!(j.in_window());
        assert!(kinds(&j).is_empty());
        let end = j.end_window().unwrap().unwrap();
        assert_eq!(j.end_window().unwrap(), None, "closed once");
        drop(j);
        let mut j = Journal::open(d.path()).unwrap();
        assert!(!j.in_window());
        assert_eq!(kinds(&j).last(), Some(&(end, MarkerKind::InconsistentEnd)));
        // Open across an initial copy's end: it begins again after it (a replica keeps nothing before).
        j.note_bypass();
        j.append(&write(0, 3, 4096)).unwrap();
        let done = j.append(&Op::Marker { kind: MarkerKind::InitialCopyDone }).unwrap();
        j.append(&write(0, 4, 4096)).unwrap();
        assert_eq!(kinds(&j).last(), Some(&(done.next(), MarkerKind::InconsistentBegin)));
    }
}
