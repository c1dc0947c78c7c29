//! Replication outbox records: changes committed here that other replicas have not been sent
//! yet. A record is written in the same batch as the changes, so a crash between the commit and
//! the send loses nothing; it is deleted once the broker confirmed the send to every
//! destination it lists.
//!
//! One record per write, whatever the number of replicas: the write costs one outbox insert
//! and, later, one delete. Which destination has confirmed is kept in memory only; after a
//! crash the record is sent to all its destinations again, a duplicate that applying
//! replication writes again identically (or skips, where it was superseded since).

use super::{Change, Storage, StorageError, layout};
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
#[derive(Deserialize)]
struct StoredRecord {
    destinations: Vec<String>,
    changes: Vec<Change>,
}

/// [`StoredRecord`] borrowed, to write one without copying its changes.
#[derive(Serialize)]
struct StoredRecordRef<'a> {
    destinations: &'a [String],
    changes: &'a [Change],
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
        let size: usize = (self.destinations.iter().map(String::len))
            .chain(self.changes.iter().map(Change::encoded_size))
            .sum();
        let record = StoredRecordRef {
            destinations: &self.destinations,
            changes: &self.changes,
        };
        layout::encode_into(&record, Vec::with_capacity(size))
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
    /// Every outbox record, loaded whole. See [`for_each_outbox`](Self::for_each_outbox),
    /// which holds one record at a time.
    pub fn outbox(&self) -> Result<Vec<OutboxRecord>, StorageError> {
        let mut out = Vec::new();
        self.for_each_outbox(|record| out.push(record))?;
        Ok(out)
    }

    /// Calls `f` with every outbox record, oldest first, one at a time: what a node re-sends
    /// at start-up, without holding every leftover change in memory at once.
    ///
    /// A record that cannot be decoded is logged as an error and moved, unchanged, to the
    /// `outbox-corrupt` keyspace: one bad record must not keep the node from starting, nor
    /// hold up the others. Its changes do not reach the other replicas (they catch up from a
    /// dump or later writes).
    pub fn for_each_outbox(&self, mut f: impl FnMut(OutboxRecord)) -> Result<(), StorageError> {
        let mut corrupt = Vec::new();
        for kv in self.inner.outbox.iter() {
            let (k, v) = kv.into_inner()?;
            match OutboxRecord::decode(&k, &v) {
                Ok(record) => f(record),
                Err(e) => {
                    log_corrupt(&k, v.len(), &e);
                    corrupt.push((k, v));
                }
            }
        }
        self.move_corrupt_outbox(corrupt);
        Ok(())
    }

    /// The outbox record `id`, read back when its changes are sent. `None` when it is not
    /// there (deleted) or could not be decoded (then it is logged and moved to the
    /// `outbox-corrupt` keyspace, as in [`for_each_outbox`](Self::for_each_outbox)).
    pub fn outbox_record(&self, id: OutboxId) -> Result<Option<OutboxRecord>, StorageError> {
        let Some(v) = self.inner.outbox.get(id.0)? else {
            return Ok(None);
        };
        match OutboxRecord::decode(&id.0, &v) {
            Ok(record) => Ok(Some(record)),
            Err(e) => {
                log_corrupt(&id.0, v.len(), &e);
                self.move_corrupt_outbox(vec![(id.0.to_vec().into(), v)]);
                Ok(None)
            }
        }
    }

    fn move_corrupt_outbox(&self, corrupt: Vec<(fjall::Slice, fjall::Slice)>) {
        if corrupt.is_empty() {
            return;
        }
        let mut wb = self.inner.db.batch();
        for (k, v) in corrupt {
            wb.insert(&self.inner.outbox_corrupt, k.clone(), v);
            wb.remove(&self.inner.outbox, k);
        }
        // Not moved: it is skipped again (and logged again) next time.
        if let Err(e) = wb.commit() {
            tracing::error!(error = %e, "cannot move undecodable outbox records aside");
        }
    }

    /// Deletes, in one batch, the outbox records `ids`, whose changes the broker confirmed for
    /// every destination. Deleting a record that is not there is not an error.
    pub fn remove_outbox(
        &self,
        ids: impl IntoIterator<Item = OutboxId>,
    ) -> Result<(), StorageError> {
        // No write lock: nothing else writes these keys once they exist, and a deletion lost
        // in a crash only means the changes are sent (and applied, idempotently) again.
        let mut wb = self.inner.db.batch();
        for id in ids {
            wb.remove(&self.inner.outbox, id.0);
        }
        if !wb.is_empty() {
            wb.commit()?;
        }
        Ok(())
    }
}

fn log_corrupt(key: &[u8], bytes: usize, e: &StorageError) {
    tracing::error!(
        key = ?key, bytes, error = %e,
        "undecodable outbox record moved to the outbox-corrupt keyspace"
    );
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
        assert_eq!(s.outbox_record(record.id).unwrap(), Some(record.clone()));
        s.remove_outbox([record.id]).unwrap();
        assert_eq!(s.outbox_record(record.id).unwrap(), None);
        assert!(s.outbox().unwrap().is_empty());
    }

    #[test]
    fn an_undecodable_record_is_moved_aside_and_the_others_still_load() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
            s.batch(|b| b.enqueue_outbox(nodes(&["node-b"]), vec![]))
                .unwrap();
            for (k, v) in [(&[1u8; 16][..], &b"not msgpack"[..]), (b"short", b"")] {
                s.inner.outbox.insert(k, v).unwrap();
            }
            s.flush().unwrap();
        }
        let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let loaded = s.outbox().unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].destinations, nodes(&["node-b"]));
        assert_eq!(
            s.inner.outbox.len().unwrap(),
            1,
            "the bad ones left the outbox"
        );
        let aside = s.inner.outbox_corrupt.get([1u8; 16]).unwrap().unwrap();
        assert_eq!(&aside[..], b"not msgpack", "kept unchanged");
        assert!(s.inner.outbox_corrupt.get(b"short").unwrap().is_some());
        assert_eq!(s.outbox().unwrap(), loaded);
        // Read back one by one, as senders do: moved aside the same way.
        s.inner.outbox.insert([2u8; 16], b"not msgpack").unwrap();
        assert_eq!(s.outbox_record(super::OutboxId([2u8; 16])).unwrap(), None);
        assert!(s.inner.outbox.get([2u8; 16]).unwrap().is_none());
        assert!(s.inner.outbox_corrupt.get([2u8; 16]).unwrap().is_some());
        assert_eq!(
            s.outbox_record(loaded[0].id).unwrap(),
            Some(loaded[0].clone())
        );
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
