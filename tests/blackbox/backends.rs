//! tai-core's backend contracts, each run against every implementation (real Redis, PostgreSQL
//! and SQLite): state store, rate limiter, window counter (the queues: `queues.rs`).

use std::sync::Arc;
use std::time::Duration;

use tai_blackbox::{backend, eventually, unique};
use tai_core::db::Database;
use tai_core::heijunka::{
    GcraLimiter, MemoryWindowCounter, Quota, RateLimiter, RedisGcra, RedisWindowCounter,
    WindowCounter,
};
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

    // puts at once (the SQL store writes them in groups): all kept; of two to one key, the
    // one sent later (each send completes at its first poll, in this order)
    let mut puts: Vec<(String, Vec<u8>)> = (0..50)
        .map(|i| (format!("many{i}"), format!("v{i}").into_bytes()))
        .collect();
    puts.insert(10, ("dup".into(), b"first".to_vec()));
    puts.insert(30, ("dup".into(), b"second".to_vec()));
    let answers = futures_util::future::join_all(
        puts.iter()
            .map(|(k, v)| s.put(k, v.clone(), Some(Duration::from_secs(60)))),
    )
    .await;
    assert!(answers.iter().all(Result::is_ok), "{name}: {answers:?}");
    for i in 0..50 {
        assert_eq!(
            s.get(&format!("many{i}")).await.expect(name),
            Some(format!("v{i}").into_bytes()),
            "{name}"
        );
    }
    assert_eq!(
        s.get("dup").await.expect(name),
        Some(b"second".to_vec()),
        "{name}"
    );

    // several keys in one read, in the order asked, an absent or expired one as None
    s.put("brief", b"x".to_vec(), Some(Duration::from_millis(300)))
        .await
        .expect(name);
    let asked = ["many3", "absent", "dup", "many3", "brief"];
    let read = s.get_many(&asked).await.expect(name);
    let v3 = Some(b"v3".to_vec());
    let second = Some(b"second".to_vec());
    assert_eq!(
        read,
        [
            v3.clone(),
            None,
            second.clone(),
            v3.clone(),
            Some(b"x".to_vec())
        ],
        "{name}"
    );
    eventually(Duration::from_secs(5), "brief to expire", || async {
        let read = s.get_many(&asked).await.expect(name);
        (read == [v3.clone(), None, second.clone(), v3.clone(), None]).then_some(())
    })
    .await;
    assert_eq!(
        s.get_many(&[]).await.expect(name),
        Vec::<Option<Vec<u8>>>::new()
    );
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

/// The rate-limiter contract, run against every implementation: the burst, then refusals
/// saying when to retry (within one interval), keys apart, and after that wait one more and
/// only one. Real time: the Redis limiter runs on Redis's clock, and waiting for the limiter's
/// own `retry_after` is the behaviour under test.
async fn limiter_contract(limiter: &dyn RateLimiter) {
    let name = format!("{limiter:?}");
    assert_eq!(limiter.quota().burst, 3, "{name}");
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let d = limiter.check("merchant").await.expect("check");
        assert!(d.allowed, "{name}");
        assert_eq!(d.limit, 3, "{name}");
        remaining.push(d.remaining);
    }
    assert_eq!(remaining, vec![2, 1, 0], "{name}");
    let refused = limiter.check("merchant").await.expect("check");
    assert!(!refused.allowed, "{name}");
    assert_eq!(refused.remaining, 0, "{name}");
    let wait = refused.retry_after.expect("a refusal says when to retry");
    assert!(
        wait > Duration::ZERO && wait <= Duration::from_secs(1),
        "{name}: {wait:?}"
    );
    assert!(
        limiter
            .check("other-merchant")
            .await
            .expect("check")
            .allowed,
        "{name}: keys have their own budget"
    );
    tokio::time::sleep(wait).await;
    assert!(
        limiter.check("merchant").await.expect("check").allowed,
        "{name}: one more after the interval"
    );
    assert!(
        !limiter.check("merchant").await.expect("check").allowed,
        "{name}: and only one"
    );
}

/// The window-counter contract, run against every implementation: of 800 hits by 16
/// concurrent tasks exactly `limit` pass, every hit is counted, and a refusal's `retry_after`
/// is when the oldest hit leaves the window.
async fn counter_contract(counter: Arc<dyn WindowCounter>) {
    let name = format!("{counter:?}");
    assert_eq!(
        (counter.window(), counter.limit()),
        (Duration::from_secs(60), 5)
    );
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let c = counter.clone();
            tokio::spawn(async move {
                let mut allowed = 0;
                for _ in 0..50 {
                    if c.hit("cust").await.expect("hit").allowed {
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
    assert_eq!(allowed, 5, "{name}: exactly the limit passes");
    let last = counter.hit("cust").await.expect("hit");
    assert_eq!(
        (last.count, last.allowed, last.remaining),
        (801, false, 0),
        "{name}"
    );
    let retry = last.retry_after.expect("over the limit");
    assert!(
        retry > Duration::from_secs(50) && retry <= Duration::from_secs(60),
        "{name}: {retry:?}"
    );
    let other = counter.hit("other").await.expect("hit");
    assert_eq!(
        (other.count, other.allowed),
        (1, true),
        "{name}: keys apart"
    );
}

async fn redis_store(what: &str) -> RedisStore {
    RedisStore::connect(
        &backend("TAI_TEST_REDIS_URL"),
        &format!("{}:", unique(what)),
    )
    .await
    .expect("connect")
}

#[tokio::test]
async fn the_rate_limiters_keep_the_limiter_contract_in_memory_and_on_redis() {
    let quota = Quota {
        burst: 3,
        interval: Duration::from_secs(1),
    };
    limiter_contract(&GcraLimiter::new(quota, tai_core::clock::system())).await;
    let redis = redis_store("gcra").await;
    limiter_contract(&RedisGcra::new(redis.connection(), redis.prefix(), quota)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_window_counters_keep_the_counter_contract_in_memory_and_on_redis() {
    let window = Duration::from_secs(60);
    counter_contract(Arc::new(MemoryWindowCounter::new(
        window,
        5,
        tai_core::clock::system(),
    )))
    .await;
    let redis = redis_store("window").await;
    counter_contract(Arc::new(RedisWindowCounter::new(
        redis.connection(),
        redis.prefix(),
        window,
        5,
    )))
    .await;
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
