//! Serving one request: from a decoded [`Request`] to the [`Response`] the node sends back.

use crate::frame::{Request, Response, WireError};
use crate::replication::ReplicationOutbox;
use crate::routing::Topology;
use crate::status::NodeStatus;
use crate::storage::{Batch, PAGE_BYTES, Storage, StorageError};

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
        Request::Put(r) => write(storage, outbox, |b| b.put(r)).map(Response::Put),
        Request::Remove(r) => write(storage, outbox, |b| b.remove(r)).map(Response::Removed),
        Request::AddItem(r) => write(storage, outbox, |b| b.add_item(r)).map(Response::ItemAdded),
        Request::RemoveItem(r) => {
            write(storage, outbox, |b| b.remove_item(r)).map(Response::ItemRemoved)
        }
        Request::Batch { ops } => write(storage, outbox, |b| {
            ops.into_iter()
                .map(|op| b.execute(op))
                .collect::<Result<Vec<_>, StorageError>>()
        })
        .map(Response::Batch),
    };
    result.map_err(|e| {
        if matches!(e, StorageError::Engine(_) | StorageError::Corrupt { .. }) {
            tracing::error!(error = %e, "request failed in storage");
        }
        WireError::from(e)
    })
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
    let Some(outbox) = outbox else {
        return storage.batch(f);
    };
    let (out, _) = storage.batch_then(
        |b| {
            let out = f(b)?;
            let staged = outbox.stage(b)?;
            Ok::<_, StorageError>((out, staged))
        },
        |(_, staged)| {
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
    use crate::storage::{GetRequest, Op, OpResult, PutRequest, StorageOptions};

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

    #[test]
    fn a_write_whose_fsync_failed_still_reaches_the_senders() {
        let dir = tempfile::tempdir().unwrap();
        let s = Storage::open(
            dir.path(),
            StorageOptions::default().durability(crate::storage::Durability::Fsync),
        )
        .unwrap();
        let t = std::sync::Arc::new(Topology::blocks(
            1,
            [("a", "a:1"), ("b", "b:1"), ("c", "c:1")].map(|(n, a)| (n.to_owned(), a.to_owned())),
        ));
        let outbox = ReplicationOutbox::open(s.clone(), "a", t.clone()).unwrap();
        s.fail_syncs(true);
        let err = execute_replicated(
            &s,
            &t,
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
