//! Handling one message for a saga: load (and merge), skip a redelivery, run the handler,
//! save; and [`SagaEndpointExt`], which puts a saga on an endpoint.

use crate::context::SagaContext;
use crate::document::{HandledMessage, SagaDocument, union_handled};
use crate::error::SagaError;
use crate::persister::{MissingSaga, Mode, Persister};
use crate::routes::{RouteFns, Routes};
use crate::saga::{MergeSagaState, Saga};
use crate::store::{SagaStore, SaveRequest, StoreError};
use rhinobus::headers::names;
use rhinobus::message::Message;
use rhinobus::transport::OutgoingMessage;
use rhinobus::{Context, EndpointBuilder, ErrorKind, HandlerError};
use rhinobus_dht::{Sibling, Version};
use serde::de::DeserializeOwned;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::SystemTime;
use tracing::{debug, warn};

/// The DHT key of a saga instance: `saga/<saga name>/<key>`.
pub fn saga_key<S: Saga>(key: &S::Key) -> String {
    format!("saga/{}/{}", S::NAME, key)
}

/// One saga type with its persister, shared by the handlers of its messages.
pub(crate) struct Runtime<S: Saga> {
    pub(crate) saga: S,
    pub(crate) persister: Persister<S>,
}

/// A loaded instance.
pub(crate) struct Loaded<St> {
    pub(crate) document: Option<SagaDocument<St>>,
    parents: Vec<Version>,
    merge: Option<MergeSagaState<St>>,
}

fn store_error(e: StoreError) -> SagaError {
    match e {
        StoreError::Conflict => {
            SagaError::Conflict("the saga was saved by another handling".into())
        }
        StoreError::Other(e) => SagaError::Store(e),
    }
}

/// Whether the message being handled is a timeout this saga asked for
/// ([`SagaContext::request_timeout`]).
fn is_timeout<S: Saga>(ctx: &Context) -> bool {
    ctx.header(names::SAGA_TIMEOUT) == Some(S::NAME)
}

impl<S: Saga> Runtime<S> {
    pub(crate) fn new(saga: S, persister: Persister<S>) -> (Arc<Self>, Routes<S>) {
        (Arc::new(Self { saga, persister }), Routes::<S>::of())
    }

    pub(crate) async fn load(&self, key: &str) -> Result<Loaded<S::State>, SagaError> {
        let mut siblings = self.persister.store.load(key).await.map_err(store_error)?;
        match siblings.len() {
            0 => Ok(Loaded {
                document: None,
                parents: Vec::new(),
                merge: None,
            }),
            1 => {
                let s = siblings.remove(0);
                Ok(Loaded {
                    document: Some(SagaDocument::decode(&s.value)?),
                    parents: vec![s.version],
                    merge: None,
                })
            }
            n => {
                let Mode::Merging { merger, .. } = &self.persister.mode else {
                    return one_handling_twice(siblings).ok_or_else(|| SagaError::Siblings {
                        key: key.to_owned(),
                        siblings: n,
                    });
                };
                let parents = siblings.iter().map(|s| s.version).collect();
                let mut states = Vec::with_capacity(n);
                let mut handled = Vec::with_capacity(n);
                let mut completed = false;
                for s in &siblings {
                    let doc = SagaDocument::<S::State>::decode(&s.value)?;
                    match doc.state {
                        Some(state) => states.push(state),
                        None => completed = true,
                    }
                    handled.push(doc.handled);
                }
                let handled = union_handled(handled, self.persister.remember);
                debug!(
                    saga = S::NAME,
                    key,
                    siblings = n,
                    completed,
                    "merging siblings"
                );
                // Completion wins: an instance completed on one branch stays completed. What
                // the other branches did is not merged, so say so where operators look.
                if completed && !states.is_empty() {
                    warn!(
                        saga = S::NAME,
                        key,
                        dropped_branches = states.len(),
                        "the saga completed on one branch; concurrent branches are not merged"
                    );
                }
                let (state, merge) = if completed || states.is_empty() {
                    (None, None)
                } else if states.len() == 1 {
                    (states.pop(), None)
                } else {
                    let merged = merger.merge(states.clone());
                    (Some(merged), Some(MergeSagaState { siblings: states }))
                };
                Ok(Loaded {
                    document: Some(SagaDocument { state, handled }),
                    parents,
                    merge,
                })
            }
        }
    }

    /// What becomes of a message whose instance is gone: a timeout the saga asked for is
    /// dropped (the instance finished before its time came), anything else as the persister
    /// says.
    fn missing(&self, ctx: &Context, error: SagaError) -> Result<(), HandlerError> {
        if is_timeout::<S>(ctx) {
            debug!(error = %error, "dropping a timeout of a saga that is gone");
            return Ok(());
        }
        match self.persister.missing {
            MissingSaga::ErrorQueue => Err(error.into_handler_error()),
            MissingSaga::Discard => {
                warn!(error = %error, "discarding a message for a missing saga");
                Ok(())
            }
        }
    }

    /// Stages again, as they were, the messages the first handling of a redelivered message
    /// sent: the crash may have come between the save and their sending.
    fn resend(ctx: &Context, handled: &HandledMessage) {
        for m in &handled.outgoing {
            ctx.stage(m.clone());
        }
    }

    pub(crate) async fn handle<M: Message>(
        &self,
        message: M,
        ctx: Context,
        route: RouteFns<S, M>,
    ) -> Result<(), HandlerError> {
        let correlation = (route.correlate)(&message);
        let (key, dht_key) = (correlation.to_string(), saga_key::<S>(&correlation));
        let message_id = ctx.message_id().to_owned();
        if message_id.is_empty() {
            // Redeliveries are recognised by id: without one, a second message would pass
            // for a redelivery of the first and be dropped.
            return Err(SagaError::MissingMessageId {
                saga: S::NAME,
                key,
                message_type: M::NAME,
            }
            .into_handler_error());
        }
        let loaded = self
            .load(&dht_key)
            .await
            .map_err(SagaError::into_handler_error)?;
        if let Some(handled) = loaded
            .document
            .as_ref()
            .and_then(|d| d.handled(&message_id))
        {
            debug!(
                saga = S::NAME,
                key, message_id, "already handled; sending its messages again"
            );
            Self::resend(&ctx, handled);
            return Ok(());
        }
        let (state, mut handled, is_new) = match loaded.document {
            Some(SagaDocument {
                state: Some(state),
                handled,
            }) => (state, handled, false),
            Some(SagaDocument {
                state: None,
                handled,
            }) => {
                if loaded.parents.len() > 1 {
                    // Completion won over concurrent branches: collapse them into one
                    // completed marker now, or a live branch would outlast the marker (and
                    // the saga come back to life when the marker expires).
                    let marker = SagaDocument {
                        state: None,
                        handled,
                    };
                    self.save(dht_key, &marker, loaded.parents, true, false)
                        .await?;
                }
                return self.missing(
                    &ctx,
                    SagaError::Completed {
                        saga: S::NAME,
                        key,
                        message_type: M::NAME,
                        message_id,
                    },
                );
            }
            // A timeout never starts an instance: it was asked for by one that is gone.
            None if route.initiates && !is_timeout::<S>(&ctx) => {
                (S::State::default(), Vec::new(), true)
            }
            None => {
                return self.missing(
                    &ctx,
                    SagaError::NotFound {
                        saga: S::NAME,
                        key,
                        message_type: M::NAME,
                        message_id,
                    },
                );
            }
        };
        let mut saga_ctx = SagaContext::<S>::new(state, key, ctx.clone(), is_new);
        if let (Some(merge), Mode::Merging { react, .. }) = (loaded.merge, &self.persister.mode) {
            react(&self.saga, merge, &mut saga_ctx).await?;
        }
        (route.run)(&self.saga, message, &mut saga_ctx).await?;
        let (state, completed, sent) = saga_ctx.into_parts();
        let mut document = SagaDocument {
            state: (!completed).then_some(state),
            handled: std::mem::take(&mut handled),
        };
        document.remember(
            HandledMessage {
                id: message_id.clone(),
                outgoing: sent,
            },
            self.persister.remember,
        );
        if let Mode::Merging { .. } = &self.persister.mode {
            // First as if optimistic: a concurrent run of this very message (a redelivery
            // while the first run was still going) must not be applied twice, as a sibling.
            match self
                .save(
                    dht_key.clone(),
                    &document,
                    loaded.parents.clone(),
                    completed,
                    true,
                )
                .await
            {
                Err(e) if e.kind() == ErrorKind::Conflict => {
                    let now = self
                        .load(&dht_key)
                        .await
                        .map_err(SagaError::into_handler_error)?;
                    if let Some(first) = now.document.as_ref().and_then(|d| d.handled(&message_id))
                    {
                        debug!(
                            saga = S::NAME,
                            message_id, "handled meanwhile by a concurrent run"
                        );
                        Self::unstage(&ctx, &document);
                        Self::resend(&ctx, first);
                        return Ok(());
                    }
                    // Another message's write: keep both, as siblings, for the next load to merge.
                }
                done => return done,
            }
        }
        let optimistic = self.persister.is_optimistic();
        self.save(dht_key, &document, loaded.parents, completed, optimistic)
            .await
    }

    /// Takes back from `ctx` what this handling staged (the newest entry of `document`).
    fn unstage(ctx: &Context, document: &SagaDocument<S::State>) {
        let Some(ours) = document.handled.last() else {
            return;
        };
        let id_of = |m: &OutgoingMessage| m.headers.get(names::MESSAGE_ID).cloned();
        let ids: HashSet<String> = ours.outgoing.iter().filter_map(id_of).collect();
        ctx.retain_outgoing(|m| id_of(m).is_none_or(|id| !ids.contains(&id)));
    }

    /// Saves `document` under `key` over `parents`; a completed saga's document expires after
    /// the persister's retention. An optimistic save that lost a race is a conflict.
    async fn save(
        &self,
        key: String,
        document: &SagaDocument<S::State>,
        parents: Vec<Version>,
        completed: bool,
        optimistic: bool,
    ) -> Result<(), HandlerError> {
        let value = document.encode().map_err(SagaError::into_handler_error)?;
        let request = SaveRequest {
            key,
            value,
            parents,
            optimistic,
            expires_at: completed.then(|| SystemTime::now() + self.persister.completed_retention),
        };
        self.persister
            .store
            .save(request)
            .await
            .map_err(|e| store_error(e).into_handler_error())?;
        Ok(())
    }
}

/// The siblings an optimistic persister can still make sense of: every one the result of
/// handling the same message last (a save that reached a node which then died, retried on a
/// replica that had not seen it yet). The message was applied on each branch from the same
/// state, so any one of them is a whole handling of it: the one with the oldest version is
/// kept, and the next save supersedes them all. `None` for any other siblings.
fn one_handling_twice<St: DeserializeOwned>(mut siblings: Vec<Sibling>) -> Option<Loaded<St>> {
    siblings.sort_by_key(|s| s.version);
    let documents: Vec<SagaDocument<St>> = siblings
        .iter()
        .map(|s| SagaDocument::decode(&s.value).ok())
        .collect::<Option<_>>()?;
    let last = |d: &SagaDocument<St>| d.handled.last().map(|h| h.id.clone());
    let first = last(&documents[0])?;
    if !documents.iter().all(|d| last(d).as_ref() == Some(&first)) {
        return None;
    }
    warn!(
        message_id = first,
        siblings = siblings.len(),
        "one message handled on several branches; keeping one of them"
    );
    Some(Loaded {
        document: documents.into_iter().next(),
        parents: siblings.iter().map(|s| s.version).collect(),
        merge: None,
    })
}

/// Puts sagas on an endpoint: one line per saga with its persister.
///
/// ```
/// use rhinobus::{Endpoint, transport::InMemory};
/// use rhinobus_sagas::{MemoryStore, Persister, SagaEndpointExt};
/// # use rhinobus_sagas::{Routes, Saga};
/// # struct Billing;
/// # impl Saga for Billing {
/// #     const NAME: &'static str = "demo.billing"; type State = u64; type Key = u64;
/// #     fn routes(_: &mut Routes<Self>) {}
/// # }
///
/// let builder = Endpoint::builder("billing", InMemory::new())
///     .saga(Billing, Persister::optimistic(MemoryStore::new()));
/// # let _ = builder;
/// ```
pub trait SagaEndpointExt: Sized {
    /// Handles every message `saga` lists in [`Saga::routes`], with state in `persister`.
    fn saga<S: Saga>(self, saga: S, persister: Persister<S>) -> Self;
}

impl SagaEndpointExt for EndpointBuilder {
    fn saga<S: Saga>(self, saga: S, persister: Persister<S>) -> Self {
        let (runtime, routes) = Runtime::new(saga, persister);
        routes.routes.iter().fold(self, |builder, route| {
            (route.register)(builder, runtime.clone())
        })
    }
}

/// The state of every current version of the instance `key` of saga `S` in `store`, oldest
/// first, without merging: `None` for a completed instance. Empty when there is no instance.
/// For tools and tests that look at sagas from outside.
///
/// ```
/// use rhinobus_sagas::{MemoryStore, saga_states};
/// # use rhinobus_sagas::{Routes, Saga};
/// # struct Counter;
/// # impl Saga for Counter {
/// #     const NAME: &'static str = "demo.counter"; type State = u64; type Key = u64;
/// #     fn routes(_: &mut Routes<Self>) {}
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), rhinobus_sagas::SagaError> {
/// let states = saga_states::<Counter>(&MemoryStore::new(), &7).await?;
/// assert!(states.is_empty());
/// # Ok(()) }
/// ```
pub async fn saga_states<S: Saga>(
    store: &dyn SagaStore,
    key: &S::Key,
) -> Result<Vec<Option<S::State>>, SagaError> {
    let siblings = store.load(&saga_key::<S>(key)).await.map_err(store_error)?;
    siblings
        .iter()
        .map(|s| SagaDocument::<S::State>::decode(&s.value).map(|d| d.state))
        .collect()
}
