//! rhinobus-dht scenarios: a node started in this process on a temporary directory, driven over
//! loopback TCP by concurrent client tasks, each waiting for its answer before the next request
//! (as `redis-benchmark -c N` does), sharing a few pipelined connections.

use crate::cpu::{CpuClock, CpuUse};
use crate::node::InProcessNode;
use crate::report::{Latencies, Report};
use rhinobus_dht::{Client, ClientOptions, Durability, PutRequest};
use std::error::Error;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Bytes per value, as `redis-benchmark -d 100`.
const VALUE_BYTES: usize = 100;
/// Distinct keys the get scenario reads.
const GET_KEYS: u64 = 10_000;
/// Connections the client keeps to the node.
const CONNECTIONS: usize = 4;

type BoxError = Box<dyn Error + Send + Sync>;

async fn connect(addr: &str) -> Result<Client, BoxError> {
    Ok(Client::connect_with(
        [addr.to_owned()],
        ClientOptions::default().connections_per_node(CONNECTIONS),
    )
    .await?)
}

/// What [`drive`] measured.
pub(crate) struct Driven {
    pub elapsed: Duration,
    pub latencies: Latencies,
    pub cpu: CpuUse,
}

/// Runs `ops` operations spread over `clients` tasks; each task runs `op(n)` for its share of
/// operation numbers `n` and records every latency, and the CPU used meanwhile (the broker's
/// too, given the address of the one the operations use).
pub(crate) async fn drive<F, Fut>(
    ops: u64,
    clients: usize,
    broker: Option<&str>,
    op: F,
) -> Result<Driven, BoxError>
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), BoxError>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let clock = broker.map_or_else(CpuClock::start, CpuClock::start_with_broker);
    let tasks: Vec<_> = (0..clients.max(1))
        .map(|_| {
            let op = op.clone();
            let next = next.clone();
            tokio::spawn(async move {
                let mut latencies = Latencies::with_capacity((ops as usize / clients.max(1)) + 1);
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= ops {
                        break;
                    }
                    let t = Instant::now();
                    op(n).await?;
                    latencies.record(t.elapsed());
                }
                Ok::<_, BoxError>(latencies)
            })
        })
        .collect();
    let mut all = Latencies::with_capacity(ops as usize);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(Driven {
        elapsed: start.elapsed(),
        latencies: all,
        cpu: clock.stop(),
    })
}

fn value() -> bytes::Bytes {
    bytes::Bytes::from(vec![b'x'; VALUE_BYTES])
}

/// `dht-get`: `ops` reads of 100-byte values spread over 10,000 keys, by `clients` concurrent
/// tasks.
pub async fn dht_get(ops: u64, clients: usize) -> Result<Report, Box<dyn Error>> {
    run_get(ops, clients).await.map_err(|e| e as Box<dyn Error>)
}

async fn run_get(ops: u64, clients: usize) -> Result<Report, BoxError> {
    let node = InProcessNode::start(Durability::Buffered).await?;
    let client = connect(&node.addr).await?;
    let c = client.clone();
    drive(GET_KEYS, clients, None, move |n| {
        let c = c.clone();
        async move {
            c.put(PutRequest::new(format!("key:{n}"), value())).await?;
            Ok(())
        }
    })
    .await?;
    let c = client.clone();
    let run = drive(ops, clients, None, move |n| {
        let c = c.clone();
        async move {
            let siblings = c.get(format!("key:{}", n % GET_KEYS)).await?;
            if siblings.len() != 1 {
                return Err(format!("expected one value, found {}", siblings.len()).into());
            }
            Ok(())
        }
    })
    .await?;
    drop(client);
    node.stop().await?;
    Ok(Report::new("dht-get", ops, run.elapsed, run.latencies)
        .with_cpu(&run.cpu)
        .with("clients", clients)
        .with("connections", CONNECTIONS)
        .with("value_bytes", VALUE_BYTES))
}

/// `dht-put`: `ops` writes of 100-byte values to fresh keys with buffered durability, by
/// `clients` concurrent tasks.
pub async fn dht_put(ops: u64, clients: usize) -> Result<Report, Box<dyn Error>> {
    run_put(ops, clients, Durability::Buffered)
        .await
        .map_err(|e| e as Box<dyn Error>)
}

/// `dht-put-fsync`: as `dht-put`, but every write is fsynced before it is acknowledged;
/// concurrent writers share fsyncs (group commit).
pub async fn dht_put_fsync(ops: u64, clients: usize) -> Result<Report, Box<dyn Error>> {
    run_put(ops, clients, Durability::Fsync)
        .await
        .map_err(|e| e as Box<dyn Error>)
}

async fn run_put(ops: u64, clients: usize, durability: Durability) -> Result<Report, BoxError> {
    let node = InProcessNode::start(durability).await?;
    let client = connect(&node.addr).await?;
    let c = client.clone();
    let run = drive(ops, clients, None, move |n| {
        let c = c.clone();
        async move {
            c.put(PutRequest::new(format!("key:{n}"), value())).await?;
            Ok(())
        }
    })
    .await?;
    drop(client);
    node.stop().await?;
    let (scenario, durability) = match durability {
        Durability::Buffered => ("dht-put", "buffered"),
        Durability::Fsync => ("dht-put-fsync", "fsync"),
    };
    Ok(Report::new(scenario, ops, run.elapsed, run.latencies)
        .with_cpu(&run.cpu)
        .with("clients", clients)
        .with("connections", CONNECTIONS)
        .with("value_bytes", VALUE_BYTES)
        .with("durability", durability))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn scenarios_run_and_count_their_operations() {
        let get = dht_get(500, 8).await.unwrap();
        assert_eq!(get.ops, 500);
        assert!(get.p99_ms >= get.p50_ms);
        let put = dht_put(500, 8).await.unwrap();
        assert_eq!(put.ops, 500);
        assert_eq!(put.scenario, "dht-put");
        let fsync = dht_put_fsync(200, 8).await.unwrap();
        assert_eq!(fsync.ops, 200);
        assert_eq!(fsync.scenario, "dht-put-fsync");
    }
}
