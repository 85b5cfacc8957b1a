//! Every metric the configuration server exports, by name, and the fleet gauges it derives from its
//! store each second: items by state, each item's state and RPO threshold, each component's heartbeat
//! age. [`Fleet::of`] is pure; [`Fleet::export`] sets the gauges.

use crate::lifecycle::State;
use crate::model::{Component, Item, Policy, DEFAULT_RPO_SECS};

/// Seconds since an item's replica last held everything its source had written (label `item`), for
/// items that replicate or are Critical and have caught up once; NaN for the others.
pub const ITEM_RPO_SECONDS: &str = "sr_config_server_item_rpo_seconds";

/// Registrations refused (unknown, used, expired or other-role key, or a taken name).
pub const REGISTRATIONS_REFUSED: &str = "sr_config_server_registrations_refused_total";

/// Components registered (label `role`).
pub const REGISTRATIONS: &str = "sr_config_server_registrations_total";

/// Items in each state (label `state`; every state is present, 0 when none).
pub const ITEMS: &str = "sr_config_server_items";

/// 1 for an item's current state, 0 for the others (labels `item`, `machine`, `state`).
pub const ITEM_STATE: &str = "sr_config_server_item_state";

/// The RPO threshold of an item's policy, in seconds (label `item`).
pub const ITEM_RPO_THRESHOLD_SECONDS: &str = "sr_config_server_item_rpo_threshold_seconds";

/// A resync's or initial replication's progress, 0 to 1 (label `item`; 0 when none runs).
pub const ITEM_SYNC_PROGRESS: &str = "sr_config_server_item_sync_progress_ratio";

/// Seconds since a component's last heartbeat (labels `component`, `role`; -1 when it never reported).
pub const COMPONENT_HEARTBEAT_AGE: &str = "sr_config_server_component_heartbeat_age_seconds";

/// 1 when a component reported within the component timeout and is not revoked (labels `component`,
/// `role`).
pub const COMPONENT_UP: &str = "sr_config_server_component_up";

/// 1 when a component's certificate was revoked (labels `component`, `role`): it is gone for good, so
/// alerts leave it out.
pub const COMPONENT_REVOKED: &str = "sr_config_server_component_revoked";

/// 1 while a process server drains (it gets no new items; it may then be removed): alerts leave it
/// out (labels `component`, `role`).
pub const COMPONENT_DRAINING: &str = "sr_config_server_component_draining";

/// The component timeout, in seconds: how long a component may be silent before its work moves.
pub const COMPONENT_TIMEOUT_SECONDS: &str = "sr_config_server_component_timeout_seconds";

/// Jobs started (label `kind`).
pub const JOBS_STARTED: &str = "sr_config_server_jobs_started_total";

/// Jobs ended (labels `kind`, `result`: `succeeded` or `failed`).
pub const JOBS_ENDED: &str = "sr_config_server_jobs_total";

/// Job kinds whose counters exist from the start (at 0), so that a rule's `increase()` sees their
/// first failure.
pub const JOB_KINDS: &[&str] = &[
    "register",
    "enable protection",
    "disable protection",
    "resync",
    "test failover",
    "test failover cleanup",
    "planned failover",
    "unplanned failover",
    "failback",
    "plan test failover",
    "plan planned failover",
    "plan unplanned failover",
    "change recovery point",
    "commit failover",
    "reprotect",
    "move process server",
];

/// Sets every job counter and the refused registrations to exist at 0 (call once at start).
pub fn register_counters() {
    metrics::counter!(REGISTRATIONS_REFUSED).increment(0);
    for kind in JOB_KINDS {
        metrics::counter!(JOBS_STARTED, "kind" => *kind).increment(0);
        for result in ["succeeded", "failed"] {
            metrics::counter!(JOBS_ENDED, "kind" => *kind, "result" => result).increment(0);
        }
    }
}

/// One item's gauges.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemGauges {
    pub item: u64,
    pub machine: String,
    pub state: &'static str,
    pub rpo_threshold_secs: u64,
    /// None before its first catch-up, and in states where nothing replicates.
    pub rpo_secs: Option<u64>,
    pub sync_progress: f64,
}

/// One component's gauges.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentGauges {
    pub name: String,
    pub role: &'static str,
    /// Seconds since its last heartbeat; None when it never reported.
    pub age_secs: Option<u64>,
    pub up: bool,
    pub revoked: bool,
    pub draining: bool,
}

/// What the fleet gauges say at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Fleet {
    pub by_state: Vec<(&'static str, u64)>,
    pub items: Vec<ItemGauges>,
    pub components: Vec<ComponentGauges>,
    pub component_timeout_secs: u64,
}

impl Fleet {
    pub fn of(items: &[Item], policies: &[Policy], comps: &[Component], now: u64, timeout: u64) -> Fleet {
        let by_state =
            State::NAMES.iter().map(|s| (*s, items.iter().filter(|i| i.state.name() == *s).count() as u64)).collect();
        let items = items
            .iter()
            .map(|i| ItemGauges {
                item: i.id,
                machine: i.machine.clone(),
                state: i.state.name(),
                rpo_threshold_secs: policies
                    .iter()
                    .find(|p| p.id == i.policy)
                    .map_or(DEFAULT_RPO_SECS, |p| p.rpo_threshold_secs),
                rpo_secs: (i.state.replicating() || matches!(i.state, State::Critical { .. }))
                    .then_some(i.caught_up_at)
                    .flatten()
                    .map(|t| now.saturating_sub(t)),
                sync_progress: match &i.state {
                    State::InitialReplication { percent }
                    | State::Resynchronizing { percent, .. }
                    | State::Reprotecting { percent, .. } => f64::from(*percent) / 100.0,
                    _ => 0.0,
                },
            })
            .collect();
        // NBD clients hold certificates but never report: they are not watched.
        let components = comps
            .iter()
            .filter(|c| c.role != crate::model::ComponentRole::NbdClient)
            .map(|c| {
                let age_secs = c.last_heartbeat.map(|t| now.saturating_sub(t));
                ComponentGauges {
                    name: c.name.clone(),
                    role: c.role.wire().name(),
                    age_secs,
                    up: !c.revoked && age_secs.is_some_and(|a| a <= timeout),
                    revoked: c.revoked,
                    draining: c.draining,
                }
            })
            .collect();
        Fleet { by_state, items, components, component_timeout_secs: timeout }
    }

    pub fn export(&self) {
        for (state, n) in &self.by_state {
            metrics::gauge!(ITEMS, "state" => *state).set(*n as f64);
        }
        for i in &self.items {
            let item = i.item.to_string();
            for s in State::NAMES {
                let v = if *s == i.state { 1.0 } else { 0.0 };
                metrics::gauge!(ITEM_STATE, "item" => item.clone(), "machine" => i.machine.clone(), "state" => *s)
                    .set(v);
            }
            metrics::gauge!(ITEM_RPO_THRESHOLD_SECONDS, "item" => item.clone()).set(i.rpo_threshold_secs as f64);
            // NaN where there is no RPO (failed over, disabled): no comparison holds, so no alert
            // stays open on a value from before.
            let rpo = i.rpo_secs.map_or(f64::NAN, |r| r as f64);
            metrics::gauge!(ITEM_RPO_SECONDS, "item" => item.clone()).set(rpo);
            metrics::gauge!(ITEM_SYNC_PROGRESS, "item" => item).set(i.sync_progress);
        }
        for c in &self.components {
            let age = c.age_secs.map_or(-1.0, |a| a as f64);
            metrics::gauge!(COMPONENT_HEARTBEAT_AGE, "component" => c.name.clone(), "role" => c.role).set(age);
            metrics::gauge!(COMPONENT_UP, "component" => c.name.clone(), "role" => c.role)
                .set(f64::from(u8::from(c.up)));
            metrics::gauge!(COMPONENT_REVOKED, "component" => c.name.clone(), "role" => c.role)
                .set(f64::from(u8::from(c.revoked)));
            metrics::gauge!(COMPONENT_DRAINING, "component" => c.name.clone(), "role" => c.role)
                .set(f64::from(u8::from(c.draining)));
        }
        metrics::gauge!(COMPONENT_TIMEOUT_SECONDS).set(self.component_timeout_secs as f64);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::lifecycle::Direction;
    use crate::model::ComponentRole;

    fn comp(name: &str, heard: Option<u64>, revoked: bool) -> Component {
        Component {
            name: name.into(),
            role: ComponentRole::ProcessServer,
            serial: 1,
            registered_at: 0,
            last_heartbeat: heard,
            address: None,
            http: None,
            revoked,
            load: Default::default(),
            draining: false,
        }
    }

    #[test]
    fn fleet_counts_every_state_and_reads_thresholds_progress_and_heartbeats() {
        let items = vec![
            Item {
                caught_up_at: Some(990),
                ..Item::new(1, "a", "gold", State::Protected { direction: Direction::Forward }, 0)
            },
            Item::new(2, "b", "none", State::Resynchronizing { direction: Direction::Forward, percent: 40 }, 0),
            Item::new(3, "c", "gold", State::Protected { direction: Direction::Reverse }, 0),
        ];
        let gold: Policy =
            serde_json::from_value(serde_json::json!({ "id": "gold", "name": "gold", "rpo_threshold_secs": 60 }))
                .unwrap();
        let comps = vec![comp("ps-1", Some(995), false), comp("ps-2", Some(900), false), comp("ps-3", None, false)];
        let mut revoked = comp("ps-4", Some(1000), true);
        revoked.role = ComponentRole::MasterTarget;
        let comps = [comps, vec![revoked]].concat();
        let f = Fleet::of(&items, &[gold], &comps, 1000, 10);
        assert_eq!(f.by_state.len(), State::NAMES.len());
        let count = |s: &str| f.by_state.iter().find(|(n, _)| *n == s).map(|(_, c)| *c);
        assert_eq!((count("protected"), count("resynchronizing"), count("critical")), (Some(2), Some(1), Some(0)));
        assert_eq!(f.items[0].rpo_threshold_secs, 60);
        assert_eq!(f.items[1].rpo_threshold_secs, DEFAULT_RPO_SECS);
        assert_eq!((f.items[1].state, f.items[1].sync_progress), ("resynchronizing", 0.4));
        assert_eq!(f.items[0].sync_progress, 0.0);
        assert_eq!(f.items.iter().map(|i| i.rpo_secs).collect::<Vec<_>>(), vec![Some(10), None, None]);
        let up: Vec<(Option<u64>, bool)> = f.components.iter().map(|c| (c.age_secs, c.up)).collect();
        assert_eq!(up, vec![(Some(5), true), (Some(100), false), (None, false), (Some(0), false)]);
        assert_eq!(f.components.iter().map(|c| c.revoked).collect::<Vec<_>>(), vec![false, false, false, true]);
        assert_eq!(f.components[3].role, "master-target");
    }

    #[test]
    fn every_state_has_its_name_listed() {
        let d = Direction::Forward;
        let r = String::new();
        let all = [
            State::Unprotected,
            State::EnablingProtection,
            State::InitialReplication { percent: 0 },
            State::Protected { direction: d },
            State::ResyncRequired { direction: d, reason: r.clone() },
            State::Resynchronizing { direction: d, percent: 0 },
            State::Critical { direction: d, reason: r },
            State::FailoverInProgress { direction: d, planned: true },
            State::FailedOver { direction: d },
            State::Committed { direction: d },
            State::Reprotecting { direction: d, percent: 0 },
            State::FailingBack,
            State::FailedBack,
            State::DisablingProtection,
        ];
        for s in &all {
            assert!(State::NAMES.contains(&s.name()), "{}", s.name());
        }
    }
}
