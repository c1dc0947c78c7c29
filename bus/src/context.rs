//! [`Context`]: what a handler sees of the message it handles, and how it sends.

use crate::bus::{Bus, SendOptions};
use crate::error::BusError;
use crate::headers::{Headers, names};
use crate::message::Message;
use crate::transport::{Destination, OutgoingMessage};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use uuid::Uuid;

/// The handler's view of the bus while it handles one message.
///
/// Sends, publishes and replies are collected, not sent: they leave together, confirmed by
/// the broker, after every handler of the message succeeded, and only then is the message
/// acknowledged. If a handler fails, what it sent is discarded and the next attempt starts
/// afresh.
#[derive(Clone)]
pub struct Context {
    bus: Bus,
    incoming: Arc<Headers>,
    attempt: u32,
    outbox: Arc<Mutex<Vec<OutgoingMessage>>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("endpoint", &self.bus.endpoint())
            .field("message_id", &self.message_id())
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl Context {
    pub(crate) fn new(bus: Bus, incoming: Arc<Headers>, attempt: u32) -> Self {
        Self {
            bus,
            incoming,
            attempt,
            outbox: Arc::default(),
        }
    }

    /// A context for handling a message outside an endpoint, as test harnesses do: what the
    /// handler sends is collected and returned by [`Context::take_outgoing`].
    pub fn detached(bus: Bus, incoming: Headers) -> Self {
        Self::new(bus, Arc::new(incoming), 1)
    }

    /// The headers of the message being handled.
    pub fn headers(&self) -> &Headers {
        &self.incoming
    }

    /// The id of the message being handled.
    pub fn message_id(&self) -> &str {
        self.header(names::MESSAGE_ID).unwrap_or_default()
    }

    /// One header of the message being handled.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.incoming.get(name).map(String::as_str)
    }

    /// Which run of the handlers this is for the current delivery, from 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The name of the endpoint handling the message.
    pub fn endpoint(&self) -> &str {
        self.bus.endpoint()
    }

    /// Sends `message` to `queue` once the handlers succeeded.
    pub fn send<M: Message>(&self, queue: &str, message: &M) -> Result<Uuid, BusError> {
        self.send_with(queue, message, SendOptions::default())
    }

    /// [`Context::send`] with extra headers.
    pub fn send_with<M: Message>(
        &self,
        queue: &str,
        message: &M,
        options: SendOptions,
    ) -> Result<Uuid, BusError> {
        self.stage_new(Destination::Queue(queue.into()), message, options)
    }

    /// Sends `message` back to this endpoint's own queue, to arrive no sooner than `delay`
    /// from now: a timeout or reminder, as NServiceBus's `Defer` or a saga's timeout. Like
    /// every send of a handler it leaves only if the handlers succeed. See
    /// [`SendOptions::delay`].
    pub fn defer<M: Message>(&self, message: &M, delay: Duration) -> Result<Uuid, BusError> {
        let queue = self.bus.endpoint().to_owned();
        self.send_with(&queue, message, SendOptions::delayed_by(delay))
    }

    /// Publishes `message` to its subscribers once the handlers succeeded.
    pub fn publish<M: Message>(&self, message: &M) -> Result<Uuid, BusError> {
        self.publish_with(message, SendOptions::default())
    }

    /// [`Context::publish`] with extra headers.
    pub fn publish_with<M: Message>(
        &self,
        message: &M,
        options: SendOptions,
    ) -> Result<Uuid, BusError> {
        self.stage_new(Destination::Topic(M::NAME.into()), message, options)
    }

    /// Sends `message` to the reply address of the message being handled. Saga headers of
    /// the message being handled go back with the reply, so that it finds its saga.
    pub fn reply<M: Message>(&self, message: &M) -> Result<Uuid, BusError> {
        let queue = self
            .header(names::REPLY_TO)
            .ok_or(BusError::NoReplyAddress)?
            .to_owned();
        let mut options = SendOptions::default();
        for name in [names::SAGA_ID, names::SAGA_TYPE] {
            if let Some(v) = self.incoming.get(name) {
                options.headers.insert(name.into(), v.clone());
            }
        }
        self.send_with(&queue, message, options)
    }

    /// Builds the envelope of `message` exactly as [`Context::send`] or [`Context::publish`]
    /// would (a new message id, this conversation, this trace), without staging it.
    pub fn envelope<M: Message>(
        &self,
        destination: Destination,
        message: &M,
        options: SendOptions,
    ) -> Result<OutgoingMessage, BusError> {
        let (_, m) = self
            .bus
            .envelope(destination, message, Some(&self.incoming), options)?;
        Ok(m)
    }

    /// Stages a message built earlier, exactly as it is: same id, headers and body. Built for
    /// re-sending what an earlier handling of a redelivered message sent, so that receivers
    /// can recognise the duplicate by its id.
    pub fn stage(&self, message: OutgoingMessage) {
        self.outbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(message);
    }

    /// Takes back the staged messages for which `keep` returns false: for a handler that
    /// learns its work was done already (by a concurrent run of the same message) and must
    /// not send it twice. The other handlers' messages are left alone when `keep` says so.
    pub fn retain_outgoing(&self, keep: impl FnMut(&OutgoingMessage) -> bool) {
        self.outbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(keep);
    }

    /// How many messages are staged.
    pub(crate) fn staged(&self) -> usize {
        self.outbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Takes back the messages staged after the first `kept`: what a part of the handling
    /// that failed had sent.
    pub(crate) fn unstage_after(&self, kept: usize) {
        self.outbox
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .truncate(kept);
    }

    /// Everything sent so far, taken out of the context.
    pub fn take_outgoing(&self) -> Vec<OutgoingMessage> {
        std::mem::take(&mut *self.outbox.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn stage_new<M: Message>(
        &self,
        destination: Destination,
        message: &M,
        options: SendOptions,
    ) -> Result<Uuid, BusError> {
        let (id, m) = self
            .bus
            .envelope(destination, message, Some(&self.incoming), options)?;
        self.stage(m);
        Ok(id)
    }
}
