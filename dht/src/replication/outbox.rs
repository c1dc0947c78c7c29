//! [`ReplicationOutbox`]: what this node still owes the other replicas, durable until the
//! broker confirmed it.
//!
//! A write stages one outbox record per destination in its own storage batch
//! ([`ReplicationOutbox::stage`]), so the write and the promise to replicate it commit together.
//! After the commit the records also go to an in-memory queue per destination
//! ([`ReplicationOutbox::committed`]); one sender per destination takes everything queued (up
//! to [`MAX_CHANGES_PER_MESSAGE`]), sends it as one [`Replicate`] message, and deletes the
//! records only once `Bus::send` returned, i.e. the broker confirmed. A crash in between
//! leaves the records on disk; they are loaded and sent again at start-up. Sends that fail are
//! retried every [`RETRY_INTERVAL`].

use super::message::Replicate;
use crate::cluster::queue_name;
use crate::routing::{RangeId, Topology};
use crate::shutdown::Shutdown;
use crate::storage::{Batch, Change, OutboxRecord, Storage, StorageError};
use rhinobus::Bus;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;

/// The most changes one [`Replicate`] message carries.
pub const MAX_CHANGES_PER_MESSAGE: usize = 500;
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
    pending: Mutex<VecDeque<OutboxRecord>>,
    wake: Notify,
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
        outbox.committed(leftover);
        Ok(outbox)
    }

    /// The node this outbox sends for.
    pub fn node(&self) -> &str {
        &self.inner.node
    }

    /// How many records wait to be confirmed, over all destinations.
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

    /// Stages, in batch `b`, one outbox record per other replica of the keys `b` changed.
    /// Hand the result to [`committed`](Self::committed) once the batch committed.
    pub fn stage(&self, b: &mut Batch<'_>) -> Result<Vec<OutboxRecord>, StorageError> {
        if b.changes().is_empty() {
            return Ok(Vec::new());
        }
        let topology = &self.inner.topology;
        let mut by_destination: BTreeMap<&str, Vec<Change>> = BTreeMap::new();
        for change in b.changes() {
            for i in topology.replica_indexes(RangeId::of(change.key())) {
                let Some(name) = topology.names.get(i as usize) else {
                    continue;
                };
                if *name != self.inner.node {
                    by_destination
                        .entry(name.as_str())
                        .or_default()
                        .push(change.clone());
                }
            }
        }
        let mut records = Vec::with_capacity(by_destination.len());
        for (destination, changes) in by_destination {
            records.push(b.enqueue_outbox(destination, changes)?);
        }
        Ok(records)
    }

    /// Queues committed records for their senders.
    pub fn committed(&self, records: Vec<OutboxRecord>) {
        for r in records {
            match self.inner.destinations.get(&r.destination) {
                Some(d) => {
                    d.pending
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push_back(r);
                    d.wake.notify_one();
                }
                // A node no longer in the topology: nobody to send to. The record stays on
                // disk, for an operator to look at, rather than being dropped.
                None => {
                    tracing::warn!(destination = %r.destination, "outbox record for an unknown node")
                }
            }
        }
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
        loop {
            let (count, changes) = {
                let pending = d.pending.lock().unwrap_or_else(PoisonError::into_inner);
                let mut changes = Vec::new();
                let mut count = 0;
                for r in pending.iter() {
                    if count > 0 && changes.len() + r.changes.len() > MAX_CHANGES_PER_MESSAGE {
                        break;
                    }
                    changes.extend(r.changes.iter().cloned());
                    count += 1;
                }
                (count, changes)
            };
            if count == 0 {
                tokio::select! {
                    _ = stop.recv() => return,
                    _ = d.wake.notified() => continue,
                }
            }
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
                    let done: Vec<OutboxRecord> = d
                        .pending
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .drain(..count)
                        .collect();
                    let storage = self.inner.storage.clone();
                    let removed = tokio::task::spawn_blocking(move || {
                        storage.remove_outbox(done.iter().map(|r| (r.destination.as_str(), r.id)))
                    })
                    .await;
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
                    tracing::warn!(%destination, error = %e, "replication send failed; retrying");
                    tokio::select! {
                        _ = stop.recv() => return,
                        _ = tokio::time::sleep(RETRY_INTERVAL) => {}
                    }
                }
            }
        }
    }
}
