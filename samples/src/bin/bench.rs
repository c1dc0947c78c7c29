//! The rhinobus load generator. Prints one JSON object per scenario with `--json`, a table
//! line otherwise.
//!
//! ```text
//! cargo run --release -p rhinobus-samples --bin bench -- bus --json
//! ```

use clap::{Parser, ValueEnum};
use rhinobus_samples::report::Report;
use rhinobus_samples::scenarios::amqp::{self, Load};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Scenario {
    /// Plain lapin: the ceiling of this machine.
    RawAmqp,
    /// rhinobus on RabbitMQ to a no-op handler (runs raw-amqp first as its baseline).
    Bus,
    /// rhinobus on the in-memory transport.
    BusInmemory,
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
    /// Messages per scenario.
    #[arg(long, default_value_t = 50_000)]
    messages: u64,
    /// Handler concurrency (and prefetch).
    #[arg(long, default_value_t = 32)]
    concurrency: u16,
    /// RabbitMQ address.
    #[arg(long, env = "RHINOBUS_AMQP_URL", default_value = rhinobus::transport::DEFAULT_AMQP_URL)]
    amqp: String,
}

type BenchError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args).await {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
}

async fn run(args: &Args) -> Result<(), BenchError> {
    let load = Load {
        messages: args.messages,
        concurrency: args.concurrency,
        amqp_url: args.amqp.clone(),
    };
    let print = |r: &Report| {
        if args.json {
            println!("{}", serde_json::to_string(r).expect("a report serializes"));
        } else {
            println!("{}", r.human());
        }
    };
    let wants = |s: Scenario| args.scenario == s || args.scenario == Scenario::All;
    if wants(Scenario::RawAmqp) || wants(Scenario::Bus) {
        let raw = amqp::raw_amqp(&load).await?;
        if wants(Scenario::RawAmqp) {
            print(&raw);
        }
        if wants(Scenario::Bus) {
            print(&amqp::bus_rabbitmq(&load).await?.with_baseline(&raw));
        }
    }
    if wants(Scenario::BusInmemory) {
        print(&amqp::bus_inmemory(&load).await?);
    }
    Ok(())
}
