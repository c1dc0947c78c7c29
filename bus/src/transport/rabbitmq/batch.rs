//! Confirmed publishing that knows which messages came back.
//!
//! The broker hands back a `mandatory` message it could not route (`basic.return`) just before
//! it confirms it, but lapin gives each return to whichever confirm of the channel completes
//! next, not to the confirm of the message returned. On a channel shared by independent
//! publishers, a routed send could thus be reported unroutable while a returned one was
//! reported sent: a message lost.
//!
//! So returns are matched here by what they carry. A [`Batch`] publishes on a channel that
//! nothing else publishes on until the batch is settled, waits for all its confirms (which
//! leaves no return of the channel unclaimed: each return precedes its own message's confirm,
//! and each confirm takes the oldest waiting return), and matches every return the confirms
//! carried to the message it is by exchange, routing key and message id.

use super::amqp;
use crate::error::BusError;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use std::task::Poll;
use std::time::Duration;
use tracing::warn;

/// How long handing messages to the connection may take; a connection the broker blocked
/// (a memory or disk alarm) stalls here.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// What a publish needs to have come to for the message to count as sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Routing {
    /// It must reach a queue (a send): an unroutable message is an error.
    Required,
    /// It may reach no queue (a publish nobody subscribed to).
    Optional,
}

/// One message to publish, its names checked.
pub(crate) struct Publication {
    exchange: ShortString,
    routing_key: ShortString,
    body: Vec<u8>,
    properties: BasicProperties,
    routing: Routing,
}

impl Publication {
    /// A message for `routing_key` through `exchange` (`""`: straight to the queue named by
    /// the routing key), or a clear error when a name is too long for AMQP.
    pub(crate) fn new(
        exchange: &str,
        routing_key: &str,
        body: Vec<u8>,
        properties: BasicProperties,
        routing: Routing,
    ) -> Result<Self, BusError> {
        Ok(Self {
            exchange: amqp::short("exchange", exchange)?,
            routing_key: amqp::short("queue or routing key", routing_key)?,
            body,
            properties,
            routing,
        })
    }

    /// The queue the message must reach, for a send.
    pub(crate) fn queue(&self) -> Option<&str> {
        (self.routing == Routing::Required && self.exchange.as_str().is_empty())
            .then(|| self.routing_key.as_str())
    }
}

/// Publishes with `mandatory` set, on a channel in confirm mode that nothing else publishes on
/// until [`Batch::settle`] returns.
pub(crate) struct Batch {
    channel: Channel,
    targets: Vec<Target>,
    confirms: Vec<PublisherConfirm>,
    /// Why the fate of the batch is unknown, once it is.
    broken: Option<BusError>,
}

/// Where a message of a batch went, to recognise it when it comes back.
struct Target {
    exchange: ShortString,
    routing_key: ShortString,
    message_id: Option<ShortString>,
    routing: Routing,
}

impl Target {
    fn of(p: &Publication) -> Self {
        Self {
            exchange: p.exchange.clone(),
            routing_key: p.routing_key.clone(),
            message_id: p.properties.message_id().clone(),
            routing: p.routing,
        }
    }

    fn is(&self, returned: &lapin::message::Delivery) -> bool {
        let same_id = match (&self.message_id, returned.properties.message_id()) {
            (Some(ours), Some(theirs)) => ours == theirs,
            _ => true,
        };
        returned.exchange == self.exchange && returned.routing_key == self.routing_key && same_id
    }
}

impl Batch {
    /// A batch on `channel`, which must be in confirm mode and not shared until it is settled.
    pub(crate) fn new(channel: Channel) -> Self {
        Self {
            channel,
            targets: Vec::new(),
            confirms: Vec::new(),
            broken: None,
        }
    }

    /// The channel the batch publishes on.
    pub(crate) fn channel(&self) -> &Channel {
        &self.channel
    }

    /// How many messages were published in this batch.
    pub(crate) fn len(&self) -> usize {
        self.targets.len()
    }

    /// Hands `publications` to the connection, in order. An error leaves the fate of the
    /// whole batch unknown: [`Batch::settle`] then reports it.
    pub(crate) async fn publish<'p>(
        &mut self,
        publications: impl IntoIterator<Item = &'p Publication>,
    ) -> Result<(), BusError> {
        if let Some(e) = &self.broken {
            return Err(copy_of(e));
        }
        let publications: Vec<&Publication> = publications.into_iter().collect();
        // A publish takes its delivery tag and queues its frames when first polled: start them
        // one by one, in order, then wait until the connection has written all of them.
        let mut started = Vec::with_capacity(publications.len());
        for p in &publications {
            let mut publishing = Box::pin(self.channel.basic_publish(
                p.exchange.clone(),
                p.routing_key.clone(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &p.body,
                p.properties.clone(),
            ));
            let first = futures_util::poll!(publishing.as_mut());
            started.push(async move {
                match first {
                    Poll::Ready(published) => published,
                    Poll::Pending => publishing.await,
                }
            });
        }
        let all = futures_util::future::join_all(started);
        let confirms = match tokio::time::timeout(PUBLISH_TIMEOUT, all).await {
            Ok(results) => results
                .into_iter()
                .collect::<Result<Vec<_>, _>>()
                .map_err(BusError::from),
            Err(_) => Err(BusError::Timeout(PUBLISH_TIMEOUT)),
        };
        match confirms {
            Ok(confirms) => {
                self.targets
                    .extend(publications.iter().map(|p| Target::of(p)));
                self.confirms.extend(confirms);
                Ok(())
            }
            Err(e) => {
                self.broken = Some(copy_of(&e));
                Err(e)
            }
        }
    }

    /// Waits for every confirm and tells, in publishing order, what became of each message:
    /// sent, refused by the broker, or (for a message that had to reach a queue) unroutable.
    /// An error for the whole batch (a timeout, a broken channel, a failed publish) leaves the
    /// fate of every message unknown, and the channel must not be used again.
    pub(crate) async fn settle(
        self,
        timeout: Duration,
    ) -> Result<Vec<Result<(), BusError>>, BusError> {
        if let Some(e) = self.broken {
            return Err(e);
        }
        let all = futures_util::future::try_join_all(self.confirms);
        let confirmations = tokio::time::timeout(timeout, all)
            .await
            .map_err(|_| BusError::Timeout(timeout))??;
        let mut returned = vec![false; self.targets.len()];
        let mut outcomes = Vec::with_capacity(self.targets.len());
        for (target, confirmation) in self.targets.iter().zip(confirmations) {
            let (outcome, carried) = match confirmation {
                Confirmation::Ack(carried) => (Ok(()), carried),
                Confirmation::Nack(carried) => (
                    Err(BusError::Refused {
                        destination: target.routing_key.to_string(),
                    }),
                    carried,
                ),
                Confirmation::NotRequested => {
                    return Err(BusError::Transport(
                        "publisher confirms are not enabled on this channel".into(),
                    ));
                }
            };
            outcomes.push(outcome);
            if let Some(r) = carried {
                claim(&self.targets, &mut returned, &r.delivery);
            }
        }
        for ((outcome, target), returned) in outcomes.iter_mut().zip(&self.targets).zip(returned) {
            if returned && target.routing == Routing::Required && outcome.is_ok() {
                *outcome = Err(BusError::Unroutable {
                    queue: target.routing_key.to_string(),
                });
            }
        }
        Ok(outcomes)
    }
}

/// Marks the messages of a batch that `returned` is. Two messages of one batch with the same
/// destination and id cannot be told apart: both count as returned (a copy may then arrive
/// twice, and none is lost).
fn claim(targets: &[Target], returned: &mut [bool], delivery: &lapin::message::Delivery) {
    let mut found = false;
    for (target, r) in targets.iter().zip(returned.iter_mut()) {
        if target.is(delivery) {
            *r = true;
            found = true;
        }
    }
    if !found {
        warn!(
            exchange = %delivery.exchange,
            routing_key = %delivery.routing_key,
            "the broker returned a message this channel did not publish"
        );
    }
}

/// The same error again, for each of the senders a batch error concerns. Publishing fails
/// with transport errors and timeouts; anything else is carried as its message.
pub(crate) fn copy_of(e: &BusError) -> BusError {
    match e {
        BusError::Timeout(t) => BusError::Timeout(*t),
        BusError::Transport(why) => BusError::Transport(why.clone()),
        other => BusError::Transport(other.to_string()),
    }
}

/// A new channel of `connection` in confirm mode.
pub(crate) async fn confirming_channel(connection: &Connection) -> Result<Channel, BusError> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(queue: &str, id: Option<&str>) -> Target {
        Target {
            exchange: "".into(),
            routing_key: queue.into(),
            message_id: id.map(ShortString::from),
            routing: Routing::Required,
        }
    }

    fn returned(queue: &str, id: Option<&str>) -> lapin::message::Delivery {
        let mut d = lapin::message::Delivery::mock(0, "".into(), queue.into(), false, Vec::new());
        if let Some(id) = id {
            d.properties = BasicProperties::default().with_message_id(id.into());
        }
        d
    }

    fn claimed(targets: &[Target], r: &lapin::message::Delivery) -> Vec<bool> {
        let mut marks = vec![false; targets.len()];
        claim(targets, &mut marks, r);
        marks
    }

    #[test]
    fn a_return_is_the_message_with_its_destination_and_id() {
        let targets = [
            target("a", Some("1")),
            target("b", Some("2")),
            target("b", Some("3")),
        ];
        assert_eq!(
            claimed(&targets, &returned("b", Some("3"))),
            [false, false, true]
        );
        assert_eq!(claimed(&targets, &returned("a", Some("3"))), [false; 3]);
    }

    #[test]
    fn returns_that_cannot_be_told_apart_count_for_every_candidate() {
        let targets = [target("b", None), target("b", Some("2")), target("c", None)];
        assert_eq!(claimed(&targets, &returned("b", None)), [true, true, false]);
        assert_eq!(
            claimed(&targets, &returned("b", Some("9"))),
            [true, false, false]
        );
    }
}
