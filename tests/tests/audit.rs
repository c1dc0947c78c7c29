//! The audit queue against a real RabbitMQ: copies of handled messages, read and replayed with
//! the `rhinobus` CLI as a real process, and a deleted audit queue.

use lapin::options::QueueDeleteOptions;
use rhinobus::headers::names;
use rhinobus::transport::RabbitMq;
use rhinobus::{Context, Endpoint, HandlerError, Message};
use rhinobus_tests::{
    RabbitmqctlOnDrop, Raw, Work, amqp_url, rabbitmqctl, recv, rhinobus_cli, unique,
};
use std::time::Duration;

/// An endpoint on `queue` auditing to `audit` whose handler reports every `n` it handles,
/// with whether the message came with the processing headers of an earlier handling.
async fn audited_endpoint(
    queue: &str,
    error: &str,
    audit: &str,
) -> (Endpoint, tokio::sync::mpsc::UnboundedReceiver<(u32, bool)>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let endpoint = Endpoint::builder(queue, RabbitMq::new(amqp_url()))
        .error_queue(error)
        .audit_queue(audit)
        .handle(move |w: Work, ctx: Context| {
            let stale = ctx.header(names::PROCESSING_ENDPOINT).is_some();
            let _ = tx.send((w.n, stale));
            async { Ok::<_, HandlerError>(()) }
        })
        .start()
        .await
        .expect("start the endpoint");
    (endpoint, rx)
}

#[tokio::test]
async fn handled_messages_are_audited_and_a_replay_from_the_audit_queue_handles_them_again() {
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("audited").await;
    let audit = unique("audit");
    raw.forget_later(&audit);
    let (endpoint, mut handled) = audited_endpoint(&queue, &error, &audit).await;
    endpoint.bus().send(&queue, &Work { n: 7 }).await.unwrap();
    assert_eq!(recv(&mut handled).await, (7, false));
    raw.wait_for_count(&audit, 1, Duration::from_secs(10)).await;
    assert_eq!(raw.count(&queue).await, 0);

    let (ok, out, err) = rhinobus_cli(&["errors", "--queue", &audit, "list", "--json"]);
    assert!(ok, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    let copy = &listed[0];
    assert_eq!(copy["message_type"], Work::NAME);
    assert_eq!(
        copy["source_queue"],
        queue.as_str(),
        "the queue that handled it"
    );
    let headers = &copy["headers"];
    assert_eq!(headers[names::PROCESSING_ENDPOINT], queue.as_str());
    assert_eq!(headers[names::PROCESSING_ATTEMPTS], "1");
    let pid = format!("(pid {})", std::process::id());
    assert!(
        headers[names::PROCESSING_HOST]
            .as_str()
            .unwrap_or_default()
            .ends_with(&pid)
    );
    for time in [names::PROCESSING_STARTED, names::PROCESSING_ENDED] {
        let t = headers[time].as_str().unwrap_or_default();
        assert!(rhinobus::headers::parse_time(t).is_some(), "{time}: {t:?}");
    }

    // Replaying from the audit queue is how an operator has a message handled again: afresh,
    // without the processing headers of the first handling.
    let (ok, _, err) = rhinobus_cli(&["errors", "--queue", &audit, "replay", "--all"]);
    assert!(ok, "{err}");
    assert_eq!(recv(&mut handled).await, (7, false));
    raw.wait_for_count(&audit, 1, Duration::from_secs(10)).await;
    let copies = raw.drain(&audit).await;
    assert_eq!(copies.len(), 1);
    let (headers, body) = &copies[0];
    assert_eq!(headers[names::REPLAY_COUNT], "1");
    assert_eq!(rhinobus::message::decode::<Work>(body).unwrap().n, 7);
    endpoint.shutdown().await;
    assert_eq!(raw.count(&error).await, 0);
    raw.cleanup().await;
}

#[tokio::test]
async fn a_handled_message_whose_audit_queue_was_deleted_goes_to_the_error_queue_once() {
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("audited").await;
    let audit = unique("audit");
    let (endpoint, mut handled) = audited_endpoint(&queue, &error, &audit).await;
    raw.channel
        .queue_delete(audit.as_str().into(), QueueDeleteOptions::default())
        .await
        .expect("delete the audit queue");
    endpoint.bus().send(&queue, &Work { n: 3 }).await.unwrap();
    assert_eq!(recv(&mut handled).await, (3, false));
    raw.wait_for_count(&error, 1, Duration::from_secs(10)).await;
    endpoint.shutdown().await;
    handled_once_and_in_the_error_queue(&raw, &queue, &error, &mut handled).await;
    raw.cleanup().await;
}

#[tokio::test]
async fn a_handled_message_whose_audit_copy_a_length_limit_refuses_goes_to_the_error_queue_once() {
    let mut raw = Raw::connect().await;
    let (queue, error) = raw.endpoint_queues("audited").await;
    let audit = unique("audit");
    raw.forget_later(&audit);
    let (endpoint, mut handled) = audited_endpoint(&queue, &error, &audit).await;
    let policy = unique("policy");
    let (pattern, limit) = (
        format!("^{audit}$"),
        r#"{"max-length":0,"overflow":"reject-publish"}"#,
    );
    rabbitmqctl(&[
        "set_policy",
        &policy,
        &pattern,
        limit,
        "--apply-to",
        "queues",
    ]);
    let cleared = RabbitmqctlOnDrop::new(&["clear_policy", &policy]);
    // Policies reach queues asynchronously: wait until this one shows.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !rabbitmqctl(&["list_queues", "name", "policy", "-q"])
        .lines()
        .any(|l| l.starts_with(&audit) && l.contains(&policy))
    {
        assert!(tokio::time::Instant::now() < deadline, "policy not applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    endpoint.bus().send(&queue, &Work { n: 3 }).await.unwrap();
    assert_eq!(recv(&mut handled).await, (3, false));
    raw.wait_for_count(&error, 1, Duration::from_secs(10)).await;
    endpoint.shutdown().await;
    drop(cleared);
    handled_once_and_in_the_error_queue(&raw, &queue, &error, &mut handled).await;
    assert_eq!(raw.count(&audit).await, 0);
    raw.cleanup().await;
}

/// After the endpoint stopped: message 3 was handled once (never redelivered) and is in the
/// error queue with the reason `audit`, its processing headers and its body.
async fn handled_once_and_in_the_error_queue(
    raw: &Raw,
    queue: &str,
    error: &str,
    handled: &mut tokio::sync::mpsc::UnboundedReceiver<(u32, bool)>,
) {
    // A message left to be redelivered would be back in its queue once the endpoint stopped.
    assert!(handled.try_recv().is_err(), "handled a second time");
    assert_eq!(raw.count(queue).await, 0, "back in its queue");
    let failed = raw.drain(error).await;
    assert_eq!(failed.len(), 1);
    let (headers, body) = &failed[0];
    assert_eq!(headers[names::FAILURE_REASON], "audit");
    assert_eq!(headers[names::FAILURE_SOURCE_QUEUE], queue);
    assert_eq!(rhinobus::message::decode::<Work>(body).unwrap().n, 3);
    assert_eq!(
        headers[names::PROCESSING_ENDPOINT],
        queue,
        "a whole audit copy once replayed --to the audit queue"
    );
}
