//! Jobs: every action the server carries out is a job with steps, progress, start and end times and
//! an error, persisted as it advances so a restarted server shows where each one stood.

use crate::model::{id_key, now, Job, JobState, Step, JOBS};
use crate::store::{ControlStore, Docs, StoreError};

/// The steps of a job kind, by name: `job.step(EnableStep::Choose.index())` rather than `job.step(1)`.
macro_rules! job_steps {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name {
            $($variant),+
        }

        impl $name {
            /// The steps' names, in order, as the job shows them.
            pub const NAMES: &[&str] = &[$($text),+];

            pub fn index(self) -> usize {
                self as usize
            }
        }

        impl From<$name> for usize {
            fn from(s: $name) -> usize {
                s.index()
            }
        }
    };
}

job_steps!(
    /// Enable protection.
    EnableStep {
        CheckPrerequisites => "check prerequisites",
        Choose => "choose a process server and a master target",
        DataKey => "create the item's data key",
        Assign => "hand out assignments",
        InitialReplication => "initial replication",
        Protected => "protected",
    }
);
job_steps!(
    /// An operator's resync.
    ResyncStep {
        Compare => "compare checksums",
        Ship => "ship the differing blocks",
        Protected => "protected",
    }
);
job_steps!(
    /// Reprotect.
    ReprotectStep {
        Check => "check both sites",
        Replicate => "replicate the changed blocks back",
        Protected => "protected",
    }
);

pub struct JobHandle<'a> {
    store: &'a dyn ControlStore,
    pub job: Job,
}

impl<'a> JobHandle<'a> {
    /// Records a new running job with its steps, all pending.
    pub fn start(store: &'a dyn ControlStore, kind: &str, target: &str, steps: &[&str]) -> Result<Self, StoreError> {
        let id = store.next_id(JOBS)?;
        let job = Job {
            id,
            kind: kind.into(),
            target: target.into(),
            state: JobState::Running,
            progress: 0,
            steps: steps
                .iter()
                .map(|s| Step { name: s.to_string(), state: JobState::Running, started: None, ended: None })
                .collect(),
            started: now(),
            ended: None,
            error: None,
        };
        let h = JobHandle { store, job };
        h.save()?;
        metrics::counter!(crate::metrics::JOBS_STARTED, "kind" => kind.to_string()).increment(1);
        Ok(h)
    }

    /// A handle on a stored job, to advance it later.
    pub fn load(store: &'a dyn ControlStore, id: u64) -> Result<Option<Self>, StoreError> {
        Ok(store.get::<Job>(JOBS, &id_key(id))?.map(|job| JobHandle { store, job }))
    }

    fn save(&self) -> Result<(), StoreError> {
        self.store.put(JOBS, &id_key(self.job.id), &self.job)
    }

    /// Marks step `i` started.
    pub fn step(&mut self, i: usize) -> Result<(), StoreError> {
        if let Some(s) = self.job.steps.get_mut(i) {
            s.started = Some(now());
        }
        self.save()
    }

    /// Marks step `i` done and moves progress.
    pub fn step_done(&mut self, i: usize) -> Result<(), StoreError> {
        let n = self.job.steps.len().max(1);
        if let Some(s) = self.job.steps.get_mut(i) {
            s.state = JobState::Succeeded;
            s.ended = Some(now());
        }
        self.job.progress = (((i + 1) * 100) / n) as u8;
        self.save()
    }

    pub fn progress(&mut self, percent: u8) -> Result<(), StoreError> {
        self.job.progress = percent.min(100);
        self.save()
    }

    pub fn succeed(mut self) -> Result<Job, StoreError> {
        self.job.state = JobState::Succeeded;
        self.job.progress = 100;
        self.job.ended = Some(now());
        self.save()?;
        self.count("succeeded");
        Ok(self.job)
    }

    fn count(&self, result: &'static str) {
        let kind = self.job.kind.clone();
        metrics::counter!(crate::metrics::JOBS_ENDED, "kind" => kind, "result" => result).increment(1);
    }

    /// Fails the job (and its running step) with `error`.
    pub fn fail(mut self, error: &str) -> Result<Job, StoreError> {
        for s in &mut self.job.steps {
            if s.state == JobState::Running && s.started.is_some() {
                s.state = JobState::Failed;
                s.ended = Some(now());
            }
        }
        self.job.state = JobState::Failed;
        self.job.ended = Some(now());
        self.job.error = Some(error.to_string());
        self.save()?;
        self.count("failed");
        Ok(self.job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemControlStore;

    #[test]
    fn steps_progress_and_failure_are_persisted() {
        let s = MemControlStore::default();
        let mut j = JobHandle::start(&s, "register", "ps-1", &["verify key", "issue certificate"]).unwrap();
        j.step(0).unwrap();
        j.step_done(0).unwrap();
        let saved: Job = s.get(JOBS, &id_key(j.job.id)).unwrap().unwrap();
        assert_eq!(saved.progress, 50);
        j.step(1).unwrap();
        let failed = j.fail("CSR invalid").unwrap();
        assert_eq!(failed.state, JobState::Failed);
        assert_eq!(failed.steps[1].state, JobState::Failed);
        let saved: Job = s.get(JOBS, &id_key(failed.id)).unwrap().unwrap();
        assert_eq!(saved.error.as_deref(), Some("CSR invalid"));
    }
}
