//! The Kanban queue contract, run against every backend: the in-process queue, NATS JetStream,
//! RabbitMQ, and JetStream with RabbitMQ as its fallback.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tai_blackbox::{backend, unique};
use tai_core::kanban::{
    FallbackQueue, JetStreamQueue, MemoryQueue, QueueConfig, QueueError, RabbitMqQueue, SharedQueue,
};

fn config(name: &str) -> QueueConfig {
    let mut config = QueueConfig::new(name, 3);
    config.ack_wait = Duration::from_secs(1);
    config.max_deliver = 3;
    config
}

#[allow(clippy::ptr_arg)] // the queue's id function takes its item type
fn id(item: &String) -> String {
    String::clone(item)
}

async fn next(q: &SharedQueue<String>) -> tai_core::kanban::Delivery<String> {
    tokio::time::timeout(Duration::from_secs(10), q.pull())
        .await
        .expect("an item within 10 s")
        .expect("pull")
        .expect("an item, not the end")
}

/// What every queue promises. `reopen` makes the queue again as a restarted process would
/// (`None` for the in-process queue, which does not outlive its process).
async fn queue_contract<F, Fut>(q: SharedQueue<String>, reopen: Option<F>)
where
    F: Fn() -> Fut,
    Fut: Future<Output = SharedQueue<String>>,
{
    let name = q.backend();
    // bounded: the fourth push is refused, and an ack makes room
    for item in ["a", "b", "c"] {
        q.push(item.to_owned()).await.expect("room");
    }
    let refused = q.push("d".into()).await;
    assert!(
        matches!(refused, Err(QueueError::Full { capacity: 3, .. })),
        "{name}: a full queue refuses, not {refused:?}"
    );
    let first = next(&q).await;
    assert_eq!(
        (first.item.as_str(), first.attempt),
        ("a", 1),
        "{name}: first in, first out"
    );
    first.ack().await.expect("ack");
    q.push("d".into()).await.expect("room again after an ack");

    // a nack hands the item out again, counting the attempt; the others come once
    let mut seen = Vec::new();
    let mut b_attempts = Vec::new();
    while b_attempts.len() < 3 {
        let d = next(&q).await;
        if d.item == "b" {
            b_attempts.push(d.attempt);
            match b_attempts.len() {
                1 => d.nack().await.expect("nack"),
                // a worker that dies holding it: back after the ack wait
                2 => drop(d),
                // the last attempt fails too: a dead letter, not handed out again
                _ => d.nack().await.expect("nack"),
            }
        } else {
            seen.push((d.item.clone(), d.attempt));
            d.ack().await.expect("ack");
        }
    }
    assert_eq!(
        b_attempts,
        vec![1, 2, 3],
        "{name}: attempts counted across nack and ack wait"
    );
    while seen.len() < 2 {
        let d = next(&q).await;
        seen.push((d.item.clone(), d.attempt));
        d.ack().await.expect("ack");
    }
    seen.sort();
    assert_eq!(seen, vec![("c".into(), 1), ("d".into(), 1)], "{name}");
    // after max_deliver attempts: never again (a redelivery would come within the ack wait)
    let after = tokio::time::timeout(Duration::from_secs(3), q.pull()).await;
    assert!(after.is_err(), "{name}: a dead letter came back: {after:?}");

    if let Some(reopen) = reopen {
        // a process that dies holding an item: the next one gets it again, and each death
        // counts as an attempt, so an item that kills its worker cannot loop forever
        q.push("e".into()).await.expect("room");
        let mut q = q;
        for attempt in 1..=3 {
            let held = next(&q).await;
            assert_eq!(
                (held.item.as_str(), held.attempt),
                ("e", attempt),
                "{name}: kept and counted across a crash"
            );
            drop(held);
            drop(q);
            q = reopen().await;
        }
        let after = tokio::time::timeout(Duration::from_secs(3), q.pull()).await;
        assert!(
            after.is_err(),
            "{name}: an item whose holders died max_deliver times came back: {after:?}"
        );
        q.push("f".into()).await.expect("room");
        let d = next(&q).await;
        assert_eq!((d.item.as_str(), d.attempt), ("f", 1), "{name}");
        d.ack().await.expect("ack");
        q.close();
        assert!(
            q.pull().await.expect("pull").is_none(),
            "{name}: closed and empty"
        );
    } else {
        q.close();
        assert!(
            q.pull().await.expect("pull").is_none(),
            "{name}: closed and empty"
        );
    }
}

async fn jetstream(run: &str) -> SharedQueue<String> {
    jetstream_at(&backend("TAI_TEST_NATS_URL"), run).await
}

async fn jetstream_at(url: &str, run: &str) -> SharedQueue<String> {
    Arc::new(
        JetStreamQueue::<String>::connect(
            url,
            &format!("KANBAN_{run}"),
            &format!("{run}.work"),
            config(run),
        )
        .await
        .expect("connect to JetStream")
        .with_ids(id),
    )
}

async fn rabbitmq(run: &str) -> SharedQueue<String> {
    let url = backend("TAI_TEST_AMQP_URL");
    Arc::new(
        RabbitMqQueue::<String>::connect(&url, &format!("kanban.{run}"), config(run))
            .await
            .expect("connect to RabbitMQ")
            .with_ids(id),
    )
}

#[tokio::test]
async fn the_memory_queue_keeps_the_queue_contract() {
    let q: SharedQueue<String> = Arc::new(MemoryQueue::new(
        config("memory"),
        tai_core::clock::system(),
    ));
    queue_contract(q, None::<fn() -> std::future::Ready<SharedQueue<String>>>).await;
}

#[tokio::test]
async fn the_jetstream_queue_keeps_the_queue_contract() {
    let run = unique("kanban");
    queue_contract(jetstream(&run).await, Some(|| jetstream(&run))).await;
}

#[tokio::test]
async fn the_rabbitmq_queue_keeps_the_queue_contract() {
    let run = unique("kanban");
    queue_contract(rabbitmq(&run).await, Some(|| rabbitmq(&run))).await;
}

async fn both(run: &str) -> SharedQueue<String> {
    Arc::new(FallbackQueue::new(
        jetstream(run).await,
        rabbitmq(run).await,
        id,
    ))
}

#[tokio::test]
async fn jetstream_with_rabbitmq_as_fallback_keeps_the_queue_contract() {
    let run = unique("kanban");
    queue_contract(both(&run).await, Some(|| both(&run))).await;
}

#[tokio::test]
async fn a_copy_on_both_backends_is_handled_once() {
    let run = unique("kanban");
    let (primary, fallback) = (jetstream(&run).await, rabbitmq(&run).await);
    // the primary stored it but its answer was lost, so it went to the fallback as well
    primary.push("x".into()).await.expect("push");
    fallback.push("x".into()).await.expect("push");
    primary.push("y".into()).await.expect("push");
    let q = FallbackQueue::new(primary, fallback, id);
    let mut handled = Vec::new();
    while handled.len() < 2 {
        let d = tokio::time::timeout(
            Duration::from_secs(10),
            tai_core::kanban::WorkQueue::pull(&q),
        )
        .await
        .expect("in time")
        .expect("pull")
        .expect("an item");
        handled.push(d.item.clone());
        d.ack().await.expect("ack");
    }
    // nothing else comes: the copy is dropped, not handed out
    let more = tokio::time::timeout(
        Duration::from_secs(3),
        tai_core::kanban::WorkQueue::pull(&q),
    )
    .await;
    assert!(more.is_err(), "a copy was handed out: {more:?}");
    assert_eq!(q.duplicates_dropped(), 1);
    handled.sort();
    assert_eq!(handled, vec!["x", "y"]);
}

/// Closed while NATS is down: the pulls end once RabbitMQ is drained, instead of waiting for a
/// NATS that may not come back (a service stopping during an outage would hang), and what NATS
/// holds waits there for the next process.
#[tokio::test]
async fn a_fallback_queue_closed_during_an_outage_ends_its_pulls() {
    let mut nats = tai_blackbox::OwnNats::start().await;
    let run = unique("kanban");
    let primary = jetstream_at(&nats.url(), &run).await;
    let q: SharedQueue<String> = Arc::new(FallbackQueue::new(primary, rabbitmq(&run).await, id));
    q.push("held-by-nats".into()).await.expect("push");
    nats.stop();
    q.push("on-rabbitmq".into()).await.expect("to the fallback");
    let d = next(&q).await;
    assert_eq!(d.item, "on-rabbitmq");
    d.ack().await.expect("ack");
    q.close();
    let end = tokio::time::timeout(Duration::from_secs(15), q.pull()).await;
    assert!(
        matches!(end, Ok(Ok(None))),
        "the pulls end once the reachable backend is drained: {end:?}"
    );
    nats.restart().await;
    let again = jetstream_at(&nats.url(), &run).await;
    let d = next(&again).await;
    assert_eq!(d.item, "held-by-nats", "kept by NATS for the next process");
    d.ack().await.expect("ack");
}
