//! The phone-billing sample (the seed's post on concurrency): a call, two SMS and a payment
//! for account 555-5421 are handled at the same time by three endpoints, each from the same
//! version of the statement. The merging persister keeps all four writes as siblings; the
//! next message merges them — every item once, the overdraft charge the call caused
//! recalculated away, and a compensation published for it.
//!
//! ```text
//! cargo run -p rhinobus-samples --bin billing                 # in memory, embedded DHT storage
//! cargo run -p rhinobus-samples --bin billing -- --amqp amqp://guest:guest@127.0.0.1:5672/%2f
//! ```

use clap::Parser;
use rhinobus::{Context, Endpoint, HandlerError};
use rhinobus_dht::{Storage, StorageOptions};
use rhinobus_sagas::{Persister, SagaEndpointExt, SagaStore, saga_states};
use rhinobus_samples::billing::*;
use rhinobus_samples::race::RaceStore;
use rhinobus_samples::sample::{Broker, wait_for};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Parser)]
#[command(about = "the phone-billing saga with the merging persister")]
struct Args {
    /// Run on RabbitMQ at this URL instead of in memory.
    #[arg(long)]
    amqp: Option<String>,
}

const PHONE: &str = "555-5421";
const WORKERS: usize = 4;
const WAIT: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("billing: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let broker = Broker::from_url(args.amqp);
    let suffix = broker.run_suffix();
    let (queue, accounting) = (format!("billing{suffix}"), format!("accounting{suffix}"));
    let dir = tempfile::tempdir()?;
    let store = RaceStore::new(Storage::open(dir.path(), StorageOptions::default())?);

    // Accounting hears about charges, compensations and statements.
    let events = Arc::new(Mutex::new(Vec::<String>::new()));
    let statement = Arc::new(Mutex::new(None::<Statement>));
    let (e1, e2, s) = (events.clone(), events.clone(), statement.clone());
    let accounting = Endpoint::builder_shared(accounting, broker.transport())
        .subscribe::<OverdraftCharged>()
        .subscribe::<OverdraftWaived>()
        .subscribe::<StatementIssued>()
        .handle(move |m: OverdraftCharged, _: Context| {
            e1.lock()
                .expect("not poisoned")
                .push(format!("overdraft charged: {}$", m.cents / 100));
            async { Ok::<_, HandlerError>(()) }
        })
        .handle(move |m: OverdraftWaived, _: Context| {
            e2.lock().expect("not poisoned").push(format!(
                "overdraft waived (compensation): {}$",
                m.cents / 100
            ));
            async { Ok::<_, HandlerError>(()) }
        })
        .handle(move |m: StatementIssued, _: Context| {
            *s.lock().expect("not poisoned") = Some(m.statement);
            async { Ok::<_, HandlerError>(()) }
        })
        .start()
        .await?;

    // The call, the SMS and the payment come from different systems, each to its own
    // endpoint: three endpoints and four concurrent handlings of one account.
    let (calls, sms, payments) = (
        format!("{queue}-calls"),
        format!("{queue}-sms"),
        format!("{queue}-payments"),
    );
    let mut workers = Vec::new();
    for (name, concurrency) in [(&calls, 1), (&sms, 2), (&payments, 1)] {
        workers.push(
            Endpoint::builder_shared(name.clone(), broker.transport())
                .concurrency(concurrency)
                .error_queue(format!("{queue}-error"))
                .saga(
                    BillingSaga,
                    Persister::merging(store.clone(), StatementMerger),
                )
                .start()
                .await?,
        );
    }
    let bus = accounting.bus();
    let phone = PHONE.to_string();
    bus.send(
        &payments,
        &OpenAccount {
            phone: phone.clone(),
            deposit_id: "#1 deposit".into(),
            cents: 1_000,
        },
    )
    .await?;
    wait_for("the account to open", WAIT, || {
        versions(store.inner(), &phone, 1)
    })
    .await?;

    // The race: each of the four handlings loads the same version ("version 42").
    store.arm(WORKERS);
    bus.send(
        &calls,
        &CallMade {
            phone: phone.clone(),
            call_id: "#2 call".into(),
            minutes: 3,
        },
    )
    .await?;
    bus.send(
        &sms,
        &SmsSent {
            phone: phone.clone(),
            sms_id: "#3 sms".into(),
        },
    )
    .await?;
    bus.send(
        &sms,
        &SmsSent {
            phone: phone.clone(),
            sms_id: "#4 sms".into(),
        },
    )
    .await?;
    bus.send(
        &payments,
        &PaymentReceived {
            phone: phone.clone(),
            payment_id: "#5 payment".into(),
            cents: 2_000,
        },
    )
    .await?;
    wait_for("four concurrent versions", WAIT, || {
        versions(store.inner(), &phone, WORKERS)
    })
    .await?;
    println!("after the race, {PHONE} has {WORKERS} versions (siblings), one per handling");

    // The next message finds the siblings, merges them and collapses them into one.
    bus.send(
        &payments,
        &CloseStatement {
            phone: phone.clone(),
        },
    )
    .await?;
    let final_statement = wait_for("the statement", WAIT, || {
        let s = statement.clone();
        async move { s.lock().expect("not poisoned").clone() }
    })
    .await?;
    wait_for("two accounting events", WAIT, || {
        let e = events.clone();
        async move { (e.lock().expect("not poisoned").len() >= 2).then_some(()) }
    })
    .await?;
    for w in workers {
        w.shutdown().await;
    }
    accounting.shutdown().await;

    println!("{}", final_statement.render(PHONE));
    let mut events = events.lock().expect("not poisoned").clone();
    events.sort();
    for e in events {
        println!("accounting: {e}");
    }
    Ok(())
}

/// `Some` once the account has `n` versions.
async fn versions(store: &dyn SagaStore, phone: &String, n: usize) -> Option<()> {
    let states = saga_states::<BillingSaga>(store, phone).await.ok()?;
    (states.len() == n).then_some(())
}
