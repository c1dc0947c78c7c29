//! [`ReplicationOutbox`]: what this node still owes the other replicas, durable until the
//! broker confirmed it.
//!
//! A write stages one outbox record, listing every destination, in its own storage batch
//! ([`ReplicationOutbox::stage`]), so the write and the promise to replicate it commit together.
//! Its changes are encoded once, there ([`PackedChanges`]): the record and every message copy
//! those bytes. After the commit the record goes to an in-memory queue per destination
//! ([`ReplicationOutbox::committed`]), with its encoded changes while the outbox holds fewer
//! than [`MEMORY_BUDGET`] bytes of them, as an id and a counter alone beyond that: however long
//! a destination stays unreachable, memory holds the budget and a few dozen bytes per record.
//! One sender per destination takes the queued records (reading back from disk, and encoding
//! again, those queued without their changes), one at a time, until it has a message's worth
//! (up to [`MAX_CHANGES_PER_MESSAGE`] changes and [`MAX_BYTES_PER_MESSAGE`] bytes, a big record
//! split over several messages), and sends it as one [`Replicate`] message; records go out in
//! commit order. When `Bus::send` returned (the broker confirmed) for the last destination of a
//! record, the storage is told ([`Storage::remove_outbox`]), which drops the record from disk
//! with the rest of its generation. A crash in between leaves the records on disk; at start-up
//! their ids are queued again (each record read once, to see who it is for) and they are sent
//! again, to every destination they list. Sends that fail are retried every
//! [`RETRY_INTERVAL`].

use super::message::Replicate;
use crate::cluster::queue_name;
use crate::routing::{RangeId, Topology};
use crate::shutdown::Shutdown;
use crate::storage::{
    Batch, Change, OutboxId, PackedChanges, Storage, StorageError, unpack_array, write_array,
};
use rhinobus::Bus;
use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;

/// The most changes one [`Replicate`] message carries. The broker's work goes by messages
/// more than by their bytes, so a message carries a tick's worth of changes at the rate of a
/// fast host's saturated node; a replica applies it in batches of
/// [`APPLY_BATCH`](super::apply::APPLY_BATCH), passing its write turn to clients between them.
/// Under `bench dht-put-replicated`'s load, 2,000 instead of 500 took about 40% off the
/// broker's CPU per write and raised replicated throughput by about a sixth (README).
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
/// about a fifth, for about 12 ms more replication lag at the median (README).
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
    queue: Mutex<VecDeque<Arc<Delivery>>>,
    wake: Notify,
}

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
    /// Topology indexes.
    destinations: BTreeSet<usize>,
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
            destinations.retain(|&i| record.destinations.contains(&outbox.destination(i).name));
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

    /// How many records wait to be confirmed, counted once per destination.
    pub fn pending(&self) -> usize {
        self.others().map(|d| d.lock().len()).sum()
    }

    /// The other nodes' queues.
    fn others(&self) -> impl Iterator<Item = &Destination> {
        self.inner.destinations.iter().flatten()
    }

    /// How many records each other node still waits for, by name, in name order.
    pub fn pending_by_destination(&self) -> Vec<(String, usize)> {
        let mut pending: Vec<_> = (self.others())
            .map(|d| (d.name.clone(), d.lock().len()))
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
                queue.capacity() * std::mem::size_of::<Arc<Delivery>>()
                    + queue.len() * std::mem::size_of::<Delivery>()
            })
            .sum()
    }

    /// Whether the node at topology index `destination` holds a replica of `range`.
    fn replicates_to(&self, destination: usize, range: RangeId) -> bool {
        (self.inner.topology.replica_indexes(range)).any(|i| i as usize == destination)
    }

    /// The other replicas (topology indexes) that must receive some of the changes to keys in
    /// `ranges`: those holding those ranges.
    fn destinations_of(&self, ranges: impl IntoIterator<Item = RangeId>) -> BTreeSet<usize> {
        let topology = &self.inner.topology;
        let mut destinations = BTreeSet::new();
        for range in ranges {
            let replicas = topology.replica_indexes(range).map(|i| i as usize);
            destinations.extend(replicas.filter(|&i| self.is_other(i)));
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
        let listed: Vec<&str> = (destinations.iter())
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

    /// Queues record `id` for each of `destinations` (other nodes' topology indexes); false
    /// when there are none, for the caller to delete the record.
    fn queue(&self, id: OutboxId, destinations: &BTreeSet<usize>, changes: Option<Held>) -> bool {
        if destinations.is_empty() {
            return false;
        }
        let delivery = Arc::new(Delivery {
            id,
            remaining: AtomicUsize::new(destinations.len()),
            changes,
        });
        for &i in destinations {
            let d = self.destination(i);
            d.lock().push_back(delivery.clone());
            d.wake.notify_one();
        }
        true
    }

    /// Runs one sender per destination until `stop`, sending through `bus`.
    ///
    /// Senders send on ticks, the moments that are a whole number of `linger`s past the Unix
    /// epoch, at most one message per tick each: what is queued while a sender waits for the
    /// next tick goes together in its message (up to a message's worth, which goes at once). A
    /// record queued when the sender has not sent since the last tick goes at once, so writes
    /// that come slower than one per `linger` wait for nothing. The broker spends about as
    /// much on a message as on the changes in it (RabbitMQ syncs each persistent message to
    /// disk, once per queue), so under load fewer, fuller messages carry several times more
    /// writes on the same broker; the price is up to `linger` more replication lag under that
    /// load. The ticks are the same for every sender of every node (as far as their clocks
    /// agree), so under load their messages reach the broker together and it syncs them
    /// together. Zero sends every record at once.
    pub async fn run_senders(&self, bus: Bus, stop: Shutdown, linger: Duration) {
        let senders: Vec<_> = (0..self.inner.destinations.len())
            .filter(|&i| self.is_other(i))
            .map(|i| {
                let sender = self.clone().send_loop(i, bus.clone(), stop.clone(), linger);
                tokio::spawn(sender)
            })
            .collect();
        for s in senders {
            let _ = s.await;
        }
    }

    /// The changes of the next message for `destination`, its queued records read back from
    /// disk where they are not held in memory; the first `front_sent` changes of the front
    /// record being confirmed already.
    fn next_message(
        &self,
        destination: usize,
        front_sent: usize,
    ) -> Result<(Taken, ChangeArray), StorageError> {
        let d = self.destination(destination);
        take_message(
            |i| {
                // Indexes stay valid: only this destination's sender removes from the queue.
                let Some(delivery) = d.lock().get(i).cloned() else {
                    return Ok(None);
                };
                if let Some(held) = &delivery.changes {
                    return Ok(Some(held.changes.clone()));
                }
                // A record gone from disk (moved aside as undecodable) has nothing to send.
                let changes = match self.inner.storage.outbox_record(delivery.id)? {
                    Some(record) => PackedChanges::pack(&record.changes)?,
                    None => PackedChanges::default(),
                };
                Ok(Some(Arc::new(changes)))
            },
            |range| self.replicates_to(destination, range),
            front_sent,
            self.inner.max_packed_bytes.min(MAX_BYTES_PER_MESSAGE),
        )
    }

    /// Sends to the node at topology index `index`, another node's.
    async fn send_loop(self, index: usize, bus: Bus, mut stop: Shutdown, linger: Duration) {
        let d = self.destination(index);
        let destination = &d.name;
        let queue = queue_name(destination);
        // How many changes of the front record this destination already confirmed: a record
        // larger than one message (a big batch) goes out over several.
        let mut front_sent = 0;
        // When the last message went out: the next one waits for the tick after it.
        let mut last_sent: Option<tokio::time::Instant> = None;
        loop {
            if d.lock().is_empty() {
                tokio::select! {
                    _ = stop.recv() => return,
                    // Writers wake the sender with every record they queue.
                    _ = d.wake.notified() => continue,
                }
            }
            // The rest of a record too big for one message needs no company.
            let due = last_sent.map(|at| next_tick(at, linger));
            if front_sent == 0 && !self.linger(d, due, &mut stop).await {
                return;
            }
            let next = {
                let outbox = self.clone();
                tokio::task::spawn_blocking(move || outbox.next_message(index, front_sent)).await
            };
            let (taken, array) = match next {
                Ok(Ok(next)) => next,
                Ok(Err(e)) => {
                    tracing::warn!(%destination, error = %e, "cannot read the outbox; retrying");
                    tokio::select! {
                        _ = stop.recv() => return,
                        _ = tokio::time::sleep(RETRY_INTERVAL) => continue,
                    }
                }
                Err(e) => {
                    tracing::warn!(%destination, error = %e, "outbox read task failed; retrying");
                    tokio::select! {
                        _ = stop.recv() => return,
                        _ = tokio::time::sleep(RETRY_INTERVAL) => continue,
                    }
                }
            };
            if array.len == 0 {
                // Only records with nothing left to send: done without a message.
                front_sent = self.confirmed(d, taken).await;
                continue;
            }
            let message = Replicate {
                from: self.inner.node.clone(),
                changes: Vec::new(),
                packed: array.bytes.into(),
            };
            last_sent = Some(tokio::time::Instant::now());
            let sent = tokio::select! {
                _ = stop.recv() => return,
                sent = bus.send(&queue, &message) => sent,
            };
            let alone = (sent.is_err() && array.len == 1).then(|| lone_change(&message.packed));
            // Up to a message's worth of bytes, not to be held while confirmed records go.
            drop(message);
            match sent {
                Ok(_) => front_sent = self.confirmed(d, taken).await,
                Err(e) => {
                    match &alone {
                        // Loud: if the broker refuses this change for its size, no retry will
                        // ever get it through and replication to this node is stuck behind it
                        // (the record stays on disk). Raise the broker's max message size.
                        Some((key, bytes)) => tracing::error!(
                            %destination, %key, bytes, error = %e,
                            "replication of a single change failed; retrying (if the broker \
                             refuses it for its size, raise its max_message_size and the \
                             node's --broker-max-message-bytes)"
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

    /// Waits until a message's worth of records is queued for `destination`, or until `due`
    /// (at once when there is none, or it has passed). False when stopped meanwhile.
    async fn linger(
        &self,
        d: &Destination,
        due: Option<tokio::time::Instant>,
        stop: &mut Shutdown,
    ) -> bool {
        let Some(due) = due.filter(|d| *d > tokio::time::Instant::now()) else {
            return true;
        };
        while d.lock().len() < MAX_CHANGES_PER_MESSAGE {
            tokio::select! {
                _ = stop.recv() => return false,
                _ = tokio::time::sleep_until(due) => return true,
                _ = d.wake.notified() => {}
            }
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

    /// Drops from `destination`'s queue what the broker confirmed (`taken`), deletes the
    /// records every destination has now confirmed, and returns how many changes of the new
    /// front record are confirmed.
    async fn confirmed(&self, destination: &Destination, taken: Taken) -> usize {
        let (whole, front_sent) = match taken {
            Taken::Whole(n) => (n, 0),
            Taken::Partly { whole, front_sent } => (whole, front_sent),
        };
        // Only this task removes from the front, so these are the records sent.
        let done: Vec<OutboxId> = destination
            .lock()
            .drain(..whole)
            .filter(|p| p.remaining.fetch_sub(1, Ordering::AcqRel) == 1)
            .map(|p| p.id)
            .collect();
        if !done.is_empty() {
            // Not a long write: deleting outbox records takes no write lock.
            let storage = self.inner.storage.clone();
            let removed = tokio::task::spawn_blocking(move || storage.remove_outbox(done)).await;
            match removed {
                Ok(Ok(())) => {}
                // The records stay on disk and are sent again after a restart:
                // a duplicate, never a loss.
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot delete sent outbox records"),
                Err(e) => tracing::warn!(error = %e, "outbox clean-up task failed"),
            }
        }
        front_sent
    }
}

/// The first tick after `t`: the next moment that is a whole number of `linger`s past the Unix
/// epoch by the system clock, the same for every sender of every node.
fn next_tick(t: tokio::time::Instant, linger: Duration) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    let t_since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(now.saturating_duration_since(t));
    t + until_next_tick(t_since_epoch, linger)
}

/// How long after `since_epoch` the next whole multiple of `linger` comes (a whole `linger` when
/// `since_epoch` is one; nothing when `linger` is zero).
fn until_next_tick(since_epoch: Duration, linger: Duration) -> Duration {
    let linger_ns = linger.as_nanos();
    if linger_ns == 0 {
        return Duration::ZERO;
    }
    let into = since_epoch.as_nanos() % linger_ns;
    // Below `linger`, which is a Duration: it fits.
    Duration::from_nanos(u64::try_from(linger_ns - into).unwrap_or(u64::MAX))
}

impl Destination {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Arc<Delivery>>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
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

/// The changes of one message: a MessagePack array of their encodings.
#[derive(Debug, Default, PartialEq, Eq)]
struct ChangeArray {
    /// How many changes.
    len: usize,
    /// The array.
    bytes: Vec<u8>,
}

/// The key and size of the one change in `packed`, for the log of a send that failed.
fn lone_change(packed: &[u8]) -> (String, usize) {
    let key = match unpack_array(packed).as_deref() {
        Ok([change]) => String::from_utf8_lossy(change.key())
            .chars()
            .take(200)
            .collect(),
        _ => String::new(),
    };
    (key, packed.len())
}

/// The changes of the next message to a destination, `record(i)` giving its `i`th queued
/// record (`None` past the last) and `keep` the ranges the destination holds (asked only of
/// records of several changes), the first
/// `front_sent` kept changes of the front record being confirmed already; at most
/// [`MAX_CHANGES_PER_MESSAGE`] changes and `max_bytes` bytes of them, but at least one change
/// when there is any. Reads records only as far as the message needs, and copies the changes'
/// encodings as they are.
fn take_message<E>(
    mut record: impl FnMut(usize) -> Result<Option<Arc<PackedChanges>>, E>,
    keep: impl Fn(RangeId) -> bool,
    front_sent: usize,
    max_bytes: usize,
) -> Result<(Taken, ChangeArray), E> {
    let mut records = Vec::new();
    // (record, change) of each change taken.
    let mut taken = Vec::new();
    let mut bytes = 0;
    let mut outcome = None;
    'records: while let Some(changes) = record(records.len())? {
        let i = records.len();
        records.push(changes);
        let start = if i == 0 { front_sent } else { 0 };
        // A record of one change is queued only for the replicas of its key.
        let all = records[i].len() == 1;
        let kept = (records[i].iter().enumerate()).filter(|(_, (range, _))| all || keep(*range));
        for (j, (n, (_, encoded))) in kept.enumerate().skip(start) {
            if !taken.is_empty()
                && (taken.len() == MAX_CHANGES_PER_MESSAGE || bytes + encoded.len() > max_bytes)
            {
                outcome = Some(if j == 0 {
                    Taken::Whole(i)
                } else {
                    Taken::Partly {
                        whole: i,
                        front_sent: j,
                    }
                });
                break 'records;
            }
            bytes += encoded.len();
            taken.push((i, n));
        }
        // Full: no need to read the next record to find out.
        if taken.len() == MAX_CHANGES_PER_MESSAGE || bytes >= max_bytes {
            break;
        }
    }
    let outcome = outcome.unwrap_or(Taken::Whole(records.len()));
    let mut array = ChangeArray {
        len: taken.len(),
        bytes: Vec::with_capacity(bytes + 5),
    };
    let encoded = |&(i, n): &(usize, usize)| records[i].encoded(n);
    write_array(taken.iter().map(encoded), &mut array.bytes);
    Ok((outcome, array))
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn messages_are_limited_in_bytes_and_split_big_records() {
        let put = |len: usize| Change::Put {
            key: "k".into(),
            version: crate::Version::new(),
            parents: vec![],
            value: vec![0u8; len].into(),
            expires_at: None,
        };
        let mib = 1024 * 1024;
        let pack = |records: Vec<Vec<Change>>| -> Vec<Arc<PackedChanges>> {
            (records.iter())
                .map(|r| Arc::new(PackedChanges::pack(r).unwrap()))
                .collect()
        };
        let take_within = |queue: &[Arc<PackedChanges>], front_sent, max| {
            let record = |i| Ok(queue.get(i).cloned());
            let (taken, array) = take_message::<()>(record, |_| true, front_sent, max).unwrap();
            let changes: Vec<Change> = rmp_serde::from_slice(&array.bytes).unwrap();
            assert_eq!(changes.len(), array.len);
            (taken, changes.len())
        };
        let take = |queue: &[Arc<PackedChanges>], front_sent| {
            take_within(queue, front_sent, MAX_BYTES_PER_MESSAGE)
        };
        // A batch of three 3 MiB values, then a 16 MiB value, then a small one.
        let queue = pack(vec![
            vec![put(3 * mib), put(3 * mib), put(3 * mib)],
            vec![put(16 * mib)],
            vec![put(1)],
        ]);
        assert_eq!(
            take(&queue, 0),
            (
                Taken::Partly {
                    whole: 0,
                    front_sent: 2
                },
                2
            )
        );
        assert_eq!(take(&queue, 2), (Taken::Whole(1), 1));
        // A broker taking less: one 3 MiB value per message.
        let partly = |front_sent| Taken::Partly {
            whole: 0,
            front_sent,
        };
        assert_eq!(take_within(&queue, 0, 4 * mib), (partly(1), 1));
        assert_eq!(take_within(&queue, 1, 4 * mib), (partly(2), 1));
        // Too big for the limit alone: it still goes, alone.
        assert_eq!(take(&queue[1..], 0), (Taken::Whole(1), 1));
        assert_eq!(take(&queue[2..], 0), (Taken::Whole(1), 1));
        // A record with nothing to send (gone from disk) is taken along.
        assert_eq!(
            take(&pack(vec![vec![], vec![put(1)]]), 0),
            (Taken::Whole(2), 1)
        );
        assert_eq!(take(&pack(vec![vec![]]), 0), (Taken::Whole(1), 0));
        assert_eq!(take(&[], 0), (Taken::Whole(0), 0));
        // Many small changes: the count limit, without reading further than needed.
        let small = pack(
            (0..MAX_CHANGES_PER_MESSAGE + 1)
                .map(|_| vec![put(1)])
                .collect(),
        );
        let mut read = 0;
        let (taken, array) = take_message::<()>(
            |i| {
                read += 1;
                Ok(small.get(i).cloned())
            },
            |_| true,
            0,
            MAX_BYTES_PER_MESSAGE,
        )
        .unwrap();
        assert_eq!(array.len, MAX_CHANGES_PER_MESSAGE);
        assert_eq!(taken, Taken::Whole(MAX_CHANGES_PER_MESSAGE));
        assert_eq!(read, MAX_CHANGES_PER_MESSAGE, "records read");
    }

    #[test]
    fn a_destination_gets_only_the_changes_of_its_ranges() {
        let put = |key: &str| Change::Put {
            key: key.to_owned().into(),
            version: crate::Version::new(),
            parents: vec![],
            value: "v".into(),
            expires_at: None,
        };
        let record =
            Arc::new(PackedChanges::pack(&[put("a"), put("b"), put("c"), put("d")]).unwrap());
        let wanted = [RangeId::of(b"b"), RangeId::of(b"d")];
        let queue = [record];
        let take = |front_sent| {
            let keep = |range| wanted.contains(&range);
            take_message::<()>(
                |i| Ok(queue.get(i).cloned()),
                keep,
                front_sent,
                MAX_BYTES_PER_MESSAGE,
            )
            .unwrap()
        };
        let keys = |array: ChangeArray| {
            let changes: Vec<Change> = rmp_serde::from_slice(&array.bytes).unwrap();
            changes.iter().map(|c| c.key().clone()).collect::<Vec<_>>()
        };
        let (taken, array) = take(0);
        assert_eq!(taken, Taken::Whole(1));
        assert_eq!(keys(array), ["b", "d"]);
        // Resuming after the first kept change confirmed: the second only.
        assert_eq!(keys(take(1).1), ["d"]);
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

    #[test]
    fn ticks_are_whole_lingers_since_the_epoch() {
        let ms = Duration::from_millis;
        assert_eq!(until_next_tick(ms(25), ms(20)), ms(15));
        assert_eq!(
            until_next_tick(ms(40), ms(20)),
            ms(20),
            "on a tick: the next one"
        );
        assert_eq!(until_next_tick(ms(0), ms(20)), ms(20));
        assert_eq!(until_next_tick(ms(39), ms(20)), ms(1));
        assert_eq!(until_next_tick(ms(39), Duration::ZERO), Duration::ZERO);
        let now = tokio::time::Instant::now();
        let next = next_tick(now, ms(20));
        assert!(next > now && next <= now + ms(20));
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
