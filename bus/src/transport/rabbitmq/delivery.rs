//! A message received from RabbitMQ, owned by the endpoint until it is settled.

use super::acks::Acks;
use super::{RabbitMq, amqp};
use crate::error::BusError;
use crate::headers::Headers;
use crate::transport::Delivery;
use async_trait::async_trait;
use std::sync::Arc;

pub(super) struct RabbitDelivery {
    transport: RabbitMq,
    /// The acks of the channel it came on. They keep the channel open: lapin closes a channel
    /// when its last handle goes, and it must outlive every delivery taken from it.
    acks: Arc<Acks>,
    delivery: lapin::message::Delivery,
    headers: Arc<Headers>,
    settled: bool,
}

impl RabbitDelivery {
    pub(super) fn new(
        transport: RabbitMq,
        acks: Arc<Acks>,
        delivery: lapin::message::Delivery,
    ) -> Self {
        acks.delivered(delivery.delivery_tag);
        let headers = Arc::new(amqp::envelope_headers(&delivery.properties));
        Self {
            transport,
            acks,
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

    async fn ack(&mut self) -> Result<(), BusError> {
        self.settled = true;
        self.acks.ack(self.delivery.delivery_tag)
    }

    async fn forward(&mut self, queue: &str, extra: Headers) -> Result<(), BusError> {
        let props = amqp::moved_copy(&self.delivery.properties, &extra)?;
        self.transport
            .republish(queue, &self.delivery.data, props)
            .await?;
        self.ack().await
    }
}

impl Drop for RabbitDelivery {
    fn drop(&mut self) {
        if !self.settled {
            // Give it back now rather than holding a prefetch slot until the channel closes.
            self.acks.nack(self.delivery.delivery_tag);
        }
    }
}
