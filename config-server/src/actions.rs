//! Which operator actions an item allows now: the same gates the API's handlers apply (the lifecycle's
//! transitions, and what each handler checks beside them), so the portal offers exactly what the API
//! would take. Pure: an item in, action names out (`actions` in an item's JSON).

use crate::lifecycle::{Direction, Event, State};
use crate::model::Item;

pub const TEST_FAILOVER: &str = "test-failover";
pub const TEST_FAILOVER_CLEANUP: &str = "test-failover-cleanup";
pub const PLANNED_FAILOVER: &str = "planned-failover";
pub const UNPLANNED_FAILOVER: &str = "unplanned-failover";
pub const FAILBACK: &str = "failback";
pub const CHANGE_POINT: &str = "change-point";
pub const COMMIT: &str = "commit";
/// Reprotect after a committed failover: the machine on the other site must be named.
pub const REPROTECT_NAMING_MACHINE: &str = "reprotect-naming-machine";
/// Reprotect after a failback whose reprotect did not start: the original machine is known.
pub const REPROTECT: &str = "reprotect";
pub const RESYNC: &str = "resync";
/// A new replica from a whole copy: what repairs a Critical item or a broken chain.
pub const FULL_RESYNC: &str = "full-resync";
pub const MOVE: &str = "move";
pub const DISABLE: &str = "disable";

/// States whose replica keeps recovery points a test failover can bring up (the test failover handler
/// takes these only).
pub fn has_points(s: &State) -> bool {
    matches!(
        s,
        State::Protected { .. }
            | State::ResyncRequired { .. }
            | State::Resynchronizing { .. }
            | State::Critical { .. }
            | State::Reprotecting { .. }
    )
}

pub fn allowed(i: &Item) -> Vec<&'static str> {
    let s = &i.state;
    let ok = |e: Event| s.on(&e).is_ok();
    let mut out = Vec::new();
    if i.test_failover.is_some() {
        out.push(TEST_FAILOVER_CLEANUP);
    } else if has_points(s) && i.master_target.is_some() {
        out.push(TEST_FAILOVER);
    }
    if i.master_target.is_some() {
        if matches!(s, State::Protected { .. })
            && i.process_server.is_some()
            && ok(Event::FailoverRequested { planned: true })
        {
            out.push(PLANNED_FAILOVER);
        }
        if ok(Event::FailoverRequested { planned: false }) {
            out.push(UNPLANNED_FAILOVER);
        }
    }
    // A failback is a planned failover back: it drains the journal through the process server.
    if *s == (State::Protected { direction: Direction::Reverse })
        && i.master_target.is_some()
        && i.process_server.is_some()
    {
        out.push(FAILBACK);
    }
    if matches!(s, State::FailedOver { .. }) {
        out.extend([CHANGE_POINT, COMMIT]);
    }
    if ok(Event::ReprotectRequested) && i.failover.is_some() {
        out.push(match (s, &i.previous_machine) {
            (State::FailedBack, Some(_)) => REPROTECT,
            _ => REPROTECT_NAMING_MACHINE,
        });
    }
    // The resync handler's gates: a resync keeps a running one, or starts one where the lifecycle
    // allows; a Critical item or a broken chain takes a full one only.
    let resyncable = matches!(s, State::ResyncRequired { .. } | State::Resynchronizing { .. })
        || ok(Event::ResyncNeeded { reason: String::new() });
    match s {
        State::Critical { .. } => out.push(FULL_RESYNC),
        _ if resyncable && i.chain_broken => out.push(FULL_RESYNC),
        _ if resyncable => out.extend([RESYNC, FULL_RESYNC]),
        _ => {}
    }
    if crate::balance::movable(i) && i.moving.is_none() {
        out.push(MOVE);
    }
    if ok(Event::DisableRequested) {
        out.push(DISABLE);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::{FailoverRecord, TestFailoverRecord};

    fn item(state: State) -> Item {
        Item {
            process_server: Some("ps-1".into()),
            master_target: Some("mt-1".into()),
            ..Item::new(1, "m", "p", state, 0)
        }
    }

    #[test]
    fn each_state_offers_what_the_api_takes() {
        use Direction::*;
        let protected = item(State::Protected { direction: Forward });
        assert_eq!(
            allowed(&protected),
            [TEST_FAILOVER, PLANNED_FAILOVER, UNPLANNED_FAILOVER, RESYNC, FULL_RESYNC, MOVE, DISABLE]
        );
        let reverse = item(State::Protected { direction: Reverse });
        assert!(allowed(&reverse).contains(&FAILBACK));
        assert!(!allowed(&protected).contains(&FAILBACK));
        // Planned needs Protected; a disaster during a resync still allows an unplanned failover.
        let resyncing = item(State::Resynchronizing { direction: Forward, percent: 5 });
        assert!(!allowed(&resyncing).contains(&PLANNED_FAILOVER));
        assert!(allowed(&resyncing).contains(&UNPLANNED_FAILOVER));
        // Critical: only a full resync repairs it; it can still fail over, unplanned.
        let critical = item(State::Critical { direction: Forward, reason: "x".into() });
        let c = allowed(&critical);
        assert!(c.contains(&FULL_RESYNC) && !c.contains(&RESYNC) && c.contains(&UNPLANNED_FAILOVER), "{c:?}");
        assert!(!c.contains(&PLANNED_FAILOVER), "a planned failover needs a protected item");
        // Initial replication: no point yet, no resync (the copy is running), no failover.
        let initial = item(State::InitialReplication { percent: 10 });
        assert_eq!(allowed(&initial), [MOVE, DISABLE]);
        let failed_over = item(State::FailedOver { direction: Forward });
        assert_eq!(allowed(&failed_over), [CHANGE_POINT, COMMIT]);
        let mut committed = item(State::Committed { direction: Forward });
        assert_eq!(allowed(&committed), [DISABLE], "no failover record: nothing to reprotect from");
        committed.failover = Some(
            serde_json::from_value::<FailoverRecord>(serde_json::json!({
                "generation": 1, "planned": true, "point": "latest", "job": 1, "by": "t", "from_machine": "m"
            }))
            .unwrap(),
        );
        assert_eq!(allowed(&committed), [REPROTECT_NAMING_MACHINE, DISABLE]);
        let mut back = committed.clone();
        back.state = State::FailedBack;
        back.previous_machine = Some("m-dr".into());
        assert_eq!(allowed(&back), [REPROTECT, DISABLE]);
        assert!(allowed(&item(State::Unprotected)).is_empty());
        // A broken chain: only a full resync repairs it, and only where a resync may start.
        let mut broken = protected.clone();
        broken.chain_broken = true;
        assert!(allowed(&broken).contains(&FULL_RESYNC) && !allowed(&broken).contains(&RESYNC));
        let mut broken_over = item(State::FailedOver { direction: Forward });
        broken_over.chain_broken = true;
        assert_eq!(allowed(&broken_over), [CHANGE_POINT, COMMIT]);
        // No process server: nothing to drain through, so no planned failover and no failback.
        let mut bare = reverse.clone();
        bare.process_server = None;
        let b = allowed(&bare);
        assert!(!b.contains(&FAILBACK) && !b.contains(&PLANNED_FAILOVER) && b.contains(&UNPLANNED_FAILOVER), "{b:?}");
        assert!(allowed(&item(State::FailoverInProgress { direction: Forward, planned: true })).is_empty());
        let mut testing = protected.clone();
        testing.test_failover = Some(
            serde_json::from_value::<TestFailoverRecord>(serde_json::json!({
                "view": "tfo", "master_target": "mt-1",
                "machine": {"name": "m", "source_machine": "m", "item": 1, "purpose": "test", "cpus": 1,
                            "memory_bytes": 1, "network_interfaces": [], "disks": []}
            }))
            .unwrap(),
        );
        assert_eq!(allowed(&testing)[0], TEST_FAILOVER_CLEANUP);
        assert!(!allowed(&testing).contains(&TEST_FAILOVER));
    }
}
