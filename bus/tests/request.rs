//! A request and its reply through the in-memory transport: each reply reaches the request
//! that asked for it, and one that comes too late or of another type is kept, not lost.

use rhinobus::headers::names;
use rhinobus::request::{RequestError, Requester};
use rhinobus::transport::InMemory;
use rhinobus::{Context, Endpoint, HandlerError, Message};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

#[derive(Debug, Serialize, Deserialize)]
struct GetPrice {
    sku: u32,
}
impl Message for GetPrice {
    const NAME: &'static str = "tests.get-price";
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Price {
    sku: u32,
    cents: u64,
}
impl Message for Price {
    const NAME: &'static str = "tests.price";
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Unknown {
    sku: u32,
}
impl Message for Unknown {
    const NAME: &'static str = "tests.unknown-sku";
}

/// A catalog that answers after `delay`, with an [`Unknown`] for SKU 0, and counts requests.
async fn catalog(broker: &InMemory, delay: Duration, asked: Arc<AtomicU32>) -> Endpoint {
    Endpoint::builder("catalog", broker.clone())
        .concurrency(16)
        .handle(move |get: GetPrice, ctx: Context| {
            asked.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(delay).await;
                match get.sku {
                    0 => ctx.reply(&Unknown { sku: 0 })?,
                    sku => ctx.reply(&Price {
                        sku,
                        cents: u64::from(sku) * 10,
                    })?,
                };
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .unwrap()
}

#[tokio::test]
async fn each_reply_reaches_the_request_that_asked_for_it() {
    let broker = InMemory::new();
    let asked = Arc::new(AtomicU32::new(0));
    let catalog = catalog(&broker, Duration::ZERO, asked.clone()).await;
    let web = Requester::builder("web.replies", broker.clone())
        .start()
        .await
        .unwrap();
    let requests = (1..=50).map(|sku| {
        let web = &web;
        async move {
            let price: Price = web
                .request("catalog", &GetPrice { sku }, Duration::from_secs(10))
                .await
                .unwrap();
            price
        }
    });
    let prices = futures_util::future::join_all(requests).await;
    for (sku, price) in (1..=50).zip(prices) {
        assert_eq!(
            price,
            Price {
                sku,
                cents: u64::from(sku) * 10
            }
        );
    }
    assert_eq!(asked.load(Ordering::SeqCst), 50);
    let other = web
        .request::<_, Price>("catalog", &GetPrice { sku: 0 }, Duration::from_secs(10))
        .await;
    let Err(RequestError::OtherType { expected, reply }) = other else {
        panic!("{other:?}");
    };
    assert_eq!(expected, Price::NAME);
    assert_eq!(reply.decode::<Unknown>().unwrap(), Unknown { sku: 0 });
    web.shutdown().await;
    catalog.shutdown().await;
    assert_eq!(broker.queue_len("error"), 0);
}

#[tokio::test]
async fn a_reply_that_comes_after_its_request_gave_up_goes_to_the_error_queue() {
    let broker = InMemory::new();
    let asked = Arc::new(AtomicU32::new(0));
    let catalog = catalog(&broker, Duration::from_millis(300), asked.clone()).await;
    let web = Requester::builder("web.replies", broker.clone())
        .error_queue("web.errors")
        .start()
        .await
        .unwrap();
    let late = web
        .request::<_, Price>("catalog", &GetPrice { sku: 3 }, Duration::from_millis(100))
        .await;
    assert!(matches!(late, Err(RequestError::Timeout(_))), "{late:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while broker.queue_len("web.errors") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the late reply was lost"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (headers, body) = broker.take("web.errors").unwrap();
    assert_eq!(headers[names::FAILURE_REASON], "no-request");
    let price: Price = rhinobus::message::decode(&body).unwrap();
    assert_eq!(price, Price { sku: 3, cents: 30 });
    web.shutdown().await;
    catalog.shutdown().await;
}

#[tokio::test]
async fn a_request_nobody_took_in_time_is_not_answered_later() {
    let broker = InMemory::new();
    broker.declare_queue("catalog");
    let web = Requester::builder("web.replies", broker.clone())
        .start()
        .await
        .unwrap();
    let unanswered = web
        .request::<_, Price>("catalog", &GetPrice { sku: 4 }, Duration::from_millis(100))
        .await;
    assert!(
        matches!(unanswered, Err(RequestError::Timeout(_))),
        "{unanswered:?}"
    );
    let asked = Arc::new(AtomicU32::new(0));
    let catalog = catalog(&broker, Duration::ZERO, asked.clone()).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while broker.queue_len("catalog") > 0 {
        assert!(tokio::time::Instant::now() < deadline, "never taken");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    catalog.shutdown().await;
    assert_eq!(broker.queue_len("catalog"), 0, "taken, not left unstarted");
    assert_eq!(
        asked.load(Ordering::SeqCst),
        0,
        "dropped past its time, not handled"
    );
    web.shutdown().await;
    assert_eq!(broker.queue_len("error"), 0);
}
