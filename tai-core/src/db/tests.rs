use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::audit::AuditSink;
use crate::backend::BoxFuture;
use crate::clock::ManualClock;
use crate::outbox::{OutboxRelay, enqueue};
use crate::store::{SqlStore, StateStore};

async fn memory_db() -> Database {
    let db = Database::connect("memory", 1)
        .await
        .expect("sqlite in memory");
    db.migrate_core().await.expect("schema");
    db
}

#[tokio::test]
async fn the_sql_store_keeps_the_state_store_contract_on_a_manual_clock() {
    let clock = ManualClock::new();
    let s = SqlStore::new(memory_db().await, clock.shared());
    let ttl = Some(Duration::from_secs(10));
    assert!(s.put_if_absent("k", b"a".to_vec(), ttl).await.expect("db"));
    assert!(!s.put_if_absent("k", b"b".to_vec(), ttl).await.expect("db"));
    assert_eq!(s.get("k").await.expect("db"), Some(b"a".to_vec()));
    assert!(
        !s.compare_and_swap("k", b"x", b"c".to_vec(), ttl)
            .await
            .expect("db")
    );
    assert!(
        s.compare_and_swap("k", b"a", b"c".to_vec(), ttl)
            .await
            .expect("db")
    );
    s.put("k2", b"z".to_vec(), None).await.expect("db");
    s.put("j", b"other prefix".to_vec(), None)
        .await
        .expect("db");
    assert_eq!(s.keys("k").await.expect("db"), vec!["k", "k2"]);
    clock.advance(Duration::from_secs(10));
    assert_eq!(s.get("k").await.expect("db"), None, "expired");
    assert_eq!(s.keys("k").await.expect("db"), vec!["k2"]);
    assert!(s.put_if_absent("k", b"d".to_vec(), None).await.expect("db"));
    assert!(s.delete("k2").await.expect("db"));
    assert!(!s.delete("k2").await.expect("db"));
    // counters and fencing
    let old = s.incr("fence").await.expect("db");
    assert_eq!(s.get("fence").await.expect("db"), Some(b"1".to_vec()));
    assert!(
        s.put_fenced("rec", b"v1".to_vec(), "fence", old)
            .await
            .expect("db")
    );
    let new = s.incr("fence").await.expect("db");
    assert_eq!((old, new), (1, 2));
    assert!(
        !s.put_fenced("rec", b"stale".to_vec(), "fence", old)
            .await
            .expect("db"),
        "a superseded token cannot write"
    );
    assert!(
        s.put_fenced("rec", b"v2".to_vec(), "fence", new)
            .await
            .expect("db")
    );
    assert_eq!(s.get("rec").await.expect("db"), Some(b"v2".to_vec()));
    assert!(s.incr("rec").await.is_err(), "not an integer");
    assert_eq!(s.get("rec").await.expect("db"), Some(b"v2".to_vec()));
    // expired keys are swept from the table
    s.put("short", b"x".to_vec(), Some(Duration::from_secs(1)))
        .await
        .expect("db");
    clock.advance(Duration::from_secs(2));
    assert_eq!(s.sweep().await.expect("db"), 1);
}

#[tokio::test]
async fn a_sqlite_file_keeps_its_rows_across_connections() {
    let dir = std::env::temp_dir().join(format!("tai-db-test-{}", uuid::Uuid::new_v4().simple()));
    let url = format!("sqlite://{}/nested/state.db", dir.display());
    {
        let db = Database::connect(&url, 1).await.expect("sqlite file");
        db.migrate_core().await.expect("schema");
        let s = SqlStore::new(db, ManualClock::new().shared());
        s.put("kept", b"yes".to_vec(), None).await.expect("db");
    }
    let db = Database::connect(&url, 1).await.expect("sqlite file again");
    db.migrate_core().await.expect("migrating twice is a no-op");
    assert_eq!(db.dialect(), Dialect::Sqlite);
    let s = SqlStore::new(db, ManualClock::new().shared());
    assert_eq!(s.get("kept").await.expect("db"), Some(b"yes".to_vec()));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn an_unknown_database_url_is_refused_by_name() {
    let e = Database::connect("mysql://x@y/z", 1)
        .await
        .expect_err("refused");
    assert!(e.to_string().contains("DATABASE_URL must be"), "{e}");
}

/// Records what it was sent; fails while `down` is set.
#[derive(Debug, Default)]
struct RecordingSink {
    sent: Mutex<Vec<String>>,
    down: Mutex<bool>,
}

impl AuditSink for RecordingSink {
    fn backend(&self) -> &'static str {
        "recording"
    }
    fn publish<'a>(
        &'a self,
        _subject: &'a str,
        id: &'a str,
        _payload: Vec<u8>,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        let down = *self.down.lock().expect("lock");
        if !down {
            self.sent.lock().expect("lock").push(id.to_owned());
        }
        Box::pin(std::future::ready(if down {
            Err(BackendError::Unavailable {
                backend: "nats",
                message: "down".into(),
            })
        } else {
            Ok(())
        }))
    }
    fn ping(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(std::future::ready(Ok(())))
    }
}

#[tokio::test]
async fn the_relay_publishes_in_order_keeps_events_while_the_sink_is_down_and_never_twice() {
    let clock = ManualClock::new();
    let db = memory_db().await;
    let sink = Arc::new(RecordingSink::default());
    let relay = OutboxRelay::new(db.clone(), sink.clone(), clock.shared());
    let write = |id: &'static str| {
        let db = db.clone();
        async move {
            let mut tx = db.pool().begin().await.expect("tx");
            enqueue(&mut tx, id, "events.test", b"{}", 1)
                .await
                .expect("enqueue");
            tx.commit().await.expect("commit");
        }
    };
    write("e1").await;
    write("e2").await;
    *sink.down.lock().expect("lock") = true;
    assert!(relay.pass().await.is_err(), "nothing acknowledged");
    assert_eq!(relay.pending().await.expect("db"), 2, "kept while down");
    *sink.down.lock().expect("lock") = false;
    write("e3").await;
    assert_eq!(relay.pass().await.expect("pass"), 3);
    assert_eq!(relay.pass().await.expect("pass"), 0, "published once");
    assert_eq!(relay.pending().await.expect("db"), 0);
    assert_eq!(*sink.sent.lock().expect("lock"), vec!["e1", "e2", "e3"]);
    let stored = crate::outbox::read(&db, 0, 10).await.expect("read");
    assert_eq!(stored.len(), 3);
    assert!(stored.iter().all(|e| e.published_at.is_some()));
}
