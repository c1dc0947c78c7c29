//! The per-message pipeline of an endpoint: drop a message past its time to be received, find
//! the handlers, run them inside the behaviors with retries, send what they sent, and settle
//! the delivery (ack, delay, or error queue).

use crate::behavior::{Behavior, Next, catching_panics};
use crate::bus::Bus;
use crate::context::Context;
use crate::error::{BusError, ErrorKind, HandlerError};
use crate::handler::Handlers;
use crate::headers::{Headers, format_time, names, parse_time};
use crate::recoverability::{Failure, Recoverability};
use crate::trace;
use crate::transport::{DelayQueue, Delivery};
use rand::Rng;
use std::sync::Arc;
use std::time::SystemTime;
use tracing::{Instrument, debug, error, field, info, info_span, warn};

/// How long a delivery that could not be settled is held before it goes back to its queue.
const SETTLE_FAILURE_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

pub(crate) struct Pipeline {
    pub(crate) bus: Bus,
    pub(crate) handlers: Handlers,
    /// Around every attempt, outermost first.
    pub(crate) behaviors: Vec<Arc<dyn Behavior>>,
    pub(crate) policy: Recoverability,
    pub(crate) queue: String,
    pub(crate) delay_queues: Vec<DelayQueue>,
    pub(crate) audit_queue: Option<String>,
    /// This process, as audit copies name it ([`names::PROCESSING_HOST`]).
    pub(crate) host: String,
}

/// Whether the message came after its `rhinobus-discard-after` time: no longer worth
/// handling. A header that is not a time (from another client: rhinobus refuses to send one)
/// is ignored: the message is handled.
fn past_its_time(headers: &Headers, now: SystemTime) -> bool {
    let Some(text) = headers.get(names::DISCARD_AFTER) else {
        return false;
    };
    match parse_time(text) {
        Some(at) => now > at,
        None => {
            warn!(header = %text, "{} is not an RFC 3339 time; handling the message", names::DISCARD_AFTER);
            false
        }
    }
}

/// Acknowledges a message that came after its time, without handling it. Should the ack not
/// reach the broker, it is delivered again and dropped then.
async fn discard(mut delivery: Box<dyn Delivery>) {
    let discard_after = delivery.headers().get(names::DISCARD_AFTER).cloned();
    info!(
        discard_after,
        "received after its time to be received; dropped unhandled"
    );
    if let Err(e) = delivery.ack().await {
        warn!(error = %e, "could not drop the message; it will be redelivered");
    }
}

/// How a delivery is to be settled.
enum Outcome {
    /// Handled and everything it sent is confirmed: remove it (after copying it to the audit
    /// queue, if there is one).
    Handled { attempts: u32 },
    /// Every immediate retry failed: wait in a delay queue, then come back.
    Delay { queue: String, round: u32 },
    /// Give up: to the error queue.
    Fail(Failure),
}

/// Why running the handlers once did not succeed.
enum RunError {
    Decode(crate::message::CodecError),
    Handler(HandlerError),
}

impl Pipeline {
    pub(crate) async fn process(&self, delivery: Box<dyn Delivery>) {
        let headers = delivery.headers().clone();
        let get = |name| headers.get(name).map_or("", String::as_str);
        let span = info_span!(
            "message",
            endpoint = %self.bus.endpoint(),
            message_id = %get(names::MESSAGE_ID),
            message_type = %get(names::MESSAGE_TYPE),
            trace_id = %trace::trace_id(get(names::TRACEPARENT)).unwrap_or(""),
            redelivered = delivery.redelivered(),
            attempt = field::Empty,
        );
        async {
            let started = SystemTime::now();
            if past_its_time(&headers, started) {
                discard(delivery).await;
                return;
            }
            let outcome = self.handle(delivery.body(), &headers).await;
            self.settle(delivery, &headers, outcome, started).await;
        }
        .instrument(span)
        .await
    }

    async fn handle(&self, body: &[u8], headers: &Arc<Headers>) -> Outcome {
        let Some(message_type) = headers.get(names::MESSAGE_TYPE) else {
            return Outcome::Fail(self.rejection(
                "missing-type",
                format!("the message has no {} header", names::MESSAGE_TYPE),
            ));
        };
        let Some(handlers) = self.handlers.for_type(message_type) else {
            return Outcome::Fail(self.rejection(
                "no-handler",
                format!(
                    "endpoint {} has no handler for message type {message_type:?}",
                    self.bus.endpoint()
                ),
            ));
        };
        let (mut attempt, mut failures, mut conflicts) = (0u32, 0u32, 0u32);
        loop {
            attempt += 1;
            tracing::Span::current().record("attempt", attempt);
            let ctx = Context::new(self.bus.clone(), headers.clone(), attempt);
            let error = match run(&self.behaviors, handlers, body, &ctx).await {
                Ok(()) => match self.bus.transport().send(ctx.take_outgoing()).await {
                    Ok(()) => return Outcome::Handled { attempts: attempt },
                    Err(e) => HandlerError::from(e),
                },
                Err(RunError::Decode(e)) => {
                    return Outcome::Fail(Failure {
                        reason: "decode",
                        error_type: std::any::type_name::<crate::message::CodecError>().into(),
                        message: e.to_string(),
                        causes: Vec::new(),
                        attempts: attempt,
                    });
                }
                Err(RunError::Handler(e)) => e,
            };
            if error.kind() == ErrorKind::Conflict && conflicts < self.policy.conflict_retries {
                conflicts += 1;
                debug!(error = %error, conflicts, "conflict; running again on fresh state");
                let max = self.policy.conflict_jitter.as_micros() as u64;
                let jitter = rand::rng().random_range(0..=max);
                tokio::time::sleep(std::time::Duration::from_micros(jitter)).await;
                continue;
            }
            if self.policy.is_unrecoverable(&error) {
                error!(error = %error, attempts = attempt, "no retry can mend this; moving to the error queue");
                return Outcome::Fail(Failure::of_handler("unrecoverable", &error, attempt));
            }
            failures += 1;
            if failures <= self.policy.immediate_retries {
                warn!(error = %error, failures, "handler failed; retrying");
                continue;
            }
            let rounds_done = headers
                .get(names::DELAYED_RETRIES)
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or(0);
            if let Some(q) = self.delay_queues.get(rounds_done) {
                warn!(error = %error, delay = ?q.delay, "immediate retries spent; delaying");
                return Outcome::Delay {
                    queue: q.name.clone(),
                    round: rounds_done as u32 + 1,
                };
            }
            error!(error = %error, attempts = attempt, "giving up; moving to the error queue");
            return Outcome::Fail(Failure::of_handler("handler", &error, attempt));
        }
    }

    /// A message that no handler can take: straight to the error queue, no retries.
    fn rejection(&self, reason: &'static str, message: String) -> Failure {
        error!(reason, "{message}; moving to the error queue");
        Failure {
            reason,
            error_type: "rhinobus::Rejected".into(),
            message,
            causes: Vec::new(),
            attempts: 0,
        }
    }

    async fn settle(
        &self,
        mut delivery: Box<dyn Delivery>,
        headers: &Headers,
        outcome: Outcome,
        started: SystemTime,
    ) {
        let result = match outcome {
            Outcome::Handled { attempts } => match &self.audit_queue {
                None => delivery.ack().await,
                Some(audit) => {
                    self.audit(delivery.as_mut(), audit, headers, attempts, started)
                        .await
                }
            },
            Outcome::Delay { queue, round } => {
                let mut extra = Headers::new();
                extra.insert(names::DELAYED_RETRIES.into(), round.to_string());
                delivery.forward(&queue, extra).await
            }
            Outcome::Fail(failure) => {
                let extra = failure.headers(headers, self.bus.endpoint(), &self.queue);
                delivery.forward(&self.policy.error_queue, extra).await
            }
        };
        if let Err(e) = result {
            // The delivery was not removed, so the broker hands it out again once it is let
            // go. Pause before letting it go, so that a broker refusing the error queue
            // (deleted by hand, say) does not turn into a hot loop of handler runs.
            warn!(error = %e, "could not settle the message; it will be redelivered");
            tokio::time::sleep(SETTLE_FAILURE_PAUSE).await;
        }
        drop(delivery);
    }

    /// Moves a handled message to the audit queue with its processing headers. When the broker
    /// does not take the copy (the queue is gone, a length limit refuses it, no confirm came
    /// in time) the message goes to the error queue instead, processing headers included, so
    /// that replayed `--to` the audit queue it is a whole audit copy: handling it again would
    /// not get the copy taken, and would repeat what the handlers did. Only a broken
    /// connection leaves it to be redelivered, which its broker does whatever happens here.
    async fn audit(
        &self,
        delivery: &mut dyn Delivery,
        audit: &str,
        headers: &Headers,
        attempts: u32,
        started: SystemTime,
    ) -> Result<(), BusError> {
        let mut extra = Headers::new();
        extra.insert(
            names::PROCESSING_ENDPOINT.into(),
            self.bus.endpoint().into(),
        );
        extra.insert(names::PROCESSING_QUEUE.into(), self.queue.clone());
        extra.insert(names::PROCESSING_HOST.into(), self.host.clone());
        extra.insert(names::PROCESSING_STARTED.into(), format_time(started));
        extra.insert(
            names::PROCESSING_ENDED.into(),
            format_time(SystemTime::now()),
        );
        extra.insert(names::PROCESSING_ATTEMPTS.into(), attempts.to_string());
        match delivery.forward(audit, extra.clone()).await {
            Err(e @ BusError::Transport(_)) => Err(e),
            Err(e) => {
                let failure = Failure {
                    reason: "audit",
                    error_type: "rhinobus::AuditCopyFailed".into(),
                    message: format!(
                        "handled, but its copy was not taken by the audit queue {audit:?}: {e}; \
                         replay it --to the audit queue once that can take it (replayed to \
                         its source queue it is handled again)"
                    ),
                    causes: Vec::new(),
                    attempts,
                };
                error!(audit_queue = %audit, error = %e, "audit copy failed; moving the handled message to the error queue");
                extra.extend(failure.headers(headers, self.bus.endpoint(), &self.queue));
                delivery.forward(&self.policy.error_queue, extra).await
            }
            other => other,
        }
    }
}

/// This machine's name and this process's id: `<host name> (pid <pid>)`. The name comes from
/// the kernel on Linux, else from `HOSTNAME` or `COMPUTERNAME`.
pub(crate) fn this_process() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "unknown host".into());
    format!("{name} (pid {})", std::process::id())
}

/// Runs every handler of the message once, in registration order, sharing one context.
async fn run(
    behaviors: &[Arc<dyn Behavior>],
    handlers: &[crate::handler::ErasedHandler],
    body: &[u8],
    ctx: &Context,
) -> Result<(), RunError> {
    let mut handlings = Vec::with_capacity(handlers.len());
    for h in handlers {
        handlings.push(h(body, ctx.clone()).map_err(RunError::Decode)?);
    }
    // A behavior that panics fails the attempt as a handler would.
    catching_panics(
        "a behavior",
        Next::new(behaviors, ctx, body, handlings).run_outermost(),
    )
    .await
    .map_err(RunError::Handler)
}
