//! `rhinobus-dht`: run a node, or talk to one from a shell.

use bytes::Bytes;
use clap::{Parser, Subcommand, ValueEnum};
use rhinobus::endpoint::wait_for_signal;
use rhinobus_dht::anti_entropy;
use rhinobus_dht::replication::outbox::{
    DEFAULT_BROKER_MAX_MESSAGE_BYTES, DEFAULT_LINGER, MIN_BROKER_MAX_MESSAGE_BYTES,
};
use rhinobus_dht::{
    AddItemRequest, Client, ClientError, ClientOptions, ClusterSpec, Durability, ItemId,
    NodeOptions, PutRequest, RangeAssignment, RangeId, RemoveItemRequest, RemoveRequest,
    Replication, ReplicationOptions, Sibling, Storage, StorageError, StorageOptions, Version,
    WireError, cluster, serve,
};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// A versioned, persistent hash table node and its command-line client.
#[derive(Parser)]
#[command(name = "rhinobus-dht", version)]
struct Cli {
    /// The node to talk to.
    #[arg(
        long,
        global = true,
        env = "RHINOBUS_DHT_NODE",
        default_value = "127.0.0.1:7480"
    )]
    node: String,
    /// The nodes' shared secret.
    #[arg(
        long,
        global = true,
        env = "RHINOBUS_DHT_SECRET",
        hide_env_values = true
    )]
    secret: Option<String>,
    /// Print JSON for scripts instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// How long to wait for an answer, in milliseconds.
    #[arg(long, global = true, default_value_t = 10_000)]
    timeout_ms: u64,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node until SIGINT or SIGTERM.
    Node {
        /// Where the data lives.
        #[arg(long)]
        data: PathBuf,
        /// The address to listen on; port 0 picks a free one (printed on start). Defaults to
        /// this node's address in the cluster file, or 127.0.0.1:7480.
        #[arg(long)]
        listen: Option<String>,
        /// The cluster file (JSON: version and nodes by name and address). Without it the node
        /// stands alone and does not replicate.
        #[arg(long, requires = "name")]
        cluster: Option<PathBuf>,
        /// This node's name in the cluster file.
        #[arg(long, requires = "cluster")]
        name: Option<String>,
        /// The RabbitMQ that carries replication.
        #[arg(long, env = "RHINOBUS_AMQP_URL", default_value = rhinobus::transport::DEFAULT_AMQP_URL)]
        amqp: String,
        /// When a write counts as done.
        #[arg(long, value_enum, default_value_t = DurabilityArg::Buffered)]
        durability: DurabilityArg,
        /// The largest frame accepted, in bytes.
        #[arg(long, default_value_t = rhinobus_dht::frame::DEFAULT_MAX_FRAME)]
        max_frame: usize,
        /// Replication messages to each node go on ticks this many milliseconds apart (the
        /// same on every node), at most one per tick: writes that come faster wait for company
        /// in the next, fuller one (more throughput for a little more replication lag under
        /// load; 0: send every write at once).
        #[arg(long, default_value_t = DEFAULT_LINGER.as_millis() as u64)]
        replication_linger_ms: u64,
        /// The largest message the broker takes, in bytes: its `max_message_size` (16 MiB by
        /// default on RabbitMQ 4, 128 MiB on RabbitMQ 3). Replication messages stay within it,
        /// and a write whose value is too long to travel in one is refused.
        #[arg(
            long,
            default_value_t = DEFAULT_BROKER_MAX_MESSAGE_BYTES as u64,
            value_parser = clap::value_parser!(u64).range(MIN_BROKER_MAX_MESSAGE_BYTES as u64..),
        )]
        broker_max_message_bytes: u64,
        /// How long the tombstones of superseded versions and removed list items are kept
        /// ("10d", "36h", or "forever"). A replication message held up for longer than this
        /// (or replayed from the error queue after it) brings the version it carries back as
        /// a sibling.
        #[arg(long, default_value = "10d", value_parser = parse_grace)]
        tombstone_grace: Grace,
        /// Before serving, copy every range this node holds from the other replicas: for a
        /// node that lost its data. Harmless otherwise (copies merge like replication), but it
        /// reads every range of every other replica.
        #[arg(long, requires = "cluster")]
        rebuild: bool,
        /// Compare, in the background, every range this node is the primary of with its other
        /// replicas, once per this long ("10m", "1h"), and repair those that differ (off when
        /// not given). Each comparison reads the range on every replica: a pass reads, on
        /// every replica, the ranges this node is the primary of.
        #[arg(long, requires = "cluster", value_parser = parse_pass)]
        anti_entropy_pass: Option<Duration>,
    },
    /// Print every current sibling of a key.
    Get {
        /// The key.
        key: String,
    },
    /// Write a value, superseding the given parent versions.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// A version this value replaces (repeatable).
        #[arg(long = "parent")]
        parents: Vec<Version>,
        /// Fail with a conflict unless the parents are exactly the current versions.
        #[arg(long)]
        optimistic: bool,
        /// Expire the value after this many seconds.
        #[arg(long)]
        expires_in_secs: Option<u64>,
    },
    /// Remove versions of a key.
    Remove {
        /// The key.
        key: String,
        /// A version to remove (repeatable, at least one).
        #[arg(long = "parent", required = true)]
        parents: Vec<Version>,
        /// Fail with a conflict unless the parents are exactly the current versions.
        #[arg(long)]
        optimistic: bool,
    },
    /// Add an item to a list.
    AddItem {
        /// The list's key.
        key: String,
        /// The item.
        value: String,
    },
    /// Remove an item from a list.
    RemoveItem {
        /// The list's key.
        key: String,
        /// The item id.
        id: ItemId,
    },
    /// Print the items of a list.
    Items {
        /// The list's key.
        key: String,
    },
    /// Print the topology the node serves.
    Topology,
    /// Print everything the node holds (every range, or one), whatever its role for the
    /// ranges: for comparing replicas.
    Dump {
        /// Only this range (0-1023).
        #[arg(long)]
        range: Option<u16>,
    },
    /// Print the node's topology version and the replication it still owes each peer (writes
    /// the broker has not confirmed yet).
    Status,
    /// Compare every range across its replicas by digest; fail, listing the ranges whose
    /// replicas differ, unless all agree (replication in flight differs too: run it again once
    /// writes have stopped).
    Verify {
        /// First copy each range whose replicas differ from every replica into every other
        /// (merged as replication merges: each ends with the union of what they held, minus
        /// what any of them removed), then compare again.
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DurabilityArg {
    /// Survives a crash of the process.
    Buffered,
    /// fsync per commit, shared between concurrent writers.
    Fsync,
}

/// Exit code for an optimistic conflict, so scripts can tell it from other failures.
const EXIT_CONFLICT: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(cli))
}

async fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Node {
            ref data,
            ref listen,
            ref cluster,
            ref name,
            ref amqp,
            durability,
            max_frame,
            replication_linger_ms,
            broker_max_message_bytes,
            tombstone_grace,
            rebuild,
            anti_entropy_pass,
        } => {
            let cluster = match (cluster, name) {
                (Some(file), Some(name)) => Some((file.as_path(), name.as_str(), amqp.as_str())),
                _ => None,
            };
            let tuning = NodeTuning {
                durability,
                max_frame,
                replication_linger: Duration::from_millis(replication_linger_ms),
                broker_max_message_bytes: usize::try_from(broker_max_message_bytes)
                    .unwrap_or(usize::MAX),
                tombstone_grace: tombstone_grace.0,
                rebuild,
                anti_entropy_pass,
            };
            run_node(data, listen.as_deref(), cluster, tuning, cli.secret.clone()).await
        }
        Command::Verify { repair } => verify(&cli, repair).await,
        _ => match client_command(cli).await {
            Ok(()) => Ok(()),
            Err(ClientError::Conflict(c)) => {
                eprintln!("error: {c}");
                return ExitCode::from(EXIT_CONFLICT);
            }
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = e.source();
            while let Some(s) = source {
                eprintln!("  caused by: {s}");
                source = s.source();
            }
            ExitCode::FAILURE
        }
    }
}

/// `--tombstone-grace`: how long tombstones are kept; forever when `None`.
#[derive(Clone, Copy)]
struct Grace(Option<Duration>);

fn parse_grace(s: &str) -> Result<Grace, String> {
    if s == "forever" {
        return Ok(Grace(None));
    }
    let grace =
        humantime::parse_duration(s).map_err(|e| format!("{e} (try \"10d\" or \"forever\")"))?;
    if grace.is_zero() {
        return Err("no grace would purge every tombstone at once (\"forever\" keeps them)".into());
    }
    Ok(Grace(Some(grace)))
}

fn parse_pass(s: &str) -> Result<Duration, String> {
    let pass = humantime::parse_duration(s).map_err(|e| format!("{e} (try \"10m\")"))?;
    if pass.is_zero() || pass > Duration::from_secs(366 * 86_400) {
        return Err("a pass takes some time, and at most a year (try \"10m\")".into());
    }
    Ok(pass)
}

/// How a node runs, from its flags.
struct NodeTuning {
    durability: DurabilityArg,
    max_frame: usize,
    replication_linger: Duration,
    /// The broker's largest message.
    broker_max_message_bytes: usize,
    /// How long tombstones are kept; forever when `None`.
    tombstone_grace: Option<Duration>,
    /// Copy this node's ranges from the other replicas before serving.
    rebuild: bool,
    /// How long one pass of anti-entropy takes; none when `None`.
    anti_entropy_pass: Option<Duration>,
}

async fn run_node(
    data: &std::path::Path,
    listen: Option<&str>,
    cluster: Option<(&std::path::Path, &str, &str)>,
    tuning: NodeTuning,
    secret: Option<String>,
) -> Result<(), Box<dyn std::error::Error>> {
    let NodeTuning {
        durability,
        max_frame,
        replication_linger,
        broker_max_message_bytes,
        tombstone_grace,
        rebuild,
        anti_entropy_pass,
    } = tuning;
    // A divergence repaired after the peers purged the tombstones would bring removed versions
    // back: the passes must fit in the grace.
    if let (Some(pass), Some(grace)) = (anti_entropy_pass, tombstone_grace) {
        let longest = anti_entropy::max_pass(grace);
        if longest.is_none_or(|longest| pass > longest) {
            let longest = longest.map_or("none".into(), |d| {
                humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
            });
            return Err(format!(
                "--anti-entropy-pass {} is too long for --tombstone-grace {}: repairs must \
                 come within the grace, or removed versions come back (longest pass: {longest})",
                humantime::format_duration(pass),
                humantime::format_duration(grace),
            )
            .into());
        }
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,fjall=warn,lsm_tree=warn,lapin=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    let durability = match durability {
        DurabilityArg::Buffered => Durability::Buffered,
        DurabilityArg::Fsync => Durability::Fsync,
    };
    let spec = match cluster {
        Some((file, name, _)) => {
            let spec = ClusterSpec::load(file)?;
            let addr = spec.node(name)?.addr.clone();
            Some((spec, addr))
        }
        None => None,
    };
    let listen = listen
        .map(str::to_owned)
        .or_else(|| spec.as_ref().map(|(_, addr)| addr.clone()))
        .unwrap_or_else(|| "127.0.0.1:7480".into());
    let dir = data.to_owned();
    let storage = tokio::task::spawn_blocking(move || {
        Storage::open(&dir, StorageOptions::default().durability(durability))
    })
    .await??;
    let mut options = NodeOptions::default()
        .secret(secret.clone())
        .max_frame(max_frame);
    let mut replication = None;
    let mut anti_entropy = None;
    if let (Some((spec, _)), Some((_, name, amqp))) = (&spec, cluster) {
        let s = storage.clone();
        let file_topology = spec.topology();
        let (topology, fresh) = tokio::task::spawn_blocking(move || {
            let fresh = cluster::stored_topology(&s)?.is_none();
            Ok::<_, cluster::ClusterError>((cluster::store_topology(&s, &file_topology)?, fresh))
        })
        .await??;
        if rebuild {
            rebuild_from_peers(&storage, &topology, name, secret.clone()).await?;
        } else if fresh {
            tracing::warn!(
                node = name, data = %data.display(),
                "the data directory held nothing: if this node replaces one that held data, \
                 stop it and start it with --rebuild, or it serves its ranges without that data"
            );
        }
        tracing::info!(
            node = name,
            topology = topology.version,
            "catching up before serving"
        );
        // Catch up before the port opens: until then clients fail over to the other replicas.
        let r = Replication::start(
            storage.clone(),
            Arc::new(topology.clone()),
            ReplicationOptions {
                linger: replication_linger,
                max_message_bytes: broker_max_message_bytes,
                ..ReplicationOptions::rabbitmq(name, amqp)
            },
        )
        .await?;
        if let Some(pass) = anti_entropy_pass {
            let client = ClientOptions::default().secret(secret.clone());
            anti_entropy = Some(anti_entropy::run(
                topology.clone(),
                name.to_owned(),
                client,
                pass,
            ));
        }
        options = options.topology(topology).outbox(r.outbox().clone());
        replication = Some(r);
    }
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    let addr = listener.local_addr()?;
    // Scripts and tests read this line to learn the port when they asked for port 0.
    println!("listening on {addr}");
    tracing::info!(%addr, data = %data.display(), ?durability, "node started");
    let purger = tokio::spawn(purge(storage.clone(), tombstone_grace));
    // Started once this node's port is open, stopped as soon as the node starts to stop.
    let anti_entropy = anti_entropy.map(|run| tokio::spawn(run).abort_handle());
    let stopping = async {
        wait_for_signal().await;
        if let Some(task) = &anti_entropy {
            task.abort();
        }
    };
    let served = serve(listener, storage, options, stopping).await;
    purger.abort();
    if let Some(r) = replication {
        r.shutdown().await;
    }
    Ok(served?)
}

/// `--rebuild`: copies this node's ranges from the other replicas, and says what came.
async fn rebuild_from_peers(
    storage: &Storage,
    topology: &rhinobus_dht::Topology,
    name: &str,
    secret: Option<String>,
) -> Result<(), rhinobus_dht::rebuild::RebuildError> {
    tracing::info!(
        node = name,
        "rebuilding from the other replicas before serving"
    );
    let options = ClientOptions::default().secret(secret);
    let rebuilt = rhinobus_dht::rebuild::rebuild(storage, topology, name, options).await?;
    for (replica, why) in &rebuilt.skipped {
        tracing::warn!(
            %replica, %why,
            "not copied from this replica: its ranges came from the others only (run --rebuild \
             again once it is back)"
        );
    }
    tracing::info!(
        ranges = rebuilt.ranges,
        pages = rebuilt.pages,
        changes = rebuilt.merged.changes,
        tombstones = rebuilt.merged.tombstones,
        "rebuilt"
    );
    Ok(())
}

/// Once a minute, cleans up expired values (readers never see them even before) and, with a
/// grace, the tombstones older than it.
async fn purge(storage: Storage, tombstone_grace: Option<Duration>) {
    /// At most this much per batch, so that client writes get turns in between.
    const CHUNK: usize = 10_000;
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let expired = storage.long_write(|s| s.purge_expired(SystemTime::now(), CHUNK));
        log_purge("expired values", expired.await, |&n| n);
        let Some(cutoff) = tombstone_grace.and_then(|g| SystemTime::now().checked_sub(g)) else {
            continue;
        };
        // A backlog (a node that was down, a first run) goes in one tick, chunk by chunk.
        loop {
            let purge = storage.long_write(move |s| s.purge_tombstones(cutoff, CHUNK));
            let purged = log_purge("tombstones", purge.await, |p| p.purged);
            if !purged.is_some_and(|p| p.more) {
                break;
            }
        }
    }
}

/// Logs one purge's outcome, `count` saying how many `what` it cleaned up.
fn log_purge<T>(
    what: &'static str,
    outcome: Result<Result<T, StorageError>, tokio::task::JoinError>,
    count: impl Fn(&T) -> usize,
) -> Option<T> {
    let error = match outcome {
        Ok(Ok(done)) => {
            let n = count(&done);
            if n > 0 {
                tracing::debug!(purged = n, what, "cleaned up");
            }
            return Some(done);
        }
        Ok(Err(e)) => e.to_string(),
        Err(e) => format!("purge task failed: {e}"),
    };
    tracing::warn!(%error, what, "purge failed");
    None
}

/// The moment `secs` seconds from now, or a clear error when that is past what the clock can
/// represent (rather than an overflow panic).
fn expires_at(secs: u64) -> Result<SystemTime, ClientError> {
    SystemTime::now()
        .checked_add(Duration::from_secs(secs))
        .ok_or_else(|| {
            ClientError::Rejected(WireError::Malformed {
                message: format!("--expires-in-secs {secs} is too far in the future"),
            })
        })
}

/// A client of the node the command line names.
async fn connect(cli: &Cli) -> Result<Client, ClientError> {
    let options = ClientOptions::default()
        .secret(cli.secret.clone())
        .timeout(Duration::from_millis(cli.timeout_ms))
        .connections_per_node(1);
    Client::connect_with([cli.node.clone()], options).await
}

async fn client_command(cli: Cli) -> Result<(), ClientError> {
    let client = connect(&cli).await?;
    let node = cli.node;
    let json = cli.json;
    match cli.command {
        Command::Node { .. } | Command::Verify { .. } => {
            Err(ClientError::Rejected(WireError::Malformed {
                message: "not a plain client command".into(),
            }))
        }
        Command::Get { key } => {
            let siblings = client.get(key.clone()).await?;
            if json {
                let list: Vec<_> = siblings.iter().map(sibling_json).collect();
                println!("{}", json!({ "key": key, "siblings": list }));
            } else if siblings.is_empty() {
                println!("(no value)");
            } else {
                println!("{:<36}  VALUE", "VERSION");
                for s in &siblings {
                    println!("{:<36}  {}", s.version, String::from_utf8_lossy(&s.value));
                }
            }
            Ok(())
        }
        Command::Put {
            key,
            value,
            parents,
            optimistic,
            expires_in_secs,
        } => {
            let request = PutRequest {
                key: Bytes::from(key),
                value: Bytes::from(value),
                parents,
                optimistic,
                expires_at: expires_in_secs.map(expires_at).transpose()?,
            };
            let out = client.put(request).await?;
            if json {
                let superseded: Vec<String> =
                    out.superseded.iter().map(ToString::to_string).collect();
                println!(
                    "{}",
                    json!({ "version": out.version.to_string(), "superseded": superseded })
                );
            } else {
                println!("{}", out.version);
            }
            Ok(())
        }
        Command::Remove {
            key,
            parents,
            optimistic,
        } => {
            let out = client
                .remove(RemoveRequest {
                    key: Bytes::from(key),
                    parents,
                    optimistic,
                })
                .await?;
            let removed: Vec<String> = out.removed.iter().map(ToString::to_string).collect();
            if json {
                println!("{}", json!({ "removed": removed }));
            } else {
                println!("removed {} version(s)", removed.len());
            }
            Ok(())
        }
        Command::AddItem { key, value } => {
            let id = client.add_item(AddItemRequest::new(key, value)).await?;
            if json {
                println!("{}", json!({ "id": id.to_string() }));
            } else {
                println!("{id}");
            }
            Ok(())
        }
        Command::RemoveItem { key, id } => {
            let removed = client
                .remove_item(RemoveItemRequest {
                    key: Bytes::from(key),
                    id,
                })
                .await?;
            if json {
                println!("{}", json!({ "removed": removed }));
            } else {
                println!("{}", if removed { "removed" } else { "not found" });
            }
            Ok(())
        }
        Command::Items { key } => {
            let items = client.get_items(key.clone()).await?;
            if json {
                let list: Vec<_> = items
                    .iter()
                    .map(|i| {
                        let mut v = value_json(&i.value);
                        v.insert("id".into(), json!(i.id.to_string()));
                        v
                    })
                    .collect();
                println!("{}", json!({ "key": key, "items": list }));
            } else {
                println!("{:<36}  VALUE", "ID");
                for i in &items {
                    println!("{:<36}  {}", i.id, String::from_utf8_lossy(&i.value));
                }
            }
            Ok(())
        }
        Command::Topology => {
            let t = client.topology();
            if json {
                println!("{}", serde_json::to_string(&*t).unwrap_or_default());
            } else {
                println!("version {}", t.version);
                println!(
                    "{:<20}  {:<24}  {:>7}  {:>9}  {:>8}",
                    "NAME", "ADDRESS", "PRIMARY", "SECONDARY", "TERTIARY"
                );
                for (i, addr) in t.nodes.iter().enumerate() {
                    let count = |role: fn(&RangeAssignment) -> Option<u32>| {
                        t.ranges
                            .iter()
                            .filter(|a| role(a) == Some(i as u32))
                            .count()
                    };
                    println!(
                        "{:<20}  {:<24}  {:>7}  {:>9}  {:>8}",
                        t.names.get(i).map(String::as_str).unwrap_or("-"),
                        addr,
                        count(|a| Some(a.primary)),
                        count(|a| a.secondary),
                        count(|a| a.tertiary),
                    );
                }
            }
            Ok(())
        }
        Command::Status => {
            let status = client.status(&node).await?;
            if json {
                let mut v = serde_json::to_value(&status).unwrap_or_default();
                v["address"] = json!(node);
                println!("{v}");
            } else {
                let name = status.node.as_deref().unwrap_or("(not replicating)");
                println!(
                    "node {name} at {node}, topology version {}",
                    status.topology
                );
                if !status.backlog.is_empty() {
                    println!("{:<32}  {:>10}", "OWES REPLICATION TO", "WRITES");
                    for b in &status.backlog {
                        println!("{:<32}  {:>10}", b.destination, b.pending);
                    }
                    println!("outbox memory: {} bytes", status.outbox_bytes);
                }
            }
            Ok(())
        }
        Command::Dump { range } => {
            let ranges: Vec<RangeId> = match range {
                Some(r) => vec![RangeId::new(r).ok_or_else(|| {
                    ClientError::Routing(format!(
                        "range {r} is not below {}",
                        rhinobus_dht::RANGE_COUNT
                    ))
                })?],
                None => RangeId::all().collect(),
            };
            let mut keys = Vec::new();
            for r in ranges {
                keys.extend(client.dump(&node, r).await?);
            }
            if json {
                let list: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        let mut m = serde_json::Map::new();
                        m.insert("range".into(), json!(RangeId::of(&k.key).get()));
                        m.insert("key_hex".into(), json!(hex(&k.key)));
                        let siblings: Vec<_> = k.siblings.iter().map(sibling_json).collect();
                        m.insert("siblings".into(), json!(siblings));
                        let items: Vec<_> = k
                            .items
                            .iter()
                            .map(|i| {
                                let mut v = value_json(&i.value);
                                v.insert("id".into(), json!(i.id.to_string()));
                                v
                            })
                            .collect();
                        m.insert("items".into(), json!(items));
                        serde_json::Value::Object(m)
                    })
                    .collect();
                println!("{}", json!({ "node": node, "keys": list }));
            } else {
                println!(
                    "{:<5}  {:<30}  {:>8}  {:>5}",
                    "RANGE", "KEY", "SIBLINGS", "ITEMS"
                );
                for k in &keys {
                    println!(
                        "{:<5}  {:<30}  {:>8}  {:>5}",
                        RangeId::of(&k.key).get(),
                        String::from_utf8_lossy(&k.key).escape_debug().to_string(),
                        k.siblings.len(),
                        k.items.len()
                    );
                }
            }
            Ok(())
        }
    }
}

/// `verify`'s failure: some ranges differ between their replicas.
#[derive(Debug, thiserror::Error)]
#[error(
    "{differing} of {ranges} ranges differ between their replicas (replication in flight \
     differs too: run again once writes have stopped)"
)]
struct ReplicasDiffer {
    differing: usize,
    ranges: usize,
}

/// `verify`: the ranges whose replicas differ, as a table or JSON; an error when there are any.
async fn verify(cli: &Cli, repair: bool) -> Result<(), Box<dyn std::error::Error>> {
    use rhinobus_dht::verify::{compare_replicas, repair as repair_ranges};
    let client = connect(cli).await?;
    let json = cli.json;
    let topology = client.topology();
    let mut reports = compare_replicas(&client, &topology).await;
    if repair && reports.iter().any(|r| !r.agrees()) {
        let repaired = repair_ranges(&client, &reports).await?;
        eprintln!(
            "repaired {} ranges: {} pages copied, {} versions and items and {} tombstones merged",
            repaired.ranges, repaired.pages, repaired.merged.changes, repaired.merged.tombstones
        );
        reports = compare_replicas(&client, &topology).await;
    }
    let differing: Vec<_> = reports.iter().filter(|r| !r.agrees()).collect();
    if json {
        let list: Vec<_> = (differing.iter())
            .map(|r| {
                let replicas: Vec<_> = (r.replicas.iter())
                    .map(|(node, d)| match d {
                        Ok(d) => json!({ "node": node, "keys": d.keys, "md5": d.md5 }),
                        Err(e) => json!({ "node": node, "error": e }),
                    })
                    .collect();
                json!({ "range": r.range.get(), "replicas": replicas })
            })
            .collect();
        println!("{}", json!({ "ranges": reports.len(), "differing": list }));
    } else if !differing.is_empty() {
        println!("{:<5}  {:<24}  {:>8}  MD5", "RANGE", "NODE", "KEYS");
        for r in &differing {
            for (node, d) in &r.replicas {
                match d {
                    Ok(d) => println!("{:<5}  {node:<24}  {:>8}  {}", r.range.get(), d.keys, d.md5),
                    Err(e) => println!("{:<5}  {node:<24}  {:>8}  ({e})", r.range.get(), "-"),
                }
            }
        }
    }
    if differing.is_empty() {
        if !json {
            println!("all {} ranges identical on their replicas", reports.len());
        }
        return Ok(());
    }
    Err(ReplicasDiffer {
        differing: differing.len(),
        ranges: reports.len(),
    }
    .into())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `value` as text when it is UTF-8, else `value_hex`, so any bytes print losslessly.
fn value_json(value: &[u8]) -> serde_json::Map<String, serde_json::Value> {
    let mut m = serde_json::Map::new();
    match std::str::from_utf8(value) {
        Ok(s) => m.insert("value".into(), json!(s)),
        Err(_) => m.insert("value_hex".into(), json!(hex(value))),
    };
    m
}

fn sibling_json(s: &Sibling) -> serde_json::Value {
    let mut m = value_json(&s.value);
    m.insert("version".into(), json!(s.version.to_string()));
    if let Some(at) = s.expires_at
        && let Ok(d) = at.duration_since(SystemTime::UNIX_EPOCH)
    {
        m.insert("expires_at_ms".into(), json!(d.as_millis() as u64));
    }
    serde_json::Value::Object(m)
}
