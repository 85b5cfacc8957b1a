//! Copying a disk into its journal: the initial copy, the copy of dirty blocks (after an overflow, a
//! comparison, or a reprotect), and scan capture's passes for disks without an NBD front end.
//!
//! ```text
//! lock --> pread chunk --> journal.append (unless zero) --> clear dirty bit --> unlock --> save progress
//! ```

use super::*;

impl ProtectedDisk {
    /// Scan capture: compares every block's checksum with what was last shipped and marks those that
    /// changed dirty. Returns the bytes marked.
    pub fn scan_once(&self, stop: &dyn Fn() -> bool) -> anyhow::Result<u64> {
        use anyhow::Context;
        let Some(scan) = &self.scan else { return Ok(0) };
        let size = self.size();
        let block = scan.lock().expect("scan lock poisoned").block;
        let chunk = (1u64 << 20).max(block);
        let mut buf = vec![0u8; chunk as usize];
        let mut marked = 0;
        let mut pos = 0;
        while pos < size && !stop() {
            let n = chunk.min(size - pos);
            let hole = self.disk.next_data(pos).is_none_or(|d| d >= pos + n);
            let b = &mut buf[..n as usize];
            let j = self.lock();
            if hole {
                b.fill(0);
            } else {
                self.disk.read_at(pos, b).with_context(|| format!("reading {} at {pos}", self.name))?;
            }
            let map = scan.lock().expect("scan lock poisoned");
            let first = (pos / block) as usize;
            let changed: Vec<(u64, u64)> = b
                .chunks(block as usize)
                .enumerate()
                .filter(|(i, c)| map.sums[first + i] != crate::scan::checksum(c))
                .map(|(i, c)| (pos + i as u64 * block, c.len() as u64))
                .collect();
            drop(map);
            let mut d = self.dirty.lock().expect("dirty lock poisoned");
            for (o, l) in &changed {
                d.mark(*o, *l)?;
                marked += l;
            }
            drop(d);
            drop(j);
            pos += n;
        }
        self.publish();
        Ok(marked)
    }

    /// Scan capture's initial copy: a first scan against a map of zeroes, its blocks shipped, then the
    /// initial-copy-done marker.
    pub fn scan_initial_copy(&self, chunk: u64, backlog: u64, stop: &dyn Fn() -> bool) -> anyhow::Result<()> {
        let st = self.copy_state();
        if !self.journaling() || st.done {
            return Ok(());
        }
        let started = (st.item, self.lock().incarnation());
        if st.cursor == 0 {
            let marked = self.scan_once(stop)?;
            tracing::info!(disk = self.name, bytes = marked, "scan capture: first scan done, copying");
            let j = self.lock();
            if !self.still_copying_for(started, &j) {
                return Ok(());
            }
            self.save_copy(CopyState { cursor: self.size(), ..self.copy_state() })?;
        }
        self.copy_dirty(chunk, backlog, stop)?;
        if self.dirty_bytes() > 0 || stop() || !self.finish_copy(started)? {
            return Ok(());
        }
        tracing::info!(disk = self.name, "initial copy finished (scan capture)");
        Ok(())
    }

    /// Copies the whole disk into the journal, skipping holes and zero chunks, resuming from the
    /// persisted cursor. Blocks; runs on its own thread. Stops early when `stop` returns true.
    pub fn initial_copy(&self, chunk: u64, backlog_limit: u64, stop: &dyn Fn() -> bool) -> anyhow::Result<()> {
        use anyhow::Context;
        let mut st = self.copy_state();
        if !self.journaling() {
            return Ok(());
        }
        if st.done {
            self.metrics.copy_ratio.set(1.0);
            return Ok(());
        }
        let size = self.size();
        let mut buf = vec![0u8; chunk as usize];
        let mut last_save = std::time::Instant::now();
        tracing::info!(disk = self.name, from = st.cursor, size, "initial copy running");
        // A new protection (another item, or the same one again) restarts the journal and the copy:
        // this run must not write into the new journal nor save its cursor over the new copy's.
        let started = (st.item, self.lock().incarnation());
        let stop = || stop() || !self.journaling() || self.copy_state().item != started.0;
        while let Some(data_at) = self.disk.next_data(st.cursor) {
            if stop() {
                return Ok(());
            }
            let pos = (data_at / chunk * chunk).max(st.cursor);
            // The copy leaves the journal room for the disk's own writes (half its limit).
            let room = backlog_limit.min(self.limit.load(Ordering::Relaxed) / 2);
            while self.pending_bytes() > room {
                if stop() {
                    return Ok(());
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let len = chunk.min(size - pos) as usize;
            {
                // Checked again under the lock: a protection that came since `stop` was asked has
                // its own journal and copy, which this one must neither write into nor save over.
                let mut j = self.lock();
                if !self.still_copying_for(started, &j) {
                    return Ok(());
                }
                self.disk.read_at(pos, &mut buf[..len]).with_context(|| format!("reading {} at {pos}", self.name))?;
                if !sr_common::compress::is_zero(&buf[..len]) {
                    j.append_write(pos, &buf[..len]).inspect_err(|e| self.journal_failed(e))?;
                    self.metrics.copy_bytes.increment(len as u64);
                }
                st.cursor = pos + len as u64;
                if last_save.elapsed() > std::time::Duration::from_millis(500) {
                    // Only the cursor is this run's: the rest of the state is as it is now.
                    self.save_copy(CopyState { cursor: st.cursor, ..self.copy_state() })?;
                    last_save = std::time::Instant::now();
                }
            }
            self.after_append();
            self.metrics.copy_ratio.set(st.cursor as f64 / size.max(1) as f64);
        }
        if stop() || !self.finish_copy(started)? {
            return Ok(());
        }
        tracing::info!(disk = self.name, "initial copy finished");
        Ok(())
    }

    /// Whether the disk is still journaling for the protection a copy started under: its item and
    /// the journal's incarnation then (`started`). Asked under the journal's lock `j`, which every
    /// new protection takes to start the journal over.
    fn still_copying_for(&self, started: (Option<u64>, u64), j: &Journal) -> bool {
        self.journaling() && self.copy_state().item == started.0 && j.incarnation() == started.1
    }

    /// Ends the copy of the protection it `started` under: its done marker and its saved state,
    /// together under the journal's lock, unless another protection started meanwhile (false:
    /// nothing written).
    fn finish_copy(&self, started: (Option<u64>, u64)) -> anyhow::Result<bool> {
        {
            let mut j = self.lock();
            if !self.still_copying_for(started, &j) {
                return Ok(false);
            }
            let done_seq = j.append(&Op::Marker { kind: MarkerKind::InitialCopyDone })?.0;
            self.save_copy(CopyState { done_seq, cursor: self.size(), done: true, ..self.copy_state() })?;
        }
        self.after_append();
        self.metrics.copy_ratio.set(1.0);
        Ok(true)
    }

    /// Copies the dirty blocks into the journal (zeroes as zero changes), clearing them as it goes.
    /// Runs while journaling and not overflowed; stops early when `stop` returns true. Returns the
    /// bytes copied.
    pub fn copy_dirty(&self, chunk: u64, backlog_limit: u64, stop: &dyn Fn() -> bool) -> anyhow::Result<u64> {
        use anyhow::Context;
        let block = self.dirty.lock().expect("dirty lock poisoned").block();
        let max_blocks = (chunk / block).max(1);
        let mut buf = vec![0u8; (max_blocks * block) as usize];
        let mut cursor = 0u64;
        let mut copied = 0u64;
        let mut last_persist = std::time::Instant::now();
        let size = self.size();
        let persist = |this: &Self| -> anyhow::Result<()> {
            // The copies must be durable in the journal before their bits are cleared on disk.
            let handle = this.lock().sync_handle();
            handle.sync_data()?;
            this.dirty.lock().expect("dirty lock poisoned").persist()?;
            if let Some(scan) = &this.scan {
                scan.lock().expect("scan lock poisoned").persist()?;
            }
            Ok(())
        };
        loop {
            if stop() || !self.journaling() || self.overflowed() {
                persist(self)?;
                return Ok(copied);
            }
            // Leave the journal room: what the dirty map holds never pushes it back over its limit.
            let room = backlog_limit.min(self.limit.load(Ordering::Relaxed) / 2);
            while self.pending_bytes() > room {
                if stop() || self.overflowed() {
                    persist(self)?;
                    return Ok(copied);
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            {
                let mut j = self.lock();
                let mut d = self.dirty.lock().expect("dirty lock poisoned");
                let Some((first, n)) = d.next_run(cursor, max_blocks) else {
                    if d.count() > 0 {
                        // Blocks marked behind the cursor meanwhile (a comparison, a scan): go round.
                        cursor = 0;
                        continue;
                    }
                    drop(d);
                    drop(j);
                    persist(self)?;
                    if !self.resync_state().active() {
                        self.resync_now.store(false, Ordering::Release);
                    }
                    return Ok(copied);
                };
                let pos = first * block;
                let len = (n * block).min(size - pos) as usize;
                self.disk.read_at(pos, &mut buf[..len]).with_context(|| format!("reading {} at {pos}", self.name))?;
                if sr_common::compress::is_zero(&buf[..len]) {
                    j.append(&Op::Zero { offset: pos, len: len as u64 }).inspect_err(|e| self.journal_failed(e))?;
                } else {
                    j.append_write(pos, &buf[..len]).inspect_err(|e| self.journal_failed(e))?;
                }
                if let Some(scan) = &self.scan {
                    scan.lock().expect("scan lock poisoned").record(pos, &buf[..len]);
                }
                d.clear(first, n);
                cursor = first + n;
                copied += len as u64;
                self.metrics.resync_bytes.increment(len as u64);
            }
            self.after_append();
            if last_persist.elapsed() > std::time::Duration::from_millis(500) {
                persist(self)?;
                last_persist = std::time::Instant::now();
            }
        }
    }
}
