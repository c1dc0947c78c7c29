//! A request and its reply through the in-memory transport: each reply reaches the request
//! that asked for it, and one that comes too late or of another type is kept, not lost.

use rhinobus::headers::names;
use rhinobus::request::{RequestError, Requester};
use rhinobus::transport::{Deliveries, EndpointTopology, InMemory, OutgoingMessage, Transport};
use rhinobus::{BusError, Context, Endpoint, HandlerError, Message};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

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

/// A price whose body is not a [`Price`]'s, under its name.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct NotAPrice {
    text: String,
}
impl Message for NotAPrice {
    const NAME: &'static str = "tests.price";
}

/// A catalog that answers once `gate` lets it (at once without one), with an [`Unknown`] for
/// SKU 0, a [`NotAPrice`] for SKU 1, two copies of the price for SKU 2, and counts requests.
async fn catalog(broker: &InMemory, gate: Option<Arc<Notify>>, asked: Arc<AtomicU32>) -> Endpoint {
    Endpoint::builder("catalog", broker.clone())
        .concurrency(16)
        .handle(move |get: GetPrice, ctx: Context| {
            asked.fetch_add(1, Ordering::SeqCst);
            let gate = gate.clone();
            async move {
                if let Some(gate) = gate {
                    gate.notified().await;
                }
                let price = Price {
                    sku: get.sku,
                    cents: u64::from(get.sku) * 10,
                };
                match get.sku {
                    0 => ctx.reply(&Unknown { sku: 0 })?,
                    1 => ctx.reply(&NotAPrice {
                        text: "cheap".into(),
                    })?,
                    2 => {
                        ctx.reply(&price)?;
                        ctx.reply(&price)?
                    }
                    _ => ctx.reply(&price)?,
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
    let catalog = catalog(&broker, None, asked.clone()).await;
    let web = Requester::builder("web.replies", broker.clone())
        .start()
        .await
        .unwrap();
    let requests = (3..=52).map(|sku| {
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
    for (sku, price) in (3..=52).zip(prices) {
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
    let undecodable = web
        .request::<_, Price>("catalog", &GetPrice { sku: 1 }, Duration::from_secs(10))
        .await;
    let Err(RequestError::Undecodable { reply, .. }) = undecodable else {
        panic!("{undecodable:?}");
    };
    assert_eq!(reply.decode::<NotAPrice>().unwrap().text, "cheap");
    // Answered twice: the second copy is known for one, not taken for a late reply.
    let twice: Price = web
        .request("catalog", &GetPrice { sku: 2 }, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(twice.cents, 20);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while broker.queue_len("web.replies") > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the copy stayed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    web.shutdown().await;
    catalog.shutdown().await;
    assert_eq!(broker.queue_len("web.replies"), 0);
    assert_eq!(
        broker.queue_len("error"),
        0,
        "no reply taken for a late one"
    );
}

#[tokio::test]
async fn a_reply_that_comes_after_its_request_gave_up_goes_to_the_error_queue() {
    let broker = InMemory::new();
    let gate = Arc::new(Notify::new());
    let catalog = catalog(&broker, Some(gate.clone()), Arc::default()).await;
    let web = Requester::builder("web.replies", broker.clone())
        .error_queue("web.errors")
        .start()
        .await
        .unwrap();
    let late = web
        .request::<_, Price>("catalog", &GetPrice { sku: 3 }, Duration::from_millis(500))
        .await;
    assert!(matches!(late, Err(RequestError::Timeout(_))), "{late:?}");
    gate.notify_one();
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
    let catalog = catalog(&broker, None, asked.clone()).await;
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

#[tokio::test]
async fn a_requester_shut_down_fails_what_waits_and_its_successor_keeps_the_late_reply() {
    let broker = InMemory::new();
    let gate = Arc::new(Notify::new());
    let asked = Arc::new(AtomicU32::new(0));
    let catalog = catalog(&broker, Some(gate.clone()), asked.clone()).await;
    let web = Requester::builder("web.replies", broker.clone())
        .error_queue("web.errors")
        .start()
        .await
        .unwrap();
    let waiting = tokio::spawn({
        let web = web.clone();
        async move {
            web.request::<_, Price>("catalog", &GetPrice { sku: 5 }, Duration::from_secs(30))
                .await
        }
    });
    while asked.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    web.shutdown().await;
    let waited = waiting.await.unwrap();
    assert!(matches!(waited, Err(RequestError::ShutDown)), "{waited:?}");
    let after = web
        .request::<_, Price>("catalog", &GetPrice { sku: 6 }, Duration::from_secs(30))
        .await;
    assert!(
        matches!(after, Err(RequestError::ShutDown)),
        "at once: {after:?}"
    );

    // The same queue, a new process: the reply to the first one's request is not lost.
    let restarted = Requester::builder("web.replies", broker.clone())
        .error_queue("web.errors")
        .start()
        .await
        .unwrap();
    gate.notify_one();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while broker.queue_len("web.errors") == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the reply was lost");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (headers, body) = broker.take("web.errors").unwrap();
    assert_eq!(headers[names::FAILURE_REASON], "no-request");
    assert_eq!(rhinobus::message::decode::<Price>(&body).unwrap().sku, 5);
    restarted.shutdown().await;
    catalog.shutdown().await;
}

/// The in-memory transport, confirming each send 200 ms after the message reached its queue.
struct SlowConfirms(InMemory);

#[async_trait::async_trait]
impl Transport for SlowConfirms {
    async fn start(
        &self,
        topology: &EndpointTopology,
        stop: CancellationToken,
    ) -> Result<Deliveries, BusError> {
        self.0.start(topology, stop).await
    }

    async fn send(&self, messages: Vec<OutgoingMessage>) -> Result<(), BusError> {
        self.0.send(messages).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(())
    }

    async fn close(&self) {
        self.0.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_that_comes_before_the_send_is_confirmed_is_taken() {
    let broker = InMemory::new();
    let catalog = catalog(&broker, None, Arc::default()).await;
    let web = Requester::builder("web.replies", SlowConfirms(broker.clone()))
        .start()
        .await
        .unwrap();
    let price: Price = web
        .request("catalog", &GetPrice { sku: 7 }, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(price.cents, 70);
    web.shutdown().await;
    catalog.shutdown().await;
    assert_eq!(broker.queue_len("error"), 0);
}

#[tokio::test]
async fn a_request_carries_the_headers_it_is_given_and_cannot_be_delayed() {
    let broker = InMemory::new();
    let pricing = Endpoint::builder("pricing", broker.clone())
        .handle(|get: GetPrice, ctx: Context| async move {
            let cents = match ctx.header("tenant") {
                Some("acme") => 99,
                _ => 100,
            };
            ctx.reply(&Price {
                sku: get.sku,
                cents,
            })?;
            Ok::<_, HandlerError>(())
        })
        .start()
        .await
        .unwrap();
    let web = Requester::builder("web.replies", broker.clone())
        .start()
        .await
        .unwrap();
    let mut for_acme = rhinobus::SendOptions::default();
    for_acme.headers.insert("tenant".into(), "acme".into());
    let ask = GetPrice { sku: 8 };
    let price: Price = web
        .request_with("pricing", &ask, Duration::from_secs(10), for_acme)
        .await
        .unwrap();
    assert_eq!(price.cents, 99);
    let later = rhinobus::SendOptions::delayed_by(Duration::from_secs(1));
    let refused = web
        .request_with::<_, Price>("pricing", &ask, Duration::from_secs(10), later)
        .await;
    assert!(
        matches!(refused, Err(RequestError::Bus(BusError::Invalid(_)))),
        "{refused:?}"
    );
    web.shutdown().await;
    pricing.shutdown().await;
}
