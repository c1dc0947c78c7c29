//! Applying replicated changes.

use super::message::Replicate;
use crate::storage::{Change, ChangeRef, Storage, StorageError, WriteTurn};

/// Applies `changes` (made on another replica) in one atomic batch and returns how many
/// wrote anything. Applying the same changes again, or in another order, or interleaved with
/// other replicas' changes, leaves the same state: see [`Batch::apply_change`](crate::Batch::apply_change).
pub fn apply(storage: &Storage, changes: &[Change]) -> Result<usize, StorageError> {
    apply_refs(storage, changes.iter().map(ChangeRef::from))
}

/// How many changes of a replication message a replica applies in one batch, in one write
/// turn: a client's write to the replica waits for the batch under way (and whatever else
/// queued for the turn before it), not for a whole message of up to
/// [`MAX_CHANGES_PER_MESSAGE`](super::outbox::MAX_CHANGES_PER_MESSAGE). A profile of
/// `bench dht-put-replicated` put a replica's apply at 2.5–3 µs per new key: about 1.3 ms per
/// batch.
pub const APPLY_BATCH: usize = 500;

/// [`apply`] of every change a replication message carries, borrowed from it, in batches of
/// [`APPLY_BATCH`] changes, passing `turn` between them. Applying a message is therefore not
/// atomic, and need not be: a message applied in part, then again in whole (redelivered after
/// a crash), leaves what applying it once does.
pub fn apply_message(
    storage: &Storage,
    message: &Replicate,
    turn: &mut WriteTurn,
) -> Result<usize, StorageError> {
    let mut changes = message.change_refs()?.into_iter().peekable();
    let mut changed = apply_refs(storage, changes.by_ref().take(APPLY_BATCH))?;
    while changes.peek().is_some() {
        turn.pass();
        changed += apply_refs(storage, changes.by_ref().take(APPLY_BATCH))?;
    }
    Ok(changed)
}

fn apply_refs<'a>(
    storage: &Storage,
    changes: impl IntoIterator<Item = ChangeRef<'a>>,
) -> Result<usize, StorageError> {
    storage.batch(|b| {
        let mut changed = 0;
        for c in changes {
            changed += usize::from(b.apply_change_ref(c)?);
        }
        Ok(changed)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::RangeId;
    use crate::storage::{
        AddItemRequest, KeyDump, PutRequest, RemoveItemRequest, RemoveRequest, StorageOptions,
    };
    use proptest::prelude::*;

    /// One client operation against the origin; indexes pick among keys and earlier results.
    #[derive(Debug, Clone)]
    enum Step {
        Put { key: u8, parents: Vec<usize> },
        Remove { key: u8, parents: Vec<usize> },
        AddItem { key: u8 },
        RemoveItem { item: usize },
    }

    fn step() -> impl Strategy<Value = Step> {
        let key = 0u8..4;
        let picks = prop::collection::vec(any::<usize>(), 0..3);
        prop_oneof![
            4 => (key.clone(), picks.clone()).prop_map(|(key, parents)| Step::Put { key, parents }),
            2 => (key.clone(), picks).prop_map(|(key, parents)| Step::Remove { key, parents }),
            1 => key.prop_map(|key| Step::AddItem { key }),
            1 => any::<usize>().prop_map(|item| Step::RemoveItem { item }),
        ]
    }

    fn open() -> (tempfile::TempDir, Storage) {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        (dir, s)
    }

    fn dump_all(s: &Storage, ranges: &[RangeId]) -> Vec<KeyDump> {
        ranges.iter().flat_map(|r| s.dump(*r).unwrap()).collect()
    }

    /// Runs `steps` on two origins (two replicas accepting writes concurrently, as under
    /// failover) and returns every batch of changes they would replicate.
    fn replication_messages(steps: &[(bool, Step)]) -> (Vec<Vec<Change>>, Vec<RangeId>) {
        let origins = [open(), open()];
        let mut versions = Vec::new();
        let mut items = Vec::new();
        let mut messages = Vec::new();
        let mut ranges = Vec::new();
        for (second, step) in steps {
            let s = &origins[usize::from(*second)].1;
            let known = versions.clone();
            let pick = |picks: &[usize]| -> Vec<_> {
                if known.is_empty() {
                    return Vec::new();
                }
                picks.iter().map(|i| known[i % known.len()]).collect()
            };
            let changes = s
                .batch(|b| {
                    match step {
                        Step::Put { key, parents } => {
                            let p = pick(parents);
                            let out = b.put(PutRequest::new(vec![*key], vec![*key]).parents(p))?;
                            versions.push(out.version);
                        }
                        Step::Remove { key, parents } => {
                            b.remove(RemoveRequest::new(vec![*key], pick(parents)))?;
                        }
                        Step::AddItem { key } => {
                            items.push((*key, b.add_item(AddItemRequest::new(vec![*key], "i"))?));
                        }
                        Step::RemoveItem { item } if !items.is_empty() => {
                            let (key, id) = items[item % items.len()];
                            b.remove_item(RemoveItemRequest {
                                key: vec![key].into(),
                                id,
                            })?;
                        }
                        Step::RemoveItem { .. } => {}
                    }
                    Ok::<_, StorageError>(b.changes().to_vec())
                })
                .unwrap();
            if !changes.is_empty() {
                messages.push(changes);
            }
        }
        for k in 0u8..4 {
            ranges.push(RangeId::of(&[k]));
        }
        ranges.sort();
        ranges.dedup();
        (messages, ranges)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Two replicas that receive the same replication messages, each duplicated and in its
        /// own order, end with identical contents.
        #[test]
        fn duplicated_reordered_delivery_converges(
            steps in prop::collection::vec((any::<bool>(), step()), 1..40),
            dups_a in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
            dups_b in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
            keys_a in prop::collection::vec(any::<u32>(), 80),
            keys_b in prop::collection::vec(any::<u32>(), 80),
        ) {
            let (messages, ranges) = replication_messages(&steps);
            let n = messages.len();
            // Every message at least once plus the chosen duplicates, in an order given by
            // random sort keys.
            let deliver = |dups: &[prop::sample::Index], keys: &[u32]| {
                let mut sequence: Vec<(u32, usize)> = (0..n)
                    .chain(dups.iter().filter(|_| n > 0).map(|i| i.index(n)))
                    .enumerate()
                    .map(|(j, m)| (keys[j % keys.len()], m))
                    .collect();
                sequence.sort();
                let (dir, s) = open();
                for (_, m) in sequence {
                    apply(&s, &messages[m]).unwrap();
                }
                (dir, s)
            };
            let (_a_dir, a) = deliver(&dups_a, &keys_a);
            let (_b_dir, b) = deliver(&dups_b, &keys_b);
            prop_assert_eq!(dump_all(&a, &ranges), dump_all(&b, &ranges));
        }
    }

    /// A message of several batches is applied whole, and applying it again after only its
    /// first batch went in leaves what applying it once does.
    #[tokio::test]
    async fn a_message_of_several_batches_is_applied_whole() {
        let (_d, replica) = open();
        let n = 2 * APPLY_BATCH + 1;
        let message = Replicate {
            from: "n1".into(),
            changes: (0..n)
                .map(|i| Change::Put {
                    key: format!("k{i}").into(),
                    version: crate::Version::new(),
                    parents: vec![],
                    value: "v".into(),
                    expires_at: None,
                })
                .collect(),
            packed: Default::default(),
        };
        let whole = message.clone();
        let applied = replica
            .long_write_in_turns(move |s, turn| apply_message(s, &whole, turn))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(applied, n);
        for i in 0..n {
            assert_eq!(replica.get(format!("k{i}").as_bytes()).unwrap().len(), 1);
        }
        // Cut short after its first batch (a crash), then delivered again whole: as once.
        let (_e, again) = open();
        apply(&again, &message.changes[..APPLY_BATCH]).unwrap();
        let whole = message.clone();
        (again.long_write_in_turns(move |s, turn| apply_message(s, &whole, turn)))
            .await
            .unwrap()
            .unwrap();
        let ranges: Vec<RangeId> = (message.changes.iter())
            .map(|c| RangeId::of(c.key()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(dump_all(&again, &ranges), dump_all(&replica, &ranges));
    }

    #[test]
    fn applying_twice_leaves_what_applying_once_did() {
        let (_d, origin) = open();
        let changes = origin
            .batch(|b| {
                let in_an_hour =
                    std::time::SystemTime::now() + std::time::Duration::from_secs(3600);
                b.put(PutRequest {
                    expires_at: Some(in_an_hour),
                    ..PutRequest::new("k", "v")
                })?;
                b.add_item(AddItemRequest::new("list", "i"))?;
                Ok::<_, StorageError>(b.changes().to_vec())
            })
            .unwrap();
        let (_r, replica) = open();
        assert_eq!(apply(&replica, &changes).unwrap(), 2);
        let once = dump_all(&replica, &[RangeId::of(b"k"), RangeId::of(b"list")]);
        apply(&replica, &changes).unwrap();
        let twice = dump_all(&replica, &[RangeId::of(b"k"), RangeId::of(b"list")]);
        assert_eq!(once, twice);
        assert_eq!(replica.get(b"k").unwrap(), origin.get(b"k").unwrap());
        assert_eq!(replica.get_items(b"list").unwrap().len(), 1);
    }
}
