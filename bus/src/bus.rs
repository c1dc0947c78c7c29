//! [`Bus`]: sending and publishing from outside a handler, and the envelopes every send gets.

use crate::error::BusError;
use crate::headers::{Headers, format_time, names};
use crate::message::{CONTENT_TYPE, Message, encode};
use crate::trace;
use crate::transport::{Destination, OutgoingMessage, Transport};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use uuid::Uuid;

/// Sends and publishes messages, each confirmed by the broker before the call returns.
///
/// Get one from a running [`crate::Endpoint`] (replies then come back to that endpoint), or
/// build a send-only one with [`Bus::new`].
///
/// ```
/// # use rhinobus::{Bus, Message, transport::InMemory};
/// # use serde::{Deserialize, Serialize};
/// #[derive(Serialize, Deserialize)]
/// struct Ping { n: u32 }
/// impl Message for Ping { const NAME: &'static str = "demo.ping"; }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), rhinobus::BusError> {
/// let broker = InMemory::new();
/// broker.declare_queue("pong");
/// let bus = Bus::new(broker.clone(), "pinger");
/// let id = bus.send("pong", &Ping { n: 1 }).await?;
/// assert_eq!(broker.queue_len("pong"), 1);
/// # let _ = id; Ok(()) }
/// ```
#[derive(Clone)]
pub struct Bus {
    inner: Arc<BusInner>,
}

struct BusInner {
    transport: Arc<dyn Transport>,
    endpoint: String,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("endpoint", &self.inner.endpoint)
            .finish_non_exhaustive()
    }
}

/// Headers to add to one send, on top of those rhinobus writes, and when to deliver it.
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// Extra headers; they cannot replace the message id, type or content type.
    pub headers: Headers,
    /// Deliver the message no sooner than this long after it is built (a timeout, a reminder,
    /// a retry the application schedules itself). For sends to a queue only: a publication
    /// with a delay is refused with [`BusError::Invalid`].
    ///
    /// The time is fixed when the message is built, in its `rhinobus-deliver-at` header, so a
    /// message kept and sent again later (as sagas do) still arrives at the time first meant.
    /// On RabbitMQ the message waits in durable delay queues, to the second (rounded up), for
    /// up to [`MAX_DELAY`]; see the README's "Delayed delivery".
    pub delay: Option<Duration>,
    /// How long after it is sent (after it is due, when delayed) the message is still worth
    /// handling, in place of its type's [`Message::TIME_TO_BE_RECEIVED`]. Up to
    /// [`MAX_TIME_TO_BE_RECEIVED`]; the end is fixed when the message is built, in its
    /// `rhinobus-discard-after` header.
    pub time_to_be_received: Option<Duration>,
}

/// The longest [`SendOptions::time_to_be_received`]: 2^32 - 1 milliseconds, about 49 days, the
/// longest per-message TTL RabbitMQ takes.
pub const MAX_TIME_TO_BE_RECEIVED: Duration = Duration::from_millis(u32::MAX as u64);

/// The longest delay a send can have: 2^28 - 1 seconds, about 8.5 years (RabbitMQ's delay
/// queues hold one bit of the delay each).
pub const MAX_DELAY: Duration = Duration::from_secs((1 << 28) - 1);

impl SendOptions {
    /// Options that deliver a send no sooner than `delay` after the message is built (by the
    /// send, or by a handler's context, whose sends leave when it succeeds).
    ///
    /// ```
    /// # use rhinobus::{Bus, Message, SendOptions, transport::InMemory};
    /// # use serde::{Deserialize, Serialize};
    /// # use std::time::Duration;
    /// #[derive(Serialize, Deserialize)]
    /// struct Remind { order: u64 }
    /// impl Message for Remind { const NAME: &'static str = "shop.remind"; }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), rhinobus::BusError> {
    /// let broker = InMemory::new();
    /// broker.declare_queue("shop");
    /// let bus = Bus::new(broker.clone(), "shop");
    /// let later = SendOptions::delayed_by(Duration::from_millis(50));
    /// bus.send_with("shop", &Remind { order: 7 }, later).await?;
    /// assert_eq!(broker.queue_len("shop"), 0);
    /// tokio::time::sleep(Duration::from_millis(200)).await;
    /// assert_eq!(broker.queue_len("shop"), 1);
    /// # Ok(()) }
    /// ```
    pub fn delayed_by(delay: Duration) -> Self {
        Self {
            delay: Some(delay),
            ..Self::default()
        }
    }

    /// These options for a message that is to be handled within `time` of being sent (of
    /// being due, when delayed), or not at all; see [`Message::TIME_TO_BE_RECEIVED`].
    ///
    /// ```
    /// # use rhinobus::{Bus, Message, SendOptions, transport::InMemory};
    /// # use serde::{Deserialize, Serialize};
    /// # use std::time::Duration;
    /// #[derive(Serialize, Deserialize)]
    /// struct Poll { n: u32 }
    /// impl Message for Poll { const NAME: &'static str = "demo.poll"; }
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), rhinobus::BusError> {
    /// let broker = InMemory::new();
    /// broker.declare_queue("poller");
    /// let bus = Bus::new(broker.clone(), "app");
    /// let brief = SendOptions::default().time_to_be_received(Duration::from_secs(30));
    /// bus.send_with("poller", &Poll { n: 1 }, brief).await?;
    /// let (headers, _) = broker.take("poller").unwrap();
    /// assert!(headers.contains_key(rhinobus::headers::names::DISCARD_AFTER));
    /// # Ok(()) }
    /// ```
    pub fn time_to_be_received(mut self, time: Duration) -> Self {
        self.time_to_be_received = Some(time);
        self
    }
}

impl Bus {
    /// A bus that sends through `transport` in the name of `endpoint`: replies to what it
    /// sends go to the queue named `endpoint`.
    pub fn new(transport: impl Transport, endpoint: impl Into<String>) -> Self {
        Self::from_shared(Arc::new(transport), endpoint.into())
    }

    pub(crate) fn from_shared(transport: Arc<dyn Transport>, endpoint: String) -> Self {
        Self {
            inner: Arc::new(BusInner {
                transport,
                endpoint,
            }),
        }
    }

    /// The endpoint this bus sends for.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    pub(crate) fn transport(&self) -> &Arc<dyn Transport> {
        &self.inner.transport
    }

    /// Sends `message` to `queue` and returns its message id once the broker confirmed it.
    /// Fails with [`BusError::Unroutable`] when the queue does not exist.
    pub async fn send<M: Message>(&self, queue: &str, message: &M) -> Result<Uuid, BusError> {
        self.send_with(queue, message, SendOptions::default()).await
    }

    /// [`Bus::send`] with extra headers.
    pub async fn send_with<M: Message>(
        &self,
        queue: &str,
        message: &M,
        options: SendOptions,
    ) -> Result<Uuid, BusError> {
        let (id, m) = self.envelope(Destination::Queue(queue.into()), message, None, options)?;
        self.inner.transport.send(vec![m]).await?;
        Ok(id)
    }

    /// Publishes `message` to every endpoint subscribed to its type and returns its id once
    /// the broker confirmed it. Publishing a type nobody subscribes to is not an error.
    pub async fn publish<M: Message>(&self, message: &M) -> Result<Uuid, BusError> {
        let (id, m) = self.envelope(
            Destination::Topic(M::NAME.into()),
            message,
            None,
            SendOptions::default(),
        )?;
        self.inner.transport.send(vec![m]).await?;
        Ok(id)
    }

    /// [`Bus::publish`] with extra headers or a time to be received (a publication cannot be
    /// delayed).
    pub async fn publish_with<M: Message>(
        &self,
        message: &M,
        options: SendOptions,
    ) -> Result<Uuid, BusError> {
        let (id, m) = self.envelope(Destination::Topic(M::NAME.into()), message, None, options)?;
        self.inner.transport.send(vec![m]).await?;
        Ok(id)
    }

    /// Sends a body that is already encoded, as message type `message_type`, with the
    /// envelope headers rhinobus gives every message. For tools (`rhinobus send`) and
    /// bridges that do not have the Rust type at hand.
    pub async fn send_encoded(
        &self,
        queue: &str,
        message_type: &str,
        body: Vec<u8>,
        options: SendOptions,
    ) -> Result<Uuid, BusError> {
        let destination = Destination::Queue(queue.into());
        let (id, m) = self.envelope_encoded(destination, message_type, body, None, options)?;
        self.inner.transport.send(vec![m]).await?;
        Ok(id)
    }

    /// Builds the envelope of an outgoing message; `cause` holds the headers of the message
    /// being handled, whose correlation, conversation and trace it continues.
    pub(crate) fn envelope<M: Message>(
        &self,
        destination: Destination,
        message: &M,
        cause: Option<&Headers>,
        mut options: SendOptions,
    ) -> Result<(Uuid, OutgoingMessage), BusError> {
        let body = encode(message)?;
        options.time_to_be_received = options.time_to_be_received.or(M::TIME_TO_BE_RECEIVED);
        self.envelope_encoded(destination, M::NAME, body, cause, options)
    }

    fn envelope_encoded(
        &self,
        destination: Destination,
        message_type: &str,
        body: Vec<u8>,
        cause: Option<&Headers>,
        options: SendOptions,
    ) -> Result<(Uuid, OutgoingMessage), BusError> {
        let id = Uuid::now_v7();
        let id_text = id.to_string();
        let now = SystemTime::now();
        let mut headers = options.headers;
        let due = match options.delay {
            Some(delay) => deliver_at(&destination, now, delay)?,
            None => now,
        };
        if options.delay.is_some() {
            headers.insert(names::DELIVER_AT.into(), format_time(due));
        }
        if let Some(time) = options.time_to_be_received {
            headers.insert(names::DISCARD_AFTER.into(), discard_after(due, time)?);
        }
        let caused = |name: &str| cause.and_then(|h| h.get(name));
        let conversation = caused(names::CONVERSATION_ID)
            .or_else(|| caused(names::MESSAGE_ID))
            .cloned()
            .unwrap_or_else(|| id_text.clone());
        if let Some(cause_id) = caused(names::MESSAGE_ID) {
            headers
                .entry(names::CORRELATION_ID.into())
                .or_insert_with(|| cause_id.clone());
        }
        if let Some(state) = caused(names::TRACESTATE) {
            headers.insert(names::TRACESTATE.into(), state.clone());
        }
        let traceparent = trace::child_of(caused(names::TRACEPARENT).map(String::as_str));
        headers.insert(names::TRACEPARENT.into(), traceparent);
        headers.insert(names::CONVERSATION_ID.into(), conversation);
        headers
            .entry(names::REPLY_TO.into())
            .or_insert_with(|| self.inner.endpoint.clone());
        headers.insert(names::SOURCE_ENDPOINT.into(), self.inner.endpoint.clone());
        headers.insert(names::SENT_AT.into(), format_time(now));
        headers.insert(names::MESSAGE_TYPE.into(), message_type.into());
        headers.insert(names::CONTENT_TYPE.into(), CONTENT_TYPE.into());
        headers.insert(names::MESSAGE_ID.into(), id_text);
        Ok((
            id,
            OutgoingMessage {
                destination,
                headers,
                body,
            },
        ))
    }
}

/// A delay no longer than [`MAX_DELAY`], or the error saying it is too long.
pub(crate) fn check_delay(delay: Duration) -> Result<(), BusError> {
    if delay > MAX_DELAY {
        return Err(BusError::Invalid(format!(
            "a delay of {delay:?} is longer than the longest one, {MAX_DELAY:?}"
        )));
    }
    Ok(())
}

/// When a send delayed by `delay` from `now` is due: its `rhinobus-deliver-at` header.
fn deliver_at(
    destination: &Destination,
    now: SystemTime,
    delay: Duration,
) -> Result<SystemTime, BusError> {
    if let Destination::Topic(t) = destination {
        return Err(BusError::Invalid(format!(
            "a publication of {t:?} cannot be delayed: delay sends to a queue instead"
        )));
    }
    check_delay(delay)?;
    // Not a moment early.
    Ok(to_next_millisecond(now + delay))
}

/// The `rhinobus-discard-after` header of a message due at `due` that is worth handling for
/// `time` after that.
fn discard_after(due: SystemTime, time: Duration) -> Result<String, BusError> {
    if time < Duration::from_millis(1) || time > MAX_TIME_TO_BE_RECEIVED {
        return Err(BusError::Invalid(format!(
            "a time to be received of {time:?} is not between 1 ms and \
             {MAX_TIME_TO_BE_RECEIVED:?}"
        )));
    }
    // Not a moment too soon.
    Ok(format_time(to_next_millisecond(due + time)))
}

/// `t` rounded up to the millisecond that the time headers keep.
fn to_next_millisecond(t: SystemTime) -> SystemTime {
    let past_ms = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() % 1_000_000);
    t + Duration::from_nanos(u64::from((1_000_000 - past_ms) % 1_000_000))
}
