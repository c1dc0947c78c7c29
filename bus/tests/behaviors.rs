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

/// Refuses job 0 before any handler runs, and panics on job 13.
struct Gate;

#[async_trait::async_trait]
impl Behavior for Gate {
    async fn around(&self, ctx: &Context, next: Next<'_>) -> Result<(), HandlerError> {
        match ctx.header("job") {
            Some("0") => Err(HandlerError::unrecoverable("job 0 is not a job")),
            Some("13") => panic!("unlucky"),
            _ => next.run().await,
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
async fn a_behavior_can_refuse_a_message_and_one_that_panics_fails_it() {
    let broker = InMemory::new();
    let handled = Log::default();
    let log = handled.clone();
    let ep = Endpoint::builder("gated", broker.clone())
        .immediate_retries(2)
        .wrap(Gate)
        .handle(move |job: Job, _| {
            note(&log, format!("handled {}", job.n));
            async { Ok::<_, HandlerError>(()) }
        })
        .start()
        .await
        .unwrap();
    for n in [0, 13, 7] {
        let mut options = rhinobus::SendOptions::default();
        options.headers.insert("job".into(), n.to_string());
        ep.bus()
            .send_with("gated", &Job { n }, options)
            .await
            .unwrap();
    }
    wait_until("two failures", || broker.queue_len("error") == 2).await;
    wait_until("job 7", || handled.lock().unwrap().len() == 1).await;
    ep.shutdown().await;
    assert_eq!(*handled.lock().unwrap(), ["handled 7"]);
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
    assert_eq!(
        failed,
        [
            (
                "0".into(),
                "unrecoverable".into(),
                "1".into(),
                "job 0 is not a job".into()
            ),
            (
                "13".into(),
                "handler".into(),
                "3".into(),
                "handler panicked: unlucky".into()
            ),
        ]
    );
}
