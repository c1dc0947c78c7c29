//! Acknowledgements, coalesced: one `basic.ack` with `multiple` settles a whole run of
//! consecutive deliveries. RabbitMQ spends about as much on an ack as on a delivery, so this
//! is worth a third more throughput here.
//!
//! The rule that keeps it safe: an ack with `multiple` for tag `T` settles every outstanding
//! delivery up to `T`, so `T` must stay below the oldest delivery still being handled (the
//! *frontier*). Acks above the frontier are held back, but never for long: past a few of them,
//! or [`RELEASE_AFTER`] later, they go out one by one, so a slow handler never holds other
//! messages' prefetch slots hostage.
//!
//! A held ack is a handled message the broker still counts as unacknowledged: an endpoint
//! that stops [flushes](Acks::flush) its acks before its connection closes, and a crash
//! redelivers at most the few handled in the last [`RELEASE_AFTER`] (at-least-once, as
//! always: duplicates possible, never a gap).

use crate::error::BusError;
use futures_util::FutureExt;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tracing::debug;

/// The longest an ack is held.
const RELEASE_AFTER: Duration = Duration::from_millis(5);

/// What to tell the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Command {
    /// Acknowledge `tag`, and with `multiple` every outstanding delivery below it too.
    Ack { tag: u64, multiple: bool },
    /// Give `tag` back to its queue.
    Nack { tag: u64 },
}

/// Which deliveries of one channel are being handled and which acks wait to be sent.
#[derive(Debug)]
pub(super) struct AckWindow {
    in_flight: BTreeSet<u64>,
    held: BTreeSet<u64>,
    /// How many acks below the frontier make one `multiple` ack.
    batch: usize,
    /// How many acks above the frontier may wait for it.
    hold_limit: usize,
}

impl AckWindow {
    /// A window that sends an ack with `multiple` once `batch` acks are below the frontier,
    /// and holds at most `hold_limit` acks above it.
    pub(super) fn new(batch: usize, hold_limit: usize) -> Self {
        Self {
            in_flight: BTreeSet::new(),
            held: BTreeSet::new(),
            batch: batch.max(1),
            hold_limit,
        }
    }

    /// A delivery was received (in tag order).
    pub(super) fn delivered(&mut self, tag: u64) {
        self.in_flight.insert(tag);
    }

    /// `tag` was handled: what to send now.
    pub(super) fn ack(&mut self, tag: u64) -> Vec<Command> {
        self.in_flight.remove(&tag);
        self.held.insert(tag);
        self.flush(false)
    }

    /// `tag` goes back to its queue: what to send now.
    pub(super) fn nack(&mut self, tag: u64) -> Vec<Command> {
        self.in_flight.remove(&tag);
        let mut commands = vec![Command::Nack { tag }];
        commands.extend(self.flush(false));
        commands
    }

    /// Every held ack, now.
    pub(super) fn release(&mut self) -> Vec<Command> {
        self.flush(true)
    }

    /// Whether some ack waits to be sent.
    pub(super) fn holds_any(&self) -> bool {
        !self.held.is_empty()
    }

    /// Whether every delivery was acked or given back.
    pub(super) fn settled(&self) -> bool {
        self.in_flight.is_empty()
    }

    fn flush(&mut self, release_all: bool) -> Vec<Command> {
        let frontier = self.in_flight.first().copied().unwrap_or(u64::MAX);
        let above = self.held.split_off(&frontier);
        let below = std::mem::replace(&mut self.held, above);
        let mut commands = Vec::new();
        if release_all || below.len() >= self.batch {
            commands.extend(below.last().map(|&tag| Command::Ack {
                tag,
                multiple: true,
            }));
        } else {
            self.held.extend(below);
        }
        if release_all || self.held.range(frontier..).count() > self.hold_limit {
            let above = self.held.split_off(&frontier);
            commands.extend(above.into_iter().map(|tag| Command::Ack {
                tag,
                multiple: false,
            }));
        }
        commands
    }
}

/// The acks of one consumer channel.
pub(super) struct Acks {
    channel: Channel,
    state: Mutex<State>,
    /// Wakes the task that releases held acks after [`RELEASE_AFTER`].
    holding: Arc<Notify>,
}

struct State {
    window: AckWindow,
    /// The last frame handed to lapin, until it is written to the socket. Frames leave in
    /// order, so once it is written, every ack decided before it is too.
    last_write: Option<Write>,
}

type Write = Pin<Box<dyn Future<Output = lapin::Result<()>> + Send>>;

impl Acks {
    /// Acks for `channel` (see [`AckWindow::new`]), with a task that sends any held ack at
    /// most [`RELEASE_AFTER`] after it was decided, until the last handle is gone.
    pub(super) fn start(channel: Channel, batch: usize, hold_limit: usize) -> Arc<Acks> {
        let acks = Arc::new(Acks {
            channel,
            state: Mutex::new(State {
                window: AckWindow::new(batch, hold_limit),
                last_write: None,
            }),
            holding: Arc::new(Notify::new()),
        });
        tokio::spawn(release_held(Arc::downgrade(&acks), acks.holding.clone()));
        acks
    }

    /// A delivery was received.
    pub(super) fn delivered(&self, tag: u64) {
        self.state().window.delivered(tag);
    }

    /// Acknowledges `tag`, now or (held) a little later.
    pub(super) fn ack(&self, tag: u64) -> Result<(), BusError> {
        if !self.channel.status().connected() {
            return Err(BusError::Transport(
                "the channel closed before the ack; the broker will redeliver".into(),
            ));
        }
        self.settle(|window| window.ack(tag));
        Ok(())
    }

    /// Gives `tag` back to its queue.
    pub(super) fn nack(&self, tag: u64) {
        self.settle(|window| window.nack(tag));
    }

    fn settle(&self, decide: impl FnOnce(&mut AckWindow) -> Vec<Command>) {
        let mut state = self.state();
        let commands = decide(&mut state.window);
        self.send(&mut state, commands);
        if state.window.holds_any() {
            self.holding.notify_one();
        }
    }

    /// Hands every held ack to lapin now, without waiting for the write: before a connection
    /// closes to be replaced, so that what was handled is not redelivered.
    pub(super) fn release(&self) {
        let mut state = self.state();
        let commands = state.window.release();
        self.send(&mut state, commands);
    }

    /// Whether every delivery taken from the channel was acked or given back.
    pub(super) fn settled(&self) -> bool {
        self.state().window.settled()
    }

    /// Waits, for at most `grace`, until every delivery taken from the channel is settled (a
    /// delivery the consumer still held when its endpoint stopped is given back as it is
    /// dropped), then sends every held ack and waits, for at most `write_within`, until lapin
    /// has written them: what must happen before the connection closes, or the broker would
    /// redeliver messages that were handled.
    pub(super) async fn flush(&self, grace: Duration, write_within: Duration) {
        let settle_by = tokio::time::Instant::now() + grace;
        while !self.settled() && tokio::time::Instant::now() < settle_by {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let write = {
            let mut state = self.state();
            let commands = state.window.release();
            self.send(&mut state, commands);
            state.last_write.take()
        };
        if let Some(write) = write {
            match tokio::time::timeout(write_within, write).await {
                Ok(Ok(())) => {}
                // The channel is gone: the broker redelivers what it did not see acked.
                Ok(Err(e)) => debug!(error = %e, "acks not written; the broker will redeliver"),
                Err(_) => debug!("acks not written in time; the broker will redeliver"),
            }
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands `commands` to lapin in order. Called with the state locked: the order of
    /// decisions must be the order on the wire (an ack with `multiple` sent before an earlier
    /// decision's would settle that one's tag, and the broker closes the channel when a tag
    /// is acknowledged twice). lapin queues a method's frame on the first poll of its
    /// future; the future then resolves once the frame is written.
    fn send(&self, state: &mut State, commands: Vec<Command>) {
        for command in commands {
            let channel = self.channel.clone();
            let mut write: Write = Box::pin(async move {
                match command {
                    Command::Ack { tag, multiple } => {
                        channel.basic_ack(tag, BasicAckOptions { multiple }).await
                    }
                    Command::Nack { tag } => {
                        let requeue = BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        };
                        channel.basic_nack(tag, requeue).await
                    }
                }
            });
            state.last_write = match (&mut write).now_or_never() {
                None => Some(write),
                Some(Ok(())) => None,
                // The channel is gone: the broker redelivers what it did not see acknowledged.
                Some(Err(e)) => {
                    debug!(error = %e, ?command, "ack not sent; the broker will redeliver");
                    None
                }
            };
        }
    }
}

impl Drop for Acks {
    fn drop(&mut self) {
        // The last handle is gone (the channel's last delivery settled): what is still held
        // is handed to lapin before the channel closes.
        self.release();
        self.holding.notify_one();
    }
}

/// Sends the acks held above a stuck frontier, [`RELEASE_AFTER`] after the first was held;
/// ends when the acks are dropped.
async fn release_held(acks: Weak<Acks>, holding: Arc<Notify>) {
    loop {
        holding.notified().await;
        tokio::time::sleep(RELEASE_AFTER).await;
        let Some(acks) = acks.upgrade() else {
            return;
        };
        acks.release();
    }
}

#[cfg(test)]
mod tests {
    use super::Command::{Ack, Nack};
    use super::*;
    use proptest::prelude::*;

    /// An ack with `multiple` up to `tag`.
    fn up_to(tag: u64) -> Command {
        Ack {
            tag,
            multiple: true,
        }
    }

    /// An ack of `tag` alone.
    fn only(tag: u64) -> Command {
        Ack {
            tag,
            multiple: false,
        }
    }

    #[test]
    fn in_order_completions_become_one_multiple_ack() {
        let mut w = AckWindow::new(1, 4);
        (1..=3).for_each(|t| w.delivered(t));
        assert_eq!(w.ack(2), vec![], "held behind 1");
        assert_eq!(w.ack(3), vec![], "held behind 1");
        assert_eq!(w.ack(1), vec![up_to(3)]);
    }

    #[test]
    fn a_slow_delivery_does_not_hold_more_than_the_limit() {
        let mut w = AckWindow::new(1, 2);
        (1..=5).for_each(|t| w.delivered(t));
        assert_eq!(w.ack(2), vec![]);
        assert_eq!(w.ack(3), vec![]);
        assert_eq!(w.ack(4), vec![only(2), only(3), only(4)]);
        assert_eq!(w.nack(1), vec![Nack { tag: 1 }]);
        assert_eq!(w.ack(5), vec![up_to(5)]);
    }

    #[test]
    fn release_sends_everything_held() {
        let mut w = AckWindow::new(1, 10);
        (1..=3).for_each(|t| w.delivered(t));
        w.ack(3);
        assert_eq!(w.release(), vec![only(3)]);
        assert_eq!(w.release(), vec![]);
    }

    #[test]
    fn acks_below_the_frontier_wait_for_a_batch() {
        let mut w = AckWindow::new(3, 10);
        (1..=5).for_each(|t| w.delivered(t));
        assert_eq!(w.ack(1), vec![]);
        assert_eq!(w.ack(2), vec![]);
        assert_eq!(w.ack(3), vec![up_to(3)]);
        assert_eq!(w.ack(4), vec![]);
        assert_eq!(w.release(), vec![up_to(4)]);
    }

    proptest! {
        /// Against a model of the broker: every delivery is settled exactly once, as decided
        /// (acked or requeued), never while it is still being handled, and a multiple ack
        /// always names a delivery that is still outstanding (RabbitMQ closes the channel
        /// otherwise).
        #[test]
        fn settles_each_delivery_once_as_decided(
            decisions in proptest::collection::vec((any::<bool>(), any::<u8>()), 1..60),
            limit in 0usize..6,
            batch in 1usize..6,
            releases in proptest::collection::vec(any::<u8>(), 0..10),
        ) {
            let n = decisions.len() as u64;
            let mut w = AckWindow::new(batch, limit);
            (1..=n).for_each(|t| w.delivered(t));
            // Settle in an order driven by the random bytes.
            let mut order: Vec<u64> = (1..=n).collect();
            order.sort_by_key(|t| decisions[(*t - 1) as usize].1);
            let mut outstanding: BTreeSet<u64> = (1..=n).collect();
            let mut in_flight: BTreeSet<u64> = (1..=n).collect();
            let mut acked = BTreeSet::new();
            let mut apply = |commands: Vec<Command>, in_flight: &BTreeSet<u64>| {
                for c in commands {
                    match c {
                        Ack { tag, multiple } => {
                            prop_assert!(outstanding.contains(&tag), "ack of unknown tag {}", tag);
                            let settled: Vec<u64> = if multiple {
                                outstanding.range(..=tag).copied().collect()
                            } else {
                                vec![tag]
                            };
                            for t in settled {
                                prop_assert!(!in_flight.contains(&t), "acked {} while handled", t);
                                outstanding.remove(&t);
                                acked.insert(t);
                            }
                        }
                        Nack { tag } => {
                            prop_assert!(outstanding.remove(&tag), "nack of unknown tag {}", tag);
                        }
                    }
                }
                Ok(())
            };
            for (i, tag) in order.iter().enumerate() {
                in_flight.remove(tag);
                let ack = decisions[(*tag - 1) as usize].0;
                let commands = if ack { w.ack(*tag) } else { w.nack(*tag) };
                apply(commands, &in_flight)?;
                if releases.contains(&(i as u8)) {
                    apply(w.release(), &in_flight)?;
                }
            }
            apply(w.release(), &in_flight)?;
            prop_assert!(outstanding.is_empty(), "left unsettled: {:?}", outstanding);
            let expected: BTreeSet<u64> = (1..=n).filter(|t| decisions[(*t - 1) as usize].0).collect();
            prop_assert_eq!(acked, expected);
        }
    }
}
