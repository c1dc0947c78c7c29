//! A small shop on rhinobus: `sales` publishes `OrderPlaced`, `shipping` subscribes and
//! replies `OrderShipped`. Shipping fails now and then, so retries show, and one order is
//! poison, no retry can mend it, so the error queue shows.
//!
//! ```text
//! cargo run -p rhinobus-samples --bin shop                       # embedded, no broker
//! cargo run -p rhinobus-samples --bin shop -- --amqp amqp://guest:guest@127.0.0.1:5672/%2f
//! ```

use clap::Parser;
use rhinobus::headers::names;
use rhinobus::transport::{InMemory, RabbitMq, Transport};
use rhinobus::{BusError, Context, Endpoint, HandlerError, Message};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

#[derive(Debug, Serialize, Deserialize)]
struct OrderPlaced {
    order: u32,
    item: String,
}
impl Message for OrderPlaced {
    const NAME: &'static str = "shop.order-placed";
}

#[derive(Debug, Serialize, Deserialize)]
struct OrderShipped {
    order: u32,
}
impl Message for OrderShipped {
    const NAME: &'static str = "shop.order-shipped";
}

#[derive(Debug, Parser)]
#[command(about = "A small shop on rhinobus")]
struct Args {
    /// Run on RabbitMQ at this address instead of the embedded in-memory broker.
    #[arg(long)]
    amqp: Option<String>,
    /// How many orders to place (at least 2: one of them is the poison order).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(2..))]
    orders: u32,
}

/// Shipping's handler: the order whose item is "anvil" is poison, and no retry changes
/// that; every third order fails on its first attempt and goes through on a retry.
async fn ship(placed: OrderPlaced, ctx: Context) -> Result<(), HandlerError> {
    if placed.item == "anvil" {
        return Err(HandlerError::unrecoverable(format!(
            "order {}: anvils do not fit in a van",
            placed.order
        )));
    }
    if placed.order.is_multiple_of(3) && ctx.attempt() == 1 {
        return Err(HandlerError::msg("the courier's API timed out"));
    }
    ctx.reply(&OrderShipped {
        order: placed.order,
    })?;
    Ok(())
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let result = match &args.amqp {
        Some(url) => run(&args, || RabbitMq::new(url), None).await,
        None => {
            let broker = InMemory::new();
            run(&args, || broker.clone(), Some(broker.clone())).await
        }
    };
    if let Err(e) = result {
        eprintln!("shop: {e}");
        std::process::exit(1);
    }
}

async fn run<T: Transport>(
    args: &Args,
    transport: impl Fn() -> T,
    embedded: Option<InMemory>,
) -> Result<(), BusError> {
    let error_queue = "shop-error".to_owned();
    let shipping = Endpoint::builder("shop-shipping", transport())
        .error_queue(&error_queue)
        .immediate_retries(2)
        .subscribe::<OrderPlaced>()
        .handle(ship)
        .start()
        .await?;
    let (shipped_tx, mut shipped) = mpsc::unbounded_channel();
    let sales = Endpoint::builder("shop-sales", transport())
        .error_queue(&error_queue)
        .handle(move |s: OrderShipped, _: Context| {
            let tx = shipped_tx.clone();
            async move {
                tx.send(s.order)?;
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await?;
    let poison = args.orders / 2;
    for order in 1..=args.orders {
        let item = if order == poison { "anvil" } else { "teapot" };
        sales
            .bus()
            .publish(&OrderPlaced {
                order,
                item: item.into(),
            })
            .await?;
    }
    for _ in 1..args.orders {
        let order = shipped.recv().await.expect("sales is running");
        println!("order {order:>3} shipped");
    }
    shipping.shutdown().await;
    sales.shutdown().await;
    println!(
        "{} of {} orders shipped; order {poison} (an anvil) is in the error queue {error_queue:?}",
        args.orders - 1,
        args.orders
    );
    match embedded {
        Some(broker) => {
            let (headers, _) = broker.take(&error_queue).expect("the poison order");
            let header = |name: &str| headers[name].clone();
            println!(
                "  {} after {} attempt(s): {}",
                header(names::FAILURE_REASON),
                header(names::FAILURE_ATTEMPTS),
                header(names::FAILURE_ERROR_MESSAGE)
            );
        }
        None => println!("  see it with: rhinobus errors --queue {error_queue} list"),
    }
    Ok(())
}
