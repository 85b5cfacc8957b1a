//! The agent's part in failovers and recovery plans.
//!
//! ```text
//! planned failover:  shutdown hook --> every disk: refuse writes, FLUSH + bookmark "failover-<gen>" --> drain
//! plan consistency:  POST /v1/hold {tag}   --> every disk's writes held (none completes) --> 200
//!                    POST /v1/release {tag, mark} --> bookmark {tag} on every disk --> writes go on
//! ```
//! The configuration server holds every agent of a plan before it releases any with a mark, so for any
//! write B that started after a write A completed (on any machines of the plan), B is before its
//! machine's mark only if A is before its own. A hold not released within its timeout ends by itself,
//! without a mark, so a lost configuration server never stalls the machine's writes for long.

use crate::capture::ProtectedDisk;
use crate::consistency::{run_hook, Events, PointsConfig};
use sr_common::wire::{MarkerKind, Op};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Stops every disk for the planned failover `generation`, after the shutdown hook when one is
/// configured. Returns each disk's final sequence number.
pub fn stop_all(
    disks: &[Arc<ProtectedDisk>],
    generation: u64,
    cfg: &PointsConfig,
    events: &Events,
) -> anyhow::Result<Vec<u64>> {
    if disks.iter().any(|d| !(d.stopped() && d.copy_state().generation == generation)) {
        if let Some(hook) = &cfg.shutdown_hook {
            match run_hook(hook, Duration::from_secs(cfg.hook_timeout_secs)) {
                Ok(out) => tracing::info!(output = out, "shutdown hook ran before the planned failover"),
                Err(why) => {
                    tracing::warn!(error = why, "shutdown hook failed; stopping the disks anyway");
                    events.lock().expect("events lock poisoned").push((
                        "warning".into(),
                        format!("planned failover: shutdown hook {why}; the disks were stopped anyway"),
                    ));
                }
            }
        }
    }
    disks.iter().map(|d| d.stop(generation).map(|s| s.0)).collect()
}

struct Held {
    tag: String,
    release: mpsc::Sender<bool>,
    marked: mpsc::Receiver<Result<Vec<(u64, u64)>, String>>,
}

/// At most one hold at a time.
#[derive(Default)]
pub struct Holder {
    held: Mutex<Option<Held>>,
}

impl Holder {
    /// Holds every disk's front-end writes until [`Holder::release`] or `timeout`. Blocking.
    pub fn hold(&self, disks: &[Arc<ProtectedDisk>], tag: &str, timeout: Duration) -> Result<(), String> {
        if tag.is_empty() || tag.len() > 128 {
            return Err("tag: 1 to 128 characters".into());
        }
        let mut slot = self.held.lock().expect("holder lock poisoned");
        if let Some(h) = slot.as_ref() {
            if h.marked.try_recv().is_err() {
                return Err(format!("already holding for {:?}; release it first", h.tag));
            }
            // That hold timed out by itself.
            *slot = None;
        }
        if let Some(d) = disks.iter().find(|d| !(d.journaling() && d.copy_state().done)) {
            return Err(format!("disk {} is not protected with its initial copy done: no point can be marked", d.name));
        }
        let (held_tx, held_rx) = mpsc::channel::<()>();
        let (release_tx, release_rx) = mpsc::channel::<bool>();
        let (marked_tx, marked_rx) = mpsc::channel();
        let (disks, tag_owned) = (disks.to_vec(), tag.to_string());
        std::thread::Builder::new()
            .name("plan-hold".into())
            .spawn(move || {
                let gates: Vec<_> = disks.iter().map(|d| d.hold_writes()).collect();
                let _ = held_tx.send(());
                let mark = match release_rx.recv_timeout(timeout) {
                    Ok(mark) => mark,
                    Err(_) => {
                        tracing::warn!(tag = tag_owned, "hold not released in time: writes resume without a mark");
                        false
                    }
                };
                let result = if mark {
                    let kind = MarkerKind::Bookmark { tag: tag_owned.clone() };
                    let mut guards: Vec<_> = disks.iter().map(|d| d.lock_journal()).collect();
                    let seqs: Result<Vec<(u64, u64)>, String> = disks
                        .iter()
                        .zip(guards.iter_mut())
                        .map(|(d, g)| {
                            g.append(&Op::Marker { kind: kind.clone() })
                                .map(|seq| (d.id.0, seq.0))
                                .map_err(|e| format!("marking disk {}: {e}", d.name))
                        })
                        .collect();
                    drop(guards);
                    seqs
                } else {
                    Ok(Vec::new())
                };
                drop(gates);
                disks.iter().for_each(|d| d.after_marker());
                let _ = marked_tx.send(result);
            })
            .map_err(|e| format!("starting the hold: {e}"))?;
        held_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| "the writes could not be held within 10 s".to_string())?;
        *slot = Some(Held { tag: tag.to_string(), release: release_tx, marked: marked_rx });
        Ok(())
    }

    /// Ends the hold for `tag`, marking every disk when `mark`. Returns (disk, seq) of each mark.
    pub fn release(&self, tag: &str, mark: bool) -> Result<Vec<(u64, u64)>, String> {
        let mut slot = self.held.lock().expect("holder lock poisoned");
        match slot.as_ref() {
            Some(h) if h.tag == tag => {}
            Some(h) => return Err(format!("holding for {:?}, not {tag:?}", h.tag)),
            None => return Err(format!("no hold for {tag:?} (it may have timed out)")),
        }
        let h = slot.take().expect("checked above");
        if h.release.send(mark).is_err() && mark {
            return Err(format!("the hold for {tag:?} timed out before the release; no mark was made"));
        }
        let seqs =
            h.marked.recv_timeout(Duration::from_secs(10)).map_err(|_| "the mark did not finish".to_string())??;
        if mark && seqs.is_empty() {
            return Err(format!("the hold for {tag:?} timed out before the release; no mark was made"));
        }
        Ok(seqs)
    }
}
