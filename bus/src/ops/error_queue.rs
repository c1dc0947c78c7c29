//! [`ErrorQueue`]: browsing an error queue and moving its messages, without losing any.
//!
//! Every operation reads the queue by consuming it without acknowledging: the messages it
//! does not select are given back when its channel closes, in their original order, and
//! those it moves are acknowledged only after the broker confirmed their copy. A crash at any
//! point can therefore leave a duplicate, never a gap.

use super::{FailedMessage, Selection};
use crate::error::BusError;
use crate::headers::{Headers, format_time, names};
use crate::transport::rabbitmq::amqp;
use crate::transport::rabbitmq::batch::{self, Batch, Publication, Routing};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};
use serde::Serialize;
use std::time::{Duration, SystemTime};

/// How many moved messages wait for their confirms together.
const CONFIRM_WINDOW: usize = 512;

/// How long the broker may take to confirm a window of moved messages.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// How long to wait for the next message of a queue that reported more.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// What to do with the selected messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Back to the queue each failed in, or to `to`, with the failure headers moved aside.
    Replay {
        /// A queue to send them to instead of their source queue.
        to: Option<String>,
    },
    /// To `<error queue>.archive`, unchanged: out of the working list, but kept.
    Archive,
    /// Delete them.
    Purge,
}

/// What an operation did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Outcome {
    /// How many messages were in the queue when the operation started.
    pub examined: usize,
    /// How many the selection matched.
    pub selected: usize,
    /// How many were moved (or deleted); 0 on a dry run.
    pub moved: usize,
    /// Messages that could not be moved, with the reason; they stay in the error queue.
    pub failed: Vec<MoveFailure>,
}

impl Outcome {
    /// Records that message `id` stays where it is, and why.
    fn stays(&mut self, id: String, error: impl std::fmt::Display) {
        self.failed.push(MoveFailure {
            id,
            error: error.to_string(),
        });
    }
}

/// A message that could not be moved.
#[derive(Debug, Clone, Serialize)]
pub struct MoveFailure {
    /// Its id.
    pub id: String,
    /// Why.
    pub error: String,
}

/// An error queue on RabbitMQ.
pub struct ErrorQueue {
    connection: Connection,
    queue: String,
}

impl std::fmt::Debug for ErrorQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ErrorQueue")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl ErrorQueue {
    /// Connects to the broker at `url` to work on the error queue `queue`.
    pub async fn connect(url: &str, queue: &str) -> Result<Self, BusError> {
        let props = ConnectionProperties::default()
            .with_connection_name(format!("rhinobus-cli:{}", std::process::id()).into());
        let connection =
            tokio::time::timeout(Duration::from_secs(10), Connection::connect(url, props))
                .await
                .map_err(|_| BusError::Transport("no answer from RabbitMQ within 10 s".into()))?
                .map_err(|e| BusError::Transport(format!("cannot reach RabbitMQ: {e}")))?;
        Ok(Self {
            connection,
            queue: queue.to_owned(),
        })
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.queue
    }

    /// Every message in the queue, in queue order, leaving the queue as it was. Bodies are
    /// left out (empty) to keep a large queue's listing small; [`ErrorQueue::find`] has them.
    pub async fn browse(&self) -> Result<Vec<FailedMessage>, BusError> {
        self.read(|_| false).await
    }

    /// The messages with id `id` (a message replayed and failed again can be there twice),
    /// bodies included, leaving the queue as it was.
    pub async fn find(&self, id: &str) -> Result<Vec<FailedMessage>, BusError> {
        let found = self.read(|m| m.id == id).await?;
        Ok(found.into_iter().filter(|m| m.id == id).collect())
    }

    /// Reads the whole queue without taking anything from it, keeping the bodies of the
    /// messages for which `keep_body` says so.
    async fn read(
        &self,
        keep_body: impl Fn(&FailedMessage) -> bool,
    ) -> Result<Vec<FailedMessage>, BusError> {
        let (channel, mut reader) = self.open_reader().await?;
        let mut out = Vec::with_capacity(reader.remaining);
        while let Some(d) = reader.next().await? {
            let mut m = FailedMessage::new(amqp::envelope_headers(&d.properties), Vec::new());
            if keep_body(&m) {
                m.body = d.data;
            }
            out.push(m);
        }
        let _ = channel.close(200, "browsed".into()).await;
        Ok(out)
    }

    /// Applies `action` to the selected messages (or only counts them, on a dry run).
    pub async fn apply(
        &self,
        selection: &Selection,
        action: &Action,
        dry_run: bool,
    ) -> Result<Outcome, BusError> {
        let (channel, mut reader) = self.open_reader().await?;
        let publisher = batch::confirming_channel(&self.connection).await?;
        let archive = format!("{}.archive", self.queue);
        if *action == Action::Archive && !dry_run {
            declare_durable(&publisher, &archive).await?;
        }
        let mut outcome = Outcome {
            examined: reader.remaining,
            ..Outcome::default()
        };
        let mut batch = Batch::new(publisher.clone());
        let mut moving = Vec::new();
        while let Some(d) = reader.next().await? {
            let headers = amqp::envelope_headers(&d.properties);
            let failed = FailedMessage::new(headers, Vec::new());
            if !selection.matches(&failed) {
                continue; // left unacknowledged: back in place when the channel closes
            }
            outcome.selected += 1;
            if dry_run {
                continue;
            }
            let target = match action {
                Action::Purge => {
                    settle(failed.id, d.acker, Ok(()), &mut outcome).await;
                    continue;
                }
                Action::Archive => amqp::moved_copy(&d.properties, &Headers::new())
                    .map(|properties| (archive.clone(), properties)),
                Action::Replay { to } => to
                    .clone()
                    .or_else(|| failed.source_queue.clone())
                    .ok_or_else(|| {
                        BusError::Invalid("no source queue header; name a queue with --to".into())
                    })
                    .and_then(|target| {
                        let props =
                            replay_properties(&d.properties, &failed.headers, to.is_none())?;
                        Ok((target, props))
                    }),
            };
            // A message that cannot be moved stays where it is (unacked, it goes back when the
            // channel closes) and is reported; the others go on.
            let copy = target.and_then(|(target, properties)| {
                Publication::new("", &target, d.data, properties, Routing::Required)
            });
            let copy = match copy {
                Ok(copy) => copy,
                Err(e) => {
                    outcome.stays(failed.id, e);
                    continue;
                }
            };
            if let Err(e) = batch.publish([&copy]).await {
                // The publishing channel broke: the window's fate is unknown, and so would be
                // that of every later move. Stop; what was not read stays in the queue.
                outcome.stays(failed.id, e);
                break;
            }
            moving.push((failed.id, d.acker));
            if batch.len() >= CONFIRM_WINDOW {
                let full = std::mem::replace(&mut batch, Batch::new(publisher.clone()));
                if !settle_window(full, &mut moving, &mut outcome).await {
                    break;
                }
            }
        }
        settle_window(batch, &mut moving, &mut outcome).await;
        let _ = channel.close(200, "done".into()).await;
        let _ = publisher.close(200, "done".into()).await;
        Ok(outcome)
    }

    async fn open_reader(&self) -> Result<(Channel, Reader), BusError> {
        let channel = self.connection.create_channel().await?;
        let remaining = channel
            .queue_declare(
                amqp::short("queue name", &self.queue)?,
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| BusError::Transport(format!("queue {:?}: {e}", self.queue)))?
            .message_count() as usize;
        channel.basic_qos(0, BasicQosOptions::default()).await?;
        let consumer = channel
            .basic_consume(
                amqp::short("queue name", &self.queue)?,
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok((
            channel,
            Reader {
                consumer,
                remaining,
            },
        ))
    }
}

/// Reads as many messages as the queue held when the operation started.
struct Reader {
    consumer: lapin::Consumer,
    remaining: usize,
}

impl Reader {
    async fn next(&mut self) -> Result<Option<lapin::message::Delivery>, BusError> {
        if self.remaining == 0 {
            return Ok(None);
        }
        match tokio::time::timeout(READ_TIMEOUT, self.consumer.next()).await {
            // Another consumer took the rest: what was seen is all there is to see.
            Err(_) | Ok(None) => Ok(None),
            Ok(Some(d)) => {
                self.remaining -= 1;
                Ok(Some(d?))
            }
        }
    }
}

/// Settles a window of moved messages: acknowledges each original whose copy the broker
/// confirmed and records why the others stay. False when the fate of the whole window is
/// unknown: the publishing channel can then no longer tell one window's returns from the
/// next, and moving stops (what was not read yet stays in the queue).
async fn settle_window(
    batch: Batch,
    moving: &mut Vec<(String, lapin::Acker)>,
    outcome: &mut Outcome,
) -> bool {
    match batch.settle(CONFIRM_TIMEOUT).await {
        Ok(results) => {
            for ((id, acker), result) in moving.drain(..).zip(results) {
                settle(id, acker, result, outcome).await;
            }
            true
        }
        Err(e) => {
            for (id, _) in moving.drain(..) {
                let why =
                    format!("{e}; it is still in the error queue (and may be in the target too)");
                outcome.stays(id, why);
            }
            false
        }
    }
}

/// Acknowledges a moved message once its copy is confirmed, or records why it stays.
async fn settle(
    id: String,
    acker: lapin::Acker,
    result: Result<(), BusError>,
    outcome: &mut Outcome,
) {
    let acked = match result {
        Ok(()) => match acker.ack(BasicAckOptions::default()).await {
            Ok(true) => Ok(()),
            Ok(false) | Err(_) => Err(BusError::Transport(
                "the channel closed before the original was removed; it is still in the error queue (and, if it was moved, in the target too)".into(),
            )),
        },
        Err(e) => Err(e),
    };
    match acked {
        Ok(()) => outcome.moved += 1,
        Err(e) => outcome.stays(id, e),
    }
}

/// The properties of a replayed message: those of a moved copy ([`amqp::moved_copy`]: no TTL,
/// no user id), failure headers moved aside under `rhinobus-previous-failure-*`, delayed
/// retries reset, no time to be received (whoever replays it wants it handled, however late),
/// and the replay recorded. A message
/// going back to be handled (`to_source`) also loses the processing headers of a handling
/// before (an audit copy's); one moved `--to` another queue keeps them.
fn replay_properties(
    props: &lapin::BasicProperties,
    headers: &Headers,
    to_source: bool,
) -> Result<lapin::BasicProperties, BusError> {
    let mut extra = Headers::new();
    for (k, v) in headers {
        if let Some(rest) = k.strip_prefix(names::FAILURE_PREFIX) {
            extra.insert(
                format!("{}{rest}", names::PREVIOUS_FAILURE_PREFIX),
                v.clone(),
            );
        }
    }
    let replays = headers
        .get(names::REPLAY_COUNT)
        .and_then(|n| n.parse::<u32>().ok())
        .unwrap_or(0);
    extra.insert(
        names::REPLAY_COUNT.into(),
        replays.saturating_add(1).to_string(),
    );
    extra.insert(names::REPLAYED_AT.into(), format_time(SystemTime::now()));
    let props = amqp::moved_copy(props, &Headers::new())?;
    amqp::with_headers_changed(&props, &extra, |k| {
        k.starts_with(names::FAILURE_PREFIX)
            || k == names::DELAYED_RETRIES
            || k == names::DISCARD_AFTER
            || (to_source && k.starts_with(names::PROCESSING_PREFIX))
    })
}

async fn declare_durable(channel: &Channel, queue: &str) -> Result<(), BusError> {
    channel
        .queue_declare(
            amqp::short("queue name", queue)?,
            QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(())
}
