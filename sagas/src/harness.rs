//! [`SagaHarness`]: drive a saga with messages in memory and look at its state and at what it
//! sent — no broker, no DHT node.

use crate::error::SagaError;
use crate::persister::Persister;
use crate::routes::Route;
use crate::runtime::{Runtime, saga_key};
use crate::saga::{OrchestratesMerge, Saga, SagaStateMerger};
use crate::store::{MemoryStore, SagaStore, StoreError};
use rhinobus::headers::names;
use rhinobus::message::{Message, decode, encode};
use rhinobus::transport::{Destination, InMemory, OutgoingMessage};
use rhinobus::{Bus, Context, HandlerError, Headers};
use std::collections::HashMap;
use std::sync::Arc;

/// A message a handling sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent(pub OutgoingMessage);

impl Sent {
    /// The wire name of its type.
    pub fn message_type(&self) -> &str {
        self.0
            .headers
            .get(names::MESSAGE_TYPE)
            .map_or("", String::as_str)
    }

    /// The queue it was sent to, or `None` when it was published.
    pub fn queue(&self) -> Option<&str> {
        match &self.0.destination {
            Destination::Queue(q) => Some(q),
            Destination::Topic(_) => None,
        }
    }

    /// Whether it was published.
    pub fn is_published(&self) -> bool {
        matches!(self.0.destination, Destination::Topic(_))
    }

    /// The message, if it is an `M`.
    pub fn decode<M: Message>(&self) -> Option<M> {
        (self.message_type() == M::NAME)
            .then(|| decode(&self.0.body).ok())
            .flatten()
    }

    /// One header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.0.headers.get(name).map(String::as_str)
    }
}

/// Runs a saga's handlers in memory, through the same code the endpoint uses (routes,
/// persister, redelivery detection), on a [`MemoryStore`].
///
/// ```
/// use rhinobus::{HandlerError, Message};
/// use rhinobus_sagas::{InitiatedBy, Routes, Saga, SagaContext, SagaHarness};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Add { counter: u32, n: u64 }
/// impl Message for Add { const NAME: &'static str = "demo.add"; }
///
/// #[derive(Serialize, Deserialize)]
/// struct Total { n: u64 }
/// impl Message for Total { const NAME: &'static str = "demo.total"; }
///
/// struct Counter;
/// impl Saga for Counter {
///     const NAME: &'static str = "demo.counter";
///     type State = u64;
///     type Key = u32;
///     fn routes(r: &mut Routes<Self>) { r.initiated_by::<Add>(); }
/// }
/// #[async_trait::async_trait]
/// impl InitiatedBy<Add> for Counter {
///     fn correlate(m: &Add) -> u32 { m.counter }
///     async fn handle(&self, m: Add, saga: &mut SagaContext<Self>) -> Result<(), HandlerError> {
///         saga.state += m.n;
///         saga.publish(&Total { n: saga.state })?;
///         Ok(())
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let harness = SagaHarness::new(Counter);
/// harness.handle(&Add { counter: 1, n: 2 }).await.expect("handled");
/// let sent = harness.handle(&Add { counter: 1, n: 3 }).await.expect("handled");
/// assert_eq!(harness.state(&1).await?, Some(5));
/// assert_eq!(sent[0].decode::<Total>().map(|t| t.n), Some(5));
/// # Ok(()) }
/// ```
pub struct SagaHarness<S: Saga> {
    runtime: Arc<Runtime<S>>,
    routes: HashMap<&'static str, Route<S>>,
    store: Arc<dyn SagaStore>,
    bus: Bus,
}

impl<S: Saga> std::fmt::Debug for SagaHarness<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SagaHarness")
            .field("saga", &S::NAME)
            .finish_non_exhaustive()
    }
}

impl<S: Saga> SagaHarness<S> {
    /// A harness with the optimistic persister on a fresh [`MemoryStore`].
    pub fn new(saga: S) -> Self {
        let store = MemoryStore::new();
        Self::with_persister(saga, store.clone(), |s| Persister::optimistic(s))
    }

    /// A harness with the merging persister on a fresh [`MemoryStore`].
    pub fn merging(saga: S, merger: impl SagaStateMerger<S::State>) -> Self
    where
        S: OrchestratesMerge,
    {
        let store = MemoryStore::new();
        Self::with_persister(saga, store.clone(), |s| Persister::merging(s, merger))
    }

    /// A harness on `store` with the persister `make` builds on it (to set options, or to use
    /// a store the test also writes to directly).
    pub fn with_persister<T: SagaStore + Clone>(
        saga: S,
        store: T,
        make: impl FnOnce(T) -> Persister<S>,
    ) -> Self {
        let (runtime, routes) = Runtime::new(saga, make(store.clone()));
        let routes = routes
            .routes
            .into_iter()
            .map(|r| (r.message_type, r))
            .collect();
        Self {
            runtime,
            routes,
            store: Arc::new(store),
            bus: Bus::new(InMemory::new(), "saga-harness"),
        }
    }

    /// Handles `message` as a new message (fresh id) and returns what the handling sent.
    pub async fn handle<M: Message>(&self, message: &M) -> Result<Vec<Sent>, HandlerError> {
        self.handle_with_id(message, &uuid::Uuid::now_v7().to_string())
            .await
    }

    /// Handles `message` with the given message id: call it twice with one id to see what a
    /// redelivery does.
    pub async fn handle_with_id<M: Message>(
        &self,
        message: &M,
        message_id: &str,
    ) -> Result<Vec<Sent>, HandlerError> {
        let mut headers = Headers::new();
        headers.insert(names::MESSAGE_ID.into(), message_id.into());
        headers.insert(names::MESSAGE_TYPE.into(), M::NAME.into());
        headers.insert(names::REPLY_TO.into(), "saga-harness-client".into());
        self.handle_with_headers(message, headers).await
    }

    /// Handles `message` with exactly these incoming headers.
    pub async fn handle_with_headers<M: Message>(
        &self,
        message: &M,
        headers: Headers,
    ) -> Result<Vec<Sent>, HandlerError> {
        let route = self.routes.get(M::NAME).ok_or_else(|| {
            HandlerError::msg(format!(
                "saga {} does not list {} in its routes",
                S::NAME,
                M::NAME
            ))
        })?;
        let body = encode(message)?;
        let ctx = Context::detached(self.bus.clone(), headers);
        (route.dispatch)(self.runtime.clone(), &body, ctx.clone())?.await?;
        Ok(ctx.take_outgoing().into_iter().map(Sent).collect())
    }

    /// The state of the instance with `key`, loaded as a handling would (siblings merged
    /// under the merging persister): `None` when there is none or it completed.
    pub async fn state(&self, key: &S::Key) -> Result<Option<S::State>, SagaError> {
        let loaded = self.runtime.load(&saga_key::<S>(key)).await?;
        Ok(loaded.document.and_then(|d| d.state))
    }

    /// Whether the instance with `key` completed.
    pub async fn is_completed(&self, key: &S::Key) -> Result<bool, SagaError> {
        let loaded = self.runtime.load(&saga_key::<S>(key)).await?;
        Ok(loaded.document.is_some_and(|d| d.state.is_none()))
    }

    /// How many versions the instance has in the store (more than one: unmerged siblings).
    pub async fn versions(&self, key: &S::Key) -> Result<usize, SagaError> {
        let siblings = self
            .store
            .load(&saga_key::<S>(key))
            .await
            .map_err(|e| match e {
                StoreError::Conflict => SagaError::Conflict("load".into()),
                StoreError::Other(e) => SagaError::Store(e),
            })?;
        Ok(siblings.len())
    }
}
