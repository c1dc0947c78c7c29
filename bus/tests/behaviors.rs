//! Behaviors around the handlers: their order, retries, refusals and panics.

use rhinobus::behavior::{Behavior, Next};
use rhinobus::headers::names;
use rhinobus::transport::InMemory;
use rhinobus::{Context, Endpoint, HandlerError, Message};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Serialize, Deserialize)]
struct Job {
    n: u32,
}
impl Message for Job {
    const NAME: &'static str = "tests.job";
}

type Log = Arc<Mutex<Vec<String>>>;

fn note(log: &Log, what: String) {
    log.lock().unwrap().push(what);
}

/// Notes its name and the attempt before and after the rest of the chain, and what it
/// returned.
struct Noting {
    name: &'static str,
    log: Log,
}

#[async_trait::async_trait]
impl Behavior for Noting {
    async fn around(&self, ctx: &Context, next: Next<'_>) -> Result<(), HandlerError> {
        note(&self.log, format!("{} before {}", self.name, ctx.attempt()));
        let result = next.run().await;
        let outcome = if result.is_ok() { "ok" } else { "failed" };
        note(&self.log, format!("{} after: {outcome}", self.name));
        result
    }
}

/// Refuses job 0 before any handler runs, skips job 1 as handled, panics on job 13, and
/// takes any failure of the rest as handled.
struct Gate;

#[async_trait::async_trait]
impl Behavior for Gate {
    async fn around(&self, ctx: &Context, next: Next<'_>) -> Result<(), HandlerError> {
        match ctx.header("job") {
            Some("0") => Err(HandlerError::unrecoverable("job 0 is not a job")),
            Some("1") => Ok(()),
            Some("13") => panic!("unlucky"),
            _ => {
                assert!(
                    !next.body().is_empty(),
                    "the body, for behaviors that read it"
                );
                let _ = next.run().await;
                Ok(())
            }
        }
    }
}

async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn behaviors_run_outermost_first_around_every_attempt() {
    let broker = InMemory::new();
    let log = Log::default();
    let handled = log.clone();
    let ep = Endpoint::builder("jobs", broker.clone())
        .immediate_retries(1)
        .wrap(Noting {
            name: "outer",
            log: log.clone(),
        })
        .wrap(Noting {
            name: "inner",
            log: log.clone(),
        })
        .handle(move |job: Job, ctx: Context| {
            note(
                &handled,
                format!("handler {} attempt {}", job.n, ctx.attempt()),
            );
            let fails = ctx.attempt() == 1;
            async move {
                if fails {
                    return Err(HandlerError::msg("first attempt fails"));
                }
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    ep.bus().send("jobs", &Job { n: 1 }).await.unwrap();
    wait_until("two attempts", || log.lock().unwrap().len() == 10).await;
    ep.shutdown().await;
    assert_eq!(
        *log.lock().unwrap(),
        [
            "outer before 1",
            "inner before 1",
            "handler 1 attempt 1",
            "inner after: failed",
            "outer after: failed",
            "outer before 2",
            "inner before 2",
            "handler 1 attempt 2",
            "inner after: ok",
            "outer after: ok",
        ]
    );
    assert_eq!(broker.queue_len("error"), 0);
}

#[tokio::test]
async fn a_behavior_can_refuse_skip_or_swallow_and_one_that_panics_fails_only_its_message() {
    let broker = InMemory::new();
    broker.declare_queue("out");
    let handled = Log::default();
    let log = handled.clone();
    let ep = Endpoint::builder("gated", broker.clone())
        .concurrency(1)
        .immediate_retries(2)
        .wrap(Gate)
        .handle(move |job: Job, ctx: Context| {
            note(&log, format!("handled {}", job.n));
            // Job 6 sends, then fails; the behavior swallows the failure, and the send is
            // taken back.
            let sent = ctx.send("out", &Job { n: job.n });
            async move {
                sent?;
                if job.n == 6 {
                    return Err(HandlerError::msg("half done"));
                }
                Ok(())
            }
        })
        .start()
        .await
        .unwrap();
    for n in [0, 1, 13, 6, 7] {
        let mut options = rhinobus::SendOptions::default();
        options.headers.insert("job".into(), n.to_string());
        ep.bus()
            .send_with("gated", &Job { n }, options)
            .await
            .unwrap();
    }
    wait_until("job 7, after the panic", || {
        handled.lock().unwrap().last().map(String::as_str) == Some("handled 7")
    })
    .await;
    ep.shutdown().await;
    assert_eq!(*handled.lock().unwrap(), ["handled 6", "handled 7"]);
    assert_eq!(broker.queue_len("gated"), 0, "1 and 6 count as handled");
    let (_, body) = broker.take("out").unwrap();
    assert_eq!(rhinobus::message::decode::<Job>(&body).unwrap().n, 7);
    assert_eq!(broker.queue_len("out"), 0, "6's send went with its failure");
    let mut failed = Vec::new();
    while let Some((headers, _)) = broker.take("error") {
        failed.push((
            headers["job"].clone(),
            headers[names::FAILURE_REASON].clone(),
            headers[names::FAILURE_ATTEMPTS].clone(),
            headers[names::FAILURE_ERROR_MESSAGE].clone(),
        ));
    }
    failed.sort();
    let failure = |job: &str, reason: &str, attempts: &str, message: &str| {
        (job.into(), reason.into(), attempts.into(), message.into())
    };
    assert_eq!(
        failed,
        [
            failure("0", "unrecoverable", "1", "job 0 is not a job"),
            failure("13", "handler", "3", "a behavior panicked: unlucky"),
        ]
    );
}

/// A conflict on the first attempt, as a saga's store would report one.
struct ConflictFirst;

#[async_trait::async_trait]
impl Behavior for ConflictFirst {
    async fn around(&self, ctx: &Context, next: Next<'_>) -> Result<(), HandlerError> {
        if ctx.attempt() == 1 {
            return Err(HandlerError::conflict("moved on meanwhile"));
        }
        next.run().await
    }
}

#[tokio::test]
async fn a_behavior_s_conflict_is_re_run_and_a_handler_s_panic_is_its_error() {
    let broker = InMemory::new();
    let log = Log::default();
    let handled = log.clone();
    let ep = Endpoint::builder("conflicted", broker.clone())
        .immediate_retries(0)
        .wrap(Noting {
            name: "outer",
            log: log.clone(),
        })
        .wrap(ConflictFirst)
        .handle(move |job: Job, ctx: Context| {
            note(
                &handled,
                format!("handler {} attempt {}", job.n, ctx.attempt()),
            );
            async move {
                if job.n == 2 {
                    panic!("handler down");
                }
                Ok::<_, HandlerError>(())
            }
        })
        .start()
        .await
        .unwrap();
    ep.bus().send("conflicted", &Job { n: 1 }).await.unwrap();
    wait_until("job 1", || log.lock().unwrap().len() == 5).await;
    ep.bus().send("conflicted", &Job { n: 2 }).await.unwrap();
    wait_until("the error queue", || broker.queue_len("error") == 1).await;
    ep.shutdown().await;
    assert_eq!(
        *log.lock().unwrap(),
        [
            "outer before 1",
            "outer after: failed",
            "outer before 2",
            "handler 1 attempt 2",
            "outer after: ok",
            "outer before 1",
            "outer after: failed",
            "outer before 2",
            "handler 2 attempt 2",
            "outer after: failed",
        ],
        "the conflict is not a failure; the handler's panic is an error to the behaviors"
    );
    let (headers, _) = broker.take("error").unwrap();
    assert_eq!(
        headers[names::FAILURE_ERROR_MESSAGE],
        "handler panicked: handler down"
    );
}
