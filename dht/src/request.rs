//! Serving one request: from a decoded [`Request`] to the [`Response`] the node sends back.

use crate::frame::{Request, Response, WireError};
use crate::replication::ReplicationOutbox;
use crate::routing::Topology;
use crate::status::NodeStatus;
use crate::storage::{
    AddItemRequest, Batch, PAGE_BYTES, PutRequest, RemoveItemRequest, RemoveRequest, Storage,
    StorageError,
};

/// Runs a data request against `storage`, without replication. `Hello` and `Topology` are
/// answered from the node's own state, given here.
///
/// Engine failures are logged here and reach the client only as [`WireError::Internal`].
pub fn execute(
    storage: &Storage,
    topology: &Topology,
    request: Request,
) -> Result<Response, WireError> {
    execute_replicated(storage, topology, None, request)
}

/// [`execute`], staging every write's replication in `outbox` within the write's own batch.
pub fn execute_replicated(
    storage: &Storage,
    topology: &Topology,
    outbox: Option<&ReplicationOutbox>,
    request: Request,
) -> Result<Response, WireError> {
    if let Some(key) = request_keys(&request).find(|k| is_reserved(k)) {
        tracing::debug!(key = %String::from_utf8_lossy(key), "request for a reserved key refused");
        return Err(WireError::ReservedKey);
    }
    let result = match request {
        Request::Hello { .. } => Ok(Response::Hello {
            topology: topology.version,
        }),
        Request::Topology => Ok(Response::Topology(topology.clone())),
        Request::Dump { range } => storage.dump(range).map(Response::Dump),
        Request::Status => Ok(Response::Status(NodeStatus::of(topology, outbox))),
        Request::Digest { range } => storage.digest(range).map(Response::Digest),
        Request::RangePage {
            range,
            from,
            max_bytes,
        } => {
            let budget = max_bytes.map_or(PAGE_BYTES, |m| PAGE_BYTES.min(m as usize));
            (storage.range_page_within(range, from.as_ref(), budget)).map(Response::RangePage)
        }
        Request::MergePage { range, page } => {
            // A bad page is the sender's mistake, not this node's storage failing.
            if let Err(e) = page.check(range) {
                let message = match e {
                    StorageError::Corrupt { detail, .. } => detail,
                    other => other.to_string(),
                };
                return Err(WireError::Malformed { message });
            }
            storage.merge_range_page(&page).map(Response::Merged)
        }
        Request::Get(r) => storage.get(&r.key).map(Response::Siblings),
        Request::GetItems(r) => storage.get_items(&r.key).map(Response::Items),
        Request::Put(r) => write_key(storage, outbox, KeyWrite::Put(r)),
        Request::Remove(r) => write_key(storage, outbox, KeyWrite::Remove(r)),
        Request::AddItem(r) => write_key(storage, outbox, KeyWrite::AddItem(r)),
        Request::RemoveItem(r) => write_key(storage, outbox, KeyWrite::RemoveItem(r)),
        Request::Batch { ops } => write(storage, outbox, |b| {
            ops.into_iter()
                .map(|op| b.execute(op))
                .collect::<Result<Vec<_>, StorageError>>()
        })
        .map(Response::Batch),
    };
    result.map_err(wire_error)
}

/// A storage error as the client is told it; engine failures are logged here, where the
/// client only learns of them as [`WireError::Internal`].
fn wire_error(e: StorageError) -> WireError {
    if matches!(e, StorageError::Engine(_) | StorageError::Corrupt { .. }) {
        tracing::error!(error = %e, "request failed in storage");
    }
    WireError::from(e)
}

/// A write of one key that is not reserved: the requests a node serves in groups
/// ([`execute_writes`]). Made with [`KeyWrite::of`], which refuses reserved keys.
#[derive(Debug, Clone)]
pub(crate) enum KeyWrite {
    /// [`Request::Put`].
    Put(PutRequest),
    /// [`Request::Remove`].
    Remove(RemoveRequest),
    /// [`Request::AddItem`].
    AddItem(AddItemRequest),
    /// [`Request::RemoveItem`].
    RemoveItem(RemoveItemRequest),
}

impl KeyWrite {
    /// `request` as a write of one key, or `request` back when it is anything else or its key
    /// is reserved (served alone, it is refused).
    pub(crate) fn of(request: Request) -> Result<Self, Request> {
        let write = match request {
            Request::Put(r) => Self::Put(r),
            Request::Remove(r) => Self::Remove(r),
            Request::AddItem(r) => Self::AddItem(r),
            Request::RemoveItem(r) => Self::RemoveItem(r),
            other => return Err(other),
        };
        if is_reserved(write.key()) {
            return Err(write.into());
        }
        Ok(write)
    }

    fn key(&self) -> &[u8] {
        match self {
            Self::Put(r) => &r.key,
            Self::Remove(r) => &r.key,
            Self::AddItem(r) => &r.key,
            Self::RemoveItem(r) => &r.key,
        }
    }

    fn apply(self, b: &mut Batch<'_>) -> Result<Response, StorageError> {
        match self {
            Self::Put(r) => b.put(r).map(Response::Put),
            Self::Remove(r) => b.remove(r).map(Response::Removed),
            Self::AddItem(r) => b.add_item(r).map(Response::ItemAdded),
            Self::RemoveItem(r) => b.remove_item(r).map(Response::ItemRemoved),
        }
    }
}

impl From<KeyWrite> for Request {
    fn from(write: KeyWrite) -> Self {
        match write {
            KeyWrite::Put(r) => Self::Put(r),
            KeyWrite::Remove(r) => Self::Remove(r),
            KeyWrite::AddItem(r) => Self::AddItem(r),
            KeyWrite::RemoveItem(r) => Self::RemoveItem(r),
        }
    }
}

/// Serves `writes`, consecutive requests of one connection, as one storage batch with one
/// outbox record: one commit, one journal write and one turn at the write lock for all of
/// them, where each would take its own. Each is answered as if served alone, in order, each
/// seeing the ones before it: when any of them fails before the commit, the batch is dropped
/// (nothing of it reaches the disk) and each is served again on its own, so that only the
/// failing ones fail.
///
/// The writes commit together, so a crash keeps all or none of them: none was acknowledged
/// before the commit, and a client retries what was not. A sync that fails after the commit
/// ([`Durability::Fsync`](crate::storage::Durability::Fsync)) fails every one of them, as it
/// would fail each alone: they are written, but not known to be durable.
pub(crate) fn execute_writes(
    storage: &Storage,
    outbox: Option<&ReplicationOutbox>,
    writes: Vec<KeyWrite>,
) -> Vec<Result<Response, WireError>> {
    if writes.len() > 1 {
        let mut committed = false;
        let grouped = write_noting_commit(storage, outbox, &mut committed, |b| {
            (writes.iter().cloned())
                .map(|w| w.apply(b))
                .collect::<Result<Vec<_>, _>>()
        });
        match grouped {
            Ok(responses) => return responses.into_iter().map(Ok).collect(),
            Err(e) if committed => {
                let e = wire_error(e);
                return writes.iter().map(|_| Err(e.clone())).collect();
            }
            // Whatever failed (a write's own refusal, or the storage before the commit),
            // serving each alone tells each its own answer.
            Err(_) => {}
        }
    }
    (writes.into_iter())
        .map(|w| write_key(storage, outbox, w).map_err(wire_error))
        .collect()
}

/// Serves one write of one key in a batch of its own.
fn write_key(
    storage: &Storage,
    outbox: Option<&ReplicationOutbox>,
    key_write: KeyWrite,
) -> Result<Response, StorageError> {
    write(storage, outbox, |b| key_write.apply(b))
}

/// Whether serving `request` takes the storage's write lock: every write, and every batch,
/// whose reads and writes share one consistent view.
pub fn takes_write_lock(request: &Request) -> bool {
    request.is_write() || matches!(request, Request::Batch { .. })
}

/// Whether `key` is reserved for the node's own records (a leading zero byte, as
/// [`TOPOLOGY_KEY`](crate::cluster::TOPOLOGY_KEY)): clients that could write those could
/// replace the topology every node loads at start-up.
pub fn is_reserved(key: &[u8]) -> bool {
    key.first() == Some(&0)
}

/// Every key a request touches.
fn request_keys(request: &Request) -> Box<dyn Iterator<Item = &[u8]> + '_> {
    match request {
        Request::Hello { .. }
        | Request::Topology
        | Request::Dump { .. }
        | Request::Status
        | Request::Digest { .. }
        | Request::RangePage { .. }
        | Request::MergePage { .. } => Box::new(std::iter::empty()),
        Request::Get(r) | Request::GetItems(r) => Box::new(std::iter::once(&r.key[..])),
        Request::Put(r) => Box::new(std::iter::once(&r.key[..])),
        Request::Remove(r) => Box::new(std::iter::once(&r.key[..])),
        Request::AddItem(r) => Box::new(std::iter::once(&r.key[..])),
        Request::RemoveItem(r) => Box::new(std::iter::once(&r.key[..])),
        Request::Batch { ops } => Box::new(ops.iter().map(|op| &op.key()[..])),
    }
}

/// Runs `f` in one batch together with the outbox records of what it changed, and queues the
/// records for sending as soon as the batch committed.
///
/// Queued before waiting for durability, not after: when the fsync fails the write is visible
/// all the same (and the client told it may or may not have happened), so its replication must
/// go out too, not sit on disk until the next start.
fn write<T>(
    storage: &Storage,
    outbox: Option<&ReplicationOutbox>,
    f: impl FnOnce(&mut Batch<'_>) -> Result<T, StorageError>,
) -> Result<T, StorageError> {
    write_noting_commit(storage, outbox, &mut false, f)
}

/// [`write`], setting `committed` once the batch committed: an error after that is the sync's.
fn write_noting_commit<T>(
    storage: &Storage,
    outbox: Option<&ReplicationOutbox>,
    committed: &mut bool,
    f: impl FnOnce(&mut Batch<'_>) -> Result<T, StorageError>,
) -> Result<T, StorageError> {
    let Some(outbox) = outbox else {
        return storage.batch_then(f, |_| *committed = true);
    };
    let (out, _) = storage.batch_then(
        |b| {
            let out = f(b)?;
            let staged = outbox.stage(b)?;
            Ok::<_, StorageError>((out, staged))
        },
        |(_, staged)| {
            *committed = true;
            if let Some(staged) = staged.take() {
                outbox.committed(staged);
            }
        },
    )?;
    Ok(out)
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Durability, GetRequest, Op, OpResult, StorageOptions};
    use bytes::Bytes;
    use proptest::prelude::*;

    #[test]
    fn batches_and_conflicts_map_to_responses() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let t = Topology::single("n:1");
        let r = execute(
            &s,
            &t,
            Request::Batch {
                ops: vec![
                    Op::Put(PutRequest::new("a", "1")),
                    Op::Get(GetRequest::new("a")),
                ],
            },
        )
        .unwrap();
        let Response::Batch(results) = r else {
            panic!("expected a batch response, got {r:?}")
        };
        assert!(matches!(&results[1], OpResult::Siblings(s) if s.len() == 1));
        let err = execute(
            &s,
            &t,
            Request::Put(PutRequest::new("a", "2").optimistic(true)),
        )
        .unwrap_err();
        assert!(matches!(err, WireError::Conflict(c) if c.current.len() == 1));
        let big = execute(&s, &t, Request::Get(GetRequest::new(vec![b'k'; 70_000]))).unwrap_err();
        assert!(matches!(big, WireError::KeyTooLarge { len: 70_000, .. }));
        let huge = PutRequest::new("k", vec![0u8; crate::storage::MAX_VALUE_LEN + 1]);
        let err = execute(&s, &t, Request::Put(huge)).unwrap_err();
        assert!(matches!(err, WireError::ValueTooLarge { .. }));
    }

    #[test]
    fn reserved_keys_are_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let t = Topology::single("n:1");
        let topology_key = crate::cluster::TOPOLOGY_KEY;
        crate::cluster::store_topology(&s, &t).unwrap();
        let before = s.get(topology_key).unwrap();
        for request in [
            Request::Put(PutRequest::new(topology_key, "forged")),
            Request::Get(GetRequest::new(topology_key)),
            Request::Put(PutRequest::new(&b"\0other"[..], "x")),
            Request::Batch {
                ops: vec![
                    Op::Put(PutRequest::new("fine", "1")),
                    Op::Put(PutRequest::new(topology_key, "forged")),
                ],
            },
        ] {
            let err = execute(&s, &t, request.clone()).unwrap_err();
            assert!(
                matches!(err, WireError::ReservedKey),
                "{request:?}: {err:?}"
            );
        }
        assert_eq!(s.get(topology_key).unwrap(), before);
        assert!(
            s.get(b"fine").unwrap().is_empty(),
            "the batch is refused whole"
        );
        assert!(s.get(b"\0other").unwrap().is_empty());
        // Keys with a zero byte elsewhere are ordinary keys.
        execute(&s, &t, Request::Put(PutRequest::new(&b"a\0b"[..], "x"))).unwrap();
    }

    /// A cluster of three: each node holds a replica of every range.
    fn three_nodes() -> std::sync::Arc<Topology> {
        std::sync::Arc::new(Topology::blocks(
            1,
            [("a", "a:1"), ("b", "b:1"), ("c", "c:1")].map(|(n, a)| (n.to_owned(), a.to_owned())),
        ))
    }

    /// A storage with the outbox of node `a` of [`three_nodes`].
    fn replicating(durability: Durability) -> (tempfile::TempDir, Storage, ReplicationOutbox) {
        let dir = tempfile::tempdir().unwrap();
        let s =
            Storage::open(dir.path(), StorageOptions::default().durability(durability)).unwrap();
        let outbox = ReplicationOutbox::open(s.clone(), "a", three_nodes()).unwrap();
        (dir, s, outbox)
    }

    fn put(key: &str) -> KeyWrite {
        KeyWrite::Put(PutRequest::new(key.to_owned(), "v"))
    }

    #[test]
    fn writes_served_together_commit_as_one_batch_with_one_outbox_record() {
        let (_d, s, outbox) = replicating(Durability::Buffered);
        s.put(PutRequest::new("gone", "v")).unwrap();
        let results = execute_writes(
            &s,
            Some(&outbox),
            vec![
                put("a"),
                put("b"),
                KeyWrite::AddItem(AddItemRequest::new("list", "i")),
                KeyWrite::Remove(RemoveRequest::new(
                    "gone",
                    [s.get(b"gone").unwrap()[0].version],
                )),
            ],
        );
        assert!(
            matches!(
                &results[..],
                [
                    Ok(Response::Put(_)),
                    Ok(Response::Put(_)),
                    Ok(Response::ItemAdded(_)),
                    Ok(Response::Removed(r)),
                ] if r.removed.len() == 1
            ),
            "{results:?}"
        );
        assert_eq!(s.get(b"a").unwrap().len(), 1);
        assert_eq!(s.get(b"b").unwrap().len(), 1);
        assert_eq!(s.get_items(b"list").unwrap().len(), 1);
        assert!(s.get(b"gone").unwrap().is_empty());
        let records = s.outbox().unwrap();
        assert_eq!(records.len(), 1, "one record for the four writes");
        assert_eq!(records[0].changes.len(), 4);
        assert_eq!(outbox.pending(), 8, "the four writes, for each of b and c");
    }

    /// One write of a generated sequence: parents, when named, are the key's versions as the
    /// group it is served in begins.
    #[derive(Debug, Clone)]
    enum Step {
        Put {
            key: u8,
            parents: bool,
            optimistic: bool,
            key_too_large: bool,
        },
        Remove {
            key: u8,
            parents: bool,
            optimistic: bool,
        },
        AddItem {
            key: u8,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        let key = 0u8..3;
        prop_oneof![
            4 => (key.clone(), any::<bool>(), any::<bool>(), prop::bool::weighted(0.1)).prop_map(
                |(key, parents, optimistic, key_too_large)| Step::Put {
                    key,
                    parents,
                    optimistic,
                    key_too_large
                }
            ),
            2 => (key.clone(), any::<bool>(), any::<bool>()).prop_map(|(key, parents, optimistic)| {
                Step::Remove {
                    key,
                    parents,
                    optimistic,
                }
            }),
            1 => key.prop_map(|key| Step::AddItem { key }),
        ]
    }

    impl Step {
        fn write(&self, s: &Storage) -> KeyWrite {
            let current = |key: u8, named: bool| -> Vec<_> {
                let siblings = if named {
                    s.get(&[key]).unwrap()
                } else {
                    vec![]
                };
                siblings.into_iter().map(|v| v.version).collect()
            };
            match *self {
                Step::Put {
                    key,
                    parents,
                    optimistic,
                    key_too_large,
                } => {
                    let k = if key_too_large {
                        vec![key; 70_000]
                    } else {
                        vec![key]
                    };
                    let put = PutRequest::new(k, vec![key]).parents(current(key, parents));
                    KeyWrite::Put(put.optimistic(optimistic))
                }
                Step::Remove {
                    key,
                    parents,
                    optimistic,
                } => KeyWrite::Remove(RemoveRequest {
                    optimistic,
                    ..RemoveRequest::new(vec![key], current(key, parents))
                }),
                Step::AddItem { key } => KeyWrite::AddItem(AddItemRequest::new(vec![key], "i")),
            }
        }
    }

    /// What an answer says, without the ids a run draws at random.
    fn shape(answer: &Result<Response, WireError>) -> String {
        match answer {
            Ok(Response::Put(o)) => format!("put, superseding {}", o.superseded.len()),
            Ok(Response::Removed(o)) => format!("removed {}", o.removed.len()),
            Ok(Response::ItemAdded(_)) => "item added".into(),
            Err(WireError::Conflict(c)) => {
                format!(
                    "conflict: {} named, {} current",
                    c.parents.len(),
                    c.current.len()
                )
            }
            other => format!("{other:?}"),
        }
    }

    /// Each key's values and list length.
    fn contents(s: &Storage) -> Vec<(Vec<Bytes>, usize)> {
        (0u8..3)
            .map(|k| {
                let mut values: Vec<_> =
                    s.get(&[k]).unwrap().into_iter().map(|v| v.value).collect();
                values.sort();
                (values, s.get_items(&[k]).unwrap().len())
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Writes served in groups get the answers, and leave the contents, that the same
        /// writes served one by one do.
        #[test]
        fn writes_served_in_groups_do_what_they_do_one_by_one(
            steps in prop::collection::vec(step(), 1..24),
            cuts in prop::collection::vec(1usize..6, 24),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let open = |name: &str| Storage::open(dir.path().join(name), StorageOptions::default()).unwrap();
            let (grouped, alone) = (open("grouped"), open("alone"));
            let (mut grouped_answers, mut alone_answers) = (Vec::new(), Vec::new());
            let mut rest = &steps[..];
            for &cut in &cuts {
                if rest.is_empty() {
                    break;
                }
                let (group, after) = rest.split_at(cut.min(rest.len()));
                rest = after;
                let writes = group.iter().map(|w| w.write(&grouped)).collect();
                grouped_answers.extend(execute_writes(&grouped, None, writes));
                let writes: Vec<_> = group.iter().map(|w| w.write(&alone)).collect();
                for w in writes {
                    alone_answers.extend(execute_writes(&alone, None, vec![w]));
                }
            }
            let shapes = |answers: &[Result<Response, WireError>]| answers.iter().map(shape).collect::<Vec<_>>();
            prop_assert_eq!(shapes(&grouped_answers), shapes(&alone_answers));
            prop_assert_eq!(contents(&grouped), contents(&alone));
        }
    }

    /// After a restart, the writes owed are counted again from the records left on disk,
    /// however many writes each holds.
    #[test]
    fn the_writes_owed_are_counted_again_after_a_restart() {
        let (_d, s, outbox) = replicating(Durability::Buffered);
        execute_writes(&s, Some(&outbox), vec![put("a"), put("b"), put("c")]);
        let batch = Request::Batch {
            ops: vec![
                Op::Put(PutRequest::new("d", "v")),
                Op::Put(PutRequest::new("e", "v")),
            ],
        };
        execute_replicated(&s, &three_nodes(), Some(&outbox), batch).unwrap();
        assert_eq!(s.outbox().unwrap().len(), 2);
        assert_eq!(outbox.pending(), 10);
        let reopened = ReplicationOutbox::open(s.clone(), "a", three_nodes()).unwrap();
        assert_eq!(reopened.pending(), 10, "five writes, for each of b and c");
        let by_destination = reopened.pending_by_destination();
        assert_eq!(by_destination, [("b".to_owned(), 5), ("c".to_owned(), 5)]);
    }

    /// Each write is answered as it would be alone, seeing the writes before it; only the
    /// failing ones fail.
    #[test]
    fn a_write_that_fails_in_a_group_fails_alone() {
        let (_d, s, outbox) = replicating(Durability::Buffered);
        let results = execute_writes(
            &s,
            Some(&outbox),
            vec![
                put("a"),
                put("b"),
                // "b" has a version now, written just before in the same group.
                KeyWrite::Put(PutRequest::new("b", "again").optimistic(true)),
                KeyWrite::Put(PutRequest::new(vec![b'k'; 70_000], "v")),
                put("c"),
            ],
        );
        assert!(
            matches!(
                &results[..],
                [
                    Ok(Response::Put(_)),
                    Ok(Response::Put(_)),
                    Err(WireError::Conflict(c)),
                    Err(WireError::KeyTooLarge { len: 70_000, .. }),
                    Ok(Response::Put(_)),
                ] if c.current.len() == 1
            ),
            "{results:?}"
        );
        for key in ["a", "b", "c"] {
            let siblings = s.get(key.as_bytes()).unwrap();
            assert_eq!(siblings.len(), 1, "{key}: written once, not twice");
            assert_eq!(siblings[0].value, "v");
        }
        // Served again one by one: a record each for the three that went in.
        assert_eq!(s.outbox().unwrap().len(), 3);
        assert_eq!(outbox.pending(), 6);
    }

    /// A sync that fails after the group committed fails every write of it, as it would each
    /// alone; they are not served again (which would write each twice).
    #[test]
    fn a_failed_sync_fails_the_whole_group_without_writing_it_twice() {
        let (_d, s, outbox) = replicating(Durability::Fsync);
        s.fail_syncs(true);
        let results = execute_writes(&s, Some(&outbox), vec![put("a"), put("b")]);
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(WireError::Internal { .. }))),
            "{results:?}"
        );
        assert_eq!(s.get(b"a").unwrap().len(), 1);
        assert_eq!(s.get(b"b").unwrap().len(), 1);
        assert_eq!(s.outbox().unwrap().len(), 1);
        assert_eq!(outbox.pending(), 4, "both writes, for each of b and c");
    }

    #[test]
    fn a_write_of_a_reserved_key_is_served_alone_and_refused() {
        let reserved = Request::Put(PutRequest::new(crate::cluster::TOPOLOGY_KEY, "forged"));
        assert!(KeyWrite::of(reserved.clone()).is_err());
        assert!(KeyWrite::of(Request::Get(GetRequest::new("k"))).is_err());
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let err = execute(&s, &Topology::single("n:1"), reserved).unwrap_err();
        assert!(matches!(err, WireError::ReservedKey));
    }

    #[test]
    fn a_write_whose_fsync_failed_still_reaches_the_senders() {
        let (_d, s, outbox) = replicating(Durability::Fsync);
        s.fail_syncs(true);
        let err = execute_replicated(
            &s,
            &Topology::single("a:1"),
            Some(&outbox),
            Request::Put(PutRequest::new("k", "v")),
        )
        .unwrap_err();
        assert!(matches!(err, WireError::Internal { .. }), "{err:?}");
        // Committed, so visible: its replication must be queued for b and c, not only on disk.
        assert_eq!(s.get(b"k").unwrap().len(), 1);
        assert_eq!(s.outbox().unwrap().len(), 1);
        assert_eq!(outbox.pending(), 2);
    }
}
