//! Transports move envelopes between queues: [`RabbitMq`] for production and [`InMemory`] for
//! tests and the samples' embedded default. Both give the endpoint the same semantics: a
//! delivery stays owned by the endpoint until it is acked or forwarded, and whatever is
//! neither goes back to its queue.

mod memory;
pub(crate) mod rabbitmq;

pub use memory::InMemory;
pub use rabbitmq::{DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_URL as DEFAULT_AMQP_URL, RabbitMq};

use crate::error::BusError;
use crate::headers::{Headers, names, parse_time};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Where an outgoing message goes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Destination {
    /// Point to point: straight into the named queue, which must exist.
    Queue(String),
    /// Publish: to every queue subscribed to this message type.
    Topic(String),
}

/// A message ready to leave: its headers and its encoded body. It can be stored (sagas keep
/// what a handling sent with their state) and staged again as it is with [`crate::Context::stage`].
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OutgoingMessage {
    /// Where it goes.
    pub destination: Destination,
    /// Its envelope headers.
    pub headers: Headers,
    /// Its encoded body.
    pub body: Vec<u8>,
}

impl OutgoingMessage {
    /// How long a send must still wait before it is delivered: the time in its
    /// `rhinobus-deliver-at` header less now, or `None` when it has none or that time has
    /// come. A publication with the header is [`BusError::Invalid`]: it cannot be delayed; so
    /// is a time further off than [`crate::MAX_DELAY`] (a header set by hand).
    pub fn remaining_delay(&self) -> Result<Option<Duration>, BusError> {
        let Some(at) = self.time_header(names::DELIVER_AT)? else {
            return Ok(None);
        };
        if let Destination::Topic(t) = &self.destination {
            return Err(BusError::Invalid(format!(
                "a publication of {t:?} has a {} header: publications cannot be delayed",
                names::DELIVER_AT
            )));
        }
        let Ok(remaining) = at.duration_since(SystemTime::now()) else {
            return Ok(None);
        };
        crate::bus::check_delay(remaining)?;
        Ok(Some(remaining).filter(|d| !d.is_zero()))
    }

    /// How much longer the message is worth handling: the time in its
    /// `rhinobus-discard-after` header less now (zero once that has passed), or `None` when it
    /// has none. A header that is not an RFC 3339 time (set by hand) is [`BusError::Invalid`].
    pub fn time_left(&self) -> Result<Option<Duration>, BusError> {
        let left = self.time_header(names::DISCARD_AFTER)?;
        Ok(left.map(|at| at.duration_since(SystemTime::now()).unwrap_or_default()))
    }

    /// The time in header `name`, if there is one.
    fn time_header(&self, name: &str) -> Result<Option<SystemTime>, BusError> {
        let Some(text) = self.headers.get(name) else {
            return Ok(None);
        };
        let at = parse_time(text).ok_or_else(|| {
            BusError::Invalid(format!(
                "the {name} header {text:?} is not an RFC 3339 time"
            ))
        })?;
        Ok(Some(at))
    }
}

/// A queue with messages delayed by a fixed time before they return to an endpoint queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DelayQueue {
    /// The queue's name.
    pub name: String,
    /// How long messages wait in it.
    pub delay: Duration,
}

/// Everything an endpoint needs declared before it consumes.
#[derive(Debug, Clone)]
pub struct EndpointTopology {
    /// The endpoint's name, used for the connection name.
    pub endpoint: String,
    /// The endpoint's durable input queue.
    pub queue: String,
    /// Message types (wire names) whose publications the queue receives.
    pub subscriptions: Vec<String>,
    /// The error queue.
    pub error_queue: String,
    /// Where a copy of every handled message goes, if anywhere.
    pub audit_queue: Option<String>,
    /// Delay queues for delayed retries, shortest first; they feed back into `queue`.
    pub delay_queues: Vec<DelayQueue>,
    /// How many unacknowledged deliveries the endpoint takes at once.
    pub prefetch: u16,
    /// Delete `queue` (with what it holds) once it has had no consumer for this long; `None`,
    /// for every endpoint, keeps it for ever. RabbitMQ's `x-expires`; the in-memory transport
    /// keeps its queues for the life of the broker whatever this says.
    pub queue_expires: Option<std::time::Duration>,
}

/// A message received from a queue, owned by the endpoint until it is settled.
///
/// Dropping a delivery without settling it returns it to its queue (as a broker does when a
/// consumer goes away), so a panic or a shutdown never loses it.
#[async_trait]
pub trait Delivery: Send + Sync {
    /// The envelope headers.
    fn headers(&self) -> &Arc<Headers>;
    /// The body, byte for byte as it was sent.
    fn body(&self) -> &[u8];
    /// Whether the broker delivered it before (a previous consumer did not settle it).
    fn redelivered(&self) -> bool;
    /// Removes it from its queue.
    async fn ack(&mut self) -> Result<(), BusError>;
    /// Copies it unchanged, plus `extra` headers (which replace headers of the same name),
    /// into `queue` (on RabbitMQ persistent, and without the `expiration` and `user_id`
    /// properties a copy cannot keep, recorded in [`names::ORIGINAL_EXPIRATION`] and
    /// [`names::ORIGINAL_USER_ID`] instead), waits for the broker to confirm the copy, and
    /// only then removes the original. A crash in between can duplicate the message, never lose it. On an error the
    /// delivery stays unsettled, and dropping it gives it back to its queue.
    ///
    /// A delivery is settled once, by `ack` or `forward`; it is dropped after that.
    async fn forward(&mut self, queue: &str, extra: Headers) -> Result<(), BusError>;
}

/// The stream of deliveries of an endpoint queue.
pub type Deliveries = mpsc::Receiver<Box<dyn Delivery>>;

/// A way to move messages: declare an endpoint, consume its queue, publish with confirms.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Declares the endpoint's topology and starts consuming its queue. Deliveries keep coming
    /// across reconnects until `stop` is cancelled; then the stream ends.
    async fn start(
        &self,
        topology: &EndpointTopology,
        stop: CancellationToken,
    ) -> Result<Deliveries, BusError>;

    /// Sends every message and returns once the broker has confirmed all of them. A message
    /// sent to a queue that does not exist is an error ([`BusError::Unroutable`]); a publish
    /// that no queue subscribes to is not.
    async fn send(&self, messages: Vec<OutgoingMessage>) -> Result<(), BusError>;

    /// Called when an endpoint using this transport stopped: releases its connections once no
    /// other endpoint uses them. Pending confirms are awaited first.
    async fn close(&self);
}
