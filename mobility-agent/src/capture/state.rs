//! What the agent keeps about a disk besides its journal and dirty map: the initial copy's progress and
//! the checksum comparison's, as one versioned record (`disk-ID.state`), and the resync window.

use super::*;
use serde::{Deserialize, Serialize};

/// A checksum comparison with the replica: asked for by `requested` (a growing id), finished when `done`
/// reaches it; `cursor` is how far it got (persisted after the differing blocks found before it are in
/// the dirty map), so an interrupted comparison resumes there.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ResyncState {
    pub requested: u64,
    pub done: u64,
    pub cursor: u64,
    /// Bytes of blocks found to differ so far.
    pub differing_bytes: u64,
    /// Bytes compared so far in this comparison, over all its runs.
    pub compared_bytes: u64,
}

impl ResyncState {
    pub fn active(&self) -> bool {
        self.requested > self.done
    }
}

/// Progress of the initial copy, persisted so a restart resumes where it stopped.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CopyState {
    pub version: u32,
    pub disk_size: u64,
    /// Bytes below this offset were copied into the journal.
    pub cursor: u64,
    pub done: bool,
    /// Sequence number of the initial-copy-done marker.
    #[serde(default)]
    pub done_seq: u64,
    /// The protected item the journal belongs to, when the configuration server assigned one.
    #[serde(default)]
    pub item: Option<u64>,
    /// The failover generation this disk parted from its peer at (0: none). While it is set and the
    /// disk is not protected, writes are tracked in the dirty map so a reprotect ships only them.
    #[serde(default)]
    pub generation: u64,
    /// A planned failover stopped the disk: writes are refused until it is protected again.
    #[serde(default)]
    pub stopped: bool,
    /// Sequence number of the final marker the stop put in the journal.
    #[serde(default)]
    pub stop_seq: u64,
}

/// Everything the agent keeps about one disk besides its journal and dirty map: one record
/// (`disk-ID.state`, kind [`DISK_STATE`]), so the two parts never disagree after a crash.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskState {
    pub copy: CopyState,
    pub resync: ResyncState,
}

impl DiskState {
    /// The disk's state: its record, or what releases before it kept in two JSON files (read once,
    /// removed after the record is first written), or a fresh state for a disk of `size` bytes.
    pub(super) fn load(dir: &Path, id: DiskId, size: u64) -> anyhow::Result<DiskState> {
        use anyhow::Context;
        let path = dir.join(format!("disk-{}.state", id.0));
        if let Some(r) = sr_common::crashsafe::read_record(&path, DISK_STATE, DISK_STATE_VERSION)? {
            return Ok(r.value);
        }
        let legacy = |name: String| -> anyhow::Result<Option<Vec<u8>>> {
            match std::fs::read(dir.join(&name)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e).with_context(|| format!("reading {}", dir.join(&name).display())),
            }
        };
        let copy = match legacy(format!("copy-{}.json", id.0))? {
            Some(b) => serde_json::from_slice(&b).context("the copy state of an earlier release is not valid")?,
            None => CopyState { version: 1, disk_size: size, ..CopyState::default() },
        };
        let resync = match legacy(format!("resync-{}.json", id.0))? {
            Some(b) => serde_json::from_slice(&b).context("the resync state of an earlier release is not valid")?,
            None => ResyncState::default(),
        };
        Ok(DiskState { copy, resync })
    }
}

pub const DISK_STATE: &str = "disk-state";

/// The format of [`DiskState`] this build writes and the newest it reads.
pub const DISK_STATE_VERSION: u32 = 1;

impl ProtectedDisk {
    pub fn resync_state(&self) -> ResyncState {
        *self.resync.lock().expect("resync lock poisoned")
    }

    pub fn save_resync(&self, st: ResyncState) -> anyhow::Result<()> {
        self.save_state(None, Some(st))
    }

    /// Writes the disk's state record with `copy` or `resync` (or both) replaced, then takes them.
    pub(super) fn save_state(&self, copy: Option<CopyState>, resync: Option<ResyncState>) -> anyhow::Result<()> {
        use anyhow::Context;
        let path = self.state_path.lock().expect("state lock poisoned");
        let state = DiskState {
            copy: copy.unwrap_or_else(|| *self.copy.lock().expect("copy lock poisoned")),
            resync: resync.unwrap_or_else(|| *self.resync.lock().expect("resync lock poisoned")),
        };
        sr_common::crashsafe::write_record(&path, DISK_STATE, DISK_STATE_VERSION, &state)
            .with_context(|| format!("saving {}", path.display()))?;
        *self.copy.lock().expect("copy lock poisoned") = state.copy;
        *self.resync.lock().expect("resync lock poisoned") = state.resync;
        if let Some(dir) = path.parent() {
            // What releases before the record kept, now superseded by it.
            for old in [format!("copy-{}.json", self.id.0), format!("resync-{}.json", self.id.0)] {
                let _ = std::fs::remove_file(dir.join(old));
            }
        }
        Ok(())
    }

    pub(super) fn save_copy(&self, st: CopyState) -> anyhow::Result<()> {
        self.save_state(Some(st), None)
    }

    /// Asks for a checksum comparison with the replica (request `id`, larger than any before); a
    /// comparison already running for a smaller id starts over.
    pub fn request_resync(&self, id: u64) -> anyhow::Result<bool> {
        let st = self.resync_state();
        if id <= st.requested {
            return Ok(false);
        }
        tracing::info!(disk = self.name, id, "resync requested: comparing checksums with the replica");
        self.save_resync(ResyncState { requested: id, done: st.done, ..ResyncState::default() })?;
        // The replica is suspected to differ: its points are not trusted until the comparison is over.
        self.note_bypass(&mut self.lock());
        self.resync_wake.notify_one();
        Ok(true)
    }

    pub fn set_resync_window(&self, w: Option<(u32, u32)>) {
        *self.window.lock().expect("window lock poisoned") = w;
    }

    /// Dirty blocks are copied now, whatever the window (until the dirty map is empty).
    pub fn resync_now(&self) {
        self.resync_now.store(true, Ordering::Release);
    }

    /// Whether dirty blocks may be copied now: no window, inside it, or an operator asked.
    pub fn copy_allowed(&self) -> bool {
        if self.resync_now.load(Ordering::Acquire) || self.scanned() {
            return true;
        }
        let Some(window) = *self.window.lock().expect("window lock poisoned") else { return true };
        let now = (sr_common::types::now_micros() / 60_000_000 % (24 * 60)) as u32;
        sr_common::types::in_daily_window(window, now)
    }

    /// Drops a comparison in progress (a new protection starts with a full initial copy anyway).
    pub(super) fn end_resync(&self) -> anyhow::Result<()> {
        let st = self.resync_state();
        if st.active() {
            self.save_resync(ResyncState { done: st.requested, ..st })?;
        }
        Ok(())
    }
}
