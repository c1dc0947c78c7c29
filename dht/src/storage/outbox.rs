//! Replication outbox records: changes committed here that other replicas have not been sent
//! yet. A record is written in the same batch as the changes, so a crash between the commit and
//! the send loses nothing; it leaves the disk once the broker confirmed the send to every
//! destination it lists.
//!
//! One record per storage batch (a write, a client's batch, or the writes a node served together),
//! whatever the number of replicas: the batch costs one outbox insert.
//! Confirmed records are not deleted one by one but a keyspace at a time (see
//! [`outbox_generations`](super::outbox_generations)). Which destination has confirmed is kept
//! in memory only; after a crash the record is sent to all its destinations again, a duplicate
//! that applying replication writes again identically (or skips, where it was superseded
//! since).

use super::outbox_generations::Generations;
use super::packed::{PackedChanges, write_array, write_array_len};
use super::{Change, Storage, StorageError};
use fjall::{Database, Keyspace, KeyspaceCreateOptions};
use serde::{Deserialize, Serialize};
use std::sync::PoisonError;

/// The identity of one outbox record: a UUID v7 (so records sort roughly by commit time) and
/// the generation keyspace it is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OutboxId {
    key: [u8; 16],
    generation: u8,
}

impl OutboxId {
    /// Generations are 0 and 1.
    fn new(key: [u8; 16], generation: usize) -> Self {
        Self {
            key,
            generation: u8::from(generation != 0),
        }
    }

    /// A new id in `generation`.
    pub(super) fn fresh(generation: usize) -> Self {
        Self::new(*uuid::Uuid::now_v7().as_bytes(), generation)
    }

    /// The key of the record in its generation's keyspace.
    pub(super) fn storage_key(self) -> [u8; 16] {
        self.key
    }

    fn generation(self) -> usize {
        usize::from(self.generation)
    }
}

/// The outbox on disk: its two generation keyspaces and which of them holds what.
pub(crate) struct OutboxStore {
    /// `outbox` (the only one before generations, so earlier records are found) and `outbox-1`.
    keyspaces: [Keyspace; 2],
    pub(crate) generations: Generations,
}

impl OutboxStore {
    pub(crate) fn open(db: &Database) -> Result<Self, StorageError> {
        let keyspaces = [
            db.keyspace("outbox", KeyspaceCreateOptions::default)?,
            db.keyspace("outbox-1", KeyspaceCreateOptions::default)?,
        ];
        let mut stored = [0; 2];
        let mut oldest = [None, None];
        for ((n, first), keyspace) in stored.iter_mut().zip(&mut oldest).zip(&keyspaces) {
            *n = keyspace.len()?;
            *first = keyspace.first_key_value().map(|kv| kv.key()).transpose()?;
        }
        // Record ids are UUID v7: the generation whose oldest record is newer was the active
        // one (or, with one of them empty, the other).
        let active = match oldest {
            [Some(a), Some(b)] => usize::from(b > a),
            [Some(_), None] => 1,
            _ => 0,
        };
        Ok(Self {
            keyspaces,
            generations: Generations::recovered(stored, active),
        })
    }

    pub(crate) fn keyspace(&self, generation: usize) -> &Keyspace {
        &self.keyspaces[generation]
    }
}

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

/// The longest destination name accepted.
const MAX_DESTINATION_LEN: usize = 255;

/// Refuses destination names that would not fit in a queue name.
pub(super) fn check_destinations(destinations: &[impl AsRef<str>]) -> Result<(), StorageError> {
    for destination in destinations.iter().map(AsRef::as_ref) {
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
    Ok(())
}

/// Writes a record as stored into `out`, replacing what it held: what serde writes for a
/// [`StoredRecord`], its changes copied in already encoded.
pub(super) fn encode_record(
    out: &mut Vec<u8>,
    destinations: &[impl AsRef<str>],
    changes: &PackedChanges,
) {
    let names: usize = destinations.iter().map(|d| d.as_ref().len() + 5).sum();
    out.clear();
    out.reserve(32 + names + changes.byte_len());
    // Writing into a Vec cannot fail.
    let _ = rmp::encode::write_map_len(out, 2);
    let _ = rmp::encode::write_str(out, "destinations");
    write_array_len(destinations.len(), out);
    for destination in destinations {
        let _ = rmp::encode::write_str(out, destination.as_ref());
    }
    let _ = rmp::encode::write_str(out, "changes");
    write_array(changes.iter().map(|(_, bytes)| bytes), out);
}

impl OutboxRecord {
    fn decode(generation: usize, k: &[u8], v: &[u8]) -> Result<Self, StorageError> {
        let corrupt = |detail: String| StorageError::Corrupt {
            what: "outbox record",
            detail,
        };
        let key =
            <[u8; 16]>::try_from(k).map_err(|_| corrupt(format!("key of {} bytes", k.len())))?;
        let stored: StoredRecord = rmp_serde::from_slice(v).map_err(|e| corrupt(e.to_string()))?;
        Ok(Self {
            id: OutboxId::new(key, generation),
            destinations: stored.destinations,
            changes: stored.changes,
        })
    }
}

impl Storage {
    /// Every outbox record on disk, loaded whole: those not yet confirmed, and confirmed ones
    /// whose generation is not cleared yet (see [`remove_outbox`](Self::remove_outbox)). See
    /// [`for_each_outbox`](Self::for_each_outbox), which holds one record at a time.
    pub fn outbox(&self) -> Result<Vec<OutboxRecord>, StorageError> {
        let mut out = Vec::new();
        self.for_each_outbox(|record| out.push(record))?;
        Ok(out)
    }

    /// Calls `f` with every outbox record on disk, oldest first, one at a time: what a node
    /// re-sends at start-up, without holding every leftover change in memory at once.
    ///
    /// A record that cannot be decoded is logged as an error and moved, unchanged, to the
    /// `outbox-corrupt` keyspace: one bad record must not keep the node from starting, nor
    /// hold up the others. Its changes do not reach the other replicas (they catch up from a
    /// dump or later writes).
    pub fn for_each_outbox(&self, mut f: impl FnMut(OutboxRecord)) -> Result<(), StorageError> {
        let outbox = &self.inner.outbox;
        for generation in outbox.generations.oldest_first() {
            let mut corrupt = Vec::new();
            for kv in outbox.keyspace(generation).iter() {
                let (k, v) = kv.into_inner()?;
                match OutboxRecord::decode(generation, &k, &v) {
                    Ok(record) => f(record),
                    Err(e) => {
                        log_corrupt(&k, v.len(), &e);
                        corrupt.push((k, v));
                    }
                }
            }
            self.move_corrupt_outbox(generation, corrupt);
        }
        Ok(())
    }

    /// The outbox record `id`, read back when its changes are sent. `None` when it is not
    /// there (deleted) or could not be decoded (then it is logged and moved to the
    /// `outbox-corrupt` keyspace, as in [`for_each_outbox`](Self::for_each_outbox)).
    pub fn outbox_record(&self, id: OutboxId) -> Result<Option<OutboxRecord>, StorageError> {
        let generation = id.generation();
        let Some(v) = self.inner.outbox.keyspace(generation).get(id.key)? else {
            return Ok(None);
        };
        match OutboxRecord::decode(generation, &id.key, &v) {
            Ok(record) => Ok(Some(record)),
            Err(e) => {
                log_corrupt(&id.key, v.len(), &e);
                self.move_corrupt_outbox(generation, vec![(id.key.to_vec().into(), v)]);
                Ok(None)
            }
        }
    }

    fn move_corrupt_outbox(&self, generation: usize, corrupt: Vec<(fjall::Slice, fjall::Slice)>) {
        if corrupt.is_empty() {
            return;
        }
        let mut wb = self.inner.db.batch();
        for (k, v) in corrupt {
            wb.insert(&self.inner.outbox_corrupt, k.clone(), v);
            wb.remove(self.inner.outbox.keyspace(generation), k);
        }
        // Not moved: it is skipped again (and logged again) next time. The generations' counts
        // stay: a record a sender read back is still in its queue and will be confirmed, and
        // those found by `resend_outbox` are not counted there.
        if let Err(e) = wb.commit() {
            tracing::error!(error = %e, "cannot move undecodable outbox records aside");
        }
    }

    /// Calls `queue` with every outbox record on disk, oldest first, as
    /// [`for_each_outbox`](Self::for_each_outbox) does, for a node to send them (again) at
    /// start-up: `queue` returns whether the record was queued for sending, or is owed to
    /// nobody any more (it is then deleted). Afterwards exactly the queued records count as
    /// waiting for [`remove_outbox`](Self::remove_outbox), so one caller at a time must queue
    /// them: one [`ReplicationOutbox`](crate::ReplicationOutbox) per table.
    pub fn resend_outbox(
        &self,
        mut queue: impl FnMut(OutboxRecord) -> bool,
    ) -> Result<(), StorageError> {
        // Under the write lock: no record is staged meanwhile.
        let _guard = self
            .inner
            .write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let mut queued = [0; 2];
        let mut owed_to_nobody = Vec::new();
        self.for_each_outbox(|record| {
            let id = record.id;
            if queue(record) {
                queued[id.generation()] += 1;
            } else {
                owed_to_nobody.push(id);
            }
        })?;
        let outbox = &self.inner.outbox;
        let mut wb = self.inner.db.batch();
        for id in owed_to_nobody {
            wb.remove(outbox.keyspace(id.generation()), id.key);
        }
        wb.commit()?;
        let mut stored = [0; 2];
        for (n, generation) in stored.iter_mut().zip(0..) {
            *n = outbox.keyspace(generation).len()?;
        }
        outbox.generations.reset(queued, stored);
        Ok(())
    }

    /// Forgets the outbox records `ids`, whose changes the broker confirmed for every
    /// destination. Forgetting a record that is not there is not an error.
    ///
    /// A record is not deleted on its own: its generation (one of the two outbox keyspaces,
    /// used in turn) is cleared once all of its records are confirmed, and records are deleted
    /// one by one only while a generation that cannot drain (a peer that stays away) holds
    /// writers in the other. Until then they stay on disk, and a restart sends them again.
    pub fn remove_outbox(
        &self,
        ids: impl IntoIterator<Item = OutboxId>,
    ) -> Result<(), StorageError> {
        let ids: Vec<OutboxId> = ids.into_iter().collect();
        let outbox = &self.inner.outbox;
        let release = outbox
            .generations
            .confirmed(ids.iter().map(|id| id.generation()));
        // No write lock: nothing else writes these keys once they exist, and a deletion lost
        // in a crash only means the changes are sent (and applied, idempotently) again.
        let mut wb = self.inner.db.batch();
        for &i in &release.delete {
            wb.remove(outbox.keyspace(ids[i].generation()), ids[i].key);
        }
        // Left on disk when the deletion fails: sent again after a restart, and gone with
        // their generation's clear. The clears handed out go ahead either way.
        let deleted = if wb.is_empty() { Ok(()) } else { wb.commit() };
        let cleared = self.clear_outbox_generations(release.clear);
        deleted?;
        cleared
    }

    /// Clears `generations`, then retires the active one if it holds only confirmed records
    /// (and clears it too).
    fn clear_outbox_generations(&self, generations: Vec<usize>) -> Result<(), StorageError> {
        let outbox = &self.inner.outbox;
        let mut result = self.clear_confirmed_generations(generations);
        if outbox.generations.idle() {
            // Under the write lock: no batch is between staging a record in the active
            // generation and counting it.
            let retired = {
                let _guard = self
                    .inner
                    .write_lock
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                outbox.generations.retire_idle()
            };
            result = result.and(self.clear_confirmed_generations(retired));
        }
        result
    }

    /// Clears each of `generations`, all of whose records are confirmed.
    fn clear_confirmed_generations(
        &self,
        generations: impl IntoIterator<Item = usize>,
    ) -> Result<(), StorageError> {
        let outbox = &self.inner.outbox;
        let mut result = Ok(());
        for generation in generations {
            let cleared = outbox.keyspace(generation).clear();
            outbox.generations.cleared(generation, cleared.is_ok());
            if let Err(e) = cleared {
                tracing::warn!(generation, error = %e, "cannot clear confirmed outbox records");
                result = Err(e.into());
            }
        }
        result
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

    /// A record per batch, each of one put.
    fn records(s: &Storage, n: usize) -> Vec<super::OutboxRecord> {
        (0..n)
            .map(|i| {
                s.batch(|b| {
                    b.put(PutRequest::new(format!("k{i}"), "v"))?;
                    let changes = b.take_changes();
                    b.enqueue_outbox(nodes(&["node-b"]), changes)
                })
                .unwrap()
            })
            .collect()
    }

    #[test]
    fn confirmed_records_leave_the_disk_a_generation_at_a_time_and_reopening_resends_the_rest() {
        use super::super::outbox_generations::ROTATE_AFTER;
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = {
            let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
            let first = records(&s, ROTATE_AFTER);
            let second = records(&s, 3);
            assert!(
                second
                    .iter()
                    .all(|r| r.id.generation() != first[0].id.generation()),
                "a full generation hands over to the other"
            );
            // All but one of the first generation confirmed: still on disk, still in order.
            s.remove_outbox(first[1..].iter().map(|r| r.id)).unwrap();
            assert_eq!(s.outbox().unwrap().len(), ROTATE_AFTER + 3);
            assert_eq!(s.outbox().unwrap()[0], first[0]);
            s.flush().unwrap();
            (first, second)
        };
        // A restart (or a crash) sends again everything still on disk, oldest first: the
        // confirmed records of a generation not yet cleared come back as duplicates.
        let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let reopened = s.outbox().unwrap();
        assert_eq!(reopened.len(), ROTATE_AFTER + 3);
        assert_eq!(reopened[0].id, first[0].id);
        assert_eq!(reopened[ROTATE_AFTER..], second[..]);
        // Confirming the first generation clears it whole; the second, once confirmed and
        // idle, is retired and cleared too.
        s.remove_outbox(reopened[..ROTATE_AFTER].iter().map(|r| r.id))
            .unwrap();
        assert_eq!(s.outbox().unwrap(), second);
        s.remove_outbox(second.iter().map(|r| r.id)).unwrap();
        assert!(s.outbox().unwrap().is_empty());
        s.flush().unwrap();
        drop(s);
        let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        assert!(
            s.outbox().unwrap().is_empty(),
            "the clears outlive a restart"
        );
        // Writing goes on in whichever generation is empty.
        let after = records(&s, 2);
        assert_eq!(s.outbox().unwrap(), after);
    }

    #[test]
    fn a_record_found_undecodable_while_sending_is_still_counted_until_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let [bad, good] = records(&s, 2).try_into().unwrap();
        let keyspace = s.inner.outbox.keyspace(bad.id.generation());
        keyspace.insert(bad.id.key, b"not msgpack").unwrap();
        // A sender reads it back: moved aside, nothing to send; it then confirms it.
        assert_eq!(s.outbox_record(bad.id).unwrap(), None);
        s.remove_outbox([bad.id]).unwrap();
        assert_eq!(s.outbox().unwrap(), vec![good.clone()], "still owed");
        s.remove_outbox([good.id]).unwrap();
        assert!(s.outbox().unwrap().is_empty());
    }

    #[test]
    fn resending_counts_what_is_on_disk_afresh() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let written = records(&s, 3);
        s.remove_outbox([written[0].id]).unwrap();
        // A second sender of the same table starts: everything on disk is sent again,
        // the confirmed record included, and counted once.
        let mut queued = Vec::new();
        s.resend_outbox(|record| {
            queued.push(record.id);
            true
        })
        .unwrap();
        assert_eq!(queued.len(), 3);
        s.remove_outbox(queued[..2].iter().copied()).unwrap();
        assert_eq!(
            s.outbox().unwrap(),
            written,
            "not cleared while the third is owed"
        );
        s.remove_outbox([queued[2]]).unwrap();
        assert!(s.outbox().unwrap().is_empty());
        // Records owed to nobody are deleted as they are found.
        records(&s, 2);
        s.resend_outbox(|_| false).unwrap();
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
                s.inner.outbox.keyspace(0).insert(k, v).unwrap();
            }
            s.flush().unwrap();
        }
        let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let loaded = s.outbox().unwrap();
        assert_eq!(loaded.len(), 1);
        assert_eq!(loaded[0].destinations, nodes(&["node-b"]));
        assert_eq!(
            s.inner.outbox.keyspace(0).len().unwrap(),
            1,
            "the bad ones left the outbox"
        );
        let aside = s.inner.outbox_corrupt.get([1u8; 16]).unwrap().unwrap();
        assert_eq!(&aside[..], b"not msgpack", "kept unchanged");
        assert!(s.inner.outbox_corrupt.get(b"short").unwrap().is_some());
        assert_eq!(s.outbox().unwrap(), loaded);
        // Read back one by one, as senders do: moved aside the same way.
        s.inner
            .outbox
            .keyspace(0)
            .insert([2u8; 16], b"not msgpack")
            .unwrap();
        assert_eq!(
            s.outbox_record(super::OutboxId::new([2u8; 16], 0)).unwrap(),
            None
        );
        assert!(s.inner.outbox.keyspace(0).get([2u8; 16]).unwrap().is_none());
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
