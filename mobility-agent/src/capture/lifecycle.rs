//! A disk's protection lifecycle as the agent carries it out: protect (a fresh initial copy),
//! unprotect, the stop of a planned failover (final FLUSH and bookmark, writes refused), and reprotect
//! (ship the blocks changed since a failover). Each changes the disk's [`Mode`] under the journal's lock.

use super::*;

impl ProtectedDisk {
    /// The disk is protected as `item`: journal its changes and copy it, starting over (a fresh journal
    /// from sequence number 1 and a new initial copy) unless it already was protected as that item.
    pub fn protect(&self, item: u64) -> anyhow::Result<()> {
        let st = self.copy_state();
        if self.journaling() && st.item == Some(item) {
            return Ok(());
        }
        tracing::info!(disk = self.name, item, "protection assigned: starting a fresh journal and initial copy");
        let mut j = self.lock();
        self.drop_journal(&mut j)?;
        self.clear_dirty()?;
        self.end_resync()?;
        self.start_protection(j, CopyState { cursor: 0, done: false, done_seq: 0, item: Some(item), ..st })?;
        self.publish();
        Ok(())
    }

    /// Records `copy` as the new protection (no longer parted from a peer, nor stopped) and journals from
    /// now on, releasing the journal lock `j` the caller took for the change.
    pub(super) fn start_protection(
        &self,
        j: std::sync::MutexGuard<'_, Journal>,
        copy: CopyState,
    ) -> anyhow::Result<()> {
        self.save_copy(CopyState { generation: 0, stopped: false, stop_seq: 0, ..copy })?;
        self.set_mode(&j, Mode::Journaling);
        drop(j);
        self.acked.store(0, Ordering::Relaxed);
        self.applied.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// The disk is not protected: stop journaling and drop the journal and the copy's progress.
    pub fn unprotect(&self) -> anyhow::Result<()> {
        let st = self.copy_state();
        if !self.journaling() && st.item.is_none() {
            return Ok(());
        }
        let mut j = self.lock();
        let next = match (self.mode(), st.generation) {
            (Mode::Stopped { .. }, _) => Mode::Stopped { protected: false },
            (_, 0) => Mode::Unprotected,
            _ => Mode::Tracking,
        };
        self.set_mode(&j, next);
        self.drop_journal(&mut j)?;
        if st.generation == 0 {
            tracing::info!(disk = self.name, "not protected: journaling stopped, journal dropped");
            self.clear_dirty()?;
        } else {
            // Parted from its peer at a failover: what changes from now on is what a reprotect ships.
            tracing::info!(
                disk = self.name,
                generation = st.generation,
                "not protected: journal dropped, writes tracked since the failover"
            );
        }
        self.end_resync()?;
        self.save_copy(CopyState { cursor: 0, done: false, done_seq: 0, item: None, ..st })?;
        drop(j);
        self.publish();
        Ok(())
    }

    /// Forgets every dirty block (a new protection copies the whole disk anyway).
    pub(super) fn clear_dirty(&self) -> std::io::Result<()> {
        let mut d = self.dirty.lock().expect("dirty lock poisoned");
        let n = d.count();
        if n > 0 {
            let blocks = self.size().div_ceil(d.block());
            d.clear(0, blocks);
            d.persist()?;
        }
        Ok(())
    }

    /// Holds every front-end write of this disk until the guard is dropped.
    pub fn hold_writes(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.hold_gate.write().expect("hold gate poisoned")
    }

    pub(super) fn gate(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.hold_gate.read().expect("hold gate poisoned")
    }

    pub fn stopped(&self) -> bool {
        matches!(self.mode(), Mode::Stopped { .. })
    }

    pub fn path(&self) -> &Path {
        self.disk.path()
    }

    /// Planned failover: refuse writes from now on, and put a final FLUSH and a bookmark tagged with the
    /// generation in the journal, after every accepted write and after every dirty block (the journal
    /// past its limit, or a comparison, left some): until those are copied into the journal the bookmark
    /// waits, and this returns 0; call again. Returns the bookmark's sequence number, the same one each
    /// time for one generation.
    pub fn stop(&self, generation: u64) -> anyhow::Result<Seq> {
        use anyhow::Context;
        let st = self.copy_state();
        if st.stopped && st.generation == generation && st.stop_seq > 0 {
            return Ok(Seq(st.stop_seq));
        }
        let mut j = self.lock();
        let protected = self.journaling();
        let pending = self.overflowed() || self.dirty_bytes() > 0 || self.resync_state().active();
        self.set_mode(&j, Mode::Stopped { protected });
        let seq = if protected && !pending {
            // Nothing is left to copy in block order: a window still open closes before the final point.
            j.end_window()?;
            j.append(&Op::Marker { kind: MarkerKind::Flush })?;
            let seq =
                j.append(&Op::Marker { kind: MarkerKind::Bookmark { tag: sr_common::types::stop_tag(generation) } })?;
            j.sync_handle().sync_data().context("syncing the journal")?;
            seq
        } else {
            Seq::ZERO
        };
        self.sync_disk().context("syncing the disk")?;
        // Everything journaled is on the disk now; whatever reaches it later (a failback) is newer.
        j.mark_on_disk().context("recording the journal as on the disk")?;
        if !(st.stopped && st.generation == generation && seq == Seq::ZERO) {
            self.save_copy(CopyState { generation, stopped: true, stop_seq: seq.0, ..st })?;
        }
        drop(j);
        if pending {
            // The dirty blocks go now, whatever the resync window says.
            self.resync_now();
            tracing::info!(
                disk = self.name,
                generation,
                dirty_bytes = self.dirty_bytes(),
                "stopped for a planned failover: writes refused; the final point follows the dirty blocks"
            );
        } else if seq > Seq::ZERO {
            self.after_append();
            tracing::info!(
                disk = self.name,
                generation,
                seq = seq.0,
                "stopped for a planned failover: writes refused, final point marked"
            );
        }
        Ok(seq)
    }

    /// Reprotect: the disk becomes the source of `item` whose replica equals this disk as it was at
    /// `baseline` except for known blocks. No initial copy: the blocks changed since (tracked here, and
    /// those a commit wrote, from the disk's split record) go to the dirty map and ship from there. When
    /// neither this disk nor its split record knows the baseline, a checksum comparison finds them.
    /// Returns whether the history was known.
    pub fn reprotect(&self, item: u64, baseline: u64) -> anyhow::Result<bool> {
        use anyhow::Context;
        let st = self.copy_state();
        if self.journaling() && st.item == Some(item) {
            return Ok(true);
        }
        let split = sr_common::split::Split::read(self.disk.path(), self.size()).map_err(anyhow::Error::msg)?;
        let from_split = split.as_ref().is_some_and(|s| s.generation == baseline);
        let known = from_split || st.generation == baseline;
        let mut j = self.lock();
        self.drop_journal(&mut j)?;
        if let Some(s) = split.filter(|_| from_split) {
            let mut d = self.dirty.lock().expect("dirty lock poisoned");
            for (o, l) in &s.changed {
                d.mark(*o, *l).context("marking the commit's ranges dirty")?;
            }
        }
        let done = j.append(&Op::Marker { kind: MarkerKind::InitialCopyDone })?;
        if self.dirty_bytes() > 0 {
            // The points after the new stream's start wait for the blocks changed since the failover.
            self.note_bypass(&mut j);
        }
        j.sync_handle().sync_data().context("syncing the journal")?;
        self.end_resync()?;
        let copy = CopyState { cursor: self.size(), done: true, done_seq: done.0, item: Some(item), ..st };
        self.start_protection(j, copy)?;
        if !known {
            tracing::warn!(
                disk = self.name,
                baseline,
                "the disk's history since the failover is not known here: comparing checksums with the replica"
            );
            self.request_resync(sr_common::types::now_micros())?;
        }
        self.resync_now();
        tracing::info!(disk = self.name, item, baseline, known, dirty_bytes = self.dirty_bytes(), "reprotected");
        self.after_append();
        Ok(known)
    }
}
