//! The traits a saga implements: [`Saga`] (its state and the messages it handles),
//! [`InitiatedBy`] and [`Orchestrates`] (one impl per message), and, for the merging persister,
//! [`OrchestratesMerge`] and [`SagaStateMerger`].

use crate::context::SagaContext;
use crate::routes::Routes;
use async_trait::async_trait;
use rhinobus::{HandlerError, Message};
use serde::{Serialize, de::DeserializeOwned};
use std::fmt::Display;

/// A long-running process whose state lives in the DHT between messages.
///
/// A saga names its state type and its correlation key, and lists the messages it handles in
/// [`Saga::routes`]. Each listed message has its own `impl InitiatedBy<M>` or
/// `impl Orchestrates<M>` block; listing a message without the matching impl is a compile
/// error.
///
/// ```
/// use rhinobus::{HandlerError, Message};
/// use rhinobus_sagas::{InitiatedBy, Orchestrates, Routes, Saga, SagaContext};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct OrderPlaced { order: u64 }
/// impl Message for OrderPlaced { const NAME: &'static str = "shop.order-placed"; }
///
/// #[derive(Serialize, Deserialize)]
/// struct OrderShipped { order: u64 }
/// impl Message for OrderShipped { const NAME: &'static str = "shop.order-shipped"; }
///
/// #[derive(Clone, Default, Serialize, Deserialize)]
/// struct Order { placed: bool }
///
/// struct Shipping;
///
/// impl Saga for Shipping {
///     const NAME: &'static str = "shop.shipping";
///     type State = Order;
///     type Key = u64;
///     fn routes(routes: &mut Routes<Self>) {
///         routes.initiated_by::<OrderPlaced>().orchestrates::<OrderShipped>();
///     }
/// }
///
/// #[async_trait::async_trait]
/// impl InitiatedBy<OrderPlaced> for Shipping {
///     fn correlate(m: &OrderPlaced) -> u64 { m.order }
///     async fn handle(&self, _: OrderPlaced, saga: &mut SagaContext<Self>) -> Result<(), HandlerError> {
///         saga.state.placed = true;
///         Ok(())
///     }
/// }
///
/// #[async_trait::async_trait]
/// impl Orchestrates<OrderShipped> for Shipping {
///     fn correlate(m: &OrderShipped) -> u64 { m.order }
///     async fn handle(&self, _: OrderShipped, saga: &mut SagaContext<Self>) -> Result<(), HandlerError> {
///         saga.complete();
///         Ok(())
///     }
/// }
/// ```
pub trait Saga: Send + Sync + Sized + 'static {
    /// The stable name of the saga type: part of the DHT key of every instance and of the
    /// saga headers. Like a message name, it must not change when the Rust type moves.
    const NAME: &'static str;
    /// The state kept between messages. A new instance starts from `Default`.
    type State: Serialize + DeserializeOwned + Default + Clone + Send + Sync + 'static;
    /// The correlation key: which instance a message belongs to. Its text form is part of the
    /// DHT key, so two keys must not print the same.
    type Key: Display + Send + Sync + 'static;

    /// Lists the messages the saga handles.
    fn routes(routes: &mut Routes<Self>);
}

/// A message that starts the saga: when no instance exists for its key, one is created from
/// `State::default()`. When one exists, the message is handled by it like an orchestrated one.
#[async_trait]
pub trait InitiatedBy<M: Message>: Saga {
    /// The instance `message` belongs to.
    fn correlate(message: &M) -> Self::Key;
    /// Handles the message; the state in `saga` is saved when this returns `Ok`.
    async fn handle(&self, message: M, saga: &mut SagaContext<Self>) -> Result<(), HandlerError>;
}

/// A message for an existing instance. When none exists (never started, or completed), the
/// message goes to the error queue, or is dropped under [`crate::MissingSaga::Discard`].
#[async_trait]
pub trait Orchestrates<M: Message>: Saga {
    /// The instance `message` belongs to.
    fn correlate(message: &M) -> Self::Key;
    /// Handles the message; the state in `saga` is saved when this returns `Ok`.
    async fn handle(&self, message: M, saga: &mut SagaContext<Self>) -> Result<(), HandlerError>;
}

/// What the merging persister found and merged before handling a message: every sibling's
/// state, oldest first. `saga.state` already holds the merged state.
#[derive(Debug, Clone)]
pub struct MergeSagaState<St> {
    /// The states that were merged (completed siblings excluded).
    pub siblings: Vec<St>,
}

/// The saga's chance to react to a merge (the seed's `Orchestrate<MergeSagaState>`): compare
/// the merged state with the siblings, send compensations, recompute charges. Runs before the
/// message that found the siblings is handled, in the same handling: what it sends leaves only
/// if that handling succeeds.
#[async_trait]
pub trait OrchestratesMerge: Saga {
    /// Reacts to a merge of `merge.siblings` into `saga.state`.
    async fn merged(
        &self,
        merge: MergeSagaState<Self::State>,
        saga: &mut SagaContext<Self>,
    ) -> Result<(), HandlerError>;
}

/// Merges concurrent versions of a saga state into one (the seed's `ISagaStateMerger`).
///
/// A merge must keep every change of every sibling: give each item a unique id and take the
/// union, then recompute what derives from the items.
///
/// ```
/// use rhinobus_sagas::SagaStateMerger;
/// use std::collections::BTreeSet;
///
/// struct Union;
/// impl SagaStateMerger<BTreeSet<u32>> for Union {
///     fn merge(&self, states: Vec<BTreeSet<u32>>) -> BTreeSet<u32> {
///         states.into_iter().flatten().collect()
///     }
/// }
/// let merged = Union.merge(vec![[1, 2].into(), [2, 3].into()]);
/// assert_eq!(merged, [1, 2, 3].into());
/// ```
pub trait SagaStateMerger<St>: Send + Sync + 'static {
    /// One state that holds everything `states` hold. `states` has at least two elements.
    fn merge(&self, states: Vec<St>) -> St;
}

impl<St, F> SagaStateMerger<St> for F
where
    F: Fn(Vec<St>) -> St + Send + Sync + 'static,
{
    fn merge(&self, states: Vec<St>) -> St {
        self(states)
    }
}
