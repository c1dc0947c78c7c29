//! [`Persister`]: how a saga's state is loaded and saved — optimistically, or merging
//! concurrent versions — and what happens to messages for missing sagas.

use crate::context::SagaContext;
use crate::saga::{MergeSagaState, OrchestratesMerge, Saga, SagaStateMerger};
use crate::store::SagaStore;
use futures_util::future::BoxFuture;
use rhinobus::HandlerError;
use std::sync::Arc;
use std::time::Duration;

/// What to do with a message for a saga that does not exist: one that does not initiate it
/// and finds no instance, or one that comes after the instance completed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MissingSaga {
    /// Fail the message with [`crate::SagaError::NotFound`] or
    /// [`crate::SagaError::Completed`]: after the endpoint's retries it lands in the error
    /// queue with that reason. Immediate retries run back to back, so a message that may
    /// overtake its initiator by more than a moment needs the endpoint's delayed retries.
    #[default]
    ErrorQueue,
    /// Drop it with a warning in the log.
    Discard,
}

pub(crate) type MergeReaction<S> = for<'a> fn(
    &'a S,
    MergeSagaState<<S as Saga>::State>,
    &'a mut SagaContext<S>,
) -> BoxFuture<'a, Result<(), HandlerError>>;

pub(crate) enum Mode<S: Saga> {
    Optimistic,
    Merging {
        merger: Arc<dyn SagaStateMerger<S::State>>,
        react: MergeReaction<S>,
    },
}

/// Loads and saves the state of one saga type in a [`SagaStore`].
///
/// - [`Persister::optimistic`]: a save names the version it loaded and is rejected if another
///   handling saved since; the bus then re-runs the handler on freshly loaded state
///   (`HandlerError::conflict`), never on the stale copy.
/// - [`Persister::merging`]: a save never fails for concurrency. Concurrent saves leave
///   siblings; the next load merges them with the saga's [`SagaStateMerger`], lets the saga
///   react ([`OrchestratesMerge`]), and the save names every sibling as parent so they collapse.
///
/// Both keep, with the state, the ids of the last [`Persister::remember`] messages handled and
/// what each of them sent: a redelivered message is not applied again, and what its first
/// handling sent is sent again (the crash may have come between the save and the sends).
///
/// A completed saga is not removed: a small marker (no state, the handled ids) stays for
/// [`Persister::completed_retention`], so late messages are reported as such and a
/// redelivered final message is recognised.
///
/// ```
/// use rhinobus_sagas::{MemoryStore, MissingSaga, Persister};
/// # use rhinobus_sagas::{Routes, Saga};
/// # #[derive(Default)] struct Counter;
/// # impl Saga for Counter {
/// #     const NAME: &'static str = "demo.counter"; type State = u64; type Key = u64;
/// #     fn routes(_: &mut Routes<Self>) {}
/// # }
/// let persister: Persister<Counter> = Persister::optimistic(MemoryStore::new())
///     .remember(500)
///     .on_missing(MissingSaga::Discard);
/// # let _ = persister;
/// ```
pub struct Persister<S: Saga> {
    pub(crate) store: Arc<dyn SagaStore>,
    pub(crate) mode: Mode<S>,
    pub(crate) remember: usize,
    pub(crate) completed_retention: Duration,
    pub(crate) missing: MissingSaga,
}

impl<S: Saga> std::fmt::Debug for Persister<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self.mode {
            Mode::Optimistic => "optimistic",
            Mode::Merging { .. } => "merging",
        };
        f.debug_struct("Persister")
            .field("saga", &S::NAME)
            .field("mode", &mode)
            .field("remember", &self.remember)
            .field("completed_retention", &self.completed_retention)
            .field("missing", &self.missing)
            .finish_non_exhaustive()
    }
}

/// How many handled message ids are kept with the state by default.
pub const DEFAULT_REMEMBER: usize = 256;

impl<S: Saga> Persister<S> {
    fn new(store: impl SagaStore, mode: Mode<S>) -> Self {
        Self {
            store: Arc::new(store),
            mode,
            remember: DEFAULT_REMEMBER,
            completed_retention: Duration::from_secs(24 * 3600),
            missing: MissingSaga::default(),
        }
    }

    /// The optimistic persister: conflicts re-run the handler on fresh state.
    pub fn optimistic(store: impl SagaStore) -> Self {
        Self::new(store, Mode::Optimistic)
    }

    /// The merging persister: writes never conflict; siblings are merged on the next load with
    /// `merger`, and the saga reacts to the merge through [`OrchestratesMerge`].
    pub fn merging(store: impl SagaStore, merger: impl SagaStateMerger<S::State>) -> Self
    where
        S: OrchestratesMerge,
    {
        fn react<'a, S: OrchestratesMerge>(
            saga: &'a S,
            merge: MergeSagaState<S::State>,
            ctx: &'a mut SagaContext<S>,
        ) -> BoxFuture<'a, Result<(), HandlerError>> {
            saga.merged(merge, ctx)
        }
        Self::new(
            store,
            Mode::Merging {
                merger: Arc::new(merger),
                react: react::<S>,
            },
        )
    }

    /// How many handled messages are remembered per instance (default [`DEFAULT_REMEMBER`]).
    /// A redelivery is recognised as long as fewer than this many other messages were handled
    /// by the instance in between.
    pub fn remember(mut self, n: usize) -> Self {
        self.remember = n.max(1);
        self
    }

    /// How long the marker of a completed saga stays (default 24 hours).
    pub fn completed_retention(mut self, d: Duration) -> Self {
        self.completed_retention = d;
        self
    }

    /// What to do with messages for missing or completed sagas (default: error queue).
    pub fn on_missing(mut self, policy: MissingSaga) -> Self {
        self.missing = policy;
        self
    }

    pub(crate) fn is_optimistic(&self) -> bool {
        matches!(self.mode, Mode::Optimistic)
    }
}
