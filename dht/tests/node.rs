//! The real node binary, driven by the Client, the CLI and raw sockets.

mod common;

use bytes::Bytes;
use common::{NodeProcess, cli, temp_data};
use rhinobus_dht::frame::{RequestFrame, ResponseFrame, decode_response};
use rhinobus_dht::{
    AddItemRequest, Client, ClientError, ClientOptions, GetRequest, Op, OpResult, PutRequest,
    RemoveItemRequest, RemoveRequest, Request, Response, WireError,
};
use serde::Serialize;
use std::collections::BTreeSet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reads_writes_lists_and_batches() {
    let (_dir, data) = temp_data();
    let node = NodeProcess::start(&data, &[]);
    let client = Client::connect(node.addr.clone()).await.unwrap();
    assert_eq!(client.topology().nodes, vec![node.addr.clone()]);

    let a = client
        .put(PutRequest::new("555-5421", "call"))
        .await
        .unwrap();
    let b = client
        .put(PutRequest::new("555-5421", "sms"))
        .await
        .unwrap();
    let siblings = client.get("555-5421").await.unwrap();
    assert_eq!(
        siblings.iter().map(|s| s.version).collect::<BTreeSet<_>>(),
        BTreeSet::from([a.version, b.version])
    );

    let stale = PutRequest::new("555-5421", "late")
        .parents([a.version])
        .optimistic(true);
    match client.put(stale).await {
        Err(ClientError::Conflict(c)) => assert_eq!(c.current.len(), 2),
        other => panic!("expected a conflict, got {other:?}"),
    }
    let merged = client
        .put(
            PutRequest::new("555-5421", "call+sms")
                .parents([a.version, b.version])
                .optimistic(true),
        )
        .await
        .unwrap();
    assert_eq!(merged.superseded.len(), 2);
    let removed = client
        .remove(RemoveRequest::new("555-5421", [merged.version]))
        .await
        .unwrap();
    assert_eq!(removed.removed, vec![merged.version]);
    assert!(client.get("555-5421").await.unwrap().is_empty());

    let id = client
        .add_item(AddItemRequest::new("list", "one"))
        .await
        .unwrap();
    assert_eq!(client.get_items("list").await.unwrap().len(), 1);
    assert!(
        client
            .remove_item(RemoveItemRequest {
                key: "list".into(),
                id
            })
            .await
            .unwrap()
    );

    // A batch that fails part-way writes nothing.
    let guarded = client.put(PutRequest::new("guarded", "v")).await.unwrap();
    let failed = client
        .batch(vec![
            Op::Put(PutRequest::new("batch/a", "1")),
            Op::Put(PutRequest::new("guarded", "w").optimistic(true)),
        ])
        .await;
    assert!(
        matches!(failed, Err(ClientError::Conflict(_))),
        "{failed:?}"
    );
    assert!(client.get("batch/a").await.unwrap().is_empty());
    let results = client
        .batch(vec![
            Op::Put(PutRequest::new("batch/a", "1")),
            Op::Put(
                PutRequest::new("guarded", "w")
                    .parents([guarded.version])
                    .optimistic(true),
            ),
            Op::Get(GetRequest::new("batch/a")),
        ])
        .await
        .unwrap();
    assert!(matches!(&results[2], OpResult::Siblings(s) if s.len() == 1));

    // The largest key and the largest value travel in one frame.
    let big_key = Bytes::from(vec![b'k'; rhinobus_dht::MAX_KEY_LEN]);
    let big_value = Bytes::from(vec![7u8; rhinobus_dht::MAX_VALUE_LEN]);
    client
        .put(PutRequest::new(big_key.clone(), big_value.clone()))
        .await
        .unwrap();
    assert_eq!(client.get(big_key).await.unwrap()[0].value, big_value);

    // Limits are enforced before sending, with the same error the node would give.
    let too_long = Bytes::from(vec![0u8; rhinobus_dht::MAX_KEY_LEN + 1]);
    assert!(matches!(
        client.get(too_long).await,
        Err(ClientError::Rejected(WireError::KeyTooLarge { .. }))
    ));
    let too_big = Bytes::from(vec![0u8; rhinobus_dht::MAX_VALUE_LEN + 1]);
    assert!(matches!(
        client.put(PutRequest::new("k", too_big)).await,
        Err(ClientError::Rejected(WireError::ValueTooLarge { .. }))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_requests_in_flight_on_one_connection() {
    let (_dir, data) = temp_data();
    let node = NodeProcess::start(&data, &[]);
    let client = Client::connect_with(
        [node.addr.clone()],
        ClientOptions::default().connections_per_node(1),
    )
    .await
    .unwrap();
    let tasks: Vec<_> = (0..500)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move {
                let key = format!("k/{i}");
                let put = c.put(PutRequest::new(key.clone(), format!("v{i}"))).await?;
                let got = c.get(key).await?;
                Ok::<_, ClientError>((i, put.version, got))
            })
        })
        .collect();
    for t in tasks {
        let (i, version, got) = t.await.unwrap().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].version, version);
        assert_eq!(got[0].value, Bytes::from(format!("v{i}")));
    }
}

/// Requests sent in one burst reach the node together; the writes among them are served in
/// batches, and each is still answered as it would be alone. (Answers may come in another
/// order: a write that waits for its turn at the write lock does not hold up a read behind it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_sent_together_are_each_answered_as_if_alone() {
    let (_dir, data) = temp_data();
    let node = NodeProcess::start(&data, &[]);
    let client = Client::connect(node.addr.clone()).await.unwrap();
    client.put(PutRequest::new("b", "v")).await.unwrap();
    let stale = rmp_serde::to_vec_named(&RequestFrame {
        id: 7,
        topology: 0,
        request: Request::Put(PutRequest::new("stale", "v")),
    })
    .unwrap();
    let frames = [
        request(1, Request::Put(PutRequest::new("a", "v"))),
        // Between two writes: answered by its id, and the connection goes on.
        unknown_request(11),
        request(2, Request::Put(PutRequest::new("c", "v"))),
        request(3, Request::Put(PutRequest::new("b", "w").optimistic(true))),
        request(4, Request::Put(PutRequest::new(&b"\0reserved"[..], "v"))),
        request(5, Request::Put(PutRequest::new("d", "v"))),
        request(6, Request::Get(GetRequest::new("b"))),
        stale,
        request(8, Request::AddItem(AddItemRequest::new("list", "i"))),
        request(9, Request::Put(PutRequest::new(vec![b'k'; 70_000], "v"))),
        request(10, Request::Put(PutRequest::new("e", "v"))),
    ];
    let mut burst = Vec::new();
    for body in &frames {
        burst.extend_from_slice(&(body.len() as u32).to_be_bytes());
        burst.extend_from_slice(body);
    }
    let mut s = TcpStream::connect(&node.addr).await.unwrap();
    s.write_all(&burst).await.unwrap();
    let mut answers = std::collections::BTreeMap::new();
    for _ in 0..frames.len() {
        let r = read_raw(&mut s).await.expect("an answer to every request");
        answers.insert(r.id, r.result);
    }
    for id in [1, 2, 5, 10] {
        assert!(
            matches!(answers[&id], Ok(Response::Put(_))),
            "{id}: {:?}",
            answers[&id]
        );
    }
    assert!(
        matches!(&answers[&3], Err(WireError::Conflict(c)) if c.current.len() == 1),
        "{:?}",
        answers[&3]
    );
    assert!(matches!(answers[&4], Err(WireError::ReservedKey)));
    assert!(
        matches!(&answers[&6], Ok(Response::Siblings(v)) if v.len() == 1 && v[0].value == "v"),
        "{:?}",
        answers[&6]
    );
    assert!(matches!(
        answers[&7],
        Err(WireError::TopologyChanged { version: 1 })
    ));
    assert!(matches!(answers[&8], Ok(Response::ItemAdded(_))));
    assert!(matches!(
        answers[&9],
        Err(WireError::KeyTooLarge { len: 70_000, .. })
    ));
    assert!(matches!(answers[&11], Err(WireError::Malformed { .. })));

    for key in ["a", "b", "c", "d", "e"] {
        let siblings = client.get(key).await.unwrap();
        assert_eq!(siblings.len(), 1, "{key}");
        assert_eq!(siblings[0].value, "v", "{key}");
    }
    assert!(client.get("stale").await.unwrap().is_empty());
    assert_eq!(client.get_items("list").await.unwrap().len(), 1);
}

/// A client that sends a burst of writes and closes its sending half at once still gets every
/// answer: the end of the stream, read while the writes were gathered, waits for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_writes_then_the_end_of_the_stream_is_answered_whole() {
    let (_dir, data) = temp_data();
    let node = NodeProcess::start(&data, &[]);
    let mut burst = Vec::new();
    for id in 0..20u64 {
        let body = request(
            id,
            Request::Put(PutRequest::new(format!("burst/{id}"), "v")),
        );
        burst.extend_from_slice(&(body.len() as u32).to_be_bytes());
        burst.extend_from_slice(&body);
    }
    let mut s = TcpStream::connect(&node.addr).await.unwrap();
    s.write_all(&burst).await.unwrap();
    s.shutdown().await.unwrap();
    let mut answered = BTreeSet::new();
    while let Some(r) = read_raw(&mut s).await {
        assert!(matches!(r.result, Ok(Response::Put(_))), "{r:?}");
        answered.insert(r.id);
    }
    assert_eq!(answered, (0..20).collect::<BTreeSet<_>>());
    let client = Client::connect(node.addr.clone()).await.unwrap();
    for id in 0..20 {
        assert_eq!(client.get(format!("burst/{id}")).await.unwrap().len(), 1);
    }
}

#[test]
fn cli_refuses_an_expiry_past_the_end_of_time() {
    let (_dir, data) = temp_data();
    let node = NodeProcess::start(&data, &[]);
    let huge = u64::MAX.to_string();
    let (code, _, err) = cli(
        &node.addr,
        &["put", "k", "v", "--expires-in-secs", &huge],
        None,
    );
    assert_eq!(code, 1, "an error, not a panic: {err}");
    assert!(err.contains("too far in the future"), "{err}");
    let (code, out, _) = cli(&node.addr, &["get", "k"], None);
    assert_eq!(code, 0);
    assert!(out.contains("(no value)"), "nothing written: {out}");
}

#[test]
fn a_tombstone_grace_without_a_unit_or_of_zero_is_refused_clearly() {
    let (_dir, data) = temp_data();
    let data = data.to_str().expect("a UTF-8 temp path");
    for (grace, says) in [
        ("10", "time unit needed"),
        ("0", "every tombstone"),
        ("0s", "every tombstone"),
    ] {
        let out = std::process::Command::new(common::BIN)
            .args(["node", "--data", data, "--tombstone-grace", grace])
            .output()
            .expect("run rhinobus-dht");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{grace}: a usage error: {err}");
        assert!(
            err.contains(says) && err.contains("forever"),
            "{grace}: {err}"
        );
    }
}

#[test]
fn cli_get_put_remove_with_json() {
    let (_dir, data) = temp_data();
    let node = NodeProcess::start(&data, &[]);
    let put = |args: &[&str]| {
        let (code, out, err) = cli(&node.addr, args, None);
        assert_eq!(code, 0, "{args:?}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["version"].as_str().unwrap().to_owned()
    };
    let a = put(&["--json", "put", "user/1", "alice"]);
    let b = put(&["--json", "put", "user/1", "bob"]);

    let (code, out, _) = cli(&node.addr, &["get", "user/1", "--json"], None);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let siblings = v["siblings"].as_array().unwrap();
    let got: BTreeSet<(String, String)> = siblings
        .iter()
        .map(|s| {
            (
                s["version"].as_str().unwrap().to_owned(),
                s["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        BTreeSet::from([(a.clone(), "alice".into()), (b.clone(), "bob".into())])
    );

    // A stale optimistic put is a conflict: its own exit code, message on stderr.
    let (code, out, err) = cli(
        &node.addr,
        &["put", "user/1", "x", "--parent", &a, "--optimistic"],
        None,
    );
    assert_eq!(code, 3);
    assert!(out.is_empty());
    assert!(err.contains("conflict"), "{err}");

    let c = put(&[
        "--json", "put", "user/1", "carol", "--parent", &a, "--parent", &b,
    ]);
    let (code, out, _) = cli(&node.addr, &["--json", "get", "user/1"], None);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["siblings"].as_array().unwrap().len(), 1);
    assert_eq!(v["siblings"][0]["version"].as_str().unwrap(), c);

    let (code, _, err) = cli(&node.addr, &["remove", "user/1", "--parent", &c], None);
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = cli(&node.addr, &["get", "user/1", "--json"], None);
    assert_eq!(code, 0);
    assert!(out.contains("\"siblings\":[]"), "{out}");

    // Bad input: an error on stderr and a non-zero exit, never a panic.
    for bad in [
        &["put", "k", "v", "--parent", "not-a-version"][..],
        &["remove", "k"][..],
        &["frobnicate"][..],
    ] {
        let (code, _, err) = cli(&node.addr, bad, None);
        assert_ne!(code, 0, "{bad:?}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let (code, _, err) = cli("127.0.0.1:1", &["get", "k"], None);
    assert_ne!(code, 0);
    assert!(err.contains("cannot connect"), "{err}");
}

async fn send_raw(stream: &mut TcpStream, body: &[u8]) {
    stream
        .write_all(&(body.len() as u32).to_be_bytes())
        .await
        .unwrap();
    stream.write_all(body).await.unwrap();
}

/// The next response frame, or `None` when the node closed the connection.
async fn read_raw(stream: &mut TcpStream) -> Option<ResponseFrame> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await.ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut body).await.ok()?;
    Some(decode_response(&body).expect("node sends decodable frames"))
}

/// A well-formed frame asking for something this node does not know.
fn unknown_request(id: u64) -> Vec<u8> {
    #[derive(Serialize)]
    enum FromTheFuture {
        Teleport { to: String },
    }
    #[derive(Serialize)]
    struct Frame {
        id: u64,
        topology: u64,
        request: FromTheFuture,
    }
    rmp_serde::to_vec_named(&Frame {
        id,
        topology: 1,
        request: FromTheFuture::Teleport { to: "mars".into() },
    })
    .unwrap()
}

fn request(id: u64, request: Request) -> Vec<u8> {
    rmp_serde::to_vec_named(&RequestFrame {
        id,
        topology: 1,
        request,
    })
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_oversize_and_abrupt_disconnects_do_not_hurt_the_node() {
    let (_dir, data) = temp_data();
    let node = NodeProcess::start(&data, &["--max-frame", "4096"]);
    let client = Client::connect(node.addr.clone()).await.unwrap();
    client.put(PutRequest::new("k", "v")).await.unwrap();

    // Garbage inside a well-formed frame: an error, then the connection is closed.
    let mut s = TcpStream::connect(&node.addr).await.unwrap();
    send_raw(&mut s, b"\xc1\xc1 definitely not messagepack").await;
    let r = read_raw(&mut s).await.expect("an error frame");
    assert!(matches!(r.result, Err(WireError::Malformed { .. })));
    assert!(read_raw(&mut s).await.is_none());

    // An unknown request kind keeps its id and the connection stays usable.
    let mut s = TcpStream::connect(&node.addr).await.unwrap();
    send_raw(&mut s, &unknown_request(99)).await;
    let r = read_raw(&mut s).await.unwrap();
    assert_eq!(r.id, 99);
    assert!(matches!(r.result, Err(WireError::Malformed { .. })));
    send_raw(&mut s, &request(100, Request::Get(GetRequest::new("k")))).await;
    let r = read_raw(&mut s).await.unwrap();
    assert_eq!(r.id, 100);
    assert!(matches!(r.result, Ok(Response::Siblings(ref v)) if v.len() == 1));

    // A stale topology version is answered with TopologyChanged.
    let stale = rmp_serde::to_vec_named(&RequestFrame {
        id: 101,
        topology: 0,
        request: Request::Get(GetRequest::new("k")),
    })
    .unwrap();
    send_raw(&mut s, &stale).await;
    let r = read_raw(&mut s).await.unwrap();
    assert!(matches!(
        r.result,
        Err(WireError::TopologyChanged { version: 1 })
    ));

    // A frame over the limit: an error, then the connection is closed.
    let mut s = TcpStream::connect(&node.addr).await.unwrap();
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let r = read_raw(&mut s).await.expect("an error frame");
    assert!(matches!(
        r.result,
        Err(WireError::FrameTooLarge { max: 4096 })
    ));
    assert!(read_raw(&mut s).await.is_none());

    // Hang up in the middle of a frame, and with requests unanswered.
    for _ in 0..20 {
        let mut s = TcpStream::connect(&node.addr).await.unwrap();
        s.write_all(&[0, 0, 1, 0, 1, 2, 3]).await.unwrap();
        drop(s);
        let mut s = TcpStream::connect(&node.addr).await.unwrap();
        for id in 0..50 {
            send_raw(&mut s, &request(id, Request::Get(GetRequest::new("k")))).await;
        }
        drop(s);
    }

    // The client's oversize request is refused before it is sent.
    let small = Client::connect_with(
        [node.addr.clone()],
        ClientOptions {
            // Big enough for the topology answer (about 10 KiB), too small for the value below.
            max_frame: 64 * 1024,
            ..ClientOptions::default()
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        small.put(PutRequest::new("big", vec![0u8; 100_000])).await,
        Err(ClientError::Rejected(WireError::FrameTooLarge { .. }))
    ));

    // Siblings that together outgrow the node's frame limit: a clear error for that request,
    // and the connection goes on serving the others.
    for _ in 0..2 {
        client
            .put(PutRequest::new("twins", vec![7u8; 3000]))
            .await
            .unwrap();
    }
    let too_large = client.get("twins").await;
    assert!(
        matches!(
            too_large,
            Err(ClientError::Rejected(WireError::ResponseTooLarge {
                max: 4096,
                ..
            }))
        ),
        "{too_large:?}"
    );
    assert_eq!(client.get("k").await.unwrap().len(), 1);

    // Through all of that, the node kept serving everyone else.
    assert_eq!(client.get("k").await.unwrap().len(), 1);
    let fresh = Client::connect(node.addr.clone()).await.unwrap();
    assert_eq!(fresh.get("k").await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_secret_is_required_when_set() {
    let (_dir, data) = temp_data();
    let node = NodeProcess::start(&data, &["--secret", "open sesame"]);
    let anonymous = Client::connect(node.addr.clone()).await;
    assert!(
        matches!(
            anonymous,
            Err(ClientError::Rejected(WireError::Unauthorized))
        ),
        "{anonymous:?}"
    );
    let wrong = Client::connect_with(
        [node.addr.clone()],
        ClientOptions::default().secret(Some("open sesame!".into())),
    )
    .await;
    assert!(matches!(
        wrong,
        Err(ClientError::Rejected(WireError::Unauthorized))
    ));
    let client = Client::connect_with(
        [node.addr.clone()],
        ClientOptions::default().secret(Some("open sesame".into())),
    )
    .await
    .unwrap();
    client.put(PutRequest::new("k", "v")).await.unwrap();

    let (code, out, _) = cli(&node.addr, &["get", "k", "--json"], Some("open sesame"));
    assert_eq!(code, 0);
    assert!(out.contains("\"value\":\"v\""), "{out}");
    let (code, _, err) = cli(&node.addr, &["get", "k"], None);
    assert_ne!(code, 0);
    assert!(err.contains("unauthorized"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_kill_9_and_sigterm_stops_cleanly() {
    let (_dir, data) = temp_data();
    let mut node = NodeProcess::start(&data, &[]);
    let client = Client::connect(node.addr.clone()).await.unwrap();
    let mut versions = Vec::new();
    for i in 0..200 {
        let put = client
            .put(PutRequest::new(format!("key/{i}"), format!("value {i}")))
            .await
            .unwrap();
        versions.push(put.version);
    }
    client
        .add_item(AddItemRequest::new("list", "item"))
        .await
        .unwrap();
    // Buffered durability: every acknowledged write is in the OS before the answer, so a crash
    // of the process loses nothing.
    let status = node.signal_and_wait("KILL");
    assert!(!status.success());
    drop(client);

    let mut node = NodeProcess::start(&data, &[]);
    let client = Client::connect(node.addr.clone()).await.unwrap();
    for (i, v) in versions.iter().enumerate() {
        let got = client.get(format!("key/{i}")).await.unwrap();
        assert_eq!(got.len(), 1, "key/{i}");
        assert_eq!(got[0].version, *v);
        assert_eq!(got[0].value, Bytes::from(format!("value {i}")));
    }
    assert_eq!(client.get_items("list").await.unwrap().len(), 1);
    drop(client);

    let status = node.signal_and_wait("TERM");
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsync_durability_serves_concurrent_writers() {
    let (_dir, data) = temp_data();
    let node = NodeProcess::start(&data, &["--durability", "fsync"]);
    let client = Client::connect(node.addr.clone()).await.unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let c = client.clone();
            tokio::spawn(async move {
                c.put(PutRequest::new(format!("f/{i}"), "v"))
                    .await
                    .map(|p| (i, p.version))
            })
        })
        .collect();
    for t in tasks {
        let (i, version) = t.await.unwrap().unwrap();
        let got = client.get(format!("f/{i}")).await.unwrap();
        assert_eq!(got[0].version, version);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_reconnects_after_the_node_restarts() {
    let (_dir, data) = temp_data();
    let mut node = NodeProcess::start(&data, &[]);
    let addr = node.addr.clone();
    let client = Client::connect(addr.clone()).await.unwrap();
    client.put(PutRequest::new("k", "v")).await.unwrap();
    node.signal_and_wait("KILL");
    let _node = NodeProcess::start(&data, &["--listen", &addr]);
    // Connections opened before the restart are dead; the pool replaces each one the first
    // time it is found closed, so a handful of attempts must get through.
    let mut last = None;
    for _ in 0..20 {
        match client.get("k").await {
            Ok(got) => {
                last = Some(Ok(got));
                break;
            }
            Err(e) => {
                last = Some(Err(e));
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    let got = last.unwrap().unwrap();
    assert_eq!(got.len(), 1);
}

/// A page pushed to a node merges there as a rebuild merges it; a page that does not belong to
/// the range it is sent for is refused with a clear error, and nothing of it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merged_pages_must_belong_to_their_range() {
    use rhinobus_dht::RangeId;
    let (_dirs, datas): (Vec<_>, Vec<_>) = (0..2).map(|_| temp_data()).unzip();
    let from = NodeProcess::start(&datas[0], &[]);
    let to = NodeProcess::start(&datas[1], &[]);
    let client = Client::connect_with([&from.addr, &to.addr], ClientOptions::default())
        .await
        .unwrap();
    let source = Client::connect(from.addr.clone()).await.unwrap();
    source.put(PutRequest::new("copied", "v")).await.unwrap();
    let range = RangeId::of(b"copied");
    let page = client
        .range_page(&from.addr, range, None, None)
        .await
        .unwrap();
    let other = RangeId::all().find(|r| *r != range).unwrap();
    let err = client
        .merge_page(&to.addr, other, page.clone())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("in a page of range"), "{err}");
    assert!(
        client
            .get_from(&to.addr, "copied")
            .await
            .unwrap()
            .is_empty()
    );
    let merged = client.merge_page(&to.addr, range, page).await.unwrap();
    assert_eq!(merged.changes, 1);
    let siblings = client.get_from(&to.addr, "copied").await.unwrap();
    assert_eq!(siblings.len(), 1);
    assert_eq!(&siblings[0].value[..], b"v");
}
