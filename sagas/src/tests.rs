//! Unit tests of the saga runtime through the harness and an in-memory endpoint.

use crate::*;
use async_trait::async_trait;
use rhinobus::headers::names;
use rhinobus::{ErrorKind, HandlerError, Message};
use rhinobus_dht::{Sibling, Version};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::Barrier;

#[derive(Debug, Serialize, Deserialize)]
struct Start {
    id: u32,
}
impl Message for Start {
    const NAME: &'static str = "test.start";
}

#[derive(Debug, Serialize, Deserialize)]
struct Add {
    id: u32,
    item: u32,
}
impl Message for Add {
    const NAME: &'static str = "test.add";
}

#[derive(Debug, Serialize, Deserialize)]
struct Finish {
    id: u32,
}
impl Message for Finish {
    const NAME: &'static str = "test.finish";
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Added {
    item: u32,
}
impl Message for Added {
    const NAME: &'static str = "test.added";
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Tagged;
impl Message for Tagged {
    const NAME: &'static str = "test.tagged";
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Basket {
    items: BTreeSet<u32>,
    applied: u32,
    merges: u32,
}

struct BasketSaga;

impl Saga for BasketSaga {
    const NAME: &'static str = "test.basket";
    type State = Basket;
    type Key = u32;
    fn routes(r: &mut Routes<Self>) {
        r.initiated_by::<Start>()
            .orchestrates::<Add>()
            .orchestrates::<Finish>();
    }
}

#[async_trait]
impl InitiatedBy<Start> for BasketSaga {
    fn correlate(m: &Start) -> u32 {
        m.id
    }
    async fn handle(&self, _: Start, _: &mut SagaContext<Self>) -> Result<(), HandlerError> {
        Ok(())
    }
}

#[async_trait]
impl Orchestrates<Add> for BasketSaga {
    fn correlate(m: &Add) -> u32 {
        m.id
    }
    async fn handle(&self, m: Add, saga: &mut SagaContext<Self>) -> Result<(), HandlerError> {
        saga.state.items.insert(m.item);
        saga.state.applied += 1;
        saga.send("audit", &Added { item: m.item })?;
        if m.item == 999 {
            saga.publish(&Tagged)?;
        }
        Ok(())
    }
}

#[async_trait]
impl Orchestrates<Finish> for BasketSaga {
    fn correlate(m: &Finish) -> u32 {
        m.id
    }
    async fn handle(&self, _: Finish, saga: &mut SagaContext<Self>) -> Result<(), HandlerError> {
        saga.complete();
        Ok(())
    }
}

#[async_trait]
impl OrchestratesMerge for BasketSaga {
    async fn merged(
        &self,
        merge: MergeSagaState<Basket>,
        saga: &mut SagaContext<Self>,
    ) -> Result<(), HandlerError> {
        assert!(merge.siblings.len() >= 2);
        saga.state.merges += 1;
        Ok(())
    }
}

fn union(states: Vec<Basket>) -> Basket {
    let mut out = Basket::default();
    for s in states {
        out.items.extend(s.items);
        out.merges = out.merges.max(s.merges);
    }
    out.applied = out.items.len() as u32;
    out
}

#[tokio::test]
async fn initiates_orchestrates_and_sends_with_saga_headers() {
    let h = SagaHarness::new(BasketSaga);
    assert!(h.handle(&Start { id: 1 }).await.unwrap().is_empty());
    let sent = h.handle(&Add { id: 1, item: 5 }).await.unwrap();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].queue(), Some("audit"));
    assert_eq!(sent[0].decode::<Added>(), Some(Added { item: 5 }));
    assert_eq!(sent[0].header(rhinobus::headers::names::SAGA_ID), Some("1"));
    assert_eq!(
        sent[0].header(rhinobus::headers::names::SAGA_TYPE),
        Some("test.basket")
    );
    let state = h.state(&1).await.unwrap().unwrap();
    assert_eq!(state.items, BTreeSet::from([5]));
}

#[tokio::test]
async fn a_message_for_a_missing_saga_fails_with_the_reason_or_is_discarded() {
    let h = SagaHarness::new(BasketSaga);
    let err = h.handle(&Add { id: 9, item: 1 }).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Failure);
    assert!(
        err.to_string()
            .contains("no test.basket saga with key \"9\""),
        "{err}"
    );
    assert!(
        err.error_type().contains("SagaError"),
        "{}",
        err.error_type()
    );
    assert_eq!(h.state(&9).await.unwrap(), None);

    let store = MemoryStore::new();
    let lenient = SagaHarness::with_persister(BasketSaga, store, |s| {
        Persister::optimistic(s).on_missing(MissingSaga::Discard)
    });
    assert!(
        lenient
            .handle(&Add { id: 9, item: 1 })
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(lenient.versions(&9).await.unwrap(), 0);
}

#[tokio::test]
async fn a_completed_saga_rejects_late_messages_but_recognises_a_redelivery() {
    let h = SagaHarness::new(BasketSaga);
    h.handle(&Start { id: 2 }).await.unwrap();
    h.handle_with_id(&Finish { id: 2 }, "finish-1")
        .await
        .unwrap();
    assert!(h.is_completed(&2).await.unwrap());
    assert_eq!(h.state(&2).await.unwrap(), None);
    h.handle_with_id(&Finish { id: 2 }, "finish-1")
        .await
        .expect("a redelivered final message is not an error");
    let err = h.handle(&Add { id: 2, item: 1 }).await.unwrap_err();
    assert!(err.to_string().contains("has completed"), "{err}");
    assert_eq!(
        err.kind(),
        ErrorKind::Unrecoverable,
        "no retry brings it back"
    );
}

#[tokio::test]
async fn a_redelivery_is_not_applied_twice_and_sends_the_same_messages_again() {
    let h = SagaHarness::new(BasketSaga);
    h.handle(&Start { id: 3 }).await.unwrap();
    let first = h
        .handle_with_id(&Add { id: 3, item: 7 }, "m-1")
        .await
        .unwrap();
    let again = h
        .handle_with_id(&Add { id: 3, item: 7 }, "m-1")
        .await
        .unwrap();
    assert_eq!(h.state(&3).await.unwrap().unwrap().applied, 1);
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].decode::<Added>(), first[0].decode::<Added>());
    assert_eq!(again[0].queue(), Some("audit"));
    assert_eq!(
        again[0].header(rhinobus::headers::names::SAGA_ID),
        Some("3")
    );
}

#[tokio::test]
async fn a_redelivery_after_a_restart_sends_the_very_same_messages_again() {
    let store = MemoryStore::new();
    let before = SagaHarness::with_persister(BasketSaga, store.clone(), Persister::optimistic);
    before.handle(&Start { id: 4 }).await.unwrap();
    let first = before
        .handle_with_id(&Add { id: 4, item: 999 }, "m-redelivered")
        .await
        .unwrap();
    // A new process, which has never sent these types, gets the message again.
    let after = SagaHarness::with_persister(BasketSaga, store, Persister::optimistic);
    let again = after
        .handle_with_id(&Add { id: 4, item: 999 }, "m-redelivered")
        .await
        .unwrap();
    assert_eq!(again.len(), 2, "an Added and a Tagged");
    assert_eq!(
        again, first,
        "same envelopes, ids included, so receivers can deduplicate"
    );
    assert_eq!(after.state(&4).await.unwrap().unwrap().applied, 1);
}

/// Wraps a store; the first `n` loads wait for each other, so that `n` concurrent handlings
/// all read the same version.
#[derive(Clone)]
struct SameVersion {
    inner: MemoryStore,
    barrier: Arc<Barrier>,
    waiting: Arc<AtomicUsize>,
}

impl SameVersion {
    fn new(n: usize) -> Self {
        Self {
            inner: MemoryStore::new(),
            barrier: Arc::new(Barrier::new(n)),
            waiting: Arc::new(AtomicUsize::new(n)),
        }
    }
}

#[async_trait]
impl SagaStore for SameVersion {
    async fn load(&self, key: &str) -> Result<Vec<Sibling>, StoreError> {
        let loaded = self.inner.load(key).await?;
        let left = self
            .waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if left.is_ok() {
            self.barrier.wait().await;
        }
        Ok(loaded)
    }
    async fn save(&self, request: SaveRequest) -> Result<Version, StoreError> {
        self.inner.save(request).await
    }
}

#[tokio::test]
async fn the_optimistic_persister_turns_a_lost_race_into_a_conflict() {
    let store = SameVersion::new(2);
    let h = SagaHarness::with_persister(BasketSaga, store.clone(), Persister::optimistic);
    store.inner.save(seed(5)).await.unwrap();
    let (a, b) = tokio::join!(
        h.handle(&Add { id: 5, item: 1 }),
        h.handle(&Add { id: 5, item: 2 })
    );
    let conflicts = [&a, &b]
        .iter()
        .filter(|r| matches!(r, Err(e) if e.kind() == ErrorKind::Conflict))
        .count();
    assert_eq!(conflicts, 1, "{a:?} {b:?}");
    assert_eq!(h.versions(&5).await.unwrap(), 1);
    // The bus re-runs the loser on fresh state; so does this test.
    let lost = if a.is_err() { 1 } else { 2 };
    h.handle(&Add { id: 5, item: lost }).await.unwrap();
    let state = h.state(&5).await.unwrap().unwrap();
    assert_eq!(state.items, BTreeSet::from([1, 2]));
    assert_eq!(state.applied, 2);
}

/// An instance of `BasketSaga` with key `id`, written straight to a store.
fn seed(id: u32) -> SaveRequest {
    stored(id, Basket::default(), &[])
}

/// A `BasketSaga` document with key `id`: `state`, having handled `handled` (oldest first).
fn stored(id: u32, state: Basket, handled: &[&str]) -> SaveRequest {
    let doc = crate::document::SagaDocument {
        state: Some(state),
        handled: handled
            .iter()
            .map(|id| crate::document::HandledMessage {
                id: (*id).into(),
                outgoing: Vec::new(),
            })
            .collect(),
    };
    SaveRequest {
        key: saga_key::<BasketSaga>(&id),
        value: doc.encode().unwrap(),
        ..SaveRequest::default()
    }
}

#[tokio::test]
async fn the_merging_persister_keeps_both_writes_and_merges_them_on_the_next_load() {
    let store = SameVersion::new(3);
    let h =
        SagaHarness::with_persister(BasketSaga, store.clone(), |s| Persister::merging(s, union));
    store.inner.save(seed(6)).await.unwrap();
    let (a, b, c) = tokio::join!(
        h.handle(&Add { id: 6, item: 1 }),
        h.handle(&Add { id: 6, item: 2 }),
        h.handle(&Add { id: 6, item: 3 }),
    );
    a.unwrap();
    b.unwrap();
    c.unwrap();
    assert_eq!(h.versions(&6).await.unwrap(), 3, "three siblings");
    h.handle(&Add { id: 6, item: 4 }).await.unwrap();
    assert_eq!(h.versions(&6).await.unwrap(), 1, "collapsed into one");
    let state = h.state(&6).await.unwrap().unwrap();
    assert_eq!(state.items, BTreeSet::from([1, 2, 3, 4]));
    assert_eq!(state.merges, 1, "the saga reacted to the merge once");
}

/// A redelivery handled while the first run of the same message is still going (a connection
/// lost mid-handling): one of the two writes wins, the other run sends what the winner sent.
#[tokio::test]
async fn the_merging_persister_applies_a_message_handled_twice_at_once_only_once() {
    let store = SameVersion::new(2);
    let h =
        SagaHarness::with_persister(BasketSaga, store.clone(), |s| Persister::merging(s, union));
    store.inner.save(seed(10)).await.unwrap();
    let add = Add { id: 10, item: 1 };
    let (a, b) = tokio::join!(
        h.handle_with_id(&add, "the-same-message"),
        h.handle_with_id(&add, "the-same-message")
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(h.versions(&10).await.unwrap(), 1, "no sibling");
    assert_eq!(h.state(&10).await.unwrap().unwrap().applied, 1);
    let ids = |sent: &[Sent]| {
        sent.iter()
            .map(|m| m.header(names::MESSAGE_ID).unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&a), ids(&b), "both runs send the same message, same id");
    assert_eq!(a.len(), 1);
}

#[tokio::test]
async fn a_completed_branch_collapses_the_siblings_into_one_completed_marker() {
    let store = SameVersion::new(2);
    let h =
        SagaHarness::with_persister(BasketSaga, store.clone(), |s| Persister::merging(s, union));
    store.inner.save(seed(8)).await.unwrap();
    let (finished, added) = tokio::join!(
        h.handle(&Finish { id: 8 }),
        h.handle(&Add { id: 8, item: 1 })
    );
    finished.unwrap();
    added.unwrap();
    assert_eq!(
        h.versions(&8).await.unwrap(),
        2,
        "a completed and a live branch"
    );
    let late = h.handle(&Add { id: 8, item: 2 }).await.unwrap_err();
    assert!(late.to_string().contains("completed"), "{late}");
    // The live branch is gone with it: nothing can outlast the marker and revive the saga.
    let left = store.inner.load(&saga_key::<BasketSaga>(&8)).await.unwrap();
    assert_eq!(left.len(), 1, "collapsed into one");
    assert!(h.is_completed(&8).await.unwrap());
    assert!(left[0].expires_at.is_some(), "the marker expires");
}

/// A `BasketSaga` document holding `items`, with `handled` as the last handled message.
fn handled_by(id: u32, items: &[u32], handled: &str) -> SaveRequest {
    let state = Basket {
        items: items.iter().copied().collect(),
        applied: 1,
        merges: 0,
    };
    stored(id, state, &[handled])
}

/// What a save that reached a node which then died leaves, once the retry on a replica that
/// had not seen it is replicated back: two branches, each the same message handled.
#[tokio::test]
async fn the_optimistic_persister_keeps_one_of_two_handlings_of_one_message() {
    let store = MemoryStore::new();
    store.save(handled_by(12, &[1], "m")).await.unwrap();
    store.save(handled_by(12, &[1, 5], "m")).await.unwrap();
    let h = SagaHarness::with_persister(BasketSaga, store.clone(), Persister::optimistic);
    h.handle(&Add { id: 12, item: 3 }).await.unwrap();
    assert_eq!(h.versions(&12).await.unwrap(), 1, "collapsed into one");
    let state = h.state(&12).await.unwrap().unwrap();
    assert_eq!(
        state.items,
        BTreeSet::from([1, 3]),
        "the older branch, then the new message"
    );

    // Branches that handled different messages last are still refused.
    store.save(handled_by(13, &[1], "m1")).await.unwrap();
    store.save(handled_by(13, &[2], "m2")).await.unwrap();
    let err = h.handle(&Add { id: 13, item: 3 }).await.unwrap_err();
    assert!(err.to_string().contains("2 concurrent versions"), "{err}");
}

#[tokio::test]
async fn the_optimistic_persister_refuses_siblings_it_cannot_merge() {
    let store = MemoryStore::new();
    store.save(seed(7)).await.unwrap();
    store.save(seed(7)).await.unwrap();
    let h = SagaHarness::with_persister(BasketSaga, store, Persister::optimistic);
    let err = h.handle(&Add { id: 7, item: 1 }).await.unwrap_err();
    assert!(err.to_string().contains("2 concurrent versions"), "{err}");
    assert_eq!(
        err.kind(),
        ErrorKind::Failure,
        "retried: a merging instance may merge them meanwhile"
    );
}

#[tokio::test]
async fn state_that_does_not_decode_is_retried_for_an_upgraded_instance_may_read_it() {
    let store = MemoryStore::new();
    let garbage = SaveRequest {
        key: saga_key::<BasketSaga>(&8),
        value: b"\xc1 not MessagePack".to_vec(),
        ..SaveRequest::default()
    };
    store.save(garbage).await.unwrap();
    let h = SagaHarness::with_persister(BasketSaga, store, Persister::optimistic);
    let err = h.handle(&Add { id: 8, item: 1 }).await.unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert_eq!(err.kind(), ErrorKind::Failure);
}

/// Counts the attempts it runs around.
struct Attempts(Arc<AtomicUsize>);

#[async_trait]
impl rhinobus::behavior::Behavior for Attempts {
    async fn around(
        &self,
        _: &rhinobus::Context,
        next: rhinobus::behavior::Next<'_>,
    ) -> Result<(), HandlerError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        next.run().await
    }
}

#[tokio::test]
async fn on_an_endpoint_a_message_for_a_missing_saga_lands_in_the_error_queue() {
    use rhinobus::transport::InMemory;
    use rhinobus::{Bus, Endpoint};
    let broker = InMemory::new();
    broker.declare_queue("audit");
    let attempts = Arc::new(AtomicUsize::new(0));
    // One at a time: `Add { id: 2 }` after the `Start` that initiates its saga.
    let ep = Endpoint::builder("baskets", broker.clone())
        .concurrency(1)
        .immediate_retries(0)
        .wrap(Attempts(attempts.clone()))
        .saga(BasketSaga, Persister::optimistic(MemoryStore::new()))
        .start()
        .await
        .unwrap();
    let bus = Bus::new(broker.clone(), "client");
    bus.send("baskets", &Add { id: 1, item: 1 }).await.unwrap();
    bus.send("baskets", &Start { id: 2 }).await.unwrap();
    bus.send("baskets", &Add { id: 2, item: 1 }).await.unwrap();
    for _ in 0..10_000 {
        if broker.queue_len("error") == 1 && broker.queue_len("audit") == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    ep.shutdown().await;
    let (headers, _) = broker
        .take("error")
        .expect("the orphan is in the error queue");
    let reason = &headers[rhinobus::headers::names::FAILURE_ERROR_MESSAGE];
    assert!(
        reason.contains("no test.basket saga with key \"1\""),
        "{reason}"
    );
    assert_eq!(broker.queue_len("audit"), 1);
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        3,
        "behaviors wrap sagas too"
    );
}

#[tokio::test]
async fn a_message_without_an_id_is_refused_not_taken_for_a_redelivery() {
    let harness = SagaHarness::new(BasketSaga);
    harness.handle(&Start { id: 5 }).await.unwrap();
    let err = harness
        .handle_with_id(&Add { id: 5, item: 1 }, "")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no message id"), "{err}");
    assert_eq!(harness.state(&5).await.unwrap().unwrap().applied, 0);
}

#[derive(Debug, Serialize, Deserialize)]
struct Expire {
    id: u32,
}
impl Message for Expire {
    const NAME: &'static str = "test.expire";
}

/// A saga that gives itself 200 ms: its timeout reports to `audit` and completes it. The
/// timeout's type also starts the saga, so that a timeout whose instance is gone could.
struct DeadlineSaga;

impl Saga for DeadlineSaga {
    const NAME: &'static str = "test.deadline";
    type State = u32;
    type Key = u32;
    fn routes(r: &mut Routes<Self>) {
        r.initiated_by::<Start>()
            .initiated_by::<Expire>()
            .orchestrates::<Finish>();
    }
}

#[async_trait]
impl InitiatedBy<Start> for DeadlineSaga {
    fn correlate(m: &Start) -> u32 {
        m.id
    }
    async fn handle(&self, m: Start, saga: &mut SagaContext<Self>) -> Result<(), HandlerError> {
        let after = std::time::Duration::from_millis(200);
        saga.request_timeout(&Expire { id: m.id }, after)?;
        Ok(())
    }
}

#[async_trait]
impl InitiatedBy<Expire> for DeadlineSaga {
    fn correlate(m: &Expire) -> u32 {
        m.id
    }
    async fn handle(&self, m: Expire, saga: &mut SagaContext<Self>) -> Result<(), HandlerError> {
        saga.send("audit", &Added { item: m.id })?;
        saga.complete();
        Ok(())
    }
}

#[async_trait]
impl Orchestrates<Finish> for DeadlineSaga {
    fn correlate(m: &Finish) -> u32 {
        m.id
    }
    async fn handle(&self, _: Finish, saga: &mut SagaContext<Self>) -> Result<(), HandlerError> {
        saga.complete();
        Ok(())
    }
}

#[tokio::test]
async fn a_timeout_comes_back_to_its_saga_and_one_for_a_finished_or_gone_saga_is_dropped() {
    use rhinobus::transport::InMemory;
    use rhinobus::{Bus, Endpoint};
    use std::time::Duration;
    let broker = InMemory::new();
    broker.declare_queue("audit");
    let ep = Endpoint::builder("deadlines", broker.clone())
        .immediate_retries(0)
        .saga(DeadlineSaga, Persister::optimistic(MemoryStore::new()))
        .start()
        .await
        .unwrap();
    let bus = Bus::new(broker.clone(), "client");
    let started = tokio::time::Instant::now();
    bus.send("deadlines", &Start { id: 1 }).await.unwrap();
    bus.send("deadlines", &Start { id: 2 }).await.unwrap();
    bus.send("deadlines", &Finish { id: 2 }).await.unwrap();
    // A timeout of an instance whose record is gone altogether: it must not start one.
    let mut gone = rhinobus::SendOptions::default();
    let timeout = (
        names::SAGA_TIMEOUT.to_owned(),
        DeadlineSaga::NAME.to_owned(),
    );
    gone.headers.extend([timeout]);
    bus.send_with("deadlines", &Expire { id: 3 }, gone)
        .await
        .unwrap();
    while broker.queue_len("audit") == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no timeout came"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "not before its time"
    );
    // Saga 2's timeout left with saga 1's; give it time to be handled.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ep.shutdown().await;
    let (_, body) = broker.take("audit").unwrap();
    assert_eq!(
        rhinobus::message::decode::<Added>(&body).unwrap(),
        Added { item: 1 }
    );
    assert_eq!(
        broker.queue_len("audit"),
        0,
        "saga 2 finished before its timeout"
    );
    assert_eq!(
        broker.queue_len("error"),
        0,
        "its timeout was dropped, not failed"
    );
    assert_eq!(broker.queue_len("deadlines"), 0);
}
