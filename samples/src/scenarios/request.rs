//! `request-reply`: callers awaiting the reply to each request with a
//! [`Requester`](rhinobus::Requester), answered by an endpoint on RabbitMQ; every round trip
//! is two messages through the broker, each confirmed before it counts as sent.

use crate::report::Report;
use crate::scenarios::amqp::{Load, delete_queues};
use crate::scenarios::dht::drive;
use rhinobus::transport::RabbitMq;
use rhinobus::{Context, Endpoint, HandlerError, Message, Requester};
use serde::{Deserialize, Serialize};
use std::time::Duration;

type BenchError = Box<dyn std::error::Error>;

/// How long a caller waits for a reply before the run fails.
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize, Deserialize)]
struct Question {
    n: u64,
}
impl Message for Question {
    const NAME: &'static str = "bench.question";
}

#[derive(Debug, Serialize, Deserialize)]
struct Answer {
    n: u64,
}
impl Message for Answer {
    const NAME: &'static str = "bench.answer";
}

/// `request-reply`: `requests` round trips by `load.concurrency` callers, answered by an
/// endpoint handling as many at once.
pub async fn request_reply(load: &Load, requests: u64) -> Result<Report, BenchError> {
    let run = uuid::Uuid::now_v7().simple().to_string();
    let (queue, replies) = (
        format!("bench-questions-{run}"),
        format!("bench-answers-{run}"),
    );
    let errors = format!("{queue}-error");
    let responder = Endpoint::builder(queue.as_str(), RabbitMq::new(&load.amqp_url))
        .concurrency(load.concurrency)
        .error_queue(errors.as_str())
        .handle(|q: Question, ctx: Context| async move {
            ctx.reply(&Answer { n: q.n })?;
            Ok::<_, HandlerError>(())
        })
        .start()
        .await?;
    let transport = RabbitMq::new(&load.amqp_url).connection_name(replies.clone());
    let requester = Requester::builder(replies.as_str(), transport)
        .error_queue(errors.as_str())
        .start()
        .await?;
    let asking = (requester.clone(), queue.clone());
    let callers = usize::from(load.concurrency);
    let driven = drive(requests, callers, Some(&load.amqp_url), move |n| {
        let (requester, queue) = asking.clone();
        async move {
            let answer: Answer = requester.request(&queue, &Question { n }, TIMEOUT).await?;
            if answer.n != n {
                return Err(format!("request {n} got the answer to {}", answer.n).into());
            }
            Ok(())
        }
    })
    .await;
    requester.shutdown().await;
    responder.shutdown().await;
    // Durable queues: deleted whether the run succeeded or not.
    delete_queues(&load.amqp_url, &[&queue, &replies, &errors]).await?;
    let driven = driven.map_err(|e| e as BenchError)?;
    Ok(
        Report::new("request-reply", requests, driven.elapsed, driven.latencies)
            .with_cpu(&driven.cpu)
            .with("callers", callers),
    )
}
