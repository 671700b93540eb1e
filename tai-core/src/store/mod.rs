//! State: where records, idempotency keys and leases live.
//!
//! The Action side stores what it did (a payment record, a rollout's state) through a
//! [`StateStore`]. Values are bytes (services store JSON); keys may expire. The operations are the
//! ones that stay atomic on Redis too: a plain write, a write only if absent (idempotency keys,
//! leases), and a compare-and-swap (state transitions under a fencing token).
//! [`MemoryStore`] is the embedded default, on the injectable clock; [`RedisStore`] keeps the
//! same contract in Redis, atomically, so every replica shares one state.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

mod redis;
mod sql;

pub use self::redis::RedisStore;
pub use self::sql::SqlStore;

use crate::backend::{BackendError, BoxFuture};
use crate::clock::SharedClock;

/// Stores `value` as JSON under `key` (expiring after `ttl`, if given).
pub async fn put_json<T: serde::Serialize + ?Sized>(
    store: &dyn StateStore,
    key: &str,
    value: &T,
    ttl: Option<Duration>,
) -> Result<(), BackendError> {
    let bytes = serde_json::to_vec(value).map_err(|e| BackendError::Protocol {
        backend: "state",
        message: format!("cannot encode {key}: {e}"),
    })?;
    store.put(key, bytes, ttl).await
}

/// Reads the JSON value under `key`: `None` when there is none, an error naming the key when
/// what is there does not read as a `T`.
pub async fn get_json<T: serde::de::DeserializeOwned>(
    store: &dyn StateStore,
    key: &str,
) -> Result<Option<T>, BackendError> {
    let Some(bytes) = store.get(key).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| BackendError::Protocol {
            backend: "state",
            message: format!("{key} does not read: {e}"),
        })
}

/// A key-value store with expiry.
pub trait StateStore: Send + Sync + std::fmt::Debug {
    /// The backend's name for `/status`: `memory` or `redis`.
    fn backend(&self) -> &'static str;
    /// Reads a key.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, BackendError>>;
    /// Reads several keys, answering their values in the same order; one round trip where the
    /// backend allows (Redis `MGET`, one SQL `SELECT`), one `get` after another otherwise.
    fn get_many<'a>(
        &'a self,
        keys: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Vec<Option<Vec<u8>>>, BackendError>> {
        Box::pin(async move {
            let mut values = Vec::with_capacity(keys.len());
            for key in keys {
                values.push(self.get(key).await?);
            }
            Ok(values)
        })
    }
    /// Writes a key, replacing what was there; `ttl` of `None` keeps it forever.
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), BackendError>>;
    /// Writes a key only if it is absent; answers whether it wrote.
    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, BackendError>>;
    /// Replaces the value only if it is currently `expected`; answers whether it wrote.
    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: &'a [u8],
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, BackendError>>;
    /// Removes a key; answers whether it existed.
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, BackendError>>;
    /// Keys starting with `prefix`, sorted.
    fn keys<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, BackendError>>;
    /// Adds one to the integer at `key` (absent counts as 0) and returns the new value.
    fn incr<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64, BackendError>>;
    /// Writes `key` only while `fence_key` holds `token`, atomically: a writer whose fencing
    /// token was superseded (a newer leader took over) cannot overwrite what the new one wrote.
    fn put_fenced<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        fence_key: &'a str,
        token: u64,
    ) -> BoxFuture<'a, Result<bool, BackendError>>;
    /// Answers whether the backend is reachable (`/ready`).
    fn ping(&self) -> BoxFuture<'_, Result<(), BackendError>>;
}

/// A value and when it expires.
type Entry = (Vec<u8>, Option<Instant>);

/// The in-memory store.
#[derive(Debug)]
pub struct MemoryStore {
    clock: SharedClock,
    map: Mutex<BTreeMap<String, Entry>>,
    /// Writes until the next sweep of expired keys (amortised: a sweep per as many writes as
    /// there are keys).
    writes_to_sweep: std::sync::atomic::AtomicUsize,
}

impl MemoryStore {
    /// An empty store.
    pub fn new(clock: SharedClock) -> Self {
        Self {
            clock,
            map: Mutex::new(BTreeMap::new()),
            writes_to_sweep: std::sync::atomic::AtomicUsize::new(10_000),
        }
    }

    fn with_map<R>(&self, f: impl FnOnce(&mut BTreeMap<String, Entry>, Instant) -> R) -> R {
        let now = self.clock.now();
        let mut map = self
            .map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if self
            .writes_to_sweep
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed)
            <= 1
        {
            // forget expired keys now and then, so keys with a TTL do not pile up
            map.retain(|_, (_, exp)| exp.is_none_or(|e| e > now));
            self.writes_to_sweep
                .store(map.len().max(10_000), std::sync::atomic::Ordering::Relaxed);
        }
        f(&mut map, now)
    }

    fn live(entry: Option<&Entry>, now: Instant) -> Option<&Vec<u8>> {
        match entry {
            Some((v, None)) => Some(v),
            Some((v, Some(exp))) if *exp > now => Some(v),
            _ => None,
        }
    }
}

fn ready<'a, T: Send + 'a>(v: T) -> BoxFuture<'a, T> {
    Box::pin(std::future::ready(v))
}

impl StateStore for MemoryStore {
    fn backend(&self) -> &'static str {
        "memory"
    }
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, BackendError>> {
        ready(Ok(
            self.with_map(|m, now| Self::live(m.get(key), now).cloned())
        ))
    }
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        self.with_map(|m, now| m.insert(key.to_owned(), (value, ttl.map(|t| now + t))));
        ready(Ok(()))
    }
    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, BackendError>> {
        ready(Ok(self.with_map(|m, now| {
            if Self::live(m.get(key), now).is_some() {
                return false;
            }
            m.insert(key.to_owned(), (value, ttl.map(|t| now + t)));
            true
        })))
    }
    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: &'a [u8],
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, BackendError>> {
        ready(Ok(self.with_map(|m, now| {
            if Self::live(m.get(key), now).map(Vec::as_slice) != Some(expected) {
                return false;
            }
            m.insert(key.to_owned(), (value, ttl.map(|t| now + t)));
            true
        })))
    }
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, BackendError>> {
        ready(Ok(self.with_map(|m, now| {
            let existed = Self::live(m.get(key), now).is_some();
            m.remove(key);
            existed
        })))
    }
    fn keys<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, BackendError>> {
        ready(Ok(self.with_map(|m, now| {
            m.range(prefix.to_owned()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .filter(|(_, v)| match v.1 {
                    Some(exp) => exp > now,
                    None => true,
                })
                .map(|(k, _)| k.clone())
                .collect()
        })))
    }
    fn incr<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64, BackendError>> {
        ready(self.with_map(|m, now| {
            let current = match Self::live(m.get(key), now) {
                Some(v) => std::str::from_utf8(v)
                    .ok()
                    .and_then(|t| t.parse::<u64>().ok())
                    .ok_or_else(|| BackendError::Protocol {
                        backend: "memory",
                        message: format!("{key} does not hold an integer"),
                    })?,
                None => 0,
            };
            let next = current + 1;
            m.insert(key.to_owned(), (next.to_string().into_bytes(), None));
            Ok(next)
        }))
    }
    fn put_fenced<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        fence_key: &'a str,
        token: u64,
    ) -> BoxFuture<'a, Result<bool, BackendError>> {
        ready(Ok(self.with_map(|m, now| {
            let current = Self::live(m.get(fence_key), now).cloned();
            if current.as_deref() != Some(token.to_string().as_bytes()) {
                return false;
            }
            m.insert(key.to_owned(), (value, None));
            true
        })))
    }
    fn ping(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    #[tokio::test]
    async fn put_if_absent_cas_and_expiry() {
        let clock = ManualClock::new();
        let s = MemoryStore::new(clock.shared());
        let ttl = Some(Duration::from_secs(10));
        assert!(s.put_if_absent("k", b"a".to_vec(), ttl).await.expect("mem"));
        assert!(!s.put_if_absent("k", b"b".to_vec(), ttl).await.expect("mem"));
        assert_eq!(s.get("k").await.expect("mem"), Some(b"a".to_vec()));
        assert!(
            !s.compare_and_swap("k", b"x", b"c".to_vec(), ttl)
                .await
                .expect("mem")
        );
        assert!(
            s.compare_and_swap("k", b"a", b"c".to_vec(), ttl)
                .await
                .expect("mem")
        );
        assert_eq!(s.get("k").await.expect("mem"), Some(b"c".to_vec()));
        s.put("k2", b"z".to_vec(), None).await.expect("mem");
        assert_eq!(s.keys("k").await.expect("mem"), vec!["k", "k2"]);
        clock.advance(Duration::from_secs(10));
        assert_eq!(s.get("k").await.expect("mem"), None, "expired");
        assert!(
            s.put_if_absent("k", b"d".to_vec(), None)
                .await
                .expect("mem")
        );
        assert!(s.delete("k2").await.expect("mem"));
        assert!(!s.delete("k2").await.expect("mem"));
    }

    #[tokio::test]
    async fn json_values_round_trip_and_an_unreadable_one_is_an_error_naming_its_key() {
        let s = MemoryStore::new(ManualClock::new().shared());
        let value = BTreeMap::from([("a".to_owned(), 1u32)]);
        put_json(&s, "j", &value, None).await.expect("put");
        let back: Option<BTreeMap<String, u32>> = get_json(&s, "j").await.expect("get");
        assert_eq!(back, Some(value));
        let none: Option<u32> = get_json(&s, "absent").await.expect("get");
        assert_eq!(none, None);
        s.put("bad", b"not json".to_vec(), None).await.expect("put");
        let e = get_json::<u32>(&s, "bad").await.expect_err("unreadable");
        assert!(e.to_string().contains("bad does not read"), "{e}");
    }

    #[tokio::test]
    async fn a_superseded_fencing_token_cannot_write() {
        let s = MemoryStore::new(ManualClock::new().shared());
        let old = s.incr("fence").await.expect("mem");
        assert!(
            s.put_fenced("rec", b"v1".to_vec(), "fence", old)
                .await
                .expect("mem")
        );
        let new = s.incr("fence").await.expect("mem");
        assert_eq!((old, new), (1, 2));
        assert!(
            !s.put_fenced("rec", b"stale".to_vec(), "fence", old)
                .await
                .expect("mem")
        );
        assert!(
            s.put_fenced("rec", b"v2".to_vec(), "fence", new)
                .await
                .expect("mem")
        );
        assert_eq!(s.get("rec").await.expect("mem"), Some(b"v2".to_vec()));
    }
}
