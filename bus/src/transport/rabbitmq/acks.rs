//! Acknowledgements, coalesced: one `basic.ack` with `multiple` settles a whole run of
//! consecutive deliveries. RabbitMQ spends about as much on an ack as on a delivery, so this
//! is worth a third more throughput here.
//!
//! The rule that keeps it safe: an ack with `multiple` for tag `T` settles every outstanding
//! delivery up to `T`, so `T` must stay below the oldest delivery still being handled (the
//! *frontier*). Acks above the frontier are held back, but never for long: past a few of them,
//! or at the next tick, they go out one by one, so a slow handler never holds other messages'
//! prefetch slots hostage.

use crate::error::BusError;
use futures_util::FutureExt;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

/// How often every held ack is sent, however few: the longest an ack waits.
const RELEASE_EVERY: Duration = Duration::from_millis(5);

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
    window: Mutex<AckWindow>,
}

impl Acks {
    /// Acks for `channel` (see [`AckWindow::new`]); a task releases held acks every
    /// [`RELEASE_EVERY`] until the last handle is gone, and the last handle releases the rest.
    pub(super) fn start(channel: Channel, batch: usize, hold_limit: usize) -> Arc<Acks> {
        let acks = Arc::new(Acks {
            channel,
            window: Mutex::new(AckWindow::new(batch, hold_limit)),
        });
        tokio::spawn(release_held(Arc::downgrade(&acks)));
        acks
    }

    /// A delivery was received.
    pub(super) fn delivered(&self, tag: u64) {
        self.window().delivered(tag);
    }

    /// Acknowledges `tag`, now or (held) a little later.
    pub(super) fn ack(&self, tag: u64) -> Result<(), BusError> {
        if !self.channel.status().connected() {
            return Err(BusError::Transport(
                "the channel closed before the ack; the broker will redeliver".into(),
            ));
        }
        let mut window = self.window();
        let commands = window.ack(tag);
        self.send(commands);
        Ok(())
    }

    /// Gives `tag` back to its queue.
    pub(super) fn nack(&self, tag: u64) {
        let mut window = self.window();
        let commands = window.nack(tag);
        self.send(commands);
    }

    fn window(&self) -> std::sync::MutexGuard<'_, AckWindow> {
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Hands `commands` to lapin in order. Called with the window locked: the order of
    /// decisions must be the order on the wire (an ack with `multiple` sent before an earlier
    /// decision's would settle that one's tag, and the broker closes the channel when a tag
    /// is acknowledged twice). lapin queues a method's frame on the first poll of its
    /// future, so one poll puts it in line without waiting for the write.
    fn send(&self, commands: Vec<Command>) {
        for command in commands {
            // Not waiting is safe: a failure means the channel is gone, and the broker
            // redelivers whatever it did not see acknowledged.
            let _ = match command {
                Command::Ack { tag, multiple } => self
                    .channel
                    .basic_ack(tag, BasicAckOptions { multiple })
                    .now_or_never(),
                Command::Nack { tag } => self
                    .channel
                    .basic_nack(
                        tag,
                        BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        },
                    )
                    .now_or_never(),
            };
        }
    }
}

impl Drop for Acks {
    fn drop(&mut self) {
        // The last delivery of the channel is settled (an endpoint stopping, say): what is
        // held goes out before the channel closes.
        let commands = self.window().release();
        self.send(commands);
    }
}

/// Every [`RELEASE_EVERY`], sends the acks still held above a stuck frontier.
async fn release_held(acks: Weak<Acks>) {
    let mut tick = tokio::time::interval(RELEASE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(acks) = acks.upgrade() else {
            return;
        };
        let mut window = acks.window();
        let commands = window.release();
        acks.send(commands);
    }
}

#[cfg(test)]
mod tests {
    use super::Command::{Ack, Nack};
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn in_order_completions_become_one_multiple_ack() {
        let mut w = AckWindow::new(1, 4);
        (1..=3).for_each(|t| w.delivered(t));
        assert_eq!(w.ack(2), vec![], "held behind 1");
        assert_eq!(w.ack(3), vec![], "held behind 1");
        assert_eq!(
            w.ack(1),
            vec![Ack {
                tag: 3,
                multiple: true
            }]
        );
    }

    #[test]
    fn a_slow_delivery_does_not_hold_more_than_the_limit() {
        let mut w = AckWindow::new(1, 2);
        (1..=5).for_each(|t| w.delivered(t));
        assert_eq!(w.ack(2), vec![]);
        assert_eq!(w.ack(3), vec![]);
        assert_eq!(
            w.ack(4),
            vec![
                Ack {
                    tag: 2,
                    multiple: false
                },
                Ack {
                    tag: 3,
                    multiple: false
                },
                Ack {
                    tag: 4,
                    multiple: false
                }
            ]
        );
        assert_eq!(w.nack(1), vec![Nack { tag: 1 }]);
        assert_eq!(
            w.ack(5),
            vec![Ack {
                tag: 5,
                multiple: true
            }]
        );
    }

    #[test]
    fn release_sends_everything_held() {
        let mut w = AckWindow::new(1, 10);
        (1..=3).for_each(|t| w.delivered(t));
        w.ack(3);
        assert_eq!(
            w.release(),
            vec![Ack {
                tag: 3,
                multiple: false
            }]
        );
        assert_eq!(w.release(), vec![]);
    }

    #[test]
    fn acks_below_the_frontier_wait_for_a_batch() {
        let mut w = AckWindow::new(3, 10);
        (1..=5).for_each(|t| w.delivered(t));
        assert_eq!(w.ack(1), vec![]);
        assert_eq!(w.ack(2), vec![]);
        assert_eq!(
            w.ack(3),
            vec![Ack {
                tag: 3,
                multiple: true
            }]
        );
        assert_eq!(w.ack(4), vec![]);
        assert_eq!(
            w.release(),
            vec![Ack {
                tag: 4,
                multiple: true
            }]
        );
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
