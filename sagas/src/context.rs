//! [`SagaContext`]: a saga handler's view of its instance: the state, the message, and how to
//! send, publish, reply and complete.

use crate::saga::Saga;
use rhinobus::headers::names;
use rhinobus::message::Message;
use rhinobus::transport::{Destination, OutgoingMessage};
use rhinobus::{BusError, Context, Headers, SendOptions};
use std::time::Duration;

/// The instance a message is handled by.
///
/// Mutate [`SagaContext::state`]; it is saved when the handler returns `Ok`. What the handler
/// sends leaves after the save, and is kept with the state so that a redelivery of the same
/// message sends it again instead of handling the message twice.
pub struct SagaContext<S: Saga> {
    /// The saga's state: loaded, merged, or `Default` for a new instance.
    pub state: S::State,
    key: String,
    ctx: Context,
    is_new: bool,
    completed: bool,
    pub(crate) sent: Vec<OutgoingMessage>,
}

impl<S: Saga> std::fmt::Debug for SagaContext<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaContext")
            .field("saga", &S::NAME)
            .field("key", &self.key)
            .field("is_new", &self.is_new)
            .field("completed", &self.completed)
            .finish_non_exhaustive()
    }
}

impl<S: Saga> SagaContext<S> {
    pub(crate) fn new(state: S::State, key: String, ctx: Context, is_new: bool) -> Self {
        Self {
            state,
            key,
            ctx,
            is_new,
            completed: false,
            sent: Vec::new(),
        }
    }

    /// The instance's correlation key, as text.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether this handling creates the instance.
    pub fn is_new(&self) -> bool {
        self.is_new
    }

    /// Marks the saga complete: its state is dropped when the handler returns `Ok`, and later
    /// messages for it are treated as messages for a missing saga.
    pub fn complete(&mut self) {
        self.completed = true;
    }

    /// Whether [`SagaContext::complete`] was called.
    pub fn is_completed(&self) -> bool {
        self.completed
    }

    /// The id of the message being handled.
    pub fn message_id(&self) -> &str {
        self.ctx.message_id()
    }

    /// The headers of the message being handled.
    pub fn headers(&self) -> &Headers {
        self.ctx.headers()
    }

    /// The bus context of the handling (attempt number, endpoint name, ...). Messages sent
    /// directly through it are not kept with the state; use [`SagaContext::send`] and friends.
    pub fn bus_context(&self) -> &Context {
        &self.ctx
    }

    /// Sends `message` to `queue` once the state is saved; it carries this saga's id and type.
    pub fn send<M: Message>(&mut self, queue: &str, message: &M) -> Result<(), BusError> {
        let headers = self.saga_headers();
        self.stage(Destination::Queue(queue.to_owned()), message, headers)
    }

    /// Sends `message` back to this endpoint, to arrive no sooner than `delay` from now: the
    /// saga's timeout (NServiceBus's `RequestTimeout`). The saga handles it as any message it
    /// orchestrates, correlated by its content; one that finds its instance completed or gone
    /// is dropped, whatever [`crate::MissingSaga`] says. Like every send of a saga it leaves
    /// after the save and is kept with the state; a redelivery sends it again with the same
    /// time. The crate's example asks for one.
    pub fn request_timeout<M: Message>(
        &mut self,
        message: &M,
        delay: Duration,
    ) -> Result<(), BusError> {
        let mut headers = self.saga_headers();
        headers.insert(names::SAGA_TIMEOUT.into(), S::NAME.into());
        let options = SendOptions {
            headers,
            delay: Some(delay),
            ..SendOptions::default()
        };
        let queue = self.ctx.endpoint().to_owned();
        self.stage_with(Destination::Queue(queue), message, options)
    }

    /// Publishes `message` once the state is saved; it carries this saga's id and type.
    pub fn publish<M: Message>(&mut self, message: &M) -> Result<(), BusError> {
        let headers = self.saga_headers();
        self.stage(Destination::Topic(M::NAME.to_owned()), message, headers)
    }

    /// Replies to the sender of the message being handled, once the state is saved. As
    /// [`Context::reply`], the saga headers of the message being handled go back with it.
    pub fn reply<M: Message>(&mut self, message: &M) -> Result<(), BusError> {
        let queue = self
            .ctx
            .header(names::REPLY_TO)
            .ok_or(BusError::NoReplyAddress)?
            .to_owned();
        let mut headers = Headers::new();
        for name in [names::SAGA_ID, names::SAGA_TYPE] {
            if let Some(v) = self.ctx.header(name) {
                headers.insert(name.into(), v.to_owned());
            }
        }
        self.stage(Destination::Queue(queue), message, headers)
    }

    fn saga_headers(&self) -> Headers {
        let mut headers = Headers::new();
        headers.insert(names::SAGA_ID.into(), self.key.clone());
        headers.insert(names::SAGA_TYPE.into(), S::NAME.into());
        headers
    }

    fn stage<M: Message>(
        &mut self,
        destination: Destination,
        message: &M,
        headers: Headers,
    ) -> Result<(), BusError> {
        let options = SendOptions {
            headers,
            ..SendOptions::default()
        };
        self.stage_with(destination, message, options)
    }

    fn stage_with<M: Message>(
        &mut self,
        destination: Destination,
        message: &M,
        options: SendOptions,
    ) -> Result<(), BusError> {
        let envelope = self.ctx.envelope(destination, message, options)?;
        self.ctx.stage(envelope.clone());
        self.sent.push(envelope);
        Ok(())
    }

    pub(crate) fn into_parts(self) -> (S::State, bool, Vec<OutgoingMessage>) {
        (self.state, self.completed, self.sent)
    }
}
