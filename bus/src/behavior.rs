//! [`Behavior`]: code that runs around every attempt at handling a message on an endpoint, as
//! NServiceBus's pipeline behaviors and MassTransit's filters do: timing and metrics, a tenant
//! or a user taken from a header for the handlers to see, a unit of work around them, a check
//! that refuses a message before any handler runs.

use crate::context::Context;
use crate::error::HandlerError;
use async_trait::async_trait;
use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

/// Runs around each attempt at handling a message (see
/// [`EndpointBuilder::wrap`](crate::EndpointBuilder::wrap)).
///
/// `next.run().await` runs the behaviors inside this one and then the handlers. A behavior
/// that does not call it skips them, and the message counts as handled when it returns `Ok`.
/// An error is the attempt's failure, as a handler's is: retried, a conflict re-run, an
/// unrecoverable one moved to the error queue at once. Retries run the behaviors again, so
/// [`Context::attempt`] tells them apart. Behaviors run only for a message that decodes and
/// has handlers here; the others go to the error queue before any behavior sees them.
///
/// What the handlers send ([`Context::send`] and the others) is staged, and leaves only once
/// the whole chain returned `Ok`, confirmed by the broker, before the message is
/// acknowledged: a behavior's code after `next.run()` runs before that, so a unit of work
/// that commits there commits before the sends are confirmed (and a failed send retries the
/// attempt). When `next.run()` fails, what was staged inside it is taken back, even if the
/// behavior then returns `Ok`: a behavior that swallows an error does not let half a
/// handling's sends go out. Whatever a behavior stages itself leaves only with an `Ok`, so a
/// refusal cannot answer; a behavior that must answer what it refuses replies and returns
/// `Ok` (the message then counts as handled, audited too).
///
/// A behavior hands values to the handlers through a task-local, since the handlers run
/// inside its call to `next.run()`:
///
/// ```
/// use rhinobus::behavior::{Behavior, Next};
/// use rhinobus::{Context, Endpoint, HandlerError, Message, SendOptions, transport::InMemory};
/// use serde::{Deserialize, Serialize};
///
/// tokio::task_local! {
///     static TENANT: String;
/// }
///
/// /// Every message is handled for the tenant its `tenant` header names, and only then.
/// struct Tenancy;
///
/// #[async_trait::async_trait]
/// impl Behavior for Tenancy {
///     async fn around(&self, ctx: &Context, next: Next<'_>) -> Result<(), HandlerError> {
///         let Some(tenant) = ctx.header("tenant") else {
///             return Err(HandlerError::unrecoverable("a message for no tenant"));
///         };
///         TENANT.scope(tenant.to_owned(), next.run()).await
///     }
/// }
///
/// #[derive(Serialize, Deserialize)]
/// struct Invoice { cents: u64 }
/// impl Message for Invoice { const NAME: &'static str = "billing.invoice"; }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), rhinobus::BusError> {
/// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
/// let billing = Endpoint::builder("billing", InMemory::new())
///     .wrap(Tenancy)
///     .handle(move |invoice: Invoice, _| {
///         let billed = (TENANT.with(String::clone), invoice.cents);
///         let _ = tx.send(billed);
///         async { Ok::<_, HandlerError>(()) }
///     })
///     .start()
///     .await?;
/// let mut for_acme = SendOptions::default();
/// for_acme.headers.insert("tenant".into(), "acme".into());
/// billing.bus().send_with("billing", &Invoice { cents: 500 }, for_acme).await?;
/// assert_eq!(rx.recv().await, Some(("acme".to_owned(), 500)));
/// billing.shutdown().await;
/// # Ok(()) }
/// ```
#[async_trait]
pub trait Behavior: Send + Sync + 'static {
    /// Runs around one attempt at handling the message of `ctx`; `next.run()` runs the rest.
    async fn around(&self, ctx: &Context, next: Next<'_>) -> Result<(), HandlerError>;
}

/// The rest of an attempt: the behaviors inside the one running, then the handlers.
pub struct Next<'a> {
    behaviors: &'a [Arc<dyn Behavior>],
    ctx: &'a Context,
    body: &'a [u8],
    handlings: Vec<BoxFuture<'static, Result<(), HandlerError>>>,
}

impl<'a> Next<'a> {
    /// The whole chain of one attempt: `behaviors`, outermost first, around `handlings`.
    pub(crate) fn new(
        behaviors: &'a [Arc<dyn Behavior>],
        ctx: &'a Context,
        body: &'a [u8],
        handlings: Vec<BoxFuture<'static, Result<(), HandlerError>>>,
    ) -> Self {
        Self {
            behaviors,
            ctx,
            body,
            handlings,
        }
    }

    /// The message's body, byte for byte as it came (its type is the
    /// [`MESSAGE_TYPE`](crate::headers::names::MESSAGE_TYPE) header), for a behavior that
    /// checks, logs or hashes it.
    pub fn body(&self) -> &[u8] {
        self.body
    }

    /// Runs the behaviors inside the one calling and then the handlers, in the order they
    /// were added, stopping at the first error. A handler that panics fails the attempt
    /// with the panic's message, as an error would. On an error, what was staged meanwhile is
    /// taken back.
    pub async fn run(self) -> Result<(), HandlerError> {
        let ctx = self.ctx;
        let staged = ctx.staged();
        let result = self.run_outermost().await;
        if result.is_err() {
            ctx.unstage_after(staged);
        }
        result
    }

    /// [`run`](Self::run) for the whole chain, called by no behavior: its failure discards
    /// the attempt's sends whole, so there is nothing to count and take back here (and an
    /// endpoint without behaviors pays nothing for them).
    pub(crate) async fn run_outermost(self) -> Result<(), HandlerError> {
        match self.behaviors.split_first() {
            Some((outer, inner)) => {
                let ctx = self.ctx;
                let rest = Next {
                    behaviors: inner,
                    ..self
                };
                outer.around(ctx, rest).await
            }
            None => run_handlers(self.handlings).await,
        }
    }
}

/// Runs the handlings one after the other, stopping at the first error.
async fn run_handlers(
    handlings: Vec<BoxFuture<'static, Result<(), HandlerError>>>,
) -> Result<(), HandlerError> {
    for handling in handlings {
        catching_panics("handler", handling).await?;
    }
    Ok(())
}

/// `f`'s result, or a panic in it as an error saying that `what` panicked.
pub(crate) async fn catching_panics(
    what: &str,
    f: impl Future<Output = Result<(), HandlerError>>,
) -> Result<(), HandlerError> {
    AssertUnwindSafe(f)
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            let text = crate::message::panic_text(panic.as_ref());
            Err(HandlerError::msg(format!("{what} panicked: {text}")))
        })
}
