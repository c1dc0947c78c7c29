//! Replication outbox records: changes committed here that another replica has not been sent
//! yet. They are written in the same batch as the changes, so a crash between the commit and
//! the send loses nothing; they are deleted once the broker confirmed the send.

use super::{Change, Storage, StorageError};
use serde::{Deserialize, Serialize};

/// The identity of one outbox record (a UUID v7, so records sort roughly by commit time).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OutboxId([u8; 16]);

/// Changes that still have to reach one destination (a node name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    /// The record's id.
    pub id: OutboxId,
    /// The node the changes are for.
    pub destination: String,
    /// The changes, in the order they were made.
    pub changes: Vec<Change>,
}

/// The longest destination name accepted.
const MAX_DESTINATION_LEN: usize = 255;

impl OutboxRecord {
    pub(super) fn new(destination: &str, changes: Vec<Change>) -> Result<Self, StorageError> {
        // The name is the key prefix, ended by a zero byte: it must not contain one.
        if destination.is_empty()
            || destination.len() > MAX_DESTINATION_LEN
            || destination.as_bytes().contains(&0)
        {
            return Err(StorageError::Corrupt {
                what: "outbox destination",
                detail: format!("{destination:?} is not a valid node name"),
            });
        }
        Ok(Self {
            id: OutboxId(*uuid::Uuid::now_v7().as_bytes()),
            destination: destination.to_owned(),
            changes,
        })
    }

    pub(super) fn storage_key(&self) -> Vec<u8> {
        storage_key(&self.destination, self.id)
    }

    pub(super) fn encode_changes(&self) -> Vec<u8> {
        super::layout::encode(&self.changes)
    }

    fn decode(k: &[u8], v: &[u8]) -> Result<Self, StorageError> {
        let corrupt = |detail: String| StorageError::Corrupt {
            what: "outbox record",
            detail,
        };
        let split = k
            .len()
            .checked_sub(17)
            .filter(|&i| k[i] == 0)
            .ok_or_else(|| corrupt(format!("key of {} bytes", k.len())))?;
        let destination = std::str::from_utf8(&k[..split])
            .map_err(|e| corrupt(e.to_string()))?
            .to_owned();
        let mut id = [0u8; 16];
        id.copy_from_slice(&k[split + 1..]);
        let changes = rmp_serde::from_slice(v).map_err(|e| corrupt(e.to_string()))?;
        Ok(Self {
            id: OutboxId(id),
            destination,
            changes,
        })
    }
}

fn storage_key(destination: &str, id: OutboxId) -> Vec<u8> {
    let mut k = Vec::with_capacity(destination.len() + 17);
    k.extend_from_slice(destination.as_bytes());
    k.push(0);
    k.extend_from_slice(&id.0);
    k
}

impl Storage {
    /// Every outbox record, oldest first per destination: what a node re-sends at start-up.
    pub fn outbox(&self) -> Result<Vec<OutboxRecord>, StorageError> {
        let mut out = Vec::new();
        for kv in self.inner.outbox.iter() {
            let (k, v) = kv.into_inner()?;
            out.push(OutboxRecord::decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Deletes outbox records whose changes the broker confirmed. Deleting a record that is not
    /// there is not an error.
    pub fn remove_outbox<'r>(
        &self,
        records: impl IntoIterator<Item = (&'r str, OutboxId)>,
    ) -> Result<(), StorageError> {
        // No write lock: nothing else writes these keys once they exist, and a deletion lost
        // in a crash only means the changes are sent (and applied, idempotently) again.
        let mut wb = self.inner.db.batch();
        for (destination, id) in records {
            wb.remove(&self.inner.outbox, storage_key(destination, id));
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

    #[test]
    fn outbox_records_commit_with_the_batch_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let record = {
            let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
            let record = s
                .batch(|b| {
                    b.put(PutRequest::new("k", "v"))?;
                    let changes = b.changes().to_vec();
                    b.enqueue_outbox("node-b", changes)
                })
                .unwrap();
            // A failed batch leaves no record behind.
            let failed: Result<(), crate::StorageError> = s.batch(|b| {
                b.enqueue_outbox("node-b", vec![])?;
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
        assert!(matches!(&stored[0].changes[0], Change::Put { key, .. } if key == "k"));
        s.remove_outbox([(record.destination.as_str(), record.id)])
            .unwrap();
        assert!(s.outbox().unwrap().is_empty());
    }

    #[test]
    fn bad_destinations_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        for bad in ["", "a\0b"] {
            let r = s.batch(|b| b.enqueue_outbox(bad, vec![]));
            assert!(r.is_err(), "{bad:?} accepted");
        }
    }
}
