//! The senders: one per destination, each sending what is queued for it on the shared ticks,
//! and confirming what the broker took.

use super::take::{ChangeArray, Taken, lone_change, take_message};
use super::{
    Destination, MAX_BYTES_PER_MESSAGE, MAX_CHANGES_PER_MESSAGE, RETRY_INTERVAL, ReplicationOutbox,
};
use crate::cluster::queue_name;
use crate::replication::message::Replicate;
use crate::shutdown::Shutdown;
use crate::storage::{OutboxId, PackedChanges, StorageError};
use rhinobus::Bus;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

impl ReplicationOutbox {
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
    pub(super) fn next_message(
        &self,
        destination: usize,
        front_sent: usize,
    ) -> Result<(Taken, ChangeArray), StorageError> {
        let d = self.destination(destination);
        take_message(
            |i| {
                // Indexes stay valid: only this destination's sender removes from the queue.
                let Some(delivery) = d.lock().get(i).map(|q| q.delivery.clone()) else {
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

    /// Waits until a message's worth of changes is queued for `destination`, or until `due`
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
        while d.owed() < MAX_CHANGES_PER_MESSAGE {
            tokio::select! {
                _ = stop.recv() => return false,
                _ = tokio::time::sleep_until(due) => return true,
                _ = d.wake.notified() => {}
            }
        }
        true
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
        let mut changes = 0;
        let done: Vec<OutboxId> = destination
            .lock()
            .drain(..whole)
            .inspect(|q| changes += q.changes)
            .filter(|q| q.delivery.remaining.fetch_sub(1, Ordering::AcqRel) == 1)
            .map(|q| q.delivery.id)
            .collect();
        destination.owed.fetch_sub(changes, Ordering::AcqRel);
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
pub(super) fn next_tick(t: tokio::time::Instant, linger: Duration) -> tokio::time::Instant {
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
