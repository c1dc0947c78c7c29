//! `dht-put-replicated`: three rhinobus-dht nodes in this process, replicating to each other
//! through RabbitMQ, driven by concurrent clients as `dht-put` drives one node. Also measures
//! replication lag: from a write's acknowledgement until all three replicas return it.

use crate::report::{Latencies, Report};
use bytes::Bytes;
use lapin::options::QueueDeleteOptions;
use rhinobus_dht::cluster::{self, queue_name};
use rhinobus_dht::{
    Client, ClientOptions, NodeOptions, PutRequest, Replication, ReplicationOptions, Storage,
    StorageOptions, Topology, anti_entropy, serve,
};
use std::error::Error;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

type BoxError = Box<dyn Error + Send + Sync>;

/// Bytes per value, as `dht-put`.
const VALUE_BYTES: usize = 100;
/// Connections the client keeps per node.
const CONNECTIONS: usize = 4;
/// How often the lag sampler picks the latest acknowledged write.
const LAG_SAMPLE_EVERY: Duration = Duration::from_millis(10);
/// Writes made one at a time after the load, each after the senders were quiet for longer
/// than the linger, for the lag of a lone write.
const LONE_WRITES: usize = 20;

struct ClusterNode {
    replication: Replication,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Three nodes with block topology and replication queues of their own.
struct InProcessCluster {
    addrs: Vec<String>,
    names: Vec<String>,
    nodes: Vec<ClusterNode>,
    /// The nodes' anti-entropy tasks, when they run one.
    anti_entropy: Vec<tokio::task::AbortHandle>,
    _dir: tempfile::TempDir,
}

impl InProcessCluster {
    /// Starts the nodes, their senders lingering `linger`, each running anti-entropy with a
    /// pass of `anti_entropy` if given.
    async fn start(
        amqp: &str,
        linger: Duration,
        anti_entropy: Option<Duration>,
    ) -> Result<Self, BoxError> {
        let dir = tempfile::tempdir()?;
        let run = uuid::Uuid::now_v7().simple().to_string();
        let mut listeners = Vec::new();
        let mut addrs = Vec::new();
        for _ in 0..3 {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            addrs.push(l.local_addr()?.to_string());
            listeners.push(l);
        }
        let names: Vec<String> = (1..=3).map(|i| format!("bench-{run}-n{i}")).collect();
        let topology = Topology::blocks(1, names.iter().cloned().zip(addrs.iter().cloned()));
        let mut nodes = Vec::new();
        for (listener, name) in listeners.into_iter().zip(&names) {
            let path = dir.path().join(name);
            let t = topology.clone();
            let storage = tokio::task::spawn_blocking(move || {
                let s = Storage::open(path, StorageOptions::default())?;
                cluster::store_topology(&s, &t)?;
                Ok::<_, BoxError>(s)
            })
            .await??;
            let replication = Replication::start(
                storage.clone(),
                Arc::new(topology.clone()),
                ReplicationOptions {
                    linger,
                    ..ReplicationOptions::rabbitmq(name.clone(), amqp)
                },
            )
            .await?;
            let options = NodeOptions::default()
                .topology(topology.clone())
                .outbox(replication.outbox().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(serve(listener, storage, options, async move {
                let _ = stopped.await;
            }));
            nodes.push(ClusterNode {
                replication,
                stop,
                task,
            });
        }
        let anti_entropy = (anti_entropy.into_iter())
            .flat_map(|pass| names.iter().map(move |name| (pass, name)))
            .map(|(pass, name)| {
                let run = anti_entropy::run(
                    topology.clone(),
                    name.clone(),
                    ClientOptions::default(),
                    pass,
                );
                tokio::spawn(run).abort_handle()
            })
            .collect();
        Ok(Self {
            addrs,
            names,
            nodes,
            anti_entropy,
            _dir: dir,
        })
    }

    async fn stop(self, amqp: &str) -> Result<(), BoxError> {
        for task in &self.anti_entropy {
            task.abort();
        }
        for n in self.nodes {
            let _ = n.stop.send(());
            n.task.await??;
            n.replication.shutdown().await;
        }
        let conn = lapin::Connection::connect(amqp, lapin::ConnectionProperties::default()).await?;
        let channel = conn.create_channel().await?;
        for name in &self.names {
            channel
                .queue_delete(
                    queue_name(name).as_str().into(),
                    QueueDeleteOptions::default(),
                )
                .await?;
        }
        let _ = conn.close(200, "bench done".into()).await;
        Ok(())
    }
}

/// `dht-put-replicated`: `ops` writes of 100-byte values to fresh keys through a three-node
/// cluster replicating over RabbitMQ at `amqp`, by `clients` concurrent tasks, the nodes'
/// senders lingering `linger` for fuller messages, and each node running anti-entropy with a
/// pass of `anti_entropy` if given.
pub async fn dht_put_replicated(
    ops: u64,
    clients: usize,
    amqp: &str,
    linger: Duration,
    anti_entropy: Option<Duration>,
) -> Result<Report, Box<dyn Error>> {
    run(ops, clients, amqp, linger, anti_entropy)
        .await
        .map_err(|e| e as Box<dyn Error>)
}

async fn run(
    ops: u64,
    clients: usize,
    amqp: &str,
    linger: Duration,
    anti_entropy: Option<Duration>,
) -> Result<Report, BoxError> {
    let cluster = InProcessCluster::start(amqp, linger, anti_entropy).await?;
    let client = Client::connect_with(
        cluster.addrs.clone(),
        ClientOptions::default().connections_per_node(CONNECTIONS),
    )
    .await?;
    let latest: Arc<Mutex<Option<(String, Instant)>>> = Arc::default();
    let (sampler_stop, sampler_stopped) = oneshot::channel::<()>();
    let sampler = tokio::spawn(sample_lag(
        client.clone(),
        cluster.addrs.clone(),
        latest.clone(),
        sampler_stopped,
    ));
    let value = Bytes::from(vec![b'x'; VALUE_BYTES]);
    let writer = (client.clone(), latest.clone());
    let run = super::dht::drive(ops, clients, Some(amqp), move |n| {
        let (client, latest) = writer.clone();
        let value = value.clone();
        async move {
            let key = format!("key:{n}");
            client.put(PutRequest::new(key.clone(), value)).await?;
            if n % 64 == 0 {
                *latest.lock().unwrap_or_else(|e| e.into_inner()) = Some((key, Instant::now()));
            }
            Ok(())
        }
    })
    .await?;
    let _ = sampler_stop.send(());
    let (mut lag, samples) = sampler.await??;
    let mut lone = lone_write_lag(&client, &cluster.addrs, linger).await?;
    drop(client);
    cluster.stop(amqp).await?;
    Ok(
        Report::new("dht-put-replicated", ops, run.elapsed, run.latencies)
            .with_cpu(&run.cpu)
            .with("clients", clients)
            .with("nodes", 3)
            .with("replicas", 3)
            .with("value_bytes", VALUE_BYTES)
            .with("linger_ms", linger.as_millis() as u64)
            .with(
                "anti_entropy_pass_ms",
                anti_entropy.map(|p| p.as_millis() as u64),
            )
            .with("lag_p50_ms", lag.quantile_ms(0.50))
            .with("lag_p99_ms", lag.quantile_ms(0.99))
            .with("lag_samples", samples)
            .with("lone_write_lag_p50_ms", lone.quantile_ms(0.50))
            .with("lone_write_lag_max_ms", lone.quantile_ms(1.0)),
    )
}

/// The lag of [`LONE_WRITES`] writes made one at a time on an idle cluster, each after a
/// quiet spell of twice the linger (at least 50 ms).
async fn lone_write_lag(
    client: &Client,
    addrs: &[String],
    linger: Duration,
) -> Result<Latencies, BoxError> {
    let quiet = (linger * 2).max(Duration::from_millis(50));
    let mut lag = Latencies::default();
    for n in 0..LONE_WRITES {
        tokio::time::sleep(quiet).await;
        let key = format!("lone:{n}");
        client.put(PutRequest::new(key.clone(), "lone")).await?;
        let acked = Instant::now();
        until_everywhere(client, addrs, &key).await?;
        lag.record(acked.elapsed());
    }
    Ok(lag)
}

/// Returns once every node in `addrs` returns `key`, polling each millisecond.
async fn until_everywhere(client: &Client, addrs: &[String], key: &str) -> Result<(), BoxError> {
    let mut waiting: Vec<&String> = addrs.iter().collect();
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for addr in waiting {
            if client.get_from(addr, key.to_owned()).await?.is_empty() {
                still.push(addr);
            }
        }
        waiting = still;
        if !waiting.is_empty() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    Ok(())
}

/// Every [`LAG_SAMPLE_EVERY`], takes the latest acknowledged write and polls all three nodes
/// until each returns it; the lag is the time from the acknowledgement until the last one did.
async fn sample_lag(
    client: Client,
    addrs: Vec<String>,
    latest: Arc<Mutex<Option<(String, Instant)>>>,
    mut stop: oneshot::Receiver<()>,
) -> Result<(Latencies, usize), BoxError> {
    let mut lag = Latencies::default();
    let mut samples = 0;
    loop {
        tokio::select! {
            _ = &mut stop => return Ok((lag, samples)),
            _ = tokio::time::sleep(LAG_SAMPLE_EVERY) => {}
        }
        let Some((key, acked)) = latest.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            continue;
        };
        until_everywhere(&client, &addrs, &key).await?;
        lag.record(acked.elapsed());
        samples += 1;
    }
}
