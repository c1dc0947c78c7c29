//! An endpoint hosting the tally saga, run as a real process by the saga crash tests.
//!
//! ```text
//! sagas_worker --amqp URL --queue Q --error-queue E --audit A --dht ADDR [--crash-after-saves N]
//! ```
//!
//! With `--crash-after-saves N` the process aborts right after its N-th saga save returned,
//! before the bus sent what the handler sent and acknowledged the message: the worst moment
//! for a crash.

use async_trait::async_trait;
use rhinobus::Endpoint;
use rhinobus::transport::RabbitMq;
use rhinobus_dht::{Client, Sibling, Version};
use rhinobus_sagas::{Persister, SagaEndpointExt, SagaStore, SaveRequest, StoreError};
use rhinobus_samples::tally::TallySaga;
use std::sync::atomic::{AtomicU64, Ordering};

struct CrashingStore {
    inner: Client,
    saves: AtomicU64,
    crash_after: Option<u64>,
}

#[async_trait]
impl SagaStore for CrashingStore {
    async fn load(&self, key: &str) -> Result<Vec<Sibling>, StoreError> {
        self.inner.load(key).await
    }

    async fn save(&self, request: SaveRequest) -> Result<Version, StoreError> {
        let version = self.inner.save(request).await?;
        let saves = self.saves.fetch_add(1, Ordering::SeqCst) + 1;
        if self.crash_after.is_some_and(|n| saves >= n) {
            eprintln!("sagas_worker: crashing after save {saves}");
            std::process::abort();
        }
        Ok(version)
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let need = |name: &str| {
        arg(&args, name).unwrap_or_else(|| {
            eprintln!("sagas_worker: missing {name}");
            std::process::exit(2)
        })
    };
    let (amqp, queue, error_queue, audit, dht) = (
        need("--amqp"),
        need("--queue"),
        need("--error-queue"),
        need("--audit"),
        need("--dht"),
    );
    let crash_after = arg(&args, "--crash-after-saves").and_then(|n| n.parse().ok());
    let client = match Client::connect(dht.clone()).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("sagas_worker: cannot reach the DHT at {dht}: {e}");
            std::process::exit(1)
        }
    };
    let store = CrashingStore {
        inner: client,
        saves: AtomicU64::new(0),
        crash_after,
    };
    let saga = TallySaga { audit: Some(audit) };
    let endpoint = match Endpoint::builder(queue, RabbitMq::new(&amqp))
        .concurrency(8)
        .error_queue(error_queue)
        .saga(saga, Persister::optimistic(store))
        .start()
        .await
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("sagas_worker: cannot start: {e}");
            std::process::exit(1)
        }
    };
    println!("ready");
    endpoint.run_until_signal().await;
}
