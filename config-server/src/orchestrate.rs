//! What an item becomes from what its components report: the configuration server's orchestration step,
//! free of I/O. `items::evaluate` gathers the observations every second, calls [`step`] for each item,
//! and carries the effects out (store the item, advance jobs, write events, send alerts, set metrics).
//!
//! ```text
//! heartbeats (machine progress, applied positions, faults, component liveness)
//!     --> Observed --> step(item, observed) --> (item', [Alert | Event | Job])
//! ```
//!
//! In order: a silent process server is replaced, a revoked agent makes the item Critical, a transient
//! problem is shown on the item, a broken chain makes it Resync required, a fault only an operator can
//! clear makes it Critical; otherwise its state moves with the reported progress (initial replication,
//! resync, reprotect, protected with its RPO).

use crate::jobs::{EnableStep, ReprotectStep, ResyncStep};
use crate::lifecycle::{Direction, Event, State};
use crate::model::*;
use sr_common::wire::ErrorCode;
use std::collections::BTreeMap;

/// What the components reported about one item, and the facts its evaluation needs.
pub struct Observed<'a> {
    /// Unix seconds.
    pub now: u64,
    /// A component whose last heartbeat is older than this (seconds) is down.
    pub component_timeout: u64,
    pub components: &'a [Component],
    /// Every item (for spreading items over process servers).
    pub items: &'a [Item],
    /// What the item's agent reported; none until it did.
    pub machine: Option<&'a Machine>,
    /// Faults the item's master target and process server report for its stream (each reason already
    /// names who reported it).
    pub stream_faults: Vec<ReplicaFault>,
    /// Applied sequence number per disk id, as the master target reported it.
    pub applied: BTreeMap<u64, u64>,
    /// The RPO threshold of the item's policy (seconds).
    pub rpo_threshold_secs: u64,
}

impl Observed<'_> {
    fn applied(&self, disk: u64) -> u64 {
        self.applied.get(&disk).copied().unwrap_or(0)
    }
}

/// What a job does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobUpdate {
    Progress(u8),
    /// `done` finished (unless it already had) and `next` started.
    Advance {
        done: usize,
        next: usize,
    },
    /// These steps finished, then the job succeeded.
    Succeed {
        done: Vec<usize>,
    },
    /// The job failed, for this reason.
    Fail(String),
}

/// Something the step asks the driver to do besides storing the item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// An event with a warning, also sent to the alert webhook.
    Alert(String),
    Event {
        severity: &'static str,
        message: String,
    },
    Job {
        job: u64,
        update: JobUpdate,
    },
}

/// Whether a component is up: registered, not revoked, serving, and heard from recently.
pub fn live(c: &Component, now: u64, timeout: u64) -> bool {
    !c.revoked && c.address.is_some() && c.last_heartbeat.is_some_and(|t| now.saturating_sub(t) <= timeout)
}

/// The least-loaded live process server other than `except`.
pub fn pick_process_server<'a>(
    comps: &'a [Component],
    items: &[Item],
    now: u64,
    timeout: u64,
    except: Option<&str>,
) -> Option<&'a Component> {
    let assigned = |name: &str| items.iter().filter(|i| i.process_server.as_deref() == Some(name)).count();
    comps
        .iter()
        .filter(|c| c.role == ComponentRole::ProcessServer && !c.draining && live(c, now, timeout))
        .filter(|c| Some(c.name.as_str()) != except)
        .min_by_key(|c| (c.load.cache_bytes, assigned(&c.name), c.name.clone()))
}

/// One evaluation of `item`: the item as it should be stored, and what else must happen.
pub fn step(item: &Item, o: &Observed) -> (Item, Vec<Effect>) {
    let mut item = item.clone();
    let mut fx = Vec::new();
    let alert = |fx: &mut Vec<Effect>, m: String| fx.push(Effect::Alert(m));
    let event = |fx: &mut Vec<Effect>, severity: &'static str, message: String| {
        fx.push(Effect::Event { severity, message });
    };
    // Scale-out: an item whose process server went silent moves to the least-loaded live one. The
    // agent keeps every change until the master target applied it, so nothing cached only on the
    // silent server is lost: the new one is sent it again.
    if item.state.replicating() {
        if let Some(ps) = item.process_server.clone() {
            let alive = o.components.iter().find(|c| c.name == ps).is_some_and(|c| live(c, o.now, o.component_timeout));
            if !alive {
                if let Some(next) = pick_process_server(o.components, o.items, o.now, o.component_timeout, Some(&ps)) {
                    item.process_server = Some(next.name.clone());
                    let m = format!("item {}: process server {ps} stopped reporting; moved to {}", item.id, next.name);
                    alert(&mut fx, m);
                }
            }
        }
    }
    // A revoked agent cannot be retried into working: the item turns Critical, with an alert.
    let agent_revoked = o.components.iter().any(|c| c.name == item.machine && c.revoked);
    if agent_revoked && !matches!(item.state, State::Critical { .. }) {
        let reason = format!("the certificate of agent {} was revoked", item.machine);
        if let Ok(next) = item.state.on(&Event::FatalError { reason: reason.clone() }) {
            item.state = next;
            alert(&mut fx, format!("item {} is critical: {reason}; re-register the agent", item.id));
        }
    }
    // A move ends with the replication it moved (a failover, a disable).
    let flowing = item.state.replicating() || matches!(item.state, State::Critical { .. });
    if let Some(m) = item.moving.clone().filter(|_| !flowing) {
        item.moving = None;
        let why = format!("item {} is {} now: its move to {} ended", item.id, item.state.name(), m.to);
        fx.push(Effect::Job { job: m.job, update: JobUpdate::Fail(why) });
    }
    let Some(machine) = o.machine else { return (item, fx) };
    // A fault retrying cannot fix, reported by the item's agent or master target (never read from
    // an error's text: each carries its code): the item turns Critical with the reason, and alerts.
    // Not assigned or not configured is the control plane catching up (its assignments clear it).
    let agent_fault = machine
        .progress
        .iter()
        .filter_map(|d| d.fatal.as_ref().map(|f| (d.id, f)))
        .find(|(_, f)| f.code.needs_operator());
    // A transient problem (retried) is shown on the item, with an event when it starts and ends.
    let problem = o.stream_faults.iter().find(|f| !f.code.fatal()).map(|f| format!("disk {}: {}", f.disk, f.reason));
    if problem != item.problem {
        match &problem {
            Some(p) => event(&mut fx, "warning", format!("item {}: {p}", item.id)),
            None => event(&mut fx, "info", format!("item {}: replication goes on again", item.id)),
        }
        item.problem = problem;
    }
    let stream_fault = o.stream_faults.iter().find(|f| f.code.needs_operator());
    let chain = ErrorCode::ChainBroken;
    let broken_chain =
        agent_fault.is_some_and(|(_, f)| f.code == chain) || stream_fault.is_some_and(|f| f.code == chain);
    if broken_chain && !item.chain_broken {
        // A gap: Resync required by itself; the resync copies the whole disk into a new stream.
        item.chain_broken = true;
        let reason = "the stream has a gap (its chain is broken): the next resync copies the whole disk";
        if let Ok(next) = item.state.on(&Event::ResyncNeeded { reason: reason.into() }) {
            item.state = next;
        }
        alert(&mut fx, format!("item {}: the replica chain is broken; a resync repairs it", item.id));
        return (item, fx);
    }
    let fault = agent_fault
        .filter(|(_, f)| f.code != chain)
        .map(|(disk, f)| format!("agent {} disk {disk}: {}", item.machine, f.reason))
        .or(stream_fault.filter(|f| f.code != chain).map(|f| format!("disk {}: {}", f.disk, f.reason)));
    if let Some(reason) = fault.filter(|_| !matches!(item.state, State::Critical { .. })) {
        if let Ok(next) = item.state.on(&Event::FatalError { reason: reason.clone() }) {
            item.state = next;
            alert(&mut fx, format!("item {} is critical: {reason}", item.id));
            return (item, fx);
        }
    }
    let before = item.state.clone();
    let p = &machine.progress;
    match item.state.clone() {
        State::Reprotecting { direction, .. } => reprotecting(&mut item, machine, o, direction, &mut fx),
        State::InitialReplication { percent } => {
            let n = machine.disks.len().max(1) as f64;
            let pct = (p.iter().map(|d| d.copy_percent).sum::<f64>() / n).clamp(0.0, 100.0) as u8;
            let done = !p.is_empty()
                && machine.disks.iter().all(|d| p.iter().any(|x| x.id == d.id && x.copy_done))
                && p.iter().all(|d| d.done_seq > 0 && o.applied(d.id) >= d.done_seq);
            if done {
                item.state = item.state.on(&Event::InitialReplicationDone).unwrap_or(item.state.clone());
                item.caught_up_at = Some(o.now);
            } else if pct != percent {
                item.state = item.state.on(&Event::Progress { percent: pct }).unwrap_or(item.state.clone());
            }
        }
        State::Protected { .. } if p.iter().any(|d| d.overflow || d.dirty_bytes > 0 || d.resync_active) => {
            let reason = if p.iter().any(|d| d.overflow || (d.dirty_bytes > 0 && !d.resync_active)) {
                "the journal reached its limit; changed blocks are tracked for a resync"
            } else {
                "a checksum comparison with the replica was started"
            };
            item.state = item.state.on(&Event::ResyncNeeded { reason: reason.into() }).unwrap_or(item.state.clone());
            event(&mut fx, "warning", format!("item {}: resync required: {reason}", item.id));
        }
        State::ResyncRequired { .. } | State::Resynchronizing { .. } => resyncing(&mut item, machine, o, &mut fx),
        State::Protected { .. } => {
            let caught_up = !p.is_empty() && p.iter().all(|d| o.applied(d.id) >= d.last_seq);
            if caught_up {
                item.caught_up_at = Some(machine.last_heartbeat.max(item.caught_up_at.unwrap_or(0)));
            }
            // A move to another process server is done once the replica caught up through it.
            if let Some(m) = item.moving.clone().filter(|m| item.caught_up_at.is_some_and(|t| t > m.since)) {
                item.moving = None;
                fx.push(Effect::Job { job: m.job, update: JobUpdate::Succeed { done: vec![1] } });
                event(&mut fx, "info", format!("item {}: moved from {} to {}, caught up", item.id, m.from, m.to));
            }
            let rpo = item.caught_up_at.map(|t| o.now.saturating_sub(t)).unwrap_or(0);
            let threshold = o.rpo_threshold_secs;
            if rpo > threshold && !item.rpo_alert {
                item.rpo_alert = true;
                let m = format!(
                    "item {} ({}): recovery point is {rpo} s old, over the policy's {threshold} s",
                    item.id, item.machine
                );
                alert(&mut fx, m);
            } else if rpo <= threshold && item.rpo_alert {
                item.rpo_alert = false;
                event(&mut fx, "info", format!("item {}: recovery point back within {threshold} s", item.id));
            }
        }
        _ => {}
    }
    if let (Some(job), true) = (item.job, item.state != before) {
        match &item.state {
            State::InitialReplication { percent } => {
                fx.push(Effect::Job { job, update: JobUpdate::Progress(*percent) })
            }
            State::Protected { .. } => {
                let done = vec![EnableStep::InitialReplication.index(), EnableStep::Protected.index()];
                fx.push(Effect::Job { job, update: JobUpdate::Succeed { done } });
                event(&mut fx, "info", format!("item {} ({}) is protected", item.id, item.machine));
            }
            _ => {}
        }
    }
    (item, fx)
}

/// Resync required or running: started once anything moves, done when every disk compared (for the
/// operator's request) and copied its dirty blocks and the master target applied everything.
fn resyncing(item: &mut Item, machine: &Machine, o: &Observed, fx: &mut Vec<Effect>) {
    let before = item.state.clone();
    let p = &machine.progress;
    let comparing = p.iter().any(|d| d.resync_active);
    let copying = p.iter().any(|d| d.dirty_bytes > 0 && !d.overflow && !d.resync_waiting);
    // An operator's request is done only once every disk compared for it.
    let requested = p.iter().all(|d| d.resync_done >= item.resync_request);
    let caught_up = !p.is_empty()
        && requested
        && !comparing
        && p.iter().all(|d| d.copy_done && d.done_seq > 0 && d.dirty_bytes == 0 && !d.overflow)
        && p.iter().all(|d| o.applied(d.id) >= d.last_seq);
    if matches!(item.state, State::ResyncRequired { .. }) && (comparing || copying || caught_up) {
        item.state = item.state.on(&Event::ResyncStarted).unwrap_or(item.state.clone());
    }
    if caught_up {
        item.state = item.state.on(&Event::ResyncDone).unwrap_or(item.state.clone());
        item.caught_up_at = Some(machine.last_heartbeat);
    } else {
        let n = p.len().max(1) as f64;
        let compared = p.iter().map(|d| if d.resync_active { d.compare_percent } else { 100.0 }).sum::<f64>() / n;
        let pct = if comparing {
            0.8 * compared
        } else if copying {
            80.0
        } else {
            95.0
        };
        item.state = item.state.on(&Event::Progress { percent: pct as u8 }).unwrap_or(item.state.clone());
    }
    let (Some(job), true) = (item.resync_job, item.state != before) else { return };
    match &item.state {
        State::Protected { .. } => {
            let done = [ResyncStep::Compare, ResyncStep::Ship, ResyncStep::Protected].map(ResyncStep::index).to_vec();
            fx.push(Effect::Job { job, update: JobUpdate::Succeed { done } });
            item.resync_job = None;
            let message = format!("item {} is resynchronized and protected", item.id);
            fx.push(Effect::Event { severity: "info", message });
        }
        State::Resynchronizing { percent, .. } => {
            if !comparing {
                let update = JobUpdate::Advance { done: ResyncStep::Compare.index(), next: ResyncStep::Ship.index() };
                fx.push(Effect::Job { job, update });
            }
            fx.push(Effect::Job { job, update: JobUpdate::Progress(*percent) });
        }
        _ => {}
    }
}

/// Reprotecting: done when every disk shipped its changed blocks (and compared, when that was needed)
/// and the master target applied everything.
fn reprotecting(item: &mut Item, machine: &Machine, o: &Observed, direction: Direction, fx: &mut Vec<Effect>) {
    let Some(mut rp) = item.reprotect.clone() else { return };
    let p = &machine.progress;
    let dirty: u64 = p.iter().map(|d| d.dirty_bytes).sum();
    let initial = rp.initial_dirty.max(dirty);
    rp.initial_dirty = initial;
    let copied = !p.is_empty() && machine.disks.iter().all(|d| p.iter().any(|x| x.id == d.id && x.copy_done));
    let compared = p.iter().all(|d| d.resync_done >= item.resync_request && !d.resync_active);
    let caught_up = copied
        && compared
        && dirty == 0
        && p.iter().all(|d| !d.overflow && d.last_seq > 0)
        && p.iter().all(|d| o.applied(d.id) >= d.last_seq);
    if caught_up {
        item.state = item.state.on(&Event::ReprotectDone).unwrap_or(item.state.clone());
        item.caught_up_at = Some(machine.last_heartbeat);
        item.reprotect = None;
        let done = vec![ReprotectStep::Replicate.index(), ReprotectStep::Protected.index()];
        fx.push(Effect::Job { job: rp.job, update: JobUpdate::Succeed { done } });
        let dir = if direction == Direction::Reverse { "reverse" } else { "forward" };
        let message = format!("item {} is reprotected: protected in the {dir} direction", item.id);
        fx.push(Effect::Event { severity: "info", message });
        return;
    }
    let pct = if p.iter().any(|d| d.resync_active) {
        0.5 * p.iter().map(|d| d.compare_percent).sum::<f64>() / p.len().max(1) as f64
    } else if copied && initial > 0 {
        50.0 + 45.0 * (1.0 - dirty as f64 / initial as f64)
    } else if copied {
        95.0
    } else {
        0.0
    };
    item.state = item.state.on(&Event::Progress { percent: pct as u8 }).unwrap_or(item.state.clone());
    fx.push(Effect::Job { job: rp.job, update: JobUpdate::Progress(pct as u8) });
    item.reprotect = Some(rp);
}

#[cfg(test)]
mod tests {
    use super::*;
    use sr_common::contract::{AdoptDisk, DiskInfo, Fault};
    use Direction::{Forward, Reverse};

    const NOW: u64 = 1_000_000;

    fn comp(name: &str, role: ComponentRole, heard: u64, cache: u64) -> Component {
        Component {
            name: name.into(),
            role,
            serial: 1,
            registered_at: 0,
            last_heartbeat: Some(heard),
            address: Some("127.0.0.1:1".into()),
            http: None,
            revoked: false,
            load: Load { cache_bytes: cache, ..Load::default() },
            draining: false,
        }
    }

    fn item(state: State) -> Item {
        Item {
            process_server: Some("ps-1".into()),
            master_target: Some("mt".into()),
            ..Item::new(7, "vm", "p", state, 0)
        }
    }

    fn disk(last_seq: u64) -> DiskProgress {
        DiskProgress { id: 1, copy_percent: 100.0, copy_done: true, done_seq: 5, last_seq, ..DiskProgress::default() }
    }

    fn machine(progress: Vec<DiskProgress>) -> Machine {
        let disks = vec![DiskInfo { id: 1, name: "d".into(), size: 1 << 20, path: None }];
        Machine { name: "vm".into(), disks, last_heartbeat: NOW - 1, progress, system: None }
    }

    fn comps() -> Vec<Component> {
        vec![
            comp("vm", ComponentRole::Agent, NOW, 0),
            comp("ps-1", ComponentRole::ProcessServer, NOW, 0),
            comp("ps-2", ComponentRole::ProcessServer, NOW, 50),
            comp("ps-3", ComponentRole::ProcessServer, NOW, 10),
            comp("mt", ComponentRole::MasterTarget, NOW, 0),
        ]
    }

    fn observe<'a>(c: &'a [Component], m: Option<&'a Machine>, applied: u64) -> Observed<'a> {
        Observed {
            now: NOW,
            component_timeout: 10,
            components: c,
            items: &[],
            machine: m,
            stream_faults: vec![],
            applied: [(1, applied)].into(),
            rpo_threshold_secs: 300,
        }
    }

    fn alerts(fx: &[Effect]) -> Vec<&str> {
        fx.iter().filter_map(|e| if let Effect::Alert(m) = e { Some(m.as_str()) } else { None }).collect()
    }

    #[test]
    fn initial_replication_moves_with_the_copy_and_ends_when_the_marker_is_applied() {
        let c = comps();
        let mut copying = disk(9);
        (copying.copy_percent, copying.copy_done, copying.done_seq) = (40.0, false, 0);
        let m = machine(vec![copying]);
        let i = Item { job: Some(3), ..item(State::InitialReplication { percent: 0 }) };
        let (i, fx) = step(&i, &observe(&c, Some(&m), 0));
        assert_eq!(i.state, State::InitialReplication { percent: 40 });
        assert_eq!(fx, [Effect::Job { job: 3, update: JobUpdate::Progress(40) }]);
        let m = machine(vec![disk(9)]);
        let (waiting, _) = step(&i, &observe(&c, Some(&m), 4));
        assert_eq!(waiting.state, State::InitialReplication { percent: 100 }, "the marker (seq 5) is not applied");
        let (done, fx) = step(&waiting, &observe(&c, Some(&m), 5));
        assert_eq!(done.state, State::Protected { direction: Forward });
        assert_eq!(done.caught_up_at, Some(NOW));
        let succeed =
            JobUpdate::Succeed { done: vec![EnableStep::InitialReplication.index(), EnableStep::Protected.index()] };
        assert_eq!(fx[0], Effect::Job { job: 3, update: succeed });
        assert!(matches!(&fx[1], Effect::Event { severity: "info", message } if message.contains("is protected")));
    }

    #[test]
    fn a_silent_process_server_hands_its_items_to_the_least_loaded_live_one() {
        let mut c = comps();
        c[1].last_heartbeat = Some(NOW - 11);
        let m = machine(vec![disk(9)]);
        let protected = item(State::Protected { direction: Forward });
        let (i, fx) = step(&protected, &observe(&c, Some(&m), 9));
        assert_eq!(i.process_server.as_deref(), Some("ps-3"), "ps-3 has less cached than ps-2");
        assert!(alerts(&fx)[0].contains("moved to ps-3"), "{fx:?}");
        c[2].revoked = true;
        c[3].address = None;
        let (i, fx) = step(&protected, &observe(&c, Some(&m), 9));
        assert_eq!(i.process_server.as_deref(), Some("ps-1"), "no live one to move to");
        assert!(alerts(&fx).is_empty());
        let failed_over = item(State::FailedOver { direction: Forward });
        assert_eq!(step(&failed_over, &observe(&c, Some(&m), 9)).0, failed_over, "only replicating items move");
    }

    #[test]
    fn faults_only_an_operator_can_clear_make_an_item_critical_or_resync_required() {
        let c = comps();
        let protected = item(State::Protected { direction: Forward });
        let mut revoked = comps();
        revoked[0].revoked = true;
        let (i, fx) = step(&protected, &observe(&revoked, None, 0));
        assert!(matches!(&i.state, State::Critical { reason, .. } if reason.contains("revoked")), "{:?}", i.state);
        assert_eq!(alerts(&fx).len(), 1);
        // The agent's fatal fault: a broken chain asks for a resync, once.
        let mut gap = disk(9);
        gap.fatal = Some(Fault { code: ErrorCode::ChainBroken, reason: "gap".into() });
        let m = machine(vec![gap]);
        let (i, fx) = step(&protected, &observe(&c, Some(&m), 9));
        assert!(i.chain_broken && matches!(i.state, State::ResyncRequired { .. }), "{i:?}");
        assert_eq!(alerts(&fx).len(), 1);
        let (again, fx) = step(&i, &observe(&c, Some(&m), 9));
        assert!(alerts(&fx).is_empty(), "raised once: {fx:?}");
        assert!(again.chain_broken);
        // A master target's unusable replica: Critical, naming the disk.
        let mut o = observe(&c, Some(&m), 9);
        let m = machine(vec![disk(9)]);
        o.machine = Some(&m);
        o.stream_faults =
            vec![ReplicaFault { item: 7, disk: 1, code: ErrorCode::ReplicaUnusable, reason: "mt: lost".into() }];
        let (i, _) = step(&protected, &o);
        assert!(matches!(&i.state, State::Critical { reason, .. } if reason == "disk 1: mt: lost"), "{:?}", i.state);
        // Not assigned is the control plane catching up: nothing changes.
        o.stream_faults[0].code = ErrorCode::NotAssigned;
        assert_eq!(step(&protected, &o).0.state, protected.state);
    }

    #[test]
    fn a_retried_problem_shows_on_the_item_with_an_event_when_it_starts_and_ends() {
        let c = comps();
        let m = machine(vec![disk(9)]);
        let protected = item(State::Protected { direction: Forward });
        let mut o = observe(&c, Some(&m), 9);
        o.stream_faults = vec![ReplicaFault { item: 7, disk: 1, code: ErrorCode::Transient, reason: "full".into() }];
        let (i, fx) = step(&protected, &o);
        assert_eq!(i.problem.as_deref(), Some("disk 1: full"));
        assert!(fx.iter().any(|e| matches!(e, Effect::Event { severity: "warning", .. })));
        assert!(!step(&i, &o).1.iter().any(|e| matches!(e, Effect::Event { .. })), "said once");
        let (cleared, fx) = step(&i, &observe(&c, Some(&m), 9));
        assert_eq!(cleared.problem, None);
        assert!(fx
            .iter()
            .any(|e| matches!(e, Effect::Event { severity: "info", message } if message.contains("goes on"))));
    }

    #[test]
    fn a_move_ends_once_the_replica_caught_up_through_the_new_process_server() {
        let c = comps();
        let rec = MoveRecord { job: 8, from: "ps-2".into(), to: "ps-1".into(), since: NOW - 1 };
        let moving = Item { moving: Some(rec.clone()), ..item(State::Protected { direction: Forward }) };
        // Not caught up yet: applied 8 of 9.
        let (i, fx) = step(&moving, &observe(&c, Some(&machine(vec![disk(9)])), 8));
        assert_eq!(i.moving, Some(rec.clone()));
        assert!(!fx.iter().any(|e| matches!(e, Effect::Job { .. })), "{fx:?}");
        // Caught up at a heartbeat after the move (the machine's, at NOW - 1, is not after it).
        let (i, _) = step(&moving, &observe(&c, Some(&machine(vec![disk(9)])), 9));
        assert_eq!(i.moving, Some(rec.clone()), "a heartbeat from before the move proves nothing");
        let mut later = machine(vec![disk(9)]);
        later.last_heartbeat = NOW;
        let (i, fx) = step(&moving, &observe(&c, Some(&later), 9));
        assert_eq!(i.moving, None);
        assert!(fx.contains(&Effect::Job { job: 8, update: JobUpdate::Succeed { done: vec![1] } }), "{fx:?}");
        // A failover ends it as failed.
        let failing = Item { state: State::FailedOver { direction: Forward }, ..moving };
        let (i, fx) = step(&failing, &observe(&c, Some(&later), 9));
        assert_eq!(i.moving, None);
        assert!(fx.iter().any(|e| matches!(e, Effect::Job { job: 8, update: JobUpdate::Fail(_) })), "{fx:?}");
    }

    #[test]
    fn rpo_over_the_policy_alerts_once_and_clears() {
        let c = comps();
        let m = machine(vec![disk(9)]);
        let old = Item { caught_up_at: Some(NOW - 400), ..item(State::Protected { direction: Forward }) };
        let (i, fx) = step(&old, &observe(&c, Some(&m), 8));
        assert!(i.rpo_alert);
        assert_eq!(alerts(&fx).len(), 1);
        assert!(alerts(&step(&i, &observe(&c, Some(&m), 8)).1).is_empty(), "alerted once");
        let (i, _) = step(&i, &observe(&c, Some(&m), 9));
        assert!(!i.rpo_alert);
        assert_eq!(i.caught_up_at, Some(NOW - 1), "the heartbeat that showed it caught up");
    }

    #[test]
    fn an_overflow_asks_for_a_resync_which_ends_once_everything_is_applied() {
        let c = comps();
        let mut over = disk(9);
        (over.overflow, over.dirty_bytes) = (true, 4096);
        let m = machine(vec![over]);
        let (i, _) = step(&item(State::Protected { direction: Forward }), &observe(&c, Some(&m), 9));
        assert!(matches!(&i.state, State::ResyncRequired { reason, .. } if reason.contains("limit")), "{:?}", i.state);
        let i = Item { resync_job: Some(4), ..i };
        let mut copying = disk(12);
        copying.dirty_bytes = 4096;
        let m = machine(vec![copying]);
        let (i, fx) = step(&i, &observe(&c, Some(&m), 9));
        assert_eq!(i.state, State::Resynchronizing { direction: Forward, percent: 80 });
        let advance = JobUpdate::Advance { done: ResyncStep::Compare.index(), next: ResyncStep::Ship.index() };
        assert_eq!(fx[0], Effect::Job { job: 4, update: advance });
        let m = machine(vec![disk(12)]);
        let (i, _) = step(&i, &observe(&c, Some(&m), 11));
        assert_eq!(i.state, State::Resynchronizing { direction: Forward, percent: 95 }, "not all applied yet");
        let (i, fx) = step(&i, &observe(&c, Some(&m), 12));
        assert_eq!(i.state, State::Protected { direction: Forward });
        assert_eq!(i.resync_job, None);
        assert!(matches!(&fx[0], Effect::Job { job: 4, update: JobUpdate::Succeed { done } } if done.len() == 3));
    }

    #[test]
    fn a_reprotect_ends_once_the_changed_blocks_are_applied() {
        let c = comps();
        let fo = FailoverRecord {
            generation: 2,
            planned: true,
            failback: false,
            point: PointSpec::Latest,
            job: 1,
            by: "op".into(),
            from_machine: "vm".into(),
            master_target: None,
            view: None,
            point_chosen: None,
            machine: None,
            committed: None,
        };
        let adopt = vec![AdoptDisk { disk: sr_common::types::DiskId(1), path: "/d".into() }];
        let rp = ReprotectRecord { baseline: 2, known: true, adopt, job: 9, initial_dirty: 0, failover: fo };
        let i = Item { reprotect: Some(rp), ..item(State::Reprotecting { direction: Reverse, percent: 0 }) };
        let mut shipping = disk(9);
        shipping.dirty_bytes = 1000;
        let m = machine(vec![shipping.clone()]);
        let (i, fx) = step(&i, &observe(&c, Some(&m), 0));
        assert_eq!(i.reprotect.as_ref().map(|r| r.initial_dirty), Some(1000));
        assert_eq!(fx, [Effect::Job { job: 9, update: JobUpdate::Progress(50) }]);
        shipping.dirty_bytes = 0;
        let m = machine(vec![shipping]);
        let (i, fx) = step(&i, &observe(&c, Some(&m), 9));
        assert_eq!(i.state, State::Protected { direction: Reverse });
        assert_eq!(i.reprotect, None);
        assert!(matches!(&fx[0], Effect::Job { job: 9, update: JobUpdate::Succeed { .. } }));
    }
}
