//! [`ReplicationOutbox`]: what this node still owes the other replicas, durable until the
//! broker confirmed it.
//!
//! A write stages one outbox record, listing every destination, in its own storage batch
//! ([`ReplicationOutbox::stage`]), so the write and the promise to replicate it commit together.
//! After the commit the record's changes go to an in-memory queue per destination
//! ([`ReplicationOutbox::committed`]); one sender per destination takes everything queued (up
//! to [`MAX_CHANGES_PER_MESSAGE`] changes and [`MAX_BYTES_PER_MESSAGE`] bytes, a big record
//! split over several messages) and sends it as one [`Replicate`] message. When `Bus::send`
//! returned (the broker confirmed) for the last destination of a record, the record is deleted,
//! in one storage batch with the others that message completed. A crash in between leaves the
//! records on disk; they are loaded and sent again, to every destination they list, at
//! start-up. Sends that fail are retried every [`RETRY_INTERVAL`].

use super::message::Replicate;
use crate::cluster::queue_name;
use crate::routing::{RangeId, Topology};
use crate::shutdown::Shutdown;
use crate::storage::{Batch, Change, OutboxRecord, Storage, StorageError};
use rhinobus::Bus;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;

/// The most changes one [`Replicate`] message carries.
pub const MAX_CHANGES_PER_MESSAGE: usize = 500;
/// The most bytes of keys and values (plus a per-change allowance, see [`change_size`]) one
/// [`Replicate`] message carries, unless a single change is larger: a message always carries
/// at least one. Well under RabbitMQ's default maximum message size (128 MiB), so a run of
/// 16 MiB values never makes a message the broker refuses again and again.
pub const MAX_BYTES_PER_MESSAGE: usize = 8 * 1024 * 1024;
/// How long a sender waits before it tries again after a failed send.
pub const RETRY_INTERVAL: Duration = Duration::from_millis(500);

/// The replication outbox of one node. Cheap to clone.
#[derive(Clone)]
pub struct ReplicationOutbox {
    inner: Arc<Inner>,
}

struct Inner {
    storage: Storage,
    node: String,
    topology: Arc<Topology>,
    destinations: HashMap<String, Destination>,
}

#[derive(Default)]
struct Destination {
    pending: Mutex<VecDeque<Pending>>,
    wake: Notify,
}

/// About how many bytes `change` takes in a [`Replicate`] message: its key and value, 32 per
/// version it names (16 bytes and their MessagePack framing, generously), and 128 for field
/// names and the rest.
pub fn change_size(change: &Change) -> usize {
    const PER_VERSION: usize = 32;
    const OVERHEAD: usize = 128;
    OVERHEAD
        + match change {
            Change::Put {
                key,
                value,
                parents,
                ..
            } => key.len() + value.len() + PER_VERSION * (parents.len() + 1),
            Change::Remove { key, parents } => key.len() + PER_VERSION * parents.len(),
            Change::AddItem { key, value, .. } => key.len() + value.len() + PER_VERSION,
            Change::RemoveItem { key, .. } => key.len() + PER_VERSION,
        }
}

/// A record's changes for one destination.
struct Pending {
    changes: Vec<Change>,
    delivery: Arc<Delivery>,
}

/// One stored record and how many of its destinations still wait for it. Which ones have it
/// is known only here: after a crash, all of them get it again.
struct Delivery {
    /// The record, without its changes (they sit in each destination's [`Pending`]).
    record: OutboxRecord,
    remaining: AtomicUsize,
}

/// A write's replication, staged in its batch; hand it to
/// [`committed`](ReplicationOutbox::committed) once the batch committed.
#[derive(Debug)]
pub struct Staged {
    record: OutboxRecord,
    routes: BTreeMap<String, Vec<Change>>,
}

impl std::fmt::Debug for ReplicationOutbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationOutbox")
            .field("node", &self.inner.node)
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

impl ReplicationOutbox {
    /// The outbox of node `node` in `topology`, with the records `storage` still holds from
    /// earlier runs queued for sending.
    pub fn open(
        storage: Storage,
        node: &str,
        topology: Arc<Topology>,
    ) -> Result<Self, StorageError> {
        let destinations = topology
            .names
            .iter()
            .filter(|n| *n != node)
            .map(|n| (n.clone(), Destination::default()))
            .collect();
        let outbox = Self {
            inner: Arc::new(Inner {
                storage: storage.clone(),
                node: node.to_owned(),
                topology,
                destinations,
            }),
        };
        let leftover = storage.outbox()?;
        if !leftover.is_empty() {
            tracing::info!(
                records = leftover.len(),
                "re-sending replication left from an earlier run"
            );
        }
        let mut owed_to_nobody = Vec::new();
        for mut record in leftover {
            let mut routes = outbox.routes(&record.changes);
            // Only the destinations the record names: the others were not owed these changes.
            routes.retain(|d, _| record.destinations.contains(d));
            record.changes = Vec::new();
            if let Some(record) = outbox.queue(record, routes) {
                owed_to_nobody.push(record);
            }
        }
        // Records none of whose changes a listed destination replicates any more.
        storage.remove_outbox(&owed_to_nobody)?;
        Ok(outbox)
    }

    /// The node this outbox sends for.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// How many records' changes wait to be confirmed, counted once per destination.
    pub fn pending(&self) -> usize {
        self.inner
            .destinations
            .values()
            .map(|d| {
                d.pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .len()
            })
            .sum()
    }

    /// The changes each other replica must receive: those of the ranges it holds.
    fn routes(&self, changes: &[Change]) -> BTreeMap<String, Vec<Change>> {
        let topology = &self.inner.topology;
        let mut by_destination: BTreeMap<String, Vec<Change>> = BTreeMap::new();
        for change in changes {
            for i in topology.replica_indexes(RangeId::of(change.key())) {
                let Some(name) = topology.names.get(i as usize) else {
                    continue;
                };
                if *name == self.inner.node {
                    continue;
                }
                match by_destination.get_mut(name) {
                    Some(list) => list.push(change.clone()),
                    None => {
                        by_destination.insert(name.clone(), vec![change.clone()]);
                    }
                }
            }
        }
        by_destination
    }

    /// Stages, in batch `b`, one outbox record for what `b` changed, listing every other
    /// replica of the keys changed. `None` when there is nobody to send to.
    pub fn stage(&self, b: &mut Batch<'_>) -> Result<Option<Staged>, StorageError> {
        if b.changes().is_empty() {
            return Ok(None);
        }
        let routes = self.routes(b.changes());
        if routes.is_empty() {
            return Ok(None);
        }
        let changes = b.changes().to_vec();
        let mut record = b.enqueue_outbox(routes.keys().cloned().collect(), changes)?;
        // The sender needs only the record's key; the changes travel in `routes`.
        record.changes = Vec::new();
        Ok(Some(Staged { record, routes }))
    }

    /// Queues a committed record for its senders.
    pub fn committed(&self, staged: Staged) {
        if let Some(record) = self.queue(staged.record, staged.routes) {
            // `stage` only returns records with destinations, all known at staging time.
            tracing::warn!(id = ?record.id, "outbox record without a destination");
        }
    }

    /// Hands each destination its changes; returns the record when no destination is owed
    /// anything, for the caller to delete.
    fn queue(
        &self,
        record: OutboxRecord,
        routes: BTreeMap<String, Vec<Change>>,
    ) -> Option<OutboxRecord> {
        let mut known = Vec::with_capacity(routes.len());
        let mut unknown = false;
        for (name, changes) in routes {
            match self.inner.destinations.get(&name) {
                Some(d) => known.push((d, changes)),
                // A node no longer in the topology: nobody to send to. The record stays on
                // disk, for an operator to look at, rather than being dropped.
                None => {
                    tracing::warn!(destination = %name, "outbox record for an unknown node");
                    unknown = true;
                }
            }
        }
        if known.is_empty() && !unknown {
            return Some(record);
        }
        // An unknown destination never confirms, so such a record is never deleted.
        let delivery = Arc::new(Delivery {
            record,
            remaining: AtomicUsize::new(known.len() + usize::from(unknown)),
        });
        for (d, changes) in known {
            d.pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push_back(Pending {
                    changes,
                    delivery: delivery.clone(),
                });
            d.wake.notify_one();
        }
        None
    }

    /// Runs one sender per destination until `stop`, sending through `bus`.
    pub async fn run_senders(&self, bus: Bus, stop: Shutdown) {
        let senders: Vec<_> = self
            .inner
            .destinations
            .keys()
            .map(|d| tokio::spawn(self.clone().send_loop(d.clone(), bus.clone(), stop.clone())))
            .collect();
        for s in senders {
            let _ = s.await;
        }
    }

    async fn send_loop(self, destination: String, bus: Bus, mut stop: Shutdown) {
        let Some(d) = self.inner.destinations.get(&destination) else {
            return;
        };
        let queue = queue_name(&destination);
        // How many changes of the front record this destination already confirmed: a record
        // larger than one message (a big batch) goes out over several.
        let mut front_sent = 0;
        loop {
            let (taken, changes) = {
                let pending = d.pending.lock().unwrap_or_else(PoisonError::into_inner);
                take_message(&pending, front_sent)
            };
            if changes.is_empty() {
                tokio::select! {
                    _ = stop.recv() => return,
                    _ = d.wake.notified() => continue,
                }
            }
            let alone = (changes.len() == 1).then(|| {
                (
                    String::from_utf8_lossy(changes[0].key())
                        .chars()
                        .take(200)
                        .collect::<String>(),
                    change_size(&changes[0]),
                )
            });
            let message = Replicate {
                from: self.inner.node.clone(),
                changes,
            };
            let sent = tokio::select! {
                _ = stop.recv() => return,
                sent = bus.send(&queue, &message) => sent,
            };
            match sent {
                Ok(_) => {
                    // Only this task removes from the front, so these are the records sent.
                    let done: Vec<OutboxRecord> = {
                        let mut pending = d.pending.lock().unwrap_or_else(PoisonError::into_inner);
                        let whole = match taken {
                            Taken::Whole(n) => {
                                front_sent = 0;
                                n
                            }
                            Taken::Partly {
                                whole,
                                front_sent: sent,
                            } => {
                                front_sent = sent;
                                whole
                            }
                        };
                        pending
                            .drain(..whole)
                            .filter(|p| p.delivery.remaining.fetch_sub(1, Ordering::AcqRel) == 1)
                            .map(|p| p.delivery.record.clone())
                            .collect()
                    };
                    if done.is_empty() {
                        continue;
                    }
                    let storage = self.inner.storage.clone();
                    let removed =
                        tokio::task::spawn_blocking(move || storage.remove_outbox(&done)).await;
                    match removed {
                        Ok(Ok(())) => {}
                        // The records stay on disk and are sent again after a restart:
                        // a duplicate, never a loss.
                        Ok(Err(e)) => {
                            tracing::warn!(error = %e, "cannot delete sent outbox records")
                        }
                        Err(e) => tracing::warn!(error = %e, "outbox clean-up task failed"),
                    }
                }
                Err(e) => {
                    match &alone {
                        // Loud: if the broker refuses this change for its size, no retry will
                        // ever get it through and replication to this node is stuck behind it
                        // (the record stays on disk). Raise the broker's max message size.
                        Some((key, bytes)) => tracing::error!(
                            %destination, %key, bytes, error = %e,
                            "replication of a single change failed; retrying (if the broker \
                             refuses it for its size, raise its max message size)"
                        ),
                        None => tracing::warn!(
                            %destination, error = %e, "replication send failed; retrying"
                        ),
                    }
                    tokio::select! {
                        _ = stop.recv() => return,
                        _ = tokio::time::sleep(RETRY_INTERVAL) => {}
                    }
                }
            }
        }
    }
}

/// How much of a destination's queue one message took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Taken {
    /// The first `n` records, completely.
    Whole(usize),
    /// The first `whole` records completely, and of the next one everything up to its change
    /// number `front_sent`.
    Partly { whole: usize, front_sent: usize },
}

/// The changes of the next message to a destination whose queue is `pending`, the first
/// `front_sent` changes of the front record being confirmed already; at most
/// [`MAX_CHANGES_PER_MESSAGE`] changes and [`MAX_BYTES_PER_MESSAGE`] bytes, but at least one
/// change when there is any.
fn take_message(pending: &VecDeque<Pending>, front_sent: usize) -> (Taken, Vec<Change>) {
    let mut changes = Vec::new();
    let mut bytes = 0;
    for (i, p) in pending.iter().enumerate() {
        let start = if i == 0 { front_sent } else { 0 };
        for (j, change) in p.changes.iter().enumerate().skip(start) {
            let size = change_size(change);
            if !changes.is_empty()
                && (changes.len() == MAX_CHANGES_PER_MESSAGE
                    || bytes + size > MAX_BYTES_PER_MESSAGE)
            {
                let taken = if j == 0 {
                    Taken::Whole(i)
                } else {
                    Taken::Partly {
                        whole: i,
                        front_sent: j,
                    }
                };
                return (taken, changes);
            }
            bytes += size;
            changes.push(change.clone());
        }
    }
    (Taken::Whole(pending.len()), changes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shutdown;
    use crate::storage::{PutRequest, StorageOptions};
    use rhinobus::Endpoint;
    use rhinobus::transport::InMemory;

    /// Polls `done` until it holds; the deadline is only a backstop against a hang.
    async fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn messages_are_limited_in_bytes_and_split_big_records() {
        let put = |len: usize| Change::Put {
            key: "k".into(),
            version: crate::Version::new(),
            parents: vec![],
            value: vec![0u8; len].into(),
            expires_at: None,
        };
        let delivery = Arc::new(Delivery {
            record: OutboxRecord::new(vec!["b".into()], vec![]).unwrap(),
            remaining: AtomicUsize::new(1),
        });
        let record = |changes: Vec<Change>| Pending {
            changes,
            delivery: delivery.clone(),
        };
        let mib = 1024 * 1024;
        // A batch of three 3 MiB values, then a 16 MiB value, then a small one.
        let queue: VecDeque<Pending> = [
            record(vec![put(3 * mib), put(3 * mib), put(3 * mib)]),
            record(vec![put(16 * mib)]),
            record(vec![put(1)]),
        ]
        .into();
        let (taken, changes) = take_message(&queue, 0);
        assert_eq!(changes.len(), 2);
        assert_eq!(
            taken,
            Taken::Partly {
                whole: 0,
                front_sent: 2
            }
        );
        let (taken, changes) = take_message(&queue, 2);
        assert_eq!((taken, changes.len()), (Taken::Whole(1), 1));
        // Too big for the limit alone: it still goes, alone.
        let rest: VecDeque<Pending> = queue.into_iter().skip(1).collect();
        let (taken, changes) = take_message(&rest, 0);
        assert_eq!((taken, changes.len()), (Taken::Whole(1), 1));
        let last: VecDeque<Pending> = rest.into_iter().skip(1).collect();
        let (taken, changes) = take_message(&last, 0);
        assert_eq!((taken, changes.len()), (Taken::Whole(1), 1));
        // Many small changes: the count limit.
        let small: VecDeque<Pending> = (0..MAX_CHANGES_PER_MESSAGE + 1)
            .map(|_| record(vec![put(1)]))
            .collect();
        let (taken, changes) = take_message(&small, 0);
        assert_eq!(changes.len(), MAX_CHANGES_PER_MESSAGE);
        assert_eq!(taken, Taken::Whole(MAX_CHANGES_PER_MESSAGE));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn big_values_travel_in_messages_under_the_byte_limit() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let topology = Arc::new(Topology::blocks(
            1,
            [("a", "a:1"), ("b", "b:1")].map(|(n, a)| (n.to_owned(), a.to_owned())),
        ));
        let broker = InMemory::new();
        broker.declare_queue(&queue_name("b"));
        let endpoint = Endpoint::builder(queue_name("a"), broker.clone())
            .start()
            .await
            .unwrap();
        let outbox = ReplicationOutbox::open(storage.clone(), "a", topology).unwrap();
        let value = vec![7u8; 3 * 1024 * 1024];
        // One write of a batch of four big values, then two writes of one each, all queued
        // before the sender starts: 18 MiB in all.
        let mut keys = Vec::new();
        for batch in [vec!["b0", "b1", "b2", "b3"], vec!["w0"], vec!["w1"]] {
            let staged = storage
                .batch(|b| {
                    for k in &batch {
                        b.put(PutRequest::new(*k, value.clone()))?;
                    }
                    outbox.stage(b)
                })
                .unwrap()
                .unwrap();
            outbox.committed(staged);
            keys.extend(batch);
        }
        let (stop, stopped) = shutdown::channel();
        let senders = tokio::spawn({
            let outbox = outbox.clone();
            let bus = endpoint.bus();
            async move { outbox.run_senders(bus, stopped).await }
        });
        eventually("every record is confirmed", || {
            storage.outbox().unwrap().is_empty()
        })
        .await;
        let mut received = Vec::new();
        while let Some((_, body)) = broker.take(&queue_name("b")) {
            assert!(
                body.len() <= MAX_BYTES_PER_MESSAGE,
                "a message of {} bytes",
                body.len()
            );
            let m: Replicate = rmp_serde::from_slice(&body).unwrap();
            received.extend(m.changes.iter().map(|c| c.key().clone()));
        }
        assert_eq!(received, keys, "every change, once, in order");
        stop.trigger();
        senders.await.unwrap();
        endpoint.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_record_per_write_is_deleted_once_every_destination_confirmed() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let names = ["a", "b", "c"].map(String::from);
        let topology = Arc::new(Topology::blocks(
            1,
            names
                .iter()
                .cloned()
                .zip(["a:1", "b:1", "c:1"].map(String::from)),
        ));
        let broker = InMemory::new();
        // Only b's queue exists: sends to c fail until it is declared.
        broker.declare_queue(&queue_name("b"));
        let endpoint = Endpoint::builder(queue_name("a"), broker.clone())
            .start()
            .await
            .unwrap();
        let outbox = ReplicationOutbox::open(storage.clone(), "a", topology).unwrap();
        let staged = storage
            .batch(|b| {
                b.put(PutRequest::new("k", "v"))?;
                outbox.stage(b)
            })
            .unwrap()
            .expect("three replicas: two destinations");
        let stored = storage.outbox().unwrap();
        assert_eq!(stored.len(), 1, "one record for both destinations");
        assert_eq!(stored[0].destinations, vec!["b".to_owned(), "c".to_owned()]);
        outbox.committed(staged);

        let (stop, stopped) = shutdown::channel();
        let senders = tokio::spawn({
            let outbox = outbox.clone();
            let bus = endpoint.bus();
            async move { outbox.run_senders(bus, stopped).await }
        });
        eventually("b receives the write", || {
            broker.queue_len(&queue_name("b")) == 1
        })
        .await;
        // Give c's sender a few failed attempts: the record must stay.
        tokio::time::sleep(RETRY_INTERVAL * 2).await;
        assert_eq!(
            storage.outbox().unwrap().len(),
            1,
            "c has not confirmed yet"
        );
        assert_eq!(outbox.pending(), 1);

        broker.declare_queue(&queue_name("c"));
        eventually("the record is deleted once c confirmed", || {
            storage.outbox().unwrap().is_empty()
        })
        .await;
        assert_eq!(broker.queue_len(&queue_name("c")), 1);
        assert_eq!(
            broker.queue_len(&queue_name("b")),
            1,
            "b is not sent it twice"
        );
        assert_eq!(outbox.pending(), 0);
        stop.trigger();
        senders.await.unwrap();
        endpoint.shutdown().await;
    }
}
