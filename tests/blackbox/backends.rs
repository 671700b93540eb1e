//! tai-core's real backends against real Redis and NATS: state store, rate limiter, window counter
//! (the queues: `queues.rs`).

use std::time::Duration;

use tai_blackbox::{backend, eventually, unique};
use tai_core::db::Database;
use tai_core::store::{RedisStore, SqlStore, StateStore};

/// The state-store contract, run against every implementation with a real backend.
async fn store_contract(s: &dyn StateStore, other: &dyn StateStore) {
    let name = s.backend();
    s.ping().await.expect("ping");
    let ttl = Some(Duration::from_millis(400));
    assert!(s.put_if_absent("k", b"a".to_vec(), ttl).await.expect(name));
    assert!(!s.put_if_absent("k", b"b".to_vec(), ttl).await.expect(name));
    assert_eq!(s.get("k").await.expect(name), Some(b"a".to_vec()));
    assert!(
        !s.compare_and_swap("k", b"x", b"c".to_vec(), None)
            .await
            .expect(name)
    );
    assert!(
        s.compare_and_swap("k", b"a", b"c".to_vec(), ttl)
            .await
            .expect(name)
    );
    s.put("k2", b"z".to_vec(), None).await.expect(name);
    assert_eq!(s.keys("k").await.expect(name), vec!["k", "k2"]);
    // another store's keys (another prefix, another database) stay out
    other.put("k3", b"q".to_vec(), None).await.expect(name);
    assert_eq!(s.keys("").await.expect(name), vec!["k", "k2"], "{name}");
    eventually(Duration::from_secs(5), "the key to expire", || async {
        s.get("k").await.expect(name).is_none().then_some(())
    })
    .await;
    assert!(
        s.put_if_absent("k", b"again".to_vec(), None)
            .await
            .expect(name),
        "expired is absent"
    );
    assert!(s.delete("k2").await.expect(name));
    assert!(!s.delete("k2").await.expect(name));

    let old = s.incr("fence").await.expect(name);
    assert!(
        s.put_fenced("rec", b"v1".to_vec(), "fence", old)
            .await
            .expect(name)
    );
    let new = s.incr("fence").await.expect(name);
    assert_eq!(new, old + 1);
    assert!(
        !s.put_fenced("rec", b"stale".to_vec(), "fence", old)
            .await
            .expect(name),
        "{name}: a superseded token cannot write"
    );
    assert!(
        s.put_fenced("rec", b"v2".to_vec(), "fence", new)
            .await
            .expect(name)
    );
    assert_eq!(s.get("rec").await.expect(name), Some(b"v2".to_vec()));
}

#[tokio::test]
async fn the_redis_store_keeps_the_state_store_contract() {
    let url = backend("TAI_TEST_REDIS_URL");
    // glob characters in the prefix match only themselves
    let prefix = format!("{}*[?]:", unique("store"));
    let s = RedisStore::connect(&url, &prefix).await.expect("connect");
    let other = RedisStore::connect(&url, &format!("{}x:", unique("store")))
        .await
        .expect("connect");
    store_contract(&s, &other).await;
}

async fn sql_store(url: &str) -> SqlStore {
    let db = Database::connect(url, 4).await.expect("connect");
    db.migrate_core().await.expect("schema");
    SqlStore::new(db, tai_core::clock::system())
}

#[tokio::test]
async fn the_sql_store_keeps_the_state_store_contract_on_postgres_and_a_sqlite_file() {
    let (pg, pg_other) = (
        tai_blackbox::postgres_database(),
        tai_blackbox::postgres_database(),
    );
    let s = sql_store(&pg).await;
    assert_eq!(s.backend(), "postgres");
    store_contract(&s, &sql_store(&pg_other).await).await;
    let dir = tai_blackbox::log_dir().join(unique("sqlite-contract"));
    let s = sql_store(&format!("sqlite://{}/a.db", dir.display())).await;
    assert_eq!(s.backend(), "sqlite");
    store_contract(
        &s,
        &sql_store(&format!("sqlite://{}/b.db", dir.display())).await,
    )
    .await;
}

#[tokio::test]
async fn a_redis_that_does_not_answer_is_a_clear_error_not_a_hang() {
    let port = tai_blackbox::free_port();
    let err = RedisStore::connect(&format!("redis://127.0.0.1:{port}"), "x:")
        .await
        .expect_err("nothing listens there");
    assert_eq!(err.backend(), "redis");
}

#[tokio::test]
async fn redis_gcra_admits_exactly_the_burst_then_one_per_interval() {
    use tai_core::heijunka::{Quota, RateLimiter, RedisGcra};
    let url = backend("TAI_TEST_REDIS_URL");
    let store = RedisStore::connect(&url, &format!("{}:", unique("gcra")))
        .await
        .expect("connect");
    let limiter = RedisGcra::new(
        store.connection(),
        store.prefix(),
        Quota {
            burst: 3,
            interval: Duration::from_secs(2),
        },
    );
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let d = limiter.check("merchant").await.expect("redis");
        assert!(d.allowed);
        remaining.push(d.remaining);
    }
    assert_eq!(remaining, vec![2, 1, 0]);
    let refused = limiter.check("merchant").await.expect("redis");
    assert!(!refused.allowed);
    let wait = refused.retry_after.expect("retry after");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(2),
        "{wait:?}"
    );
    assert!(
        limiter
            .check("other-merchant")
            .await
            .expect("redis")
            .allowed,
        "keys have their own budget"
    );
    tokio::time::sleep(wait).await; // the limiter's own answer says when: waiting for it is the behaviour under test
    assert!(
        limiter.check("merchant").await.expect("redis").allowed,
        "one more after the interval"
    );
    assert!(
        !limiter.check("merchant").await.expect("redis").allowed,
        "and only one"
    );
}

#[tokio::test]
async fn redis_window_counts_exactly_under_16_concurrent_tasks() {
    use tai_core::heijunka::{RedisWindowCounter, WindowCounter};
    let url = backend("TAI_TEST_REDIS_URL");
    let store = RedisStore::connect(&url, &format!("{}:", unique("window")))
        .await
        .expect("connect");
    let counter = std::sync::Arc::new(RedisWindowCounter::new(
        store.connection(),
        store.prefix(),
        Duration::from_secs(60),
        5,
    ));
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let c = counter.clone();
            tokio::spawn(async move {
                let mut allowed = 0;
                for _ in 0..50 {
                    if c.hit("cust").await.expect("redis").allowed {
                        allowed += 1;
                    }
                }
                allowed
            })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        allowed += t.await.expect("task");
    }
    assert_eq!(allowed, 5);
    let last = counter.hit("cust").await.expect("redis");
    assert_eq!(last.count, 801);
    let retry = last.retry_after.expect("over the limit");
    assert!(
        retry > Duration::from_secs(50) && retry <= Duration::from_secs(60),
        "{retry:?}"
    );
}

#[tokio::test]
async fn when_redis_dies_payments_get_a_clear_503_and_recover_when_it_returns() {
    use serde_json::{Value, json};
    use tai_blackbox::{OwnRedis, Proc, client};
    let port = tai_blackbox::free_port();
    let mut redis = OwnRedis::start(port).await;
    let url = redis.url();
    let http = client();
    let svc = Proc::start("payment-system", &[("REDIS_URL", url.as_str())])
        .await
        .expect("start");
    assert_eq!(
        http.get(svc.url("/ready"))
            .send()
            .await
            .expect("ready")
            .status(),
        200
    );
    let body =
        json!({"amount": "3.00", "currency": "USD", "customer_id": "cust_r", "merchant_id": "m"});
    assert_eq!(
        http.post(svc.url("/payment"))
            .json(&body)
            .send()
            .await
            .expect("pay")
            .status(),
        200
    );

    redis.kill();
    let r = http.get(svc.url("/ready")).send().await.expect("ready");
    assert_eq!(r.status(), 503);
    let ready: Value = r.json().await.expect("json");
    assert!(
        ready["error"]["message"]
            .as_str()
            .expect("m")
            .contains("redis"),
        "{ready}"
    );
    let r = http
        .post(svc.url("/payment"))
        .json(&body)
        .send()
        .await
        .expect("pay");
    assert_eq!(
        r.status(),
        503,
        "a dependency down is a 503, never a hang or a 500"
    );
    assert!(r.headers().contains_key("retry-after"));
    let err: Value = r.json().await.expect("json");
    assert!(
        err["error"]["message"]
            .as_str()
            .expect("m")
            .contains("redis"),
        "{err}"
    );
    assert_eq!(
        http.get(svc.url("/health"))
            .send()
            .await
            .expect("health")
            .status(),
        200,
        "alive, just not ready"
    );

    let _back = OwnRedis::start(port).await;
    eventually(
        Duration::from_secs(20),
        "the service to reconnect",
        || async {
            let r = http
                .post(svc.url("/payment"))
                .json(&body)
                .send()
                .await
                .ok()?;
            (r.status() == 200).then_some(())
        },
    )
    .await;
    assert_eq!(
        http.get(svc.url("/ready"))
            .send()
            .await
            .expect("ready")
            .status(),
        200
    );
}
