//! The `rhinobus errors` CLI against a real RabbitMQ, run as a real process.

use lapin::types::{AMQPValue, FieldTable};
use rhinobus::headers::names;
use rhinobus::transport::RabbitMq;
use rhinobus::{Context, Endpoint, HandlerError, Message};
use rhinobus_tests::{Raw, Work, amqp_url, rhinobus_bin, rhinobus_cli, unique};
use std::collections::HashSet;
use std::process::Command;
use std::time::Duration;

/// A failure as the bus writes it, published straight into the error queue.
fn failure_headers(id: &str, source: &str, error: &str) -> FieldTable {
    let mut h = FieldTable::default();
    let mut put = |k: &str, v: &str| {
        h.insert(k.into(), AMQPValue::LongString(v.into()));
    };
    put(names::MESSAGE_ID, id);
    put(names::MESSAGE_TYPE, Work::NAME);
    put(names::FAILURE_SOURCE_QUEUE, source);
    put(names::FAILURE_ENDPOINT, source);
    put(names::FAILURE_TIME, "2026-11-01T10:00:00.000Z");
    put(names::FAILURE_ATTEMPTS, "6");
    put(names::FAILURE_REASON, "handler");
    put(names::FAILURE_ERROR_TYPE, error);
    put(names::FAILURE_ERROR_MESSAGE, "it broke\nsecond line");
    put(names::FAILED_TIMES, "1");
    h
}

fn body(n: u32) -> Vec<u8> {
    rhinobus::message::encode(&Work { n }).unwrap()
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}): {out}"))
}

fn ids_in(raw_messages: &[(std::collections::BTreeMap<String, String>, Vec<u8>)]) -> Vec<String> {
    raw_messages
        .iter()
        .map(|(h, _)| h[names::MESSAGE_ID].clone())
        .collect()
}

#[tokio::test]
async fn list_groups_show_and_replay_one_leaving_the_rest_in_order() {
    let mut raw = Raw::connect().await;
    let (source, error) = (unique("source"), unique("error"));
    raw.queue(&source).await;
    raw.queue(&error).await;
    for n in 0..5 {
        let err = if n % 2 == 0 {
            "app::Timeout"
        } else {
            "app::Invalid"
        };
        raw.publish(
            &error,
            &body(n),
            failure_headers(&format!("m{n}"), &source, err),
        )
        .await;
    }
    raw.publish(&error, b"\x00garbage", FieldTable::default())
        .await;

    let (ok, out, err) = rhinobus_cli(&["errors", "--queue", &error, "list", "--json"]);
    assert!(ok, "{err}");
    let listed = json(&out);
    assert_eq!(listed.as_array().unwrap().len(), 6);
    assert_eq!(listed[0]["id"], "m0");
    assert_eq!(listed[0]["attempts"], 6);

    let (ok, out, _) = rhinobus_cli(&[
        "errors",
        "--queue",
        &error,
        "list",
        "--type",
        Work::NAME,
        "--limit",
        "2",
    ]);
    assert!(ok);
    assert!(
        out.contains("m0") && out.contains("m1") && !out.contains("m2"),
        "{out}"
    );
    assert!(
        out.contains("it broke") && !out.contains("second line"),
        "first line only: {out}"
    );

    let (ok, out, _) = rhinobus_cli(&["errors", "--queue", &error, "groups", "--json"]);
    assert!(ok);
    let groups = json(&out);
    assert_eq!(groups.as_array().unwrap().len(), 3, "{groups}");
    assert_eq!(groups[0]["count"], 3);
    assert_eq!(groups[0]["error_type"], "app::Timeout");

    let (ok, out, _) = rhinobus_cli(&["errors", "--queue", &error, "show", "m3", "--json"]);
    assert!(ok);
    let shown = json(&out);
    assert_eq!(shown["body"], serde_json::json!({"n": 3}));
    assert_eq!(shown["headers"][names::FAILURE_ERROR_TYPE], "app::Invalid");
    let (ok, out, _) = rhinobus_cli(&["errors", "--queue", &error, "show", "m3"]);
    assert!(ok && out.contains("\"n\": 3"), "{out}");

    let (ok, _, err) = rhinobus_cli(&["errors", "--queue", &error, "show", "nope"]);
    assert!(!ok && err.contains("no message"), "{err}");

    let (ok, out, err) = rhinobus_cli(&["errors", "--queue", &error, "replay", "m2"]);
    assert!(ok, "{err}");
    assert!(out.contains("replayed 1"), "{out}");

    let replayed = raw.drain(&source).await;
    assert_eq!(ids_in(&replayed), ["m2"]);
    let (h, b) = &replayed[0];
    assert_eq!(b, &body(2), "body unchanged");
    assert!(
        !h.contains_key(names::FAILURE_ERROR_TYPE),
        "failure headers moved aside"
    );
    assert_eq!(h["rhinobus-previous-failure-error-type"], "app::Timeout");
    assert_eq!(h[names::REPLAY_COUNT], "1");
    assert!(h.contains_key(names::REPLAYED_AT));

    let left = raw.drain(&error).await;
    assert_eq!(left.len(), 5);
    let left_ids: Vec<_> = left
        .iter()
        .map(|(h, _)| h.get(names::MESSAGE_ID).cloned().unwrap_or_default())
        .collect();
    assert_eq!(
        left_ids,
        ["m0", "m1", "m3", "m4", ""],
        "the rest stay, in their order"
    );
    assert_eq!(left[4].1, b"\x00garbage", "untouched");
    raw.cleanup().await;
}

#[tokio::test]
async fn messages_that_cannot_be_replayed_fail_loudly_stay_and_do_not_stop_the_rest() {
    let mut raw = Raw::connect().await;
    let error = unique("error");
    raw.queue(&error).await;
    let (gone, source) = (unique("gone"), unique("source"));
    raw.queue(&source).await;
    let overlong = "q".repeat(300);
    raw.publish(&error, &body(1), failure_headers("lonely", &gone, "E"))
        .await;
    raw.publish(&error, &body(2), failure_headers("fine", &source, "E"))
        .await;
    raw.publish(
        &error,
        &body(3),
        failure_headers("overlong", &overlong, "E"),
    )
    .await;
    let (ok, out, err) = rhinobus_cli(&["errors", "--queue", &error, "replay", "--all"]);
    assert!(
        !ok,
        "a message that could not be replayed makes the command fail"
    );
    assert!(err.contains("lonely") && err.contains(&gone), "{err}");
    assert!(
        err.contains("overlong") && err.contains("at most 255"),
        "{err}"
    );
    assert!(out.contains("replayed 1 of 3"), "the others went on: {out}");
    assert_eq!(ids_in(&raw.drain(&source).await), ["fine"]);
    assert_eq!(ids_in(&raw.drain(&error).await), ["lonely", "overlong"]);
    raw.cleanup().await;
}

/// Returns from the broker are matched to the messages they are: among many replays moving
/// at once, each one to the missing queue stays in the error queue and each other one moves
/// (lapin alone hands a return to whichever confirm completes next).
#[tokio::test]
async fn among_many_replays_exactly_those_to_a_missing_queue_stay() {
    let mut raw = Raw::connect().await;
    let error = unique("error");
    raw.queue(&error).await;
    let (gone, source) = (unique("gone"), unique("source"));
    raw.queue(&source).await;
    let (mut stays, mut moves) = (Vec::new(), Vec::new());
    for n in 0..700 {
        let id = format!("m{n}");
        let to = if n % 3 == 0 { &gone } else { &source };
        raw.publish(&error, &body(n), failure_headers(&id, to, "E"))
            .await;
        if n % 3 == 0 { &mut stays } else { &mut moves }.push(id);
    }
    let (ok, out, err) = rhinobus_cli(&["errors", "--queue", &error, "replay", "--all"]);
    assert!(!ok, "the replays to a missing queue make the command fail");
    assert!(
        out.contains(&format!("replayed {} of 700", moves.len())),
        "{out}\n{err}"
    );
    assert_eq!(ids_in(&raw.drain(&source).await), moves);
    assert_eq!(ids_in(&raw.drain(&error).await), stays);
    raw.cleanup().await;
}

#[tokio::test]
async fn archive_keeps_and_purge_needs_yes() {
    let mut raw = Raw::connect().await;
    let (source, error) = (unique("source"), unique("error"));
    raw.queue(&error).await;
    raw.forget_later(&format!("{error}.archive"));
    for n in 0..4 {
        raw.publish(
            &error,
            &body(n),
            failure_headers(&format!("a{n}"), &source, "E"),
        )
        .await;
    }
    let (ok, out, _) = rhinobus_cli(&[
        "errors",
        "--queue",
        &error,
        "archive",
        "a0",
        "a1",
        "--dry-run",
    ]);
    assert!(
        ok && out.contains("2 of 4 messages would be archived"),
        "{out}"
    );
    assert_eq!(raw.count(&error).await, 4, "a dry run changes nothing");

    let (ok, _, _) = rhinobus_cli(&["errors", "--queue", &error, "archive", "a0", "a1"]);
    assert!(ok);
    assert_eq!(
        ids_in(&raw.drain(&format!("{error}.archive")).await),
        ["a0", "a1"]
    );

    let (ok, _, err) = rhinobus_cli(&["errors", "--queue", &error, "purge", "--all"]);
    assert!(!ok && err.contains("--yes"), "{err}");
    assert_eq!(raw.count(&error).await, 2);
    let (ok, _, _) = rhinobus_cli(&["errors", "--queue", &error, "purge", "a2", "--yes"]);
    assert!(ok);
    assert_eq!(ids_in(&raw.drain(&error).await), ["a3"]);

    let (ok, _, err) = rhinobus_cli(&["errors", "--queue", &error, "replay"]);
    assert!(
        !ok && err.contains("required"),
        "a selector is required: {err}"
    );
    raw.cleanup().await;
}

#[tokio::test]
async fn a_message_that_fails_again_comes_back_with_a_repeated_failure_count() {
    let mut raw = Raw::connect().await;
    let (queue, error) = (unique("refail"), unique("error"));
    raw.queue(&queue).await;
    raw.queue(&error).await;
    let ep = Endpoint::builder(&queue, RabbitMq::new(amqp_url()))
        .error_queue(&error)
        .immediate_retries(0)
        .handle(|_: Work, _: Context| async { Err::<(), _>(HandlerError::msg("still broken")) })
        .start()
        .await
        .unwrap();
    let (ok, id, err) = rhinobus_cli(&[
        "send",
        &queue,
        "--type",
        Work::NAME,
        "--json",
        r#"{"n": 7}"#,
    ]);
    assert!(ok, "{err}");
    raw.wait_for_count(&error, 1, Duration::from_secs(20)).await;
    let (ok, _, err) = rhinobus_cli(&["errors", "--queue", &error, "replay", id.trim()]);
    assert!(ok, "{err}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    raw.wait_for_count(&error, 1, Duration::from_secs(20)).await;
    ep.shutdown().await;
    let back = raw.drain(&error).await;
    assert_eq!(back.len(), 1);
    let h = &back[0].0;
    assert_eq!(h[names::MESSAGE_ID], id.trim());
    assert_eq!(h[names::FAILED_TIMES], "2");
    assert_eq!(h[names::REPLAY_COUNT], "1");
    assert_eq!(h[names::FAILURE_ERROR_MESSAGE], "still broken");
    assert_eq!(
        rhinobus::message::decode::<Work>(&back[0].1).unwrap(),
        Work { n: 7 }
    );
    raw.cleanup().await;
}

#[tokio::test]
async fn send_rejects_bad_json_and_unknown_queues_clearly() {
    let (ok, _, err) = rhinobus_cli(&["send", "anywhere", "--type", "t", "--json", "{not json"]);
    assert!(!ok && err.contains("not valid JSON"), "{err}");
    let (ok, _, err) = rhinobus_cli(&["send", &unique("nowhere"), "--type", "t", "--json", "{}"]);
    assert!(!ok && err.contains("no queue named"), "{err}");
    let (ok, _, err) = rhinobus_cli(&["errors", "--queue", &unique("missing"), "list"]);
    assert!(!ok && err.contains("NOT_FOUND"), "{err}");
}

#[tokio::test]
async fn killing_the_cli_mid_replay_loses_nothing() {
    const N: u32 = 1000;
    let mut raw = Raw::connect().await;
    let (source, error) = (unique("source"), unique("error"));
    raw.queue(&source).await;
    raw.queue(&error).await;
    for n in 0..N {
        raw.publish(
            &error,
            &body(n),
            failure_headers(&format!("k{n}"), &source, "E"),
        )
        .await;
    }
    let mut child = Command::new(rhinobus_bin())
        .args(["errors", "--queue", &error, "replay", "--all"])
        .env("RHINOBUS_AMQP_URL", amqp_url())
        .spawn()
        .expect("start the CLI");
    // Kill it as soon as the replay is under way.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while raw.count(&source).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replay never started"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    child.kill().expect("kill -9");
    child.wait().expect("reap");
    let moved_at_kill = raw.count(&source).await;
    // Unacknowledged messages return to the error queue when the broker sees the connection
    // die: wait until every message is back in one queue or the other (a message both copied
    // and not yet acked is in both).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while raw.count(&source).await + raw.count(&error).await < N {
        assert!(
            tokio::time::Instant::now() < deadline,
            "messages still out after the kill"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let in_source = ids_in(&raw.drain(&source).await);
    let in_error = ids_in(&raw.drain(&error).await);
    let all: HashSet<_> = in_source.iter().chain(&in_error).cloned().collect();
    let expected: HashSet<_> = (0..N).map(|n| format!("k{n}")).collect();
    assert_eq!(
        all, expected,
        "every message is in the error queue or its source queue"
    );
    assert!(
        (in_source.len() as u32) < N,
        "the kill came mid-replay (moved at kill: {moved_at_kill}, source {}, error {})",
        in_source.len(),
        in_error.len()
    );
    raw.cleanup().await;
}
