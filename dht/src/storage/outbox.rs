//! Replication outbox records: changes committed here that other replicas have not been sent
//! yet. A record is written in the same batch as the changes, so a crash between the commit and
//! the send loses nothing; it is deleted once the broker confirmed the send to every
//! destination it lists.
//!
//! One record per write, whatever the number of replicas: the write costs one outbox insert
//! and, later, one delete. Which destination has confirmed is kept in memory only; after a
//! crash the record is sent to all its destinations again, a duplicate that applying
//! replication ignores.

use super::{Change, Storage, StorageError};
use serde::{Deserialize, Serialize};

/// The identity of one outbox record (a UUID v7, so records sort roughly by commit time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OutboxId([u8; 16]);

/// Changes that still have to reach some destinations (node names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    /// The record's id.
    pub id: OutboxId,
    /// The nodes the changes are for.
    pub destinations: Vec<String>,
    /// The changes, in the order they were made.
    pub changes: Vec<Change>,
}

/// How a record is stored: named fields, so later fields can be added.
#[derive(Serialize, Deserialize)]
struct StoredRecord {
    destinations: Vec<String>,
    changes: Vec<Change>,
}

/// The longest destination name accepted.
const MAX_DESTINATION_LEN: usize = 255;

impl OutboxRecord {
    pub(crate) fn new(
        destinations: Vec<String>,
        changes: Vec<Change>,
    ) -> Result<Self, StorageError> {
        for destination in &destinations {
            // Names travel in queue names: refuse what would not fit there.
            if destination.is_empty()
                || destination.len() > MAX_DESTINATION_LEN
                || destination.as_bytes().contains(&0)
            {
                return Err(StorageError::Corrupt {
                    what: "outbox destination",
                    detail: format!("{destination:?} is not a valid node name"),
                });
            }
        }
        Ok(Self {
            id: OutboxId(*uuid::Uuid::now_v7().as_bytes()),
            destinations,
            changes,
        })
    }

    pub(super) fn storage_key(&self) -> [u8; 16] {
        self.id.0
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        // Serialising plain structs into a Vec cannot fail (no I/O, string keys only).
        rmp_serde::to_vec_named(&StoredRecord {
            destinations: self.destinations.clone(),
            changes: self.changes.clone(),
        })
        .unwrap_or_default()
    }

    fn decode(k: &[u8], v: &[u8]) -> Result<Self, StorageError> {
        let corrupt = |detail: String| StorageError::Corrupt {
            what: "outbox record",
            detail,
        };
        let id =
            <[u8; 16]>::try_from(k).map_err(|_| corrupt(format!("key of {} bytes", k.len())))?;
        let stored: StoredRecord = rmp_serde::from_slice(v).map_err(|e| corrupt(e.to_string()))?;
        Ok(Self {
            id: OutboxId(id),
            destinations: stored.destinations,
            changes: stored.changes,
        })
    }
}

impl Storage {
    /// Every outbox record: what a node re-sends at start-up.
    pub fn outbox(&self) -> Result<Vec<OutboxRecord>, StorageError> {
        let mut out = Vec::new();
        for kv in self.inner.outbox.iter() {
            let (k, v) = kv.into_inner()?;
            out.push(OutboxRecord::decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Deletes, in one batch, outbox records whose changes the broker confirmed for every
    /// destination. Deleting a record that is not there is not an error.
    pub fn remove_outbox<'r>(
        &self,
        records: impl IntoIterator<Item = &'r OutboxRecord>,
    ) -> Result<(), StorageError> {
        // No write lock: nothing else writes these keys once they exist, and a deletion lost
        // in a crash only means the changes are sent (and applied, idempotently) again.
        let mut wb = self.inner.db.batch();
        for r in records {
            wb.remove(&self.inner.outbox, r.storage_key());
        }
        if !wb.is_empty() {
            wb.commit()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::storage::{Change, PutRequest, Storage, StorageOptions};

    fn nodes(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn outbox_records_commit_with_the_batch_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let record = {
            let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
            let record = s
                .batch(|b| {
                    b.put(PutRequest::new("k", "v"))?;
                    let changes = b.changes().to_vec();
                    b.enqueue_outbox(nodes(&["node-b", "node-c"]), changes)
                })
                .unwrap();
            // A failed batch leaves no record behind.
            let failed: Result<(), crate::StorageError> = s.batch(|b| {
                b.enqueue_outbox(nodes(&["node-b"]), vec![])?;
                Err(crate::StorageError::Corrupt {
                    what: "test",
                    detail: "abort".into(),
                })
            });
            assert!(failed.is_err());
            s.flush().unwrap();
            record
        };
        let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let stored = s.outbox().unwrap();
        assert_eq!(stored, vec![record.clone()]);
        assert_eq!(stored[0].destinations, nodes(&["node-b", "node-c"]));
        assert!(matches!(&stored[0].changes[0], Change::Put { key, .. } if key == "k"));
        s.remove_outbox([&record]).unwrap();
        assert!(s.outbox().unwrap().is_empty());
    }

    #[test]
    fn bad_destinations_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        for bad in ["", "a\0b"] {
            let r = s.batch(|b| b.enqueue_outbox(nodes(&["ok", bad]), vec![]));
            assert!(r.is_err(), "{bad:?} accepted");
        }
    }
}
