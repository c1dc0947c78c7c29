//! Delayed sends on RabbitMQ, with no plugin: a cascade of delay queues, one per bit of the
//! delay in seconds, as NServiceBus's delay infrastructure does.
//!
//! Level `n` (27 down to 0) is a topic exchange `<exchange>.delay.level.NN` and a quorum queue
//! of the same name whose messages expire after 2^n seconds. A delayed message is published to
//! the top level with its delay, in binary, as its routing key: 28 words of `0` or `1`, most
//! significant first. At each level, a message whose bit is 1 waits in the level's queue and
//! is then dead-lettered to the next level down; one whose bit is 0 passes straight on (an
//! exchange-to-exchange binding). Below level 0 the `<exchange>.delay.deliver` headers exchange
//! routes it by its `rhinobus-deliver-to` header to its queue, which its endpoint binds there
//! as it starts, and a delayed send before it sends. A message that finds no queue there (its queue was deleted while it waited)
//! goes, through the alternate exchange, to the `<exchange>.delay.undeliverable` queue, where
//! `rhinobus errors` can list it and replay it to its queue.
//!
//! The level queues are quorum queues that dead-letter at least once (RabbitMQ 3.10 or later):
//! a message leaves a level only once the next one has taken it, so a broker that stops in
//! between keeps it.

use super::amqp;
use crate::error::BusError;
use crate::headers::names;
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::protocol::AMQPErrorKind;
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ExchangeKind};
use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::OnceCell;

/// How many levels: one per bit of [`crate::MAX_DELAY`] in seconds.
const LEVELS: u32 = crate::MAX_DELAY.as_secs().count_ones();

/// The delay infrastructure as one connection knows it: its names, what it has declared, and
/// the queues it has bound to the delivery exchange.
pub(crate) struct Delays {
    exchange: String,
    /// The delivery exchange and the undeliverable queue, declared once, as an endpoint starts
    /// or before the first delayed send.
    delivery: OnceCell<Names>,
    /// The levels, declared once, before the first delayed send: an endpoint that never sends
    /// one does not wait for them as it starts (about 35 ms, in a release build here).
    levels: OnceCell<()>,
    bound: Mutex<HashSet<String>>,
}

impl Delays {
    /// The delay levels of the topic exchange `exchange`, not declared yet.
    pub(crate) fn new(exchange: &str) -> Self {
        Self {
            exchange: exchange.to_owned(),
            delivery: OnceCell::new(),
            levels: OnceCell::new(),
            bound: Mutex::default(),
        }
    }

    /// Readies this connection for delayed sends to `queues`: declares the delay levels (once
    /// per connection) and binds each of `queues` to the delivery exchange, once per
    /// connection and queue. A queue that does not exist is [`BusError::Unroutable`], before
    /// anything is sent.
    pub(crate) async fn prepare(
        &self,
        connection: &Connection,
        queues: &[&str],
    ) -> Result<(), BusError> {
        let names = self.delivery(connection).await?;
        self.levels
            .get_or_try_init(|| {
                on_own_channel(
                    connection,
                    |c| async move { declare_levels(&c, names).await },
                )
            })
            .await?;
        let unbound: Vec<&str> = {
            let bound = self.bound.lock().unwrap_or_else(PoisonError::into_inner);
            queues
                .iter()
                .copied()
                .filter(|q| !bound.contains(*q))
                .collect()
        };
        self.bind(connection, &unbound).await
    }

    /// Binds every one of `queues` to the delivery exchange, whether or not this connection
    /// bound it before: for an endpoint's own queue as it starts, which may have been deleted
    /// and declared again meanwhile (a deleted queue loses its bindings). Declares the delivery
    /// exchange first (once per connection), not the levels.
    pub(crate) async fn bind(
        &self,
        connection: &Connection,
        queues: &[&str],
    ) -> Result<(), BusError> {
        let infra = self.delivery(connection).await?;
        if queues.is_empty() {
            return Ok(());
        }
        let checked: Vec<ShortString> = queues
            .iter()
            .map(|q| amqp::short("queue name", q))
            .collect::<Result<_, _>>()?;
        // A bind to a missing queue closes its channel: one of their own.
        let channel = connection.create_channel().await?;
        for queue in &checked {
            let mut args = FieldTable::default();
            args.insert("x-match".into(), AMQPValue::LongString("all".into()));
            args.insert(
                names::DELIVER_TO.into(),
                AMQPValue::LongString(queue.as_str().into()),
            );
            let bound = channel
                .queue_bind(
                    queue.clone(),
                    infra.deliver.clone(),
                    "".into(),
                    QueueBindOptions::default(),
                    args,
                )
                .await;
            match bound {
                Ok(()) => {}
                Err(e) if amqp::is_not_found(&e) => {
                    return Err(BusError::Unroutable {
                        queue: queue.to_string(),
                    });
                }
                Err(e) => return Err(refusal(e)),
            }
        }
        let _ = channel.close(200, "bound".into()).await;
        self.bound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(queues.iter().map(|q| (*q).to_owned()));
        Ok(())
    }

    /// The names, with the delivery exchange and the undeliverable queue declared.
    async fn delivery(&self, connection: &Connection) -> Result<&Names, BusError> {
        self.delivery
            .get_or_try_init(|| async {
                let names = Names::new(&self.exchange)?;
                let declared = &names;
                on_own_channel(connection, |c| async move {
                    declare_delivery(&c, declared).await
                })
                .await?;
                Ok::<_, BusError>(names)
            })
            .await
    }
}

/// The exchange a delayed message is published to, and its routing key, for a delay (at most
/// [`crate::MAX_DELAY`], as [`crate::transport::OutgoingMessage::remaining_delay`] sees to)
/// rounded up to whole seconds.
pub(crate) fn route(exchange: &str, delay: Duration) -> (String, String) {
    let seconds = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
    debug_assert!(seconds <= crate::MAX_DELAY.as_secs(), "{delay:?} too long");
    let bits: Vec<&str> = (0..LEVELS)
        .rev()
        .map(|level| if seconds >> level & 1 == 1 { "1" } else { "0" })
        .collect();
    (level_name(exchange, LEVELS - 1), bits.join("."))
}

/// The queue where delayed messages whose queue went away meanwhile wait for an operator.
pub(crate) fn undeliverable_queue(exchange: &str) -> String {
    format!("{exchange}.delay.undeliverable")
}

fn level_name(exchange: &str, level: u32) -> String {
    format!("{exchange}.delay.level.{level:02}")
}

/// A topic binding key that matches the routing keys whose bit for `level` is `bit`.
fn bit_pattern(level: u32, bit: char) -> String {
    format!("{}{bit}.#", "*.".repeat((LEVELS - 1 - level) as usize))
}

/// Runs `declare` on a channel of its own, which a refusal closes ([`refusal`]), and closes
/// the channel after it.
async fn on_own_channel<F, Fut>(connection: &Connection, declare: F) -> Result<(), BusError>
where
    F: FnOnce(Channel) -> Fut,
    Fut: std::future::Future<Output = Result<(), lapin::Error>>,
{
    let channel = connection.create_channel().await?;
    declare(channel.clone()).await.map_err(refusal)?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

/// A broker's refusal to declare or bind (no permission, an object declared before with other
/// arguments, an exclusive queue) is a configuration to fix, not a broken connection to retry.
fn refusal(e: lapin::Error) -> BusError {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(p) if matches!(p.kind(), AMQPErrorKind::Soft(_)) => {
            BusError::Config(format!("the broker refused the delay queues: {e}"))
        }
        _ => e.into(),
    }
}

/// Every name of the delay infrastructure, checked for AMQP.
struct Names {
    undeliverable: ShortString,
    deliver: ShortString,
    /// Level 0 first.
    levels: Vec<Level>,
}

struct Level {
    name: ShortString,
    /// Where its messages go next: the level below, or the delivery exchange.
    below: ShortString,
    ttl_ms: i64,
    waits: ShortString,
    passes: ShortString,
}

impl Names {
    fn new(exchange: &str) -> Result<Self, BusError> {
        let short = |what: &str, name: &str| amqp::short(what, name);
        let deliver = short("exchange", &format!("{exchange}.delay.deliver"))?;
        let mut levels = Vec::new();
        for level in 0..LEVELS {
            let below = match level {
                0 => deliver.clone(),
                _ => short("exchange", &level_name(exchange, level - 1))?,
            };
            levels.push(Level {
                name: short("exchange", &level_name(exchange, level))?,
                below,
                ttl_ms: 1000 << level,
                waits: short("binding key", &bit_pattern(level, '1'))?,
                passes: short("binding key", &bit_pattern(level, '0'))?,
            });
        }
        Ok(Self {
            undeliverable: short("exchange", &undeliverable_queue(exchange))?,
            deliver,
            levels,
        })
    }
}

fn durable() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

/// Declares the delivery exchange and the undeliverable queue behind it (idempotent).
async fn declare_delivery(channel: &Channel, names: &Names) -> Result<(), lapin::Error> {
    let durable = durable();
    let undeliverable = &names.undeliverable;
    let no_args = FieldTable::default;
    channel
        .exchange_declare(
            undeliverable.clone(),
            ExchangeKind::Fanout,
            durable,
            no_args(),
        )
        .await?;
    declare_queue(channel, undeliverable, no_args()).await?;
    let bind = QueueBindOptions::default();
    channel
        .queue_bind(
            undeliverable.clone(),
            undeliverable.clone(),
            "".into(),
            bind,
            no_args(),
        )
        .await?;
    let mut args = FieldTable::default();
    args.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(undeliverable.as_str().into()),
    );
    channel
        .exchange_declare(names.deliver.clone(), ExchangeKind::Headers, durable, args)
        .await?;
    Ok(())
}

/// Declares every level, each feeding the one below and level 0 the delivery exchange, which
/// must exist (idempotent).
async fn declare_levels(channel: &Channel, names: &Names) -> Result<(), lapin::Error> {
    let (durable, bind, no_args) = (durable(), QueueBindOptions::default(), FieldTable::default);
    for level in &names.levels {
        let name = &level.name;
        channel
            .exchange_declare(name.clone(), ExchangeKind::Topic, durable, no_args())
            .await?;
        let text = |s: &str| AMQPValue::LongString(s.into());
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("quorum"));
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(level.ttl_ms));
        args.insert("x-dead-letter-exchange".into(), text(level.below.as_str()));
        args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        args.insert("x-overflow".into(), text("reject-publish"));
        declare_queue(channel, name, args).await?;
        channel
            .queue_bind(
                name.clone(),
                name.clone(),
                level.waits.clone(),
                bind,
                no_args(),
            )
            .await?;
        let e2e = ExchangeBindOptions::default();
        channel
            .exchange_bind(
                level.below.clone(),
                name.clone(),
                level.passes.clone(),
                e2e,
                no_args(),
            )
            .await?;
    }
    Ok(())
}

async fn declare_queue(
    channel: &Channel,
    name: &ShortString,
    args: FieldTable,
) -> Result<(), lapin::Error> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel.queue_declare(name.clone(), durable, args).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delay_is_its_seconds_in_binary_rounded_up() {
        let (exchange, key) = route("rhinobus", Duration::from_millis(5_001));
        assert_eq!(exchange, "rhinobus.delay.level.27");
        let words: Vec<&str> = key.split('.').collect();
        assert_eq!(words.len(), 28);
        assert_eq!(words[25..], ["1", "1", "0"], "6 seconds: 110");
        assert!(words[..25].iter().all(|w| *w == "0"));
        let (_, longest) = route("rhinobus", crate::MAX_DELAY);
        assert!(longest.split('.').all(|w| w == "1"));
    }

    #[test]
    fn each_level_matches_its_own_bit() {
        assert_eq!(bit_pattern(27, '1'), "1.#");
        assert_eq!(bit_pattern(0, '0'), format!("{}0.#", "*.".repeat(27)));
    }
}
