//! The protection lifecycle of one protected item, as a pure state machine: a state and an event in,
//! the next state (or a refusal that says why) out. No I/O and no clock; the server persists states and
//! turns operator actions and component reports into events.
//!
//! ```text
//! Unprotected -EnableRequested-> EnablingProtection -PrerequisitesMet-> InitialReplication(n%)
//!   -InitialReplicationDone-> Protected -ResyncNeeded-> ResyncRequired -ResyncStarted-> Resynchronizing(n%)
//!   -ResyncDone-> Protected
//! any replicating state -FatalError-> Critical -Recovered-> ResyncRequired
//! Protected | Critical (| ResyncRequired | Resynchronizing, unplanned) -FailoverRequested-> FailoverInProgress -FailoverDone-> FailedOver (commit pending)
//!   -CommitRequested-> Committed -ReprotectRequested-> Reprotecting(n%) -ReprotectDone-> Protected (reverse)
//! Protected (reverse) -FailbackRequested-> FailingBack -FailbackDone-> FailedBack -ReprotectRequested->
//!   Reprotecting(n%) -ReprotectDone-> Protected (forward)
//! most states -DisableRequested-> DisablingProtection -DisableDone-> Unprotected
//! ```

use serde::{Deserialize, Serialize};

/// Which way data flows while the item is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Primary site to secondary site.
    Forward,
    /// Secondary site back to the primary (after a failover and reprotect).
    Reverse,
}

impl Direction {
    fn flip(self) -> Direction {
        match self {
            Direction::Forward => Direction::Reverse,
            Direction::Reverse => Direction::Forward,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    Unprotected,
    EnablingProtection,
    InitialReplication {
        percent: u8,
    },
    Protected {
        direction: Direction,
    },
    ResyncRequired {
        direction: Direction,
        reason: String,
    },
    Resynchronizing {
        direction: Direction,
        percent: u8,
    },
    Critical {
        direction: Direction,
        reason: String,
    },
    FailoverInProgress {
        direction: Direction,
        planned: bool,
    },
    /// The failover happened; the operator may still change the recovery point until commit.
    FailedOver {
        direction: Direction,
    },
    Committed {
        direction: Direction,
    },
    Reprotecting {
        direction: Direction,
        percent: u8,
    },
    FailingBack,
    FailedBack,
    DisablingProtection,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    EnableRequested,
    PrerequisitesMet,
    PrerequisitesFailed { reason: String },
    Progress { percent: u8 },
    InitialReplicationDone,
    ResyncNeeded { reason: String },
    ResyncStarted,
    ResyncDone,
    FatalError { reason: String },
    Recovered,
    FailoverRequested { planned: bool },
    FailoverDone,
    FailoverFailed { reason: String },
    CommitRequested,
    ReprotectRequested,
    ReprotectDone,
    FailbackRequested,
    FailbackDone,
    DisableRequested,
    DisableDone,
}

/// A refused event: the item stays in its state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{event} is not possible while the item is {state}")]
pub struct Refused {
    pub state: String,
    pub event: String,
}

impl State {
    /// Every state's [`State::name`], in lifecycle order.
    pub const NAMES: &'static [&'static str] = &[
        "unprotected",
        "enabling_protection",
        "initial_replication",
        "protected",
        "resync_required",
        "resynchronizing",
        "critical",
        "failover_in_progress",
        "failed_over",
        "committed",
        "reprotecting",
        "failing_back",
        "failed_back",
        "disabling_protection",
    ];

    /// Short name for messages and filters (`protected`, `initial_replication`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            State::Unprotected => "unprotected",
            State::EnablingProtection => "enabling_protection",
            State::InitialReplication { .. } => "initial_replication",
            State::Protected { .. } => "protected",
            State::ResyncRequired { .. } => "resync_required",
            State::Resynchronizing { .. } => "resynchronizing",
            State::Critical { .. } => "critical",
            State::FailoverInProgress { .. } => "failover_in_progress",
            State::FailedOver { .. } => "failed_over",
            State::Committed { .. } => "committed",
            State::Reprotecting { .. } => "reprotecting",
            State::FailingBack => "failing_back",
            State::FailedBack => "failed_back",
            State::DisablingProtection => "disabling_protection",
        }
    }

    /// Whether data is flowing from a source to a replica in this state.
    pub fn replicating(&self) -> bool {
        matches!(
            self,
            State::InitialReplication { .. }
                | State::Protected { .. }
                | State::ResyncRequired { .. }
                | State::Resynchronizing { .. }
                | State::Reprotecting { .. }
        )
    }

    /// The state after `event`, or why the event is refused.
    pub fn on(&self, event: &Event) -> Result<State, Refused> {
        use Event as E;
        use State as S;
        let next = match (self, event) {
            (S::Unprotected, E::EnableRequested) => S::EnablingProtection,
            (S::EnablingProtection, E::PrerequisitesMet) => S::InitialReplication { percent: 0 },
            (S::EnablingProtection, E::PrerequisitesFailed { .. }) => S::Unprotected,
            (S::InitialReplication { .. }, E::Progress { percent }) => {
                S::InitialReplication { percent: (*percent).min(100) }
            }
            (S::InitialReplication { .. }, E::InitialReplicationDone) => S::Protected { direction: Direction::Forward },
            (S::Protected { direction }, E::ResyncNeeded { reason }) => {
                S::ResyncRequired { direction: *direction, reason: reason.clone() }
            }
            (S::ResyncRequired { direction, .. }, E::ResyncStarted) => {
                S::Resynchronizing { direction: *direction, percent: 0 }
            }
            (S::Resynchronizing { direction, .. }, E::Progress { percent }) => {
                S::Resynchronizing { direction: *direction, percent: (*percent).min(100) }
            }
            (S::Resynchronizing { direction, .. }, E::ResyncDone) => S::Protected { direction: *direction },
            (S::InitialReplication { .. }, E::FatalError { reason }) => {
                S::Critical { direction: Direction::Forward, reason: reason.clone() }
            }
            (
                S::Protected { direction }
                | S::ResyncRequired { direction, .. }
                | S::Resynchronizing { direction, .. }
                | S::Reprotecting { direction, .. },
                E::FatalError { reason },
            ) => S::Critical { direction: *direction, reason: reason.clone() },
            (S::Critical { direction, reason }, E::Recovered) => {
                S::ResyncRequired { direction: *direction, reason: format!("recovered from: {reason}") }
            }
            (S::Protected { direction } | S::Critical { direction, .. }, E::FailoverRequested { planned }) => {
                S::FailoverInProgress { direction: *direction, planned: *planned }
            }
            // A disaster does not wait for a resync to end: an unplanned failover to a retained point.
            (
                S::ResyncRequired { direction, .. } | S::Resynchronizing { direction, .. },
                E::FailoverRequested { planned: false },
            ) => S::FailoverInProgress { direction: *direction, planned: false },
            (S::FailoverInProgress { direction, .. }, E::FailoverDone) => S::FailedOver { direction: *direction },
            (S::FailoverInProgress { direction, .. }, E::FailoverFailed { reason }) => {
                S::Critical { direction: *direction, reason: reason.clone() }
            }
            (S::FailedOver { direction }, E::CommitRequested) => S::Committed { direction: *direction },
            (S::Committed { direction }, E::ReprotectRequested) => {
                S::Reprotecting { direction: direction.flip(), percent: 0 }
            }
            (S::FailedBack, E::ReprotectRequested) => S::Reprotecting { direction: Direction::Forward, percent: 0 },
            (S::Reprotecting { direction, .. }, E::Progress { percent }) => {
                S::Reprotecting { direction: *direction, percent: (*percent).min(100) }
            }
            (S::Reprotecting { direction, .. }, E::ReprotectDone) => S::Protected { direction: *direction },
            (S::Protected { direction: Direction::Reverse }, E::FailbackRequested) => S::FailingBack,
            (S::FailingBack, E::FailbackDone) => S::FailedBack,
            (S::FailingBack, E::FailoverFailed { reason }) => {
                S::Critical { direction: Direction::Reverse, reason: reason.clone() }
            }
            (
                S::EnablingProtection
                | S::InitialReplication { .. }
                | S::Protected { .. }
                | S::ResyncRequired { .. }
                | S::Resynchronizing { .. }
                | S::Critical { .. }
                | S::Committed { .. }
                | S::FailedBack,
                E::DisableRequested,
            ) => S::DisablingProtection,
            (S::DisablingProtection, E::DisableDone) => S::Unprotected,
            (state, event) => {
                return Err(Refused { state: state.name().to_string(), event: event_name(event).to_string() })
            }
        };
        Ok(next)
    }
}

pub fn event_name(e: &Event) -> &'static str {
    match e {
        Event::EnableRequested => "enable protection",
        Event::PrerequisitesMet => "prerequisites met",
        Event::PrerequisitesFailed { .. } => "prerequisites failed",
        Event::Progress { .. } => "progress",
        Event::InitialReplicationDone => "initial replication done",
        Event::ResyncNeeded { .. } => "resync needed",
        Event::ResyncStarted => "resync started",
        Event::ResyncDone => "resync done",
        Event::FatalError { .. } => "fatal error",
        Event::Recovered => "recovered",
        Event::FailoverRequested { .. } => "failover",
        Event::FailoverDone => "failover done",
        Event::FailoverFailed { .. } => "failover failed",
        Event::CommitRequested => "commit",
        Event::ReprotectRequested => "reprotect",
        Event::ReprotectDone => "reprotect done",
        Event::FailbackRequested => "failback",
        Event::FailbackDone => "failback done",
        Event::DisableRequested => "disable protection",
        Event::DisableDone => "disable done",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Direction::{Forward as F, Reverse as R};

    fn states() -> Vec<State> {
        let mut v = vec![
            State::Unprotected,
            State::EnablingProtection,
            State::InitialReplication { percent: 40 },
            State::FailingBack,
            State::FailedBack,
            State::DisablingProtection,
        ];
        for d in [F, R] {
            v.extend([
                State::Protected { direction: d },
                State::ResyncRequired { direction: d, reason: "r".into() },
                State::Resynchronizing { direction: d, percent: 10 },
                State::Critical { direction: d, reason: "c".into() },
                State::FailoverInProgress { direction: d, planned: true },
                State::FailedOver { direction: d },
                State::Committed { direction: d },
                State::Reprotecting { direction: d, percent: 5 },
            ]);
        }
        v
    }

    fn events() -> Vec<Event> {
        vec![
            Event::EnableRequested,
            Event::PrerequisitesMet,
            Event::PrerequisitesFailed { reason: "p".into() },
            Event::Progress { percent: 250 },
            Event::InitialReplicationDone,
            Event::ResyncNeeded { reason: "journal full".into() },
            Event::ResyncStarted,
            Event::ResyncDone,
            Event::FatalError { reason: "f".into() },
            Event::Recovered,
            Event::FailoverRequested { planned: false },
            Event::FailoverDone,
            Event::FailoverFailed { reason: "x".into() },
            Event::CommitRequested,
            Event::ReprotectRequested,
            Event::ReprotectDone,
            Event::FailbackRequested,
            Event::FailbackDone,
            Event::DisableRequested,
            Event::DisableDone,
        ]
    }

    /// The whole table, written out independently of the implementation: every (state, event) pair
    /// not listed here must be refused.
    fn expected(s: &State, e: &Event) -> Option<State> {
        use Event as E;
        use State as S;
        let dir = |s: &State| match s {
            S::Protected { direction }
            | S::ResyncRequired { direction, .. }
            | S::Resynchronizing { direction, .. }
            | S::Critical { direction, .. }
            | S::FailoverInProgress { direction, .. }
            | S::FailedOver { direction }
            | S::Committed { direction }
            | S::Reprotecting { direction, .. } => Some(*direction),
            _ => None,
        };
        let flip = |d: Direction| if d == F { R } else { F };
        Some(match (s.name(), e) {
            ("unprotected", E::EnableRequested) => S::EnablingProtection,
            ("enabling_protection", E::PrerequisitesMet) => S::InitialReplication { percent: 0 },
            ("enabling_protection", E::PrerequisitesFailed { .. }) => S::Unprotected,
            ("initial_replication", E::Progress { .. }) => S::InitialReplication { percent: 100 },
            ("initial_replication", E::InitialReplicationDone) => S::Protected { direction: F },
            ("initial_replication", E::FatalError { .. }) => S::Critical { direction: F, reason: "f".into() },
            ("protected", E::ResyncNeeded { .. }) => {
                S::ResyncRequired { direction: dir(s)?, reason: "journal full".into() }
            }
            ("resync_required", E::ResyncStarted) => S::Resynchronizing { direction: dir(s)?, percent: 0 },
            ("resynchronizing", E::Progress { .. }) => S::Resynchronizing { direction: dir(s)?, percent: 100 },
            ("resynchronizing", E::ResyncDone) => S::Protected { direction: dir(s)? },
            ("protected" | "resync_required" | "resynchronizing" | "reprotecting", E::FatalError { .. }) => {
                S::Critical { direction: dir(s)?, reason: "f".into() }
            }
            ("critical", E::Recovered) => S::ResyncRequired { direction: dir(s)?, reason: "recovered from: c".into() },
            ("protected" | "critical", E::FailoverRequested { .. }) => {
                S::FailoverInProgress { direction: dir(s)?, planned: false }
            }
            ("resync_required" | "resynchronizing", E::FailoverRequested { planned: false }) => {
                S::FailoverInProgress { direction: dir(s)?, planned: false }
            }
            ("failover_in_progress", E::FailoverDone) => S::FailedOver { direction: dir(s)? },
            ("failover_in_progress", E::FailoverFailed { .. }) => {
                S::Critical { direction: dir(s)?, reason: "x".into() }
            }
            ("failed_over", E::CommitRequested) => S::Committed { direction: dir(s)? },
            ("committed", E::ReprotectRequested) => S::Reprotecting { direction: flip(dir(s)?), percent: 0 },
            ("failed_back", E::ReprotectRequested) => S::Reprotecting { direction: F, percent: 0 },
            ("reprotecting", E::Progress { .. }) => S::Reprotecting { direction: dir(s)?, percent: 100 },
            ("reprotecting", E::ReprotectDone) => S::Protected { direction: dir(s)? },
            ("protected", E::FailbackRequested) if dir(s)? == R => S::FailingBack,
            ("failing_back", E::FailbackDone) => S::FailedBack,
            ("failing_back", E::FailoverFailed { .. }) => S::Critical { direction: R, reason: "x".into() },
            (
                "enabling_protection"
                | "initial_replication"
                | "protected"
                | "resync_required"
                | "resynchronizing"
                | "critical"
                | "committed"
                | "failed_back",
                E::DisableRequested,
            ) => S::DisablingProtection,
            ("disabling_protection", E::DisableDone) => S::Unprotected,
            _ => return None,
        })
    }

    #[test]
    fn every_state_and_event_pair_follows_the_table() {
        let mut allowed = 0;
        for s in states() {
            for e in events() {
                match (s.on(&e), expected(&s, &e)) {
                    (Ok(got), Some(want)) => {
                        assert_eq!(got, want, "{} + {}", s.name(), event_name(&e));
                        allowed += 1;
                    }
                    (Err(r), None) => {
                        assert!(r.to_string().contains(s.name()), "refusal names the state: {r}");
                    }
                    (got, want) => panic!("{} + {}: got {got:?}, table says {want:?}", s.name(), event_name(&e)),
                }
            }
        }
        assert!(allowed > 30, "the table allows {allowed} transitions");
    }

    #[test]
    fn a_full_cycle_protect_failover_reprotect_failback() {
        let mut s = State::Unprotected;
        for e in [
            Event::EnableRequested,
            Event::PrerequisitesMet,
            Event::Progress { percent: 50 },
            Event::InitialReplicationDone,
            Event::FailoverRequested { planned: true },
            Event::FailoverDone,
            Event::CommitRequested,
            Event::ReprotectRequested,
            Event::ReprotectDone,
        ] {
            s = s.on(&e).unwrap();
        }
        assert_eq!(s, State::Protected { direction: R });
        for e in [Event::FailbackRequested, Event::FailbackDone, Event::ReprotectRequested, Event::ReprotectDone] {
            s = s.on(&e).unwrap();
        }
        assert_eq!(s, State::Protected { direction: F });
    }

    #[test]
    fn states_round_trip_through_json() {
        for s in states() {
            let j = serde_json::to_string(&s).unwrap();
            assert_eq!(serde_json::from_str::<State>(&j).unwrap(), s);
        }
    }
}
