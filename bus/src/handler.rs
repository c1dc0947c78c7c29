//! Handlers and the table that dispatches a message type to its handlers.

use crate::context::Context;
use crate::error::HandlerError;
use crate::message::{CodecError, Message, decode};
use async_trait::async_trait;
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

/// Handles messages of type `M`.
///
/// Implement it on a type, or pass an async closure `|message: M, ctx: Context| async { .. }`.
///
/// ```
/// use rhinobus::{Context, Handler, HandlerError, Message};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct CallMade { account: String, seconds: u32 }
/// impl Message for CallMade { const NAME: &'static str = "billing.call-made"; }
///
/// #[derive(Serialize, Deserialize)]
/// struct CallBilled { account: String, cents: u64 }
/// impl Message for CallBilled { const NAME: &'static str = "billing.call-billed"; }
///
/// struct Biller { cents_per_minute: u64 }
///
/// #[async_trait::async_trait]
/// impl Handler<CallMade> for Biller {
///     async fn handle(&self, call: CallMade, ctx: Context) -> Result<(), HandlerError> {
///         let cents = u64::from(call.seconds).div_ceil(60) * self.cents_per_minute;
///         ctx.publish(&CallBilled { account: call.account, cents })?;
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait Handler<M: Message>: Send + Sync + 'static {
    /// Handles one message. Returning an error runs the recoverability policy.
    async fn handle(&self, message: M, ctx: Context) -> Result<(), HandlerError>;
}

#[async_trait]
impl<M, F, Fut> Handler<M> for F
where
    M: Message,
    F: Fn(M, Context) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    async fn handle(&self, message: M, ctx: Context) -> Result<(), HandlerError> {
        self(message, ctx).await
    }
}

/// A handler with its message type erased: decodes the body, then handles it.
pub(crate) type ErasedHandler = Arc<
    dyn Fn(&[u8], Context) -> Result<BoxFuture<'static, Result<(), HandlerError>>, CodecError>
        + Send
        + Sync,
>;

/// Message type (wire name) → every handler registered for it, in registration order.
#[derive(Clone, Default)]
pub(crate) struct Handlers {
    by_type: HashMap<&'static str, Vec<ErasedHandler>>,
}

impl Handlers {
    pub(crate) fn add<M: Message, H: Handler<M>>(&mut self, handler: H) {
        let handler = Arc::new(handler);
        let erased: ErasedHandler = Arc::new(move |body, ctx| {
            let message = decode::<M>(body)?;
            let handler = handler.clone();
            Ok(Box::pin(async move { handler.handle(message, ctx).await }))
        });
        self.by_type.entry(M::NAME).or_default().push(erased);
    }

    /// The handlers for a type, or `None` when the endpoint has none.
    pub(crate) fn for_type(&self, message_type: &str) -> Option<&[ErasedHandler]> {
        self.by_type.get(message_type).map(Vec::as_slice)
    }

    /// Every handled type.
    pub(crate) fn types(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.by_type.keys().copied()
    }
}
