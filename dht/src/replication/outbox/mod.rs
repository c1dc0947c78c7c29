//! [`ReplicationOutbox`]: what this node still owes the other replicas, durable until the
//! broker confirmed it.
//!
//! A storage batch (a write, or the writes a node serves together) stages one outbox record,
//! listing every destination ([`ReplicationOutbox::stage`]), so the writes and the promise to
//! replicate them commit together.
//! Its changes are encoded once, there ([`PackedChanges`]): the record and every message copy
//! those bytes. After the commit the record goes to an in-memory queue per destination
//! ([`ReplicationOutbox::committed`]), with its encoded changes while the outbox holds fewer
//! than [`MEMORY_BUDGET`] bytes of them, as an id and a counter alone beyond that: however long
//! a destination stays unreachable, memory holds the budget and a few dozen bytes per record.
//! One sender per destination (`sender`) takes the queued records (reading back from disk, and
//! encoding again, those queued without their changes), one at a time, until it has a
//! message's worth (`take`: up to [`MAX_CHANGES_PER_MESSAGE`] changes and
//! [`MAX_BYTES_PER_MESSAGE`] bytes, a big record split over several messages), and sends it as
//! one [`Replicate`] message; records go out in commit order. When `Bus::send` returned (the
//! broker confirmed) for the last destination of a record, the storage is told
//! ([`Storage::remove_outbox`]), which drops the record from disk with the rest of its
//! generation. A crash in between leaves the records on disk; at start-up
//! their ids are queued again (each record read once, to see who it is for) and they are sent
//! again, to every destination they list. Sends that fail are retried every
//! [`RETRY_INTERVAL`].

mod sender;
mod take;

#[cfg(doc)]
use crate::replication::message::Replicate;

use crate::routing::{RangeId, Topology};
use crate::storage::{Batch, Change, OutboxId, PackedChanges, Storage, StorageError};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;

/// The most changes one [`Replicate`] message carries. The broker's work goes by messages
/// more than by their bytes, so a message carries a tick's worth of changes at the rate of a
/// fast host's saturated node; a replica applies it in batches of
/// [`APPLY_BATCH`](super::apply::APPLY_BATCH), passing its write turn to clients between them.
/// Under `bench dht-put-replicated`'s load, 2,000 instead of 500 took about 40% off the
/// broker's CPU per write and raised replicated throughput by about a sixth
/// (`docs/performance-history.md`).
pub const MAX_CHANGES_PER_MESSAGE: usize = 2000;
/// The most bytes of encoded changes one [`Replicate`] message carries, fewer when the
/// broker takes less (see [`ReplicationOutbox::open_for_broker`]); a message always carries at
/// least one change, and only a change staged before the node was given a lower limit can
/// be bigger than the broker takes.
pub const MAX_BYTES_PER_MESSAGE: usize = 8 * 1024 * 1024;
/// The default of the largest message the broker takes: RabbitMQ 4's default
/// `max_message_size` (RabbitMQ 3's is 128 MiB). A write whose change could not travel in a
/// message this big is refused, rather than accepted and then stuck in the outbox, its
/// destination's replication held up behind it.
pub const DEFAULT_BROKER_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// The least message limit a node takes: room for any change without a value (keys are up to
/// 64 KiB), so that only values are ever refused for it.
pub const MIN_BROKER_MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Room kept in every message for what wraps its changes (the sender's name, field names).
const MESSAGE_FRAMING: usize = 1024;
/// How long a sender waits before it tries again after a failed send (or a failed read of
/// the outbox).
pub const RETRY_INTERVAL: Duration = Duration::from_millis(500);
/// The default time between the ticks on which senders send, at most one message per tick each:
/// what is written meanwhile waits for the next (see [`ReplicationOutbox::run_senders`]). Only
/// writes that come faster than one per linger wait at all. The broker's work goes mostly by
/// messages, not by the changes in them: under `bench dht-put-replicated`'s load, 40 ms took
/// about 45% off the broker's CPU per write against 20 ms and raised replicated throughput by
/// about a fifth, for about 12 ms more replication lag at the median
/// (`docs/performance-history.md`).
pub const DEFAULT_LINGER: Duration = Duration::from_millis(40);
/// At most how many bytes of encoded changes an outbox keeps in memory for its senders.
/// Records queued past it are read back from disk when they are sent, a lookup and a decoding
/// per record and destination: taking them from memory instead brought the senders'
/// share of `bench dht-put-replicated`'s CPU from 5.7% to 3.0% (the budget is never reached
/// there).
pub const MEMORY_BUDGET: usize = 32 * 1024 * 1024;

/// The replication outbox of one node. Cheap to clone.
#[derive(Clone)]
pub struct ReplicationOutbox {
    inner: Arc<Inner>,
}

struct Inner {
    storage: Storage,
    node: String,
    topology: Arc<Topology>,
    /// By index in the topology; none for this node.
    destinations: Vec<Option<Destination>>,
    /// Bytes of changes held by queued records, against [`MEMORY_BUDGET`].
    held: Arc<AtomicUsize>,
    /// The most bytes of encoded changes a message may carry, whatever else: what the broker
    /// takes, less [`MESSAGE_FRAMING`].
    max_packed_bytes: usize,
}

/// One destination's queue: the records it still waits for, oldest first. Only its sender
/// removes from the front; writers push at the back.
struct Destination {
    name: String,
    queue: Mutex<VecDeque<Queued>>,
    /// The changes of the queued records that are this destination's to apply.
    owed: AtomicUsize,
    wake: Notify,
}

/// A record in one destination's queue.
struct Queued {
    delivery: Arc<Delivery>,
    /// How many of its changes are this destination's (keys of ranges it replicates).
    changes: usize,
}

/// For each destination (by topology index), how many changes of a record are for it.
type Owed = BTreeMap<usize, usize>;

/// One stored record and how many of its destinations still wait for it. Which ones have it
/// is known only here: after a crash, all of them get it again.
struct Delivery {
    id: OutboxId,
    remaining: AtomicUsize,
    /// The record's changes, when they fitted in the memory budget; read back from disk
    /// otherwise.
    changes: Option<Held>,
}

/// Changes kept in memory, encoded, counted against the budget until they are dropped.
struct Held {
    changes: Arc<PackedChanges>,
    bytes: usize,
    held: Arc<AtomicUsize>,
}

impl Held {
    /// `changes`, if `held` plus their size stays within the budget.
    fn within_budget(changes: PackedChanges, held: &Arc<AtomicUsize>) -> Option<Self> {
        let bytes = changes.byte_len();
        held.fetch_update(Ordering::AcqRel, Ordering::Acquire, |h| {
            (h + bytes <= MEMORY_BUDGET).then_some(h + bytes)
        })
        .ok()?;
        Some(Self {
            changes: Arc::new(changes),
            bytes,
            held: held.clone(),
        })
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// A write's replication, staged in its batch; hand it to
/// [`committed`](ReplicationOutbox::committed) once the batch committed.
#[derive(Debug)]
pub struct Staged {
    id: OutboxId,
    /// By topology index, how many changes are for each.
    destinations: Owed,
    changes: PackedChanges,
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
    /// earlier runs queued for sending, for a broker that takes messages of up to
    /// [`DEFAULT_BROKER_MAX_MESSAGE_BYTES`]. Each leftover record is read once, to see which
    /// destinations it is for, and only its id is kept.
    pub fn open(
        storage: Storage,
        node: &str,
        topology: Arc<Topology>,
    ) -> Result<Self, StorageError> {
        Self::open_for_broker(storage, node, topology, DEFAULT_BROKER_MAX_MESSAGE_BYTES)
    }

    /// [`open`](Self::open) for a broker that takes messages of up to `max_message_bytes`
    /// (its `max_message_size`): messages stay within it, and [`stage`](Self::stage) refuses a
    /// write whose change would not fit alone. Below [`MIN_BROKER_MAX_MESSAGE_BYTES`] even a
    /// change without a value may not fit ([`Replication::start`](super::Replication::start)
    /// refuses such limits). A leftover record with a change bigger than the limit, staged under
    /// a higher one, is sent as it is: its sender logs an error, with the change's key and
    /// size, at every refusal until the broker takes it.
    pub fn open_for_broker(
        storage: Storage,
        node: &str,
        topology: Arc<Topology>,
        max_message_bytes: usize,
    ) -> Result<Self, StorageError> {
        let destinations = (topology.names.iter())
            .map(|n| {
                (n != node).then(|| Destination {
                    name: n.clone(),
                    queue: Mutex::default(),
                    owed: AtomicUsize::new(0),
                    wake: Notify::new(),
                })
            })
            .collect();
        let outbox = Self {
            inner: Arc::new(Inner {
                storage: storage.clone(),
                node: node.to_owned(),
                topology,
                destinations,
                held: Arc::default(),
                max_packed_bytes: max_message_bytes.saturating_sub(MESSAGE_FRAMING + node.len()),
            }),
        };
        let mut records = 0usize;
        storage.resend_outbox(|record| {
            records += 1;
            let ranges = record.changes.iter().map(|c| RangeId::of(c.key()));
            let mut destinations = outbox.destinations_of(ranges);
            // Only the destinations the record names: the others were not owed these changes.
            // A record none of whose changes a listed destination replicates any more is
            // deleted.
            destinations.retain(|&i, _| record.destinations.contains(&outbox.destination(i).name));
            outbox.queue(record.id, &destinations, None)
        })?;
        if records > 0 {
            tracing::info!(records, "re-sending replication left from an earlier run");
        }
        Ok(outbox)
    }

    /// The node this outbox sends for.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// How many changes wait to be confirmed, counted once per destination they are for.
    pub fn pending(&self) -> usize {
        self.others().map(Destination::owed).sum()
    }

    /// The other nodes' queues.
    fn others(&self) -> impl Iterator<Item = &Destination> {
        self.inner.destinations.iter().flatten()
    }

    /// How many changes each other node still waits for, by name, in name order.
    pub fn pending_by_destination(&self) -> Vec<(String, usize)> {
        let mut pending: Vec<_> = (self.others())
            .map(|d| (d.name.clone(), d.owed()))
            .collect();
        pending.sort();
        pending
    }

    /// At most how many bytes of memory the queues of pending records take: an id and a
    /// counter per record and destination, and the changes held within [`MEMORY_BUDGET`] (the
    /// others are read back from disk when sent).
    pub fn queued_bytes(&self) -> usize {
        self.inner.held.load(Ordering::Acquire) + self.queue_bytes()
    }

    /// [`queued_bytes`](Self::queued_bytes) without the changes.
    fn queue_bytes(&self) -> usize {
        self.others()
            .map(|d| {
                let queue = d.lock();
                queue.capacity() * std::mem::size_of::<Queued>()
                    + queue.len() * std::mem::size_of::<Delivery>()
            })
            .sum()
    }

    /// Whether the node at topology index `destination` holds a replica of `range`.
    fn replicates_to(&self, destination: usize, range: RangeId) -> bool {
        (self.inner.topology.replica_indexes(range)).any(|i| i as usize == destination)
    }

    /// The other replicas (topology indexes) that must receive some of the changes to keys in
    /// `ranges` (one per change), those holding those ranges, with how many changes each.
    fn destinations_of(&self, ranges: impl IntoIterator<Item = RangeId>) -> Owed {
        let topology = &self.inner.topology;
        let mut destinations = Owed::new();
        for range in ranges {
            let replicas = topology.replica_indexes(range).map(|i| i as usize);
            for i in replicas.filter(|&i| self.is_other(i)) {
                *destinations.entry(i).or_default() += 1;
            }
        }
        destinations
    }

    /// Whether topology index `i` is another node's.
    fn is_other(&self, i: usize) -> bool {
        matches!(self.inner.destinations.get(i), Some(Some(_)))
    }

    /// Stages, in batch `b`, one outbox record for what `b` changed, listing every other
    /// replica of the keys changed, and takes those changes out of `b`
    /// ([`Batch::take_changes`]), encoded once for the record and every message that will
    /// carry them. `None` when there is nobody to send to.
    ///
    /// Fails with [`StorageError::ValueTooLarge`], for the batch to write nothing, when a change
    /// would not fit in a message alone: its value is longer than the broker's limit (see
    /// [`open_for_broker`](Self::open_for_broker)) leaves room for, with its key.
    pub fn stage(&self, b: &mut Batch<'_>) -> Result<Option<Staged>, StorageError> {
        if b.changes().is_empty() {
            return Ok(None);
        }
        let changes = PackedChanges::pack(b.changes())?;
        let destinations = self.destinations_of(changes.iter().map(|(range, _)| range));
        if destinations.is_empty() {
            return Ok(None);
        }
        self.check_fits(b.changes(), &changes)?;
        b.take_changes();
        let listed: Vec<&str> = (destinations.keys())
            .map(|&i| self.destination(i).name.as_str())
            .collect();
        let id = b.enqueue_packed_outbox(&listed, &changes)?;
        Ok(Some(Staged {
            id,
            destinations,
            changes,
        }))
    }

    /// Refuses the first of `changes` (encoded in `packed`) too big for a message alone, saying
    /// how long its value may be.
    fn check_fits(&self, changes: &[Change], packed: &PackedChanges) -> Result<(), StorageError> {
        let max = self.inner.max_packed_bytes;
        let too_big = (changes.iter().zip(packed.iter())).find(|(_, (_, e))| e.len() > max);
        match too_big {
            None => Ok(()),
            Some((change, (_, encoded))) => {
                let len = change.value().map_or(0, |v| v.len());
                Err(StorageError::ValueTooLarge {
                    len,
                    max: max.saturating_sub(encoded.len() - len),
                })
            }
        }
    }

    /// Queues a committed record for its senders.
    pub fn committed(&self, staged: Staged) {
        let held = Held::within_budget(staged.changes, &self.inner.held);
        // `stage` only returns records with destinations.
        self.queue(staged.id, &staged.destinations, held);
    }

    /// Queues record `id` for each of `destinations` (other nodes' topology indexes, with how
    /// many of its changes are for each); false when there are none, for the caller to delete
    /// the record.
    fn queue(&self, id: OutboxId, destinations: &Owed, changes: Option<Held>) -> bool {
        if destinations.is_empty() {
            return false;
        }
        let delivery = Arc::new(Delivery {
            id,
            remaining: AtomicUsize::new(destinations.len()),
            changes,
        });
        for (&i, &changes) in destinations {
            let d = self.destination(i);
            // Counted before it can be sent, and confirmed: the count is never below what
            // the queue holds.
            d.owed.fetch_add(changes, Ordering::AcqRel);
            d.lock().push_back(Queued {
                delivery: delivery.clone(),
                changes,
            });
            d.wake.notify_one();
        }
        true
    }

    /// The queue of the node at topology index `i`.
    ///
    /// # Panics
    /// When `i` is this node's or not in the topology: callers take indexes from
    /// [`destinations_of`](Self::destinations_of) or check them with
    /// [`is_other`](Self::is_other).
    fn destination(&self, i: usize) -> &Destination {
        match self.inner.destinations.get(i) {
            Some(Some(d)) => d,
            _ => panic!("topology index {i} is not another node's"),
        }
    }
}

impl Destination {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Queued>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn owed(&self) -> usize {
        self.owed.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::sender::next_tick;
    use super::take::Taken;
    use super::*;
    use crate::cluster::queue_name;
    use crate::replication::message::Replicate;
    use crate::shutdown;
    use crate::storage::{PutRequest, StorageOptions};
    use rhinobus::Endpoint;
    use rhinobus::transport::InMemory;

    /// The outbox's senders running on their own task until stopped.
    struct Senders {
        stop: shutdown::ShutdownTrigger,
        task: tokio::task::JoinHandle<()>,
    }

    impl Senders {
        fn start(outbox: &ReplicationOutbox, bus: rhinobus::Bus) -> Self {
            Self::lingering(outbox, bus, Duration::ZERO)
        }

        fn lingering(outbox: &ReplicationOutbox, bus: rhinobus::Bus, linger: Duration) -> Self {
            let (stop, stopped) = shutdown::channel();
            let outbox = outbox.clone();
            let task = tokio::spawn(async move { outbox.run_senders(bus, stopped, linger).await });
            Self { stop, task }
        }

        async fn stop(self) {
            self.stop.trigger();
            self.task.await.unwrap();
        }
    }

    /// Node `a` of a cluster of `names` (its data directory, storage, endpoint and outbox),
    /// replicating over an in-memory broker on which only node `b`'s queue exists.
    async fn node_a_of(
        names: &[&str],
    ) -> (
        tempfile::TempDir,
        Storage,
        InMemory,
        Endpoint,
        ReplicationOutbox,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let topology = Arc::new(Topology::blocks(
            1,
            names.iter().map(|n| (n.to_string(), format!("{n}:1"))),
        ));
        let broker = InMemory::new();
        broker.declare_queue(&queue_name("b"));
        let endpoint = Endpoint::builder(queue_name("a"), broker.clone())
            .start()
            .await
            .unwrap();
        let outbox = ReplicationOutbox::open(storage.clone(), "a", topology).unwrap();
        (dir, storage, broker, endpoint, outbox)
    }

    /// Puts `key` on `storage` with its outbox record, as a node's write path does.
    fn write(storage: &Storage, outbox: &ReplicationOutbox, key: &str) {
        let staged = storage
            .batch(|b| {
                b.put(PutRequest::new(key.to_owned(), "v"))?;
                outbox.stage(b)
            })
            .unwrap()
            .expect("a destination");
        outbox.committed(staged);
    }

    /// Polls `done` until it holds; the deadline is only a backstop against a hang.
    async fn eventually(what: &str, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while !done() {
            assert!(tokio::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A broker taking messages of at most 1 MiB: the longest value a write may carry is what
    /// its message leaves room for, and the refusal says how long that is.
    #[test]
    fn a_write_whose_change_would_not_fit_a_message_alone_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let names = ["a", "b"].map(|n| (n.to_owned(), format!("{n}:1")));
        let topology = Arc::new(Topology::blocks(1, names));
        let limit = MIN_BROKER_MAX_MESSAGE_BYTES;
        let outbox =
            ReplicationOutbox::open_for_broker(storage.clone(), "a", topology, limit).unwrap();
        let put = |len: usize| {
            storage.batch(|b| {
                b.put(PutRequest::new("big", vec![0u8; len]))?;
                outbox.stage(b)
            })
        };
        let Err(StorageError::ValueTooLarge { len, max }) = put(limit) else {
            panic!("a value as long as the whole message was taken");
        };
        assert_eq!(len, limit);
        assert!(max < limit, "{max}");
        assert!(
            storage.get(b"big").unwrap().is_empty(),
            "the refused write wrote"
        );
        assert!(matches!(
            put(max + 1),
            Err(StorageError::ValueTooLarge { max: m, .. }) if m == max
        ));
        // The longest value allowed goes, in a message within the limit.
        outbox.committed(put(max).unwrap().expect("a destination"));
        let (taken, array) = outbox.next_message(1, 0).unwrap();
        assert_eq!((taken, array.len), (Taken::Whole(1), 1));
        let message = Replicate {
            from: "a".into(),
            changes: Vec::new(),
            packed: array.bytes.into(),
        };
        let body = rhinobus::message::encode(&message).unwrap();
        assert!(body.len() <= limit, "{} bytes", body.len());
    }

    /// Every change the body of a replication message carries, as values.
    fn changes_of(body: &[u8]) -> Vec<Change> {
        let m: Replicate = rmp_serde::from_slice(body).unwrap();
        let mut changes = m.changes;
        if !m.packed.is_empty() {
            changes.extend(rmp_serde::from_slice::<Vec<Change>>(&m.packed).unwrap());
        }
        changes
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn big_values_travel_in_messages_under_the_byte_limit() {
        let (_dir, storage, broker, endpoint, outbox) = node_a_of(&["a", "b"]).await;
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
        let senders = Senders::start(&outbox, endpoint.bus());
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
            received.extend(changes_of(&body).iter().map(|c| c.key().clone()));
        }
        assert_eq!(received, keys, "every change, once, in order");
        senders.stop().await;
        endpoint.shutdown().await;
    }

    /// The changes of the next message in `queue`, if there is one.
    fn next_changes(broker: &InMemory, queue: &str) -> Option<Vec<Change>> {
        let (_, body) = broker.take(queue)?;
        Some(changes_of(&body))
    }

    /// Writes `key` and waits until it is confirmed, which must take well under `linger`.
    async fn sent_at_once(
        storage: &Storage,
        outbox: &ReplicationOutbox,
        key: &str,
        linger: Duration,
    ) {
        let written = tokio::time::Instant::now();
        write(storage, outbox, key);
        eventually("the record is confirmed", || {
            storage.outbox().unwrap().is_empty()
        })
        .await;
        assert!(
            written.elapsed() < linger / 2,
            "{key} sent {:?} after it was written",
            written.elapsed()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_before_the_next_tick_share_its_message() {
        let (_dir, storage, broker, endpoint, outbox) = node_a_of(&["a", "b"]).await;
        const LINGER: Duration = Duration::from_secs(2);
        let senders = Senders::lingering(&outbox, endpoint.bus(), LINGER);
        // Just after a tick: the next is a whole linger away.
        let tick = next_tick(tokio::time::Instant::now(), LINGER);
        tokio::time::sleep_until(tick + Duration::from_millis(50)).await;
        // The sender has sent nothing yet: the first write goes at once, alone ...
        sent_at_once(&storage, &outbox, "k0", LINGER).await;
        // ... and the four that follow before the next tick wait for it, in one message.
        for n in 1..5 {
            write(&storage, &outbox, &format!("k{n}"));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        eventually("every record is confirmed", || {
            storage.outbox().unwrap().is_empty()
        })
        .await;
        let queue = queue_name("b");
        let first = next_changes(&broker, &queue).expect("a first message");
        assert_eq!(first.len(), 1, "the first write alone");
        let second = next_changes(&broker, &queue).expect("a second message");
        let keys: Vec<_> = second.iter().map(|c| c.key().clone()).collect();
        assert_eq!(keys, ["k1", "k2", "k3", "k4"], "the other four together");
        assert!(next_changes(&broker, &queue).is_none(), "only two messages");
        senders.stop().await;
        endpoint.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_after_a_quiet_linger_goes_at_once() {
        let (_dir, storage, _broker, endpoint, outbox) = node_a_of(&["a", "b"]).await;
        const LINGER: Duration = Duration::from_secs(1);
        let senders = Senders::lingering(&outbox, endpoint.bus(), LINGER);
        sent_at_once(&storage, &outbox, "k0", LINGER).await;
        // Quiet for longer than the linger: no need to wait.
        tokio::time::sleep(LINGER).await;
        sent_at_once(&storage, &outbox, "k1", LINGER).await;
        senders.stop().await;
        endpoint.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_record_per_write_is_deleted_once_every_destination_confirmed() {
        // Only b's queue exists: sends to c fail until it is declared.
        let (_dir, storage, broker, endpoint, outbox) = node_a_of(&["a", "b", "c"]).await;
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

        let senders = Senders::start(&outbox, endpoint.bus());
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
        senders.stop().await;
        endpoint.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_down_peer_costs_at_most_the_memory_budget_and_gets_everything_later() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(dir.path(), StorageOptions::default()).unwrap();
        let topology = Arc::new(Topology::blocks(
            1,
            [("a", "a:1"), ("b", "b:1")].map(|(n, a)| (n.to_owned(), a.to_owned())),
        ));
        // b's queue does not exist yet: every send to it fails.
        let broker = InMemory::new();
        let endpoint = Endpoint::builder(queue_name("a"), broker.clone())
            .start()
            .await
            .unwrap();
        let value = vec![7u8; 1024 * 1024];
        let write_all = |outbox: &ReplicationOutbox, keys: &[String]| {
            for key in keys {
                let staged = storage
                    .batch(|b| {
                        b.put(PutRequest::new(key.clone(), value.clone()))?;
                        outbox.stage(b)
                    })
                    .unwrap()
                    .unwrap();
                outbox.committed(staged);
            }
        };
        let received_by_b = || {
            let mut received = Vec::new();
            while let Some((_, body)) = broker.take(&queue_name("b")) {
                assert!(body.len() <= MAX_BYTES_PER_MESSAGE);
                for change in changes_of(&body) {
                    let Change::Put { key, value, .. } = change else {
                        panic!("not a put: {change:?}")
                    };
                    assert_eq!(value.len(), 1024 * 1024, "the whole value");
                    received.push(String::from_utf8(key.to_vec()).unwrap());
                }
            }
            received
        };
        let outbox = ReplicationOutbox::open(storage.clone(), "a", topology.clone()).unwrap();
        let senders = Senders::start(&outbox, endpoint.bus());
        // 48 MiB of writes while b cannot be reached.
        const WRITES: usize = 48;
        let keys: Vec<String> = (0..WRITES).map(|i| format!("k{i:02}")).collect();
        write_all(&outbox, &keys);
        // Let the sender fail a few times.
        tokio::time::sleep(RETRY_INTERVAL * 2).await;
        let bound = 16 * 1024;
        assert_eq!(outbox.pending(), WRITES);
        // The first 31 records are held with their changes, the others as ids alone.
        const { assert!(WRITES * 1024 * 1024 > MEMORY_BUDGET) };
        assert!(
            outbox.queued_bytes() <= MEMORY_BUDGET + bound,
            "{} bytes queued in memory",
            outbox.queued_bytes()
        );
        assert_eq!(storage.outbox().unwrap().len(), WRITES, "all kept on disk");

        // b comes back: the held records go from memory, the others are read back from disk.
        broker.declare_queue(&queue_name("b"));
        eventually("every record is confirmed", || {
            storage.outbox().unwrap().is_empty()
        })
        .await;
        assert_eq!(received_by_b(), keys, "every write, once, in order");
        assert_eq!(outbox.queued_bytes(), outbox.queue_bytes(), "nothing held");
        senders.stop().await;

        // Written while no sender runs, then a restart: the leftovers are queued as ids alone.
        let later: Vec<String> = (0..8).map(|i| format!("later{i}")).collect();
        write_all(&outbox, &later);
        let outbox = ReplicationOutbox::open(storage.clone(), "a", topology).unwrap();
        assert_eq!(outbox.pending(), later.len());
        assert!(outbox.queued_bytes() < bound);
        let senders = Senders::start(&outbox, endpoint.bus());
        eventually("every record is confirmed", || {
            storage.outbox().unwrap().is_empty()
        })
        .await;
        assert_eq!(outbox.pending(), 0);
        assert_eq!(received_by_b(), later, "read back from disk, in order");
        senders.stop().await;
        endpoint.shutdown().await;
    }
}
