//! Delayed sends on RabbitMQ, with no plugin: a cascade of delay queues, one per bit of the
//! delay in seconds, as NServiceBus's delay infrastructure does.
//!
//! Level `n` (27 down to 0) is a topic exchange `<exchange>.delay.level.NN` and a quorum queue
//! of the same name whose messages expire after 2^n seconds. A delayed message is published to
//! the top level with its delay, in binary, as its routing key: 28 words of `0` or `1`, most
//! significant first. At each level, a message whose bit is 1 waits in the level's queue and
//! is then dead-lettered to the next level down; one whose bit is 0 passes straight on (an
//! exchange-to-exchange binding). Below level 0 the `<exchange>.delay.deliver` headers exchange
//! routes it by its `rhinobus-deliver-to` header to its queue, which a delayed send binds
//! there first. A message that finds no queue there (its queue was deleted while it waited)
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
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection, ExchangeKind};
use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::OnceCell;

/// How many levels: delays up to 2^28 - 1 seconds ([`crate::MAX_DELAY`]).
const LEVELS: u32 = 28;

/// The delay infrastructure as one connection knows it: declared once, and the queues it has
/// bound to the delivery exchange.
#[derive(Default)]
pub(crate) struct Delays {
    declared: OnceCell<()>,
    bound: Mutex<HashSet<String>>,
}

impl Delays {
    /// Declares the delay levels (once per connection) and binds each of `queues` to the
    /// delivery exchange (once per connection and queue). A queue that does not exist is
    /// [`BusError::Unroutable`], before anything is sent.
    pub(crate) async fn prepare(
        &self,
        connection: &Connection,
        exchange: &str,
        queues: &[&str],
    ) -> Result<(), BusError> {
        self.declared
            .get_or_try_init(|| async {
                let channel = connection.create_channel().await?;
                declare(&channel, exchange).await?;
                let _ = channel.close(200, "declared".into()).await;
                Ok::<(), BusError>(())
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
        if unbound.is_empty() {
            return Ok(());
        }
        // A bind to a missing queue closes its channel: one of their own.
        let channel = connection.create_channel().await?;
        for queue in &unbound {
            let mut args = FieldTable::default();
            args.insert("x-match".into(), AMQPValue::LongString("all".into()));
            args.insert(
                names::DELIVER_TO.into(),
                AMQPValue::LongString((*queue).into()),
            );
            let bound = channel
                .queue_bind(
                    amqp::short("queue name", queue)?,
                    amqp::short("exchange", &deliver_exchange(exchange))?,
                    "".into(),
                    QueueBindOptions::default(),
                    args,
                )
                .await;
            match bound {
                Ok(()) => {}
                Err(e) if amqp::is_not_found(&e) => {
                    return Err(BusError::Unroutable {
                        queue: (*queue).to_owned(),
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        let _ = channel.close(200, "bound".into()).await;
        self.bound
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend(unbound.into_iter().map(str::to_owned));
        Ok(())
    }
}

/// The exchange a delayed message is published to, and its routing key, for a delay rounded
/// up to whole seconds.
pub(crate) fn route(exchange: &str, delay: Duration) -> (String, String) {
    let seconds = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
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

fn deliver_exchange(exchange: &str) -> String {
    format!("{exchange}.delay.deliver")
}

/// A topic binding key that matches the routing keys whose bit for `level` is `bit`.
fn bit_pattern(level: u32, bit: char) -> String {
    format!("{}{bit}.#", "*.".repeat((LEVELS - 1 - level) as usize))
}

/// Declares every level, the delivery exchange and the undeliverable queue (idempotent).
async fn declare(channel: &Channel, exchange: &str) -> Result<(), BusError> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let undeliverable = undeliverable_queue(exchange);
    let short = |name: &str| amqp::short("exchange", name);
    channel
        .exchange_declare(
            short(&undeliverable)?,
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    declare_queue(channel, &undeliverable, FieldTable::default()).await?;
    channel
        .queue_bind(
            short(&undeliverable)?,
            short(&undeliverable)?,
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut args = FieldTable::default();
    args.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(undeliverable.as_str().into()),
    );
    let deliver = deliver_exchange(exchange);
    channel
        .exchange_declare(short(&deliver)?, ExchangeKind::Headers, durable, args)
        .await?;
    for level in 0..LEVELS {
        let name = level_name(exchange, level);
        let below = match level {
            0 => deliver.clone(),
            _ => level_name(exchange, level - 1),
        };
        channel
            .exchange_declare(
                short(&name)?,
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(1000 << level),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(below.as_str().into()),
        );
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        declare_queue(channel, &name, args).await?;
        channel
            .queue_bind(
                short(&name)?,
                short(&name)?,
                amqp::short("binding key", &bit_pattern(level, '1'))?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_bind(
                short(&below)?,
                short(&name)?,
                amqp::short("binding key", &bit_pattern(level, '0'))?,
                ExchangeBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
    }
    Ok(())
}

async fn declare_queue(channel: &Channel, name: &str, args: FieldTable) -> Result<(), BusError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(amqp::short("queue name", name)?, durable, args)
        .await?;
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
