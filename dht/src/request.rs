//! Serving one request: from a decoded [`Request`] to the [`Response`] the node sends back.

use crate::frame::{Request, Response, WireError};
use crate::replication::ReplicationOutbox;
use crate::routing::Topology;
use crate::storage::{Batch, Storage, StorageError};

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
    let result = match request {
        Request::Hello { .. } => Ok(Response::Hello {
            topology: topology.version,
        }),
        Request::Topology => Ok(Response::Topology(topology.clone())),
        Request::Dump { range } => storage.dump(range).map(Response::Dump),
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

/// Runs `f` in one batch together with the outbox records of what it changed, and queues the
/// records for sending once the batch committed.
fn write<T>(
    storage: &Storage,
    outbox: Option<&ReplicationOutbox>,
    f: impl FnOnce(&mut Batch<'_>) -> Result<T, StorageError>,
) -> Result<T, StorageError> {
    let Some(outbox) = outbox else {
        return storage.batch(f);
    };
    let (out, staged) = storage.batch(|b| {
        let out = f(b)?;
        let staged = outbox.stage(b)?;
        Ok::<_, StorageError>((out, staged))
    })?;
    if let Some(staged) = staged {
        outbox.committed(staged);
    }
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
        let big = execute(&s, &t, Request::Get(GetRequest::new(vec![0u8; 70_000]))).unwrap_err();
        assert!(matches!(big, WireError::KeyTooLarge { len: 70_000, .. }));
        let huge = PutRequest::new("k", vec![0u8; crate::storage::MAX_VALUE_LEN + 1]);
        let err = execute(&s, &t, Request::Put(huge)).unwrap_err();
        assert!(matches!(err, WireError::ValueTooLarge { .. }));
    }
}
