//! Groups concurrent sends into batches that share a channel and its confirms.
//!
//! A [`Batch`] needs a channel nothing else publishes on until it is settled, and one channel
//! per send in flight would be a channel per message. So one task per connection takes every
//! send waiting, publishes them as one batch on an idle channel, and settles a few batches at
//! once, each on a channel of its own. Under load a batch carries hundreds of messages (and
//! the broker confirms them with a few acks); a lone send is a batch of one.

use super::batch::{self, Batch, Publication};
use crate::error::BusError;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use lapin::{Channel, Connection};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// How many messages a batch takes at most from the sends waiting (a larger send goes alone).
const MAX_BATCH: usize = 1024;

/// How many batches wait for their confirms at once, each on a channel of its own.
const MAX_SETTLING: usize = 4;

/// Sends waiting for the publishing task.
const QUEUED_SENDS: usize = 4096;

/// Publishes the sends of one connection in batches (see the module docs).
pub(crate) struct Publisher {
    sends: mpsc::Sender<Request>,
    in_progress: Arc<watch::Sender<usize>>,
}

/// One caller's messages, answered once all of them are settled.
struct Request {
    publications: Arc<[Publication]>,
    done: oneshot::Sender<Result<(), BusError>>,
}

impl Publisher {
    /// Starts the publishing task of `connection`; it ends when the publisher is dropped and
    /// the batches in flight are settled.
    pub(crate) fn start(connection: Arc<Connection>, confirm_timeout: Duration) -> Self {
        let (sends, waiting) = mpsc::channel(QUEUED_SENDS);
        tokio::spawn(publish_batches(connection, waiting, confirm_timeout));
        Self {
            sends,
            in_progress: Arc::new(watch::Sender::new(0)),
        }
    }

    /// Publishes `publications` and returns once the broker has confirmed all of them; the
    /// first message that was refused or (having to reach a queue) could not be routed is the
    /// error.
    pub(crate) async fn publish(&self, publications: Arc<[Publication]>) -> Result<(), BusError> {
        let _counted = InProgress::count(&self.in_progress);
        let (done, outcome) = oneshot::channel();
        let closed = || BusError::Transport("the connection's publisher stopped".into());
        self.sends
            .send(Request { publications, done })
            .await
            .map_err(|_| closed())?;
        outcome.await.map_err(|_| closed())?
    }

    /// Waits until no send is in progress, at most `timeout`.
    pub(crate) async fn finished(&self, timeout: Duration) {
        let mut in_progress = self.in_progress.subscribe();
        let _ = tokio::time::timeout(timeout, in_progress.wait_for(|n| *n == 0)).await;
    }
}

/// Counts one send in progress for as long as it lives.
struct InProgress<'a>(&'a watch::Sender<usize>);

impl<'a> InProgress<'a> {
    fn count(counter: &'a watch::Sender<usize>) -> Self {
        counter.send_modify(|n| *n += 1);
        Self(counter)
    }
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// The publishing task: batches of waiting sends out, settled batches' channels back in.
async fn publish_batches(
    connection: Arc<Connection>,
    mut waiting: mpsc::Receiver<Request>,
    confirm_timeout: Duration,
) {
    let mut idle: Vec<Channel> = Vec::new();
    let mut settling = FuturesUnordered::new();
    loop {
        tokio::select! {
            Some(channel) = settling.next(), if !settling.is_empty() => {
                idle.extend(channel);
            }
            first = waiting.recv(), if settling.len() < MAX_SETTLING => {
                let Some(first) = first else { break };
                let group = more_of(first, &mut waiting);
                let channel = match idle.pop() {
                    Some(c) => Ok(c),
                    None => open_channel(&connection, confirm_timeout).await,
                };
                match channel {
                    Ok(channel) => {
                        let mut batch = Batch::new(channel);
                        let all = group.iter().flat_map(|s| s.publications.iter());
                        // A failed publish is reported by the settling.
                        let _ = batch.publish(all).await;
                        settling.push(settle(batch, group, confirm_timeout));
                    }
                    Err(e) => answer_all(group, &e),
                }
            }
        }
    }
    while settling.next().await.is_some() {}
}

/// A new channel for batches; a broker that does not answer must not stall every send.
async fn open_channel(connection: &Connection, timeout: Duration) -> Result<Channel, BusError> {
    tokio::time::timeout(timeout, batch::confirming_channel(connection))
        .await
        .map_err(|_| BusError::Timeout(timeout))?
}

/// `first` and the sends waiting behind it, up to [`MAX_BATCH`] messages.
fn more_of(first: Request, waiting: &mut mpsc::Receiver<Request>) -> Vec<Request> {
    let mut messages = first.publications.len();
    let mut group = vec![first];
    while messages < MAX_BATCH {
        let Ok(next) = waiting.try_recv() else { break };
        messages += next.publications.len();
        group.push(next);
    }
    group
}

/// Settles `batch` and answers its sends; the channel, if it can carry the next batch.
async fn settle(batch: Batch, group: Vec<Request>, confirm_timeout: Duration) -> Option<Channel> {
    let channel = batch.channel().clone();
    match batch.settle(confirm_timeout).await {
        Ok(outcomes) => {
            let mut outcomes = outcomes.into_iter();
            for send in group {
                let mine: Vec<_> = outcomes.by_ref().take(send.publications.len()).collect();
                let _ = send.done.send(mine.into_iter().collect());
            }
            channel.status().connected().then_some(channel)
        }
        Err(e) => {
            answer_all(group, &e);
            // Confirms or returns of this batch may still arrive: the channel must go.
            let _ = channel.close(200, "batch failed".into()).await;
            None
        }
    }
}

fn answer_all(group: Vec<Request>, error: &BusError) {
    for send in group {
        let _ = send.done.send(Err(batch::copy_of(error)));
    }
}
