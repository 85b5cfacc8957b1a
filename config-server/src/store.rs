//! The configuration server's state: JSON documents by (collection, id), in redb by default, behind
//! [`ControlStore`] with an in-memory version for tests and one conformance suite for both.
//!
//! Every write is one redb transaction (durable on commit), so a SIGKILL leaves each document either
//! as it was or as written, never half of it.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store: {0}")]
    Backend(String),
    #[error("state store: document {collection}/{id} is corrupt: {reason}")]
    Corrupt { collection: String, id: String, reason: String },
}

pub trait ControlStore: Send + Sync {
    fn get_raw(&self, collection: &str, id: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn put_raw(&self, collection: &str, id: &str, doc: &[u8]) -> Result<(), StoreError>;
    fn delete(&self, collection: &str, id: &str) -> Result<bool, StoreError>;
    /// Every (id, document) of a collection, by id.
    fn list_raw(&self, collection: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// The next value of a named counter, starting at 1.
    fn next_id(&self, counter: &str) -> Result<u64, StoreError>;
}

/// Typed access on top of any [`ControlStore`].
pub trait Docs {
    fn get<T: DeserializeOwned>(&self, collection: &str, id: &str) -> Result<Option<T>, StoreError>;
    fn put<T: Serialize>(&self, collection: &str, id: &str, doc: &T) -> Result<(), StoreError>;
    fn list<T: DeserializeOwned>(&self, collection: &str) -> Result<Vec<T>, StoreError>;
}

/// Reads one stored document (what [`Docs`] does for each).
pub fn parse<T: DeserializeOwned>(collection: &str, id: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        collection: collection.into(),
        id: id.into(),
        reason: e.to_string(),
    })
}

impl<S: ControlStore + ?Sized> Docs for S {
    fn get<T: DeserializeOwned>(&self, collection: &str, id: &str) -> Result<Option<T>, StoreError> {
        self.get_raw(collection, id)?.map(|b| parse(collection, id, &b)).transpose()
    }
    fn put<T: Serialize>(&self, collection: &str, id: &str, doc: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(doc).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.put_raw(collection, id, &bytes)
    }
    fn list<T: DeserializeOwned>(&self, collection: &str) -> Result<Vec<T>, StoreError> {
        self.list_raw(collection)?.iter().map(|(id, b)| parse(collection, id, b)).collect()
    }
}

const DOCS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("docs");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

pub struct RedbControlStore {
    db: redb::Database,
}

fn be<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl RedbControlStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sr_common::state::create_db(path, sr_common::state::LOCK_WAIT)
            .map_err(|e| StoreError::Backend(format!("{}: {e}", path.display())))?;
        let tx = db.begin_write().map_err(be)?;
        tx.open_table(DOCS).map_err(be)?;
        tx.open_table(COUNTERS).map_err(be)?;
        tx.commit().map_err(be)?;
        Ok(RedbControlStore { db })
    }
}

impl ControlStore for RedbControlStore {
    fn get_raw(&self, collection: &str, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.begin_read().map_err(be)?;
        let t = tx.open_table(DOCS).map_err(be)?;
        Ok(t.get((collection, id)).map_err(be)?.map(|v| v.value().to_vec()))
    }
    fn put_raw(&self, collection: &str, id: &str, doc: &[u8]) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(be)?;
        tx.open_table(DOCS).map_err(be)?.insert((collection, id), doc).map_err(be)?;
        tx.commit().map_err(be)
    }
    fn delete(&self, collection: &str, id: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(be)?;
        let existed = tx.open_table(DOCS).map_err(be)?.remove((collection, id)).map_err(be)?.is_some();
        tx.commit().map_err(be)?;
        Ok(existed)
    }
    fn list_raw(&self, collection: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let tx = self.db.begin_read().map_err(be)?;
        let t = tx.open_table(DOCS).map_err(be)?;
        let mut out = Vec::new();
        for row in t.range((collection, "")..).map_err(be)? {
            let (k, v) = row.map_err(be)?;
            let (c, id) = k.value();
            if c != collection {
                break;
            }
            out.push((id.to_string(), v.value().to_vec()));
        }
        Ok(out)
    }
    fn next_id(&self, counter: &str) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().map_err(be)?;
        let next = {
            let mut t = tx.open_table(COUNTERS).map_err(be)?;
            let next = t.get(counter).map_err(be)?.map_or(1, |v| v.value() + 1);
            t.insert(counter, next).map_err(be)?;
            next
        };
        tx.commit().map_err(be)?;
        Ok(next)
    }
}

/// In-memory [`ControlStore`] for tests.
#[derive(Default)]
pub struct MemControlStore {
    docs: Mutex<BTreeMap<(String, String), Vec<u8>>>,
    counters: Mutex<BTreeMap<String, u64>>,
}

impl ControlStore for MemControlStore {
    fn get_raw(&self, collection: &str, id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.docs.lock().expect("poisoned").get(&(collection.into(), id.into())).cloned())
    }
    fn put_raw(&self, collection: &str, id: &str, doc: &[u8]) -> Result<(), StoreError> {
        self.docs.lock().expect("poisoned").insert((collection.into(), id.into()), doc.to_vec());
        Ok(())
    }
    fn delete(&self, collection: &str, id: &str) -> Result<bool, StoreError> {
        Ok(self.docs.lock().expect("poisoned").remove(&(collection.into(), id.into())).is_some())
    }
    fn list_raw(&self, collection: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let g = self.docs.lock().expect("poisoned");
        Ok(g.iter().filter(|((c, _), _)| c == collection).map(|((_, id), v)| (id.clone(), v.clone())).collect())
    }
    fn next_id(&self, counter: &str) -> Result<u64, StoreError> {
        let mut g = self.counters.lock().expect("poisoned");
        let v = g.entry(counter.into()).or_insert(0);
        *v += 1;
        Ok(*v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conformance(s: &dyn ControlStore) {
        assert_eq!(s.get_raw("a", "1").unwrap(), None);
        s.put_raw("a", "1", b"{\"x\":1}").unwrap();
        s.put_raw("a", "2", b"{\"x\":2}").unwrap();
        s.put_raw("ab", "1", b"{}").unwrap();
        s.put_raw("b", "1", b"{}").unwrap();
        assert_eq!(s.get_raw("a", "1").unwrap().unwrap(), b"{\"x\":1}");
        let l = s.list_raw("a").unwrap();
        assert_eq!(l.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(), ["1", "2"]);
        s.put_raw("a", "1", b"{\"x\":3}").unwrap();
        assert_eq!(s.get_raw("a", "1").unwrap().unwrap(), b"{\"x\":3}");
        assert!(s.delete("a", "1").unwrap());
        assert!(!s.delete("a", "1").unwrap());
        assert_eq!(s.list_raw("a").unwrap().len(), 1);
        assert_eq!(s.next_id("jobs").unwrap(), 1);
        assert_eq!(s.next_id("jobs").unwrap(), 2);
        assert_eq!(s.next_id("items").unwrap(), 1);
        s.put_raw("bad", "1", b"not json").unwrap();
        let e = s.get::<serde_json::Value>("bad", "1").unwrap_err();
        assert!(e.to_string().contains("bad/1"), "{e}");
    }

    #[test]
    fn mem_conforms() {
        conformance(&MemControlStore::default());
    }

    #[test]
    fn redb_conforms_and_persists() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cs.redb");
        conformance(&RedbControlStore::open(&p).unwrap());
        let s = RedbControlStore::open(&p).unwrap();
        assert_eq!(s.next_id("jobs").unwrap(), 3);
        assert_eq!(s.list_raw("a").unwrap().len(), 1);
    }
}
