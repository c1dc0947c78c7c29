//! The rhinobus load generator. Prints one JSON object per scenario with `--json`, a table
//! line otherwise. Scenarios with a baseline run it first, in the same process.
//!
//! ```text
//! cargo run --release -p rhinobus-samples --bin bench -- bus --json
//! cargo run --release -p rhinobus-samples --bin bench -- all
//! ```

use clap::{Parser, ValueEnum};
use rhinobus_dht::replication::outbox::DEFAULT_LINGER;
use rhinobus_samples::report::Report;
use rhinobus_samples::scenarios::amqp::{self, Load, Metadata};
use rhinobus_samples::scenarios::dht_cluster;
use rhinobus_samples::scenarios::{dht, errors, redis, request, sagas};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Plain lapin: the ceiling of this machine.
    RawAmqp,
    /// raw-amqp with as much metadata as a rhinobus envelope (baseline: raw-amqp).
    RawAmqpEnvelope,
    /// rhinobus on RabbitMQ to a no-op handler (baseline: raw-amqp).
    Bus,
    /// `bus` with an audit queue: every handled message is copied there (baseline: bus).
    BusAudit,
    /// rhinobus on the in-memory transport.
    BusInmemory,
    /// Requests awaited with a Requester, answered by an endpoint on RabbitMQ (--messages / 5
    /// round trips by --concurrency callers; baseline: bus, whose messages are one way).
    RequestReply,
    /// rhinobus-dht GET against one in-process node (baseline: redis-benchmark GET).
    DhtGet,
    /// rhinobus-dht PUT, buffered durability (baseline: redis-benchmark SET).
    DhtPut,
    /// rhinobus-dht PUT with an fsync per commit, shared by concurrent writers.
    DhtPutFsync,
    /// rhinobus-dht PUT through three in-process nodes replicating over RabbitMQ (baseline:
    /// dht-put of the same run); reports replication lag.
    DhtPutReplicated,
    /// `rhinobus errors list` and `replay --all` on an error queue of --error-messages.
    Errors,
    /// Sagas with the optimistic persister on a 1-node DHT, one saga per message (baseline: bus).
    SagaOptimistic,
    /// Sagas with the merging persister on a 1-node DHT, one saga per message (baseline: bus).
    SagaMerging,
    /// Every scenario.
    All,
}

#[derive(Debug, Parser)]
#[command(about = "rhinobus load generator")]
struct Args {
    /// What to measure.
    #[arg(value_enum)]
    scenario: Scenario,
    /// One JSON object per line instead of a table.
    #[arg(long)]
    json: bool,
    /// Messages per messaging scenario.
    #[arg(long, default_value_t = 50_000)]
    messages: u64,
    /// Handler concurrency (and prefetch) of the messaging scenarios.
    #[arg(long, default_value_t = 32)]
    concurrency: u16,
    /// Operations per DHT scenario.
    #[arg(long, default_value_t = 100_000)]
    ops: u64,
    /// Concurrent clients of the DHT scenarios.
    #[arg(long, default_value_t = 50)]
    clients: usize,
    /// RabbitMQ address.
    #[arg(long, env = "RHINOBUS_AMQP_URL", default_value = rhinobus::transport::DEFAULT_AMQP_URL)]
    amqp: String,
    /// Messages in the error queue of the `errors` scenario.
    #[arg(long, default_value_t = 100_000)]
    error_messages: u64,
    /// How long `dht-put-replicated`'s replication senders wait for a fuller message
    /// (default: the nodes' own default).
    #[arg(long)]
    replication_linger_ms: Option<u64>,
    /// Each node of `dht-put-replicated` runs anti-entropy with a pass this many milliseconds
    /// long (off by default, as on a node).
    #[arg(long)]
    anti_entropy_pass_ms: Option<u64>,
    /// Rounds of `dht-put-replicated` and its baseline, one after the other: the report gives
    /// the median of each, their ratio, and every round's ratio (`round_ratios`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    rounds: u32,
    /// Port of the local Redis used as the DHT baseline.
    #[arg(long, default_value_t = 6379)]
    redis_port: u16,
}

type BenchError = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args).await {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}

async fn run(args: &Args) -> Result<(), BenchError> {
    let print = |r: &Report| {
        if args.json {
            println!("{}", serde_json::to_string(r).expect("a report serializes"));
        } else {
            println!("{}", r.human());
        }
    };
    let wants = |s: Scenario| args.scenario == s || args.scenario == Scenario::All;
    let load = Load {
        messages: args.messages,
        concurrency: args.concurrency,
        amqp_url: args.amqp.clone(),
    };
    // The bus figure is also the sagas' baseline; measured once when both are wanted.
    let mut bus_report = None;
    if wants(Scenario::RawAmqp) || wants(Scenario::RawAmqpEnvelope) || wants(Scenario::Bus) {
        let raw = amqp::raw_amqp(&load, Metadata::Bare).await?;
        if wants(Scenario::RawAmqp) {
            print(&raw);
        }
        if wants(Scenario::RawAmqpEnvelope) {
            let enveloped = amqp::raw_amqp(&load, Metadata::Envelope).await?;
            print(&enveloped.with_baseline(&raw));
        }
        if wants(Scenario::Bus) {
            let bus = amqp::bus_rabbitmq(&load).await?.with_baseline(&raw);
            print(&bus);
            bus_report = Some(bus);
        }
    }
    // The bus figure, measured (and printed) once, whoever needs it first; bus-audit runs
    // right after it, so that both see the broker in the same state.
    let wants_bus_baseline = wants(Scenario::BusAudit)
        || wants(Scenario::RequestReply)
        || wants(Scenario::SagaOptimistic)
        || wants(Scenario::SagaMerging);
    if wants_bus_baseline && bus_report.is_none() {
        let bus = amqp::bus_rabbitmq(&load).await?;
        print(&bus);
        bus_report = Some(bus);
    }
    if let (true, Some(baseline)) = (wants(Scenario::BusAudit), &bus_report) {
        print(&amqp::bus_audit(&load).await?.with_baseline(baseline));
    }
    if let (true, Some(baseline)) = (wants(Scenario::RequestReply), &bus_report) {
        let round_trips = request::request_reply(&load, args.messages / 5).await?;
        print(&round_trips.with_baseline(baseline));
    }
    if wants(Scenario::BusInmemory) {
        print(&amqp::bus_inmemory(&load).await?);
    }
    if wants(Scenario::Errors) {
        let (list, replay) = errors::error_queue(&args.amqp, args.error_messages).await?;
        print(&list);
        print(&replay);
    }
    if wants(Scenario::DhtGet) || wants(Scenario::DhtPut) {
        let baseline = redis::redis_benchmark(args.ops, args.clients, args.redis_port);
        let with = |r: Report, base: Option<&Report>| match base {
            Some(b) => r.with_baseline(b),
            None => r,
        };
        if let Some((get, set)) = &baseline {
            print(get);
            print(set);
        }
        if wants(Scenario::DhtGet) {
            let r = dht::dht_get(args.ops, args.clients).await?;
            print(&with(r, baseline.as_ref().map(|b| &b.0)));
        }
        if wants(Scenario::DhtPut) {
            let r = dht::dht_put(args.ops, args.clients).await?;
            print(&with(r, baseline.as_ref().map(|b| &b.1)));
        }
    }
    if wants(Scenario::DhtPutFsync) {
        print(&dht::dht_put_fsync(args.ops / 5, args.clients).await?);
    }
    if wants(Scenario::DhtPutReplicated) {
        let linger = args
            .replication_linger_ms
            .map_or(DEFAULT_LINGER, std::time::Duration::from_millis);
        let anti_entropy = (args.anti_entropy_pass_ms).map(std::time::Duration::from_millis);
        let mut rounds = Vec::new();
        for _ in 0..args.rounds {
            let single = dht::dht_put(args.ops, args.clients).await?;
            let (ops, clients, amqp) = (args.ops, args.clients, &args.amqp);
            let replicated =
                dht_cluster::dht_put_replicated(ops, clients, amqp, linger, anti_entropy).await?;
            rounds.push((replicated, single));
        }
        print(&Report::median_of_rounds(rounds));
    }
    if let (true, Some(baseline)) = (
        wants(Scenario::SagaOptimistic) || wants(Scenario::SagaMerging),
        &bus_report,
    ) {
        for (scenario, kind) in [
            (Scenario::SagaOptimistic, sagas::PersisterKind::Optimistic),
            (Scenario::SagaMerging, sagas::PersisterKind::Merging),
        ] {
            if wants(scenario) {
                print(
                    &sagas::saga_rabbitmq(&load, kind)
                        .await?
                        .with_baseline(baseline),
                );
            }
        }
    }
    Ok(())
}
