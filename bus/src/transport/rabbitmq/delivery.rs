//! A message received from RabbitMQ, owned by the endpoint until it is settled.

use super::{RabbitMq, amqp};
use crate::error::BusError;
use crate::headers::Headers;
use crate::transport::Delivery;
use async_trait::async_trait;
use lapin::Channel;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use std::sync::Arc;

pub(super) struct RabbitDelivery {
    transport: RabbitMq,
    /// lapin closes a channel when its last handle goes; the channel must outlive every
    /// delivery taken from it, or their acks would be lost when the consumer stops.
    _channel: Channel,
    delivery: lapin::message::Delivery,
    headers: Arc<Headers>,
    settled: bool,
}

impl RabbitDelivery {
    pub(super) fn new(
        transport: RabbitMq,
        channel: Channel,
        delivery: lapin::message::Delivery,
    ) -> Self {
        let headers = Arc::new(amqp::envelope_headers(&delivery.properties));
        Self {
            transport,
            _channel: channel,
            delivery,
            headers,
            settled: false,
        }
    }
}

#[async_trait]
impl Delivery for RabbitDelivery {
    fn headers(&self) -> &Arc<Headers> {
        &self.headers
    }

    fn body(&self) -> &[u8] {
        &self.delivery.data
    }

    fn redelivered(&self) -> bool {
        self.delivery.redelivered
    }

    async fn ack(mut self: Box<Self>) -> Result<(), BusError> {
        self.settled = true;
        if self.delivery.acker.ack(BasicAckOptions::default()).await? {
            Ok(())
        } else {
            Err(BusError::Transport(
                "the channel closed before the ack; the broker will redeliver".into(),
            ))
        }
    }

    async fn forward(mut self: Box<Self>, queue: &str, extra: Headers) -> Result<(), BusError> {
        let props = amqp::with_extra_headers(&self.delivery.properties, &extra)?;
        self.transport
            .republish(queue, &self.delivery.data, props)
            .await?;
        self.ack().await
    }
}

impl Drop for RabbitDelivery {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        // Give it back now rather than holding a prefetch slot until the channel closes.
        let acker = self.delivery.acker.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await;
            });
        }
    }
}
