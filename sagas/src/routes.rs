//! [`Routes`]: the list of messages a saga handles, turned into bus handlers.

use crate::context::SagaContext;
use crate::runtime::Runtime;
use crate::saga::{InitiatedBy, Orchestrates, Saga};
use async_trait::async_trait;
use futures_util::future::BoxFuture;
use rhinobus::message::{CodecError, Message, decode};
use rhinobus::{Context, EndpointBuilder, Handler, HandlerError};
use std::marker::PhantomData;
use std::sync::Arc;

/// How one message type reaches the saga: its correlation and its handler, typed.
pub(crate) struct RouteFns<S: Saga, M> {
    pub(crate) correlate: fn(&M) -> S::Key,
    pub(crate) run: for<'a> fn(&'a S, M, &'a mut SagaContext<S>) -> BoxFuture<'a, HandlerResult>,
    pub(crate) initiates: bool,
}

type HandlerResult = Result<(), HandlerError>;

/// Decodes a body and starts handling it.
pub(crate) type Dispatch<S> =
    fn(Arc<Runtime<S>>, &[u8], Context) -> Result<BoxFuture<'static, HandlerResult>, CodecError>;

/// A route with its message type erased, for registration and for the harness.
pub(crate) struct Route<S: Saga> {
    pub(crate) message_type: &'static str,
    pub(crate) register: fn(EndpointBuilder, Arc<Runtime<S>>) -> EndpointBuilder,
    pub(crate) dispatch: Dispatch<S>,
}

/// The messages a saga handles, declared in [`Saga::routes`].
///
/// `initiated_by::<M>()` compiles only if the saga implements [`InitiatedBy<M>`], and
/// `orchestrates::<M>()` only if it implements [`Orchestrates<M>`]. A type listed twice is
/// registered once.
pub struct Routes<S: Saga> {
    pub(crate) routes: Vec<Route<S>>,
}

impl<S: Saga> std::fmt::Debug for Routes<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let types: Vec<_> = self.routes.iter().map(|r| r.message_type).collect();
        f.debug_struct("Routes")
            .field("saga", &S::NAME)
            .field("handles", &types)
            .finish_non_exhaustive()
    }
}

impl<S: Saga> Routes<S> {
    pub(crate) fn of() -> Self {
        let mut routes = Self { routes: Vec::new() };
        S::routes(&mut routes);
        routes
    }

    fn add(&mut self, route: Route<S>) {
        if !self
            .routes
            .iter()
            .any(|r| r.message_type == route.message_type)
        {
            self.routes.push(route);
        }
    }

    /// `M` starts the saga when no instance exists for its key.
    pub fn initiated_by<M: Message>(&mut self) -> &mut Self
    where
        S: InitiatedBy<M>,
    {
        self.add(Route {
            message_type: M::NAME,
            register: register::<S, M, Initiating>,
            dispatch: dispatch::<S, M, Initiating>,
        });
        self
    }

    /// `M` is handled by an existing instance.
    pub fn orchestrates<M: Message>(&mut self) -> &mut Self
    where
        S: Orchestrates<M>,
    {
        self.add(Route {
            message_type: M::NAME,
            register: register::<S, M, Orchestrating>,
            dispatch: dispatch::<S, M, Orchestrating>,
        });
        self
    }
}

/// Whether a route initiates or orchestrates: picks the trait the handler comes from.
pub(crate) trait Role<S: Saga, M: Message>: Send + Sync + 'static {
    fn fns() -> RouteFns<S, M>;
}

pub(crate) struct Initiating;
pub(crate) struct Orchestrating;

impl<S: InitiatedBy<M>, M: Message> Role<S, M> for Initiating {
    fn fns() -> RouteFns<S, M> {
        fn run<'a, S: InitiatedBy<M>, M: Message>(
            saga: &'a S,
            message: M,
            ctx: &'a mut SagaContext<S>,
        ) -> BoxFuture<'a, HandlerResult> {
            <S as InitiatedBy<M>>::handle(saga, message, ctx)
        }
        RouteFns {
            correlate: <S as InitiatedBy<M>>::correlate,
            run: run::<S, M>,
            initiates: true,
        }
    }
}

impl<S: Orchestrates<M>, M: Message> Role<S, M> for Orchestrating {
    fn fns() -> RouteFns<S, M> {
        fn run<'a, S: Orchestrates<M>, M: Message>(
            saga: &'a S,
            message: M,
            ctx: &'a mut SagaContext<S>,
        ) -> BoxFuture<'a, HandlerResult> {
            <S as Orchestrates<M>>::handle(saga, message, ctx)
        }
        RouteFns {
            correlate: <S as Orchestrates<M>>::correlate,
            run: run::<S, M>,
            initiates: false,
        }
    }
}

/// The bus handler of one message type of one saga.
struct SagaHandler<S: Saga, M: Message, R> {
    runtime: Arc<Runtime<S>>,
    role: PhantomData<fn() -> (M, R)>,
}

#[async_trait]
impl<S: Saga, M: Message, R: Role<S, M>> Handler<M> for SagaHandler<S, M, R> {
    async fn handle(&self, message: M, ctx: Context) -> Result<(), HandlerError> {
        self.runtime.handle(message, ctx, R::fns()).await
    }
}

fn register<S: Saga, M: Message, R: Role<S, M>>(
    builder: EndpointBuilder,
    runtime: Arc<Runtime<S>>,
) -> EndpointBuilder {
    builder.handle::<M, _>(SagaHandler::<S, M, R> {
        runtime,
        role: PhantomData,
    })
}

fn dispatch<S: Saga, M: Message, R: Role<S, M>>(
    runtime: Arc<Runtime<S>>,
    body: &[u8],
    ctx: Context,
) -> Result<BoxFuture<'static, HandlerResult>, CodecError> {
    let message = decode::<M>(body)?;
    Ok(Box::pin(async move {
        runtime.handle(message, ctx, R::fns()).await
    }))
}
