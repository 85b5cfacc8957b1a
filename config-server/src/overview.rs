//! What the portal's overview and item pages show at a glance: the alerts the fleet raises now, the
//! worst RPOs, the components' health and load, and a short history of RPO and churn for charts.
//!
//! ```text
//! items::evaluate (each second) --Fleet::of--> History::record (one sample per STEP_SECS)
//! GET /v1/overview       --> Overview::of(fleet, components, running jobs, history)
//! GET /v1/items/{id}/history --> History::item
//! ```
//! Everything here is pure: it takes the store's records and `now`, and returns what to show. The
//! alerts follow the Prometheus rules the chart ships (`charts/site-recovery/files/rules.yaml`) for
//! what the configuration server knows by itself, so a deployment without Prometheus sees them too.

use crate::lifecycle::State;
use crate::metrics::Fleet;
use crate::model::{Component, ComponentRole, Item, Job};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};

/// Seconds between two history samples.
pub const STEP_SECS: u64 = 10;
/// Samples kept per series: one hour at [`STEP_SECS`].
pub const KEEP_SAMPLES: usize = 360;
/// Items listed among the worst RPOs.
pub const WORST: usize = 10;

/// One sample of the fleet.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetSample {
    pub time: u64,
    /// The largest RPO of any replicating item, seconds (None when none has one).
    pub worst_rpo_secs: Option<u64>,
    /// Bytes per second of changes through all process servers.
    pub churn_bytes_per_sec: u64,
    /// Bytes waiting in all process servers' caches.
    pub cache_bytes: u64,
}

/// One sample of an item.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ItemSample {
    pub time: u64,
    pub rpo_secs: Option<u64>,
}

/// The last hour of samples, in memory: a restart starts the charts afresh (Prometheus keeps the
/// long history).
#[derive(Debug, Default)]
pub struct History {
    fleet: VecDeque<FleetSample>,
    items: BTreeMap<u64, VecDeque<ItemSample>>,
}

impl History {
    /// Takes a sample when [`STEP_SECS`] passed since the last one; forgets items that are gone.
    pub fn record(&mut self, now: u64, fleet: &Fleet, comps: &[Component]) {
        if self.fleet.back().is_some_and(|s| now < s.time + STEP_SECS) {
            return;
        }
        let ps = comps.iter().filter(|c| c.role == ComponentRole::ProcessServer && !c.revoked);
        let (churn, cache) = ps.fold((0u64, 0u64), |(ch, ca), c| {
            (ch.saturating_add(c.load.churn_bytes_per_sec), ca.saturating_add(c.load.cache_bytes))
        });
        push(
            &mut self.fleet,
            FleetSample {
                time: now,
                worst_rpo_secs: fleet.items.iter().filter_map(|i| i.rpo_secs).max(),
                churn_bytes_per_sec: churn,
                cache_bytes: cache,
            },
        );
        self.items.retain(|id, _| fleet.items.iter().any(|i| i.item == *id));
        for i in &fleet.items {
            push(self.items.entry(i.item).or_default(), ItemSample { time: now, rpo_secs: i.rpo_secs });
        }
    }

    pub fn fleet(&self) -> Vec<FleetSample> {
        self.fleet.iter().cloned().collect()
    }

    pub fn item(&self, id: u64) -> Vec<ItemSample> {
        self.items.get(&id).map(|s| s.iter().copied().collect()).unwrap_or_default()
    }
}

fn push<T>(q: &mut VecDeque<T>, v: T) {
    if q.len() == KEEP_SAMPLES {
        q.pop_front();
    }
    q.push_back(v);
}

/// Something wrong now, for an operator to look at.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    /// "critical" or "warning".
    pub severity: &'static str,
    /// The alert's name, as in the Prometheus rules.
    pub name: &'static str,
    /// What it is about: "item 3" or a component's name.
    pub subject: String,
    /// The item's id, when it is about an item (for a link).
    pub item: Option<u64>,
    pub message: String,
}

/// The alerts the fleet raises now: items over their RPO threshold, Critical, needing a resync;
/// components silent past the timeout (revoked, draining and NBD-client ones are left out, as in
/// the rules).
/// `items` give the reasons of Critical and resync-required items.
pub fn alerts(fleet: &Fleet, items: &[Item]) -> Vec<Alert> {
    let mut out = Vec::new();
    for i in &fleet.items {
        let subject = format!("item {} ({})", i.item, i.machine);
        let reason = items.iter().find(|it| it.id == i.item).and_then(|it| match &it.state {
            State::Critical { reason, .. } | State::ResyncRequired { reason, .. } => Some(reason.clone()),
            _ => None,
        });
        let reason = reason.unwrap_or_default();
        if i.state == "critical" {
            out.push(Alert {
                severity: "critical",
                name: "SiteRecoveryItemCritical",
                subject: subject.clone(),
                item: Some(i.item),
                message: format!("replication stopped and needs an operator: {reason}"),
            });
        }
        if i.state == "resync_required" {
            out.push(Alert {
                severity: "warning",
                name: "SiteRecoveryResyncRequired",
                subject: subject.clone(),
                item: Some(i.item),
                message: format!(
                    "the replica may lack blocks ({reason}): run a resync, or wait for the policy's resync window"
                ),
            });
        }
        if let Some(rpo) = i.rpo_secs.filter(|r| *r > i.rpo_threshold_secs) {
            out.push(Alert {
                severity: "warning",
                name: "SiteRecoveryRpoOverThreshold",
                subject,
                item: Some(i.item),
                message: format!(
                    "RPO {} over the policy's threshold of {}: check its process server and the link to the \
                     recovery site",
                    duration(rpo),
                    duration(i.rpo_threshold_secs)
                ),
            });
        }
    }
    for c in fleet.components.iter().filter(|c| !c.up && !c.revoked && !c.draining) {
        out.push(Alert {
            severity: "critical",
            name: "SiteRecoveryComponentDown",
            subject: c.name.clone(),
            item: None,
            message: match c.age_secs {
                Some(a) => format!(
                    "{} {} has not reported for {} (timeout {}): is it running, and can it reach this server?",
                    c.role,
                    c.name,
                    duration(a),
                    duration(fleet.component_timeout_secs)
                ),
                None => format!("{} {} registered but never reported: is it running?", c.role, c.name),
            },
        });
    }
    // Critical first, then by name.
    out.sort_by(|a, b| {
        (a.severity != "critical", a.name, &a.subject).cmp(&(b.severity != "critical", b.name, &b.subject))
    });
    out
}

/// "42 s", "3 min 5 s", "2 h 4 min", "3 d 2 h".
pub fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s if s < 86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// An item among the worst RPOs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Worst {
    pub item: u64,
    pub machine: String,
    pub rpo_secs: u64,
    pub threshold_secs: u64,
}

/// A component's health and load.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ComponentHealth {
    pub name: String,
    pub role: &'static str,
    pub up: bool,
    pub revoked: bool,
    pub draining: bool,
    pub heartbeat_age_secs: Option<u64>,
    pub cache_bytes: u64,
    pub churn_bytes_per_sec: u64,
    pub free_bytes: u64,
    /// Items placed on it (as process server or master target).
    pub items: u64,
}

/// A job still running.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Running {
    pub id: u64,
    pub kind: String,
    pub target: String,
    pub progress: u8,
    pub started: u64,
    /// The step running now.
    pub step: Option<String>,
}

/// The overview page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Overview {
    pub now: u64,
    pub items: u64,
    /// Items in each state (every state, 0 when none).
    pub by_state: Vec<(&'static str, u64)>,
    pub worst: Vec<Worst>,
    pub alerts: Vec<Alert>,
    pub running: Vec<Running>,
    /// Process servers and master targets (agents are counted in `agents`: one per machine).
    pub components: Vec<ComponentHealth>,
    pub agents: AgentCount,
    pub component_timeout_secs: u64,
    pub history: Vec<FleetSample>,
}

/// Agents registered, and how many of them reported within the component timeout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct AgentCount {
    pub total: u64,
    pub up: u64,
}

impl Overview {
    /// `running` are the jobs not ended (any order); `placed` is, per component name, how many items
    /// it carries.
    pub fn of(
        now: u64,
        fleet: &Fleet,
        items: &[Item],
        comps: &[Component],
        placed: &BTreeMap<String, u64>,
        running: &[Job],
        history: Vec<FleetSample>,
    ) -> Overview {
        let mut worst: Vec<Worst> = fleet
            .items
            .iter()
            .filter_map(|i| {
                Some(Worst {
                    item: i.item,
                    machine: i.machine.clone(),
                    rpo_secs: i.rpo_secs?,
                    threshold_secs: i.rpo_threshold_secs,
                })
            })
            .collect();
        worst.sort_by(|a, b| b.rpo_secs.cmp(&a.rpo_secs).then(a.item.cmp(&b.item)));
        worst.truncate(WORST);
        let agents = fleet
            .components
            .iter()
            .filter(|g| g.role == "agent")
            .fold(AgentCount::default(), |a, g| AgentCount { total: a.total + 1, up: a.up + u64::from(g.up) });
        let components = fleet
            .components
            .iter()
            .filter(|g| g.role != "agent")
            .filter_map(|g| {
                let c = comps.iter().find(|c| c.name == g.name)?;
                Some(ComponentHealth {
                    name: g.name.clone(),
                    role: g.role,
                    up: g.up,
                    revoked: g.revoked,
                    draining: g.draining,
                    heartbeat_age_secs: g.age_secs,
                    cache_bytes: c.load.cache_bytes,
                    churn_bytes_per_sec: c.load.churn_bytes_per_sec,
                    free_bytes: c.load.free_bytes,
                    items: placed.get(&g.name).copied().unwrap_or(0),
                })
            })
            .collect();
        let mut running: Vec<Running> = running
            .iter()
            .filter(|j| j.ended.is_none())
            .map(|j| Running {
                id: j.id,
                kind: j.kind.clone(),
                target: j.target.clone(),
                progress: j.progress,
                started: j.started,
                step: j.steps.iter().find(|s| s.started.is_some() && s.ended.is_none()).map(|s| s.name.clone()),
            })
            .collect();
        running.sort_by_key(|r| std::cmp::Reverse(r.id));
        Overview {
            now,
            items: fleet.items.len() as u64,
            by_state: fleet.by_state.clone(),
            worst,
            alerts: alerts(fleet, items),
            running,
            components,
            agents,
            component_timeout_secs: fleet.component_timeout_secs,
            history,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::lifecycle::Direction;
    use crate::model::{JobState, Policy, Step};

    fn comp(name: &str, role: ComponentRole, heard: Option<u64>) -> Component {
        Component {
            name: name.into(),
            role,
            serial: 1,
            registered_at: 0,
            last_heartbeat: heard,
            address: None,
            http: None,
            revoked: false,
            load: Default::default(),
            draining: false,
        }
    }

    fn policy(rpo: u64) -> Policy {
        serde_json::from_value(serde_json::json!({ "id": "p", "name": "p", "rpo_threshold_secs": rpo })).unwrap()
    }

    fn protected(id: u64, caught_up: u64) -> Item {
        Item {
            caught_up_at: Some(caught_up),
            ..Item::new(id, &format!("m{id}"), "p", State::Protected { direction: Direction::Forward }, 0)
        }
    }

    #[test]
    fn alerts_follow_the_rules_and_leave_out_revoked_and_draining_components() {
        let items = vec![
            protected(1, 990),
            protected(2, 800),
            Item::new(
                3,
                "m3",
                "p",
                State::Critical { direction: Direction::Forward, reason: "chain broken".into() },
                0,
            ),
            Item::new(
                4,
                "m4",
                "p",
                State::ResyncRequired { direction: Direction::Forward, reason: "journal overflow".into() },
                0,
            ),
        ];
        let mut revoked = comp("ps-r", ComponentRole::ProcessServer, Some(0));
        revoked.revoked = true;
        let mut draining = comp("ps-d", ComponentRole::ProcessServer, Some(0));
        draining.draining = true;
        let comps = vec![
            comp("ps-1", ComponentRole::ProcessServer, Some(999)),
            comp("mt-1", ComponentRole::MasterTarget, Some(900)),
            comp("agent-x", ComponentRole::Agent, None),
            comp("nbd", ComponentRole::NbdClient, None),
            revoked,
            draining,
        ];
        let fleet = Fleet::of(&items, &[policy(60)], &comps, 1000, 30);
        let all = alerts(&fleet, &items);
        assert!(all.iter().any(|a| a.message.contains("chain broken")), "{all:?}");
        let got: Vec<(&str, String)> = all.into_iter().map(|a| (a.name, a.subject)).collect();
        assert_eq!(
            got,
            vec![
                ("SiteRecoveryComponentDown", "agent-x".to_string()),
                ("SiteRecoveryComponentDown", "mt-1".to_string()),
                ("SiteRecoveryItemCritical", "item 3 (m3)".to_string()),
                ("SiteRecoveryResyncRequired", "item 4 (m4)".to_string()),
                ("SiteRecoveryRpoOverThreshold", "item 2 (m2)".to_string()),
            ]
        );
        // At the threshold exactly, no alert.
        let fleet = Fleet::of(&[protected(1, 940)], &[policy(60)], &[], 1000, 30);
        assert!(alerts(&fleet, &[]).is_empty());
    }

    #[test]
    fn overview_ranks_the_worst_rpos_and_lists_running_jobs_with_their_step() {
        let items: Vec<Item> = (1..=12).map(|i| protected(i, 1000 - i * 10)).collect();
        let mut ps = comp("ps-1", ComponentRole::ProcessServer, Some(1000));
        ps.load.churn_bytes_per_sec = 5;
        let comps = vec![
            ps.clone(),
            comp("agent-1", ComponentRole::Agent, Some(1000)),
            comp("agent-2", ComponentRole::Agent, Some(10)),
        ];
        let fleet = Fleet::of(&items, &[policy(300)], &comps, 1000, 30);
        let job = |id, ended: Option<u64>| Job {
            id,
            kind: "resync".into(),
            target: "m1".into(),
            state: if ended.is_some() { JobState::Succeeded } else { JobState::Running },
            progress: 50,
            steps: vec![
                Step { name: "a".into(), state: JobState::Succeeded, started: Some(1), ended: Some(2) },
                Step { name: "b".into(), state: JobState::Running, started: Some(2), ended: None },
            ],
            started: 1,
            ended,
            error: None,
        };
        let placed = BTreeMap::from([("ps-1".to_string(), 12)]);
        let o =
            Overview::of(1000, &fleet, &items, &comps, &placed, &[job(1, Some(3)), job(2, None), job(3, None)], vec![]);
        assert_eq!(o.worst.len(), WORST);
        assert_eq!(o.worst[0].item, 12);
        assert_eq!(o.worst[0].rpo_secs, 120);
        assert_eq!(o.running.iter().map(|r| r.id).collect::<Vec<_>>(), vec![3, 2]);
        assert_eq!(o.running[0].step.as_deref(), Some("b"));
        assert_eq!(o.components[0].items, 12);
        assert_eq!(o.components.len(), 1, "agents are counted, not listed");
        assert_eq!(o.agents, AgentCount { total: 2, up: 1 });
        assert_eq!(o.components[0].churn_bytes_per_sec, 5);
        assert_eq!(o.items, 12);
    }

    #[test]
    fn history_samples_once_a_step_keeps_an_hour_and_forgets_removed_items() {
        let mut h = History::default();
        let mut ps = comp("ps-1", ComponentRole::ProcessServer, Some(0));
        ps.load.churn_bytes_per_sec = 7;
        let items = vec![protected(1, 0), protected(2, 0)];
        for t in 0..(KEEP_SAMPLES as u64 + 5) * STEP_SECS {
            let fleet = Fleet::of(&items, &[policy(60)], std::slice::from_ref(&ps), t, 30);
            h.record(t, &fleet, std::slice::from_ref(&ps));
        }
        let f = h.fleet();
        assert_eq!(f.len(), KEEP_SAMPLES);
        assert_eq!(f[1].time - f[0].time, STEP_SECS);
        assert_eq!(f.last().unwrap().churn_bytes_per_sec, 7);
        assert_eq!(f.last().unwrap().worst_rpo_secs, Some((KEEP_SAMPLES as u64 + 4) * STEP_SECS));
        assert_eq!(h.item(2).len(), KEEP_SAMPLES);
        let t = (KEEP_SAMPLES as u64 + 6) * STEP_SECS;
        let fleet = Fleet::of(&items[..1], &[policy(60)], &[], t, 30);
        h.record(t, &fleet, &[]);
        assert!(h.item(2).is_empty(), "item 2 is gone");
        assert_eq!(h.item(1).last().unwrap().rpo_secs, Some(t));
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(42), "42 s");
        assert_eq!(duration(185), "3 min 5 s");
        assert_eq!(duration(7440), "2 h 4 min");
        assert_eq!(duration(3 * 86_400 + 7200), "3 d 2 h");
    }
}
