//! The restaurant sample (the second seed): an order's life cycle as a saga with the
//! optimistic persister. Three diners add items at the same time, submitting to the kitchen
//! is a boundary, the bill computes the bundles, and one payment request with three parts
//! meets a declined card: the rest stays paid and a second request settles the remainder.
//!
//! ```text
//! cargo run -p rhinobus-samples --bin restaurant                 # in memory, embedded storage
//! cargo run -p rhinobus-samples --bin restaurant -- --amqp amqp://guest:guest@127.0.0.1:5672/%2f
//! ```

use clap::Parser;
use rhinobus::{Context, Endpoint, HandlerError};
use rhinobus_dht::{Storage, StorageOptions};
use rhinobus_sagas::{Persister, SagaEndpointExt, saga_states};
use rhinobus_samples::restaurant::*;
use rhinobus_samples::sample::{Broker, wait_for};
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Debug, Parser)]
#[command(about = "the restaurant order saga with the optimistic persister")]
struct Args {
    /// Run on RabbitMQ at this URL instead of in memory.
    #[arg(long)]
    amqp: Option<String>,
}

const WAIT: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() {
    if let Err(e) = run(Args::parse()).await {
        eprintln!("restaurant: {e}");
        std::process::exit(1);
    }
}

type Events = mpsc::UnboundedSender<String>;

fn note(events: &Events, line: String) -> Result<(), HandlerError> {
    events
        .send(line)
        .map_err(|_| HandlerError::msg("the sample stopped listening"))
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let broker = Broker::from_url(args.amqp);
    let suffix = broker.run_suffix();
    let (restaurant, waiter) = (format!("restaurant{suffix}"), format!("waiter{suffix}"));
    let dir = tempfile::tempdir()?;
    let store = Storage::open(dir.path(), StorageOptions::default())?;
    let (tx, mut events) = mpsc::unbounded_channel::<String>();

    let orders = Endpoint::builder_shared(restaurant.clone(), broker.transport())
        .concurrency(4)
        .error_queue(format!("{restaurant}-error"))
        .saga(OrderSaga, Persister::optimistic(store.clone()))
        .start()
        .await?;
    let t = tx.clone();
    let kitchen = Endpoint::builder_shared(KITCHEN, broker.transport())
        .handle(move |m: KitchenTicket, _: Context| {
            let t = t.clone();
            async move { note(&t, format!("kitchen: cooking {}", m.dishes.join(", "))) }
        })
        .start()
        .await?;
    let cards = Endpoint::builder_shared(CARD_PROCESSOR, broker.transport())
        .handle(|m: ChargeCard, ctx: Context| async move {
            // The card ending in 5678 is declined.
            let approved = !m.card.ends_with("5678");
            ctx.reply(&CardCharged {
                order: m.order,
                part: m.part,
                approved,
            })?;
            Ok::<_, HandlerError>(())
        })
        .start()
        .await?;
    let (t1, t2, t3) = (tx.clone(), tx.clone(), tx.clone());
    let waiter = Endpoint::builder_shared(waiter, broker.transport())
        .subscribe::<PaymentIncomplete>()
        .subscribe::<OrderPaid>()
        .handle(move |m: BillReady, _: Context| {
            let t = t1.clone();
            async move {
                let mut bill = String::from("bill:");
                for (line, dollars) in &m.lines {
                    bill += &format!("\n  {line:<32} {dollars:>4}$");
                }
                bill += &format!("\n  {:<32} {:>4}$", "total", m.total);
                note(&t, bill)
            }
        })
        .handle(move |m: PaymentIncomplete, _: Context| {
            let t = t2.clone();
            async move {
                note(
                    &t,
                    format!(
                        "payment incomplete: {}$ paid, {}$ still due",
                        m.paid, m.remaining
                    ),
                )
            }
        })
        .handle(move |m: OrderPaid, _: Context| {
            let t = t3.clone();
            async move { note(&t, format!("order {} paid in full: {}$", m.order, m.total)) }
        })
        .start()
        .await?;
    let bus = waiter.bus();
    let order = "234".to_string();
    let pending = |n: usize| {
        let (store, order) = (store.clone(), order.clone());
        async move {
            let states = saga_states::<OrderSaga>(&store, &order).await.ok()?;
            let state = states.into_iter().next().flatten()?;
            (state.pending.len() == n).then_some(())
        }
    };
    let mut next_event = async || {
        tokio::time::timeout(WAIT, events.recv())
            .await
            .ok()
            .flatten()
            .ok_or("timed out waiting for the next event")
    };

    bus.send(
        &restaurant,
        &OpenOrder {
            order: order.clone(),
        },
    )
    .await?;
    wait_for("the order to open", WAIT, || pending(0)).await?;

    // John, Jane and Derek order at the same time.
    let add = |diner: &str, items: &[(&str, &str)]| AddItems {
        order: order.clone(),
        diner: diner.into(),
        items: items
            .iter()
            .map(|(i, d)| ((*i).into(), (*d).into()))
            .collect(),
    };
    let (john, jane, derek) = (
        add("john", &[("1", "salad"), ("2", "juice")]),
        add("jane", &[("3", "omelet")]),
        add("derek", &[("4", "coffee")]),
    );
    let (a, b, c) = tokio::join!(
        bus.send(&restaurant, &john),
        bus.send(&restaurant, &jane),
        bus.send(&restaurant, &derek),
    );
    a?;
    b?;
    c?;
    wait_for("four items", WAIT, || pending(4)).await?;
    println!("john, jane and derek added 4 items concurrently");

    bus.send(
        &restaurant,
        &SubmitToKitchen {
            order: order.clone(),
        },
    )
    .await?;
    println!("{}", next_event().await?);
    // Submission is a boundary: the cake waits for the next one.
    bus.send(&restaurant, &add("derek", &[("5", "cake")]))
        .await?;
    wait_for("the cake", WAIT, || pending(1)).await?;
    println!("derek added a cake after the submission: it waits for the next one");
    bus.send(
        &restaurant,
        &SubmitToKitchen {
            order: order.clone(),
        },
    )
    .await?;
    println!("{}", next_event().await?);

    bus.send(
        &restaurant,
        &RequestBill {
            order: order.clone(),
        },
    )
    .await?;
    println!("{}", next_event().await?);

    let card = |n: &str| PaymentMethod::Card { number: n.into() };
    let payments = vec![
        PaymentPart {
            amount: 15,
            method: card("****-****-****-3456"),
        },
        PaymentPart {
            amount: 8,
            method: PaymentMethod::Cash,
        },
        PaymentPart {
            amount: 5,
            method: card("****-****-****-5678"),
        },
    ];
    println!("one payment request: 15$ card 3456, 8$ cash, 5$ card 5678");
    bus.send(
        &restaurant,
        &PayBill {
            order: order.clone(),
            payments,
        },
    )
    .await?;
    println!("{}", next_event().await?);
    let remainder = vec![PaymentPart {
        amount: 5,
        method: card("****-****-****-3456"),
    }];
    println!("second payment request: 5$ card 3456");
    bus.send(
        &restaurant,
        &PayBill {
            order: order.clone(),
            payments: remainder,
        },
    )
    .await?;
    println!("{}", next_event().await?);

    let completed = saga_states::<OrderSaga>(&store, &order)
        .await?
        .iter()
        .all(Option::is_none);
    println!("saga completed: {completed}");
    for endpoint in [orders, kitchen, cards, waiter] {
        endpoint.shutdown().await;
    }
    Ok(())
}
