//! What the `billing` and `restaurant` samples share: the transport they run on (in memory by
//! default, RabbitMQ with `--amqp URL`), and waiting for a condition.

use rhinobus::transport::{InMemory, RabbitMq, Transport};
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where a sample's endpoints exchange messages.
#[derive(Debug, Clone)]
pub enum Broker {
    /// One in-memory broker shared by every endpoint of the process.
    InMemory(InMemory),
    /// RabbitMQ at this URL, one connection per endpoint.
    RabbitMq(String),
}

impl Broker {
    /// In memory without a URL, RabbitMQ with one.
    pub fn from_url(url: Option<String>) -> Self {
        match url {
            Some(url) => Broker::RabbitMq(url),
            None => Broker::InMemory(InMemory::new()),
        }
    }

    /// A transport for one endpoint or bus.
    pub fn transport(&self) -> Arc<dyn Transport> {
        match self {
            Broker::InMemory(b) => Arc::new(b.clone()),
            Broker::RabbitMq(url) => Arc::new(RabbitMq::new(url)),
        }
    }

    /// A suffix that keeps queue names of different runs apart on RabbitMQ.
    pub fn run_suffix(&self) -> String {
        match self {
            Broker::InMemory(_) => String::new(),
            Broker::RabbitMq(_) => format!("-{}", uuid::Uuid::now_v7().simple()),
        }
    }
}

/// Polls `check` until it returns `Some`, or fails after `within`.
pub async fn wait_for<T, F, Fut>(what: &str, within: Duration, mut check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(format!("timed out after {within:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
