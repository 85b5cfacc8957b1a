//! How long each item's recovery points are kept, persisted so it never shrinks by accident.
//!
//! The configuration server sends each item's retention with its assignment. An item that is missing
//! from the assignments (a failover cleared its process server, the configuration server is unreachable
//! at start, a poll failed) keeps the retention last told, read back from `retention.json` after a
//! restart; only an explicit new value changes it. Points are deleted for good, so forgetting a longer
//! retention would lose them. The configured default applies to items never told.
//!
//! ```text
//! assignment poll --> merge (pure) --changed?--> crashsafe::write_file(retention.json) --> in memory
//! expiry task     --> get(item) or the default
//! ```

use serde::{Deserialize, Serialize};
use sr_common::types::ItemId;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

const VERSION: u32 = 1;
const KIND: &str = "retention";

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    version: u32,
    /// Item id -> retention in seconds.
    items: BTreeMap<u64, u64>,
}

pub struct Retention {
    path: PathBuf,
    /// Item id -> seconds; written through to `path` before it changes here.
    items: RwLock<BTreeMap<u64, u64>>,
}

/// The retention map after an assignment poll that told `assigned` (item, seconds; 0 means not told):
/// `None` when nothing changed. Items not told keep what they had.
pub fn merge(stored: &BTreeMap<u64, u64>, assigned: &[(ItemId, u64)]) -> Option<BTreeMap<u64, u64>> {
    let mut next = stored.clone();
    for (item, secs) in assigned {
        if *secs > 0 {
            next.insert(item.0, *secs);
        }
    }
    (next != *stored).then_some(next)
}

impl Retention {
    /// Reads `path` (none yet: no item told). A damaged file is an error: guessing could expire points.
    pub fn load(path: &Path) -> anyhow::Result<Retention> {
        use anyhow::Context;
        // Releases before the record header kept the version inside the JSON (format 0 here).
        let items = match sr_common::crashsafe::read_record::<Stored>(path, KIND, VERSION).with_context(|| {
            "retention state is not readable; restore it or remove it (every item then keeps the configured \
             default until the configuration server tells it again)"
        })? {
            Some(r) => {
                anyhow::ensure!(
                    r.value.version == VERSION,
                    "retention state {} has version {}, this build reads {VERSION}",
                    path.display(),
                    r.value.version
                );
                r.value.items
            }
            None => BTreeMap::new(),
        };
        Ok(Retention { path: path.to_path_buf(), items: RwLock::new(items) })
    }

    /// Seconds of points kept for `item`, when it was ever told.
    pub fn get(&self, item: ItemId) -> Option<u64> {
        self.items.read().expect("retention lock poisoned").get(&item.0).copied()
    }

    /// Takes what an assignment poll told; persists before it takes effect. Returns whether it changed.
    pub fn update(&self, assigned: &[(ItemId, u64)]) -> anyhow::Result<bool> {
        use anyhow::Context;
        let mut items = self.items.write().expect("retention lock poisoned");
        let Some(next) = merge(&items, assigned) else { return Ok(false) };
        let stored = Stored { version: VERSION, items: next.clone() };
        sr_common::crashsafe::write_record(&self.path, KIND, VERSION, &stored)
            .with_context(|| format!("saving {}", self.path.display()))?;
        for (item, secs) in &next {
            if items.get(item) != Some(secs) {
                tracing::info!(item, secs, "retention of recovery points set");
            }
        }
        *items = next;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_item_not_told_keeps_its_retention_and_only_an_explicit_value_changes_it() {
        let stored = BTreeMap::from([(1, 7200), (2, 600)]);
        assert_eq!(merge(&stored, &[]), None, "an empty poll (server unreachable, failover) changes nothing");
        assert_eq!(merge(&stored, &[(ItemId(1), 0)]), None, "0 is 'not told'");
        assert_eq!(merge(&stored, &[(ItemId(1), 7200)]), None);
        assert_eq!(merge(&stored, &[(ItemId(2), 60)]), Some(BTreeMap::from([(1, 7200), (2, 60)])));
        assert_eq!(merge(&stored, &[(ItemId(3), 5)]), Some(BTreeMap::from([(1, 7200), (2, 600), (3, 5)])));
    }

    #[test]
    fn retention_survives_a_restart_and_a_damaged_file_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("retention.json");
        let r = Retention::load(&path).unwrap();
        assert_eq!(r.get(ItemId(1)), None);
        assert!(r.update(&[(ItemId(1), 7200)]).unwrap());
        assert!(!r.update(&[]).unwrap());
        drop(r);
        let r = Retention::load(&path).unwrap();
        assert_eq!(r.get(ItemId(1)), Some(7200));
        std::fs::write(&path, b"{\"version\":1,\"items\":{\"1\":").unwrap();
        let e = Retention::load(&path).err().unwrap();
        assert!(format!("{e:#}").contains("retention state"), "{e:#}");
    }
}
