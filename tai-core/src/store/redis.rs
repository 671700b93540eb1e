//! The state store in Redis: the same contract as memory, atomic across replicas.
//!
//! Keys carry a prefix (one per deployment of the service, or per test), values are stored as
//! given, expiry is Redis's own (`PX`). `put_if_absent` is `SET NX`; compare-and-swap is one Lua
//! script, so no other client can slip in between the read and the write. Every call is bounded
//! by a timeout, so a Redis that stops answering fails requests with a clear 503 instead of
//! hanging them.

use std::time::Duration;

use redis::aio::ConnectionManager;

use super::StateStore;
use crate::backend::{BackendError, BoxFuture};

/// A Redis-backed [`StateStore`].
#[derive(Clone)]
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable {
        backend: "redis",
        message: e.to_string(),
    }
}

const CAS: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  if tonumber(ARGV[3]) > 0 then
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  else
    redis.call('SET', KEYS[1], ARGV[2])
  end
  return 1
end
return 0
";

const FENCED: &str = r"
if redis.call('GET', KEYS[2]) == ARGV[2] then
  redis.call('SET', KEYS[1], ARGV[1])
  return 1
end
return 0
";

/// Escapes glob characters so a prefix matches only itself in `SCAN MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl RedisStore {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379/0`); every key gets `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, BackendError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let conn = tokio::time::timeout(Duration::from_secs(5), client.get_connection_manager())
            .await
            .map_err(|_| unavailable("connecting timed out after 5 s"))?
            .map_err(unavailable)?;
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
            timeout: Duration::from_secs(2),
        })
    }

    /// The connection, for other Redis-backed parts sharing it.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn k(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    async fn run<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, BackendError> {
        let mut conn = self.conn.clone();
        tokio::time::timeout(self.timeout, cmd.query_async::<T>(&mut conn))
            .await
            .map_err(|_| unavailable(format!("no answer within {:?}", self.timeout)))?
            .map_err(unavailable)
    }
}

fn ttl_ms(ttl: Option<Duration>) -> Option<u64> {
    ttl.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1))
}

impl StateStore for RedisStore {
    fn backend(&self) -> &'static str {
        "redis"
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, BackendError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("GET");
            cmd.arg(self.k(key));
            self.run(cmd).await
        })
    }

    fn get_many<'a>(
        &'a self,
        keys: &'a [&'a str],
    ) -> BoxFuture<'a, Result<Vec<Option<Vec<u8>>>, BackendError>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let mut cmd = redis::cmd("MGET");
            for key in keys {
                cmd.arg(self.k(key));
            }
            self.run(cmd).await
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("SET");
            cmd.arg(self.k(key)).arg(value);
            if let Some(ms) = ttl_ms(ttl) {
                cmd.arg("PX").arg(ms);
            }
            self.run::<()>(cmd).await
        })
    }

    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, BackendError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("SET");
            cmd.arg(self.k(key)).arg(value).arg("NX");
            if let Some(ms) = ttl_ms(ttl) {
                cmd.arg("PX").arg(ms);
            }
            let answer: Option<String> = self.run(cmd).await?;
            Ok(answer.is_some())
        })
    }

    fn compare_and_swap<'a>(
        &'a self,
        key: &'a str,
        expected: &'a [u8],
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, BackendError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(CAS)
                .arg(1)
                .arg(self.k(key))
                .arg(expected)
                .arg(value)
                .arg(ttl_ms(ttl).unwrap_or(0));
            let swapped: i64 = self.run(cmd).await?;
            Ok(swapped == 1)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, BackendError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("DEL");
            cmd.arg(self.k(key));
            let n: i64 = self.run(cmd).await?;
            Ok(n > 0)
        })
    }

    fn keys<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, BackendError>> {
        Box::pin(async move {
            let pattern = format!("{}*", glob_escape(&self.k(prefix)));
            let mut cursor: u64 = 0;
            let mut out = Vec::new();
            loop {
                let mut cmd = redis::cmd("SCAN");
                cmd.arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000);
                let (next, batch): (u64, Vec<String>) = self.run(cmd).await?;
                out.extend(
                    batch
                        .into_iter()
                        .filter_map(|k| k.strip_prefix(&self.prefix).map(str::to_owned)),
                );
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            out.sort();
            out.dedup();
            Ok(out)
        })
    }

    fn incr<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64, BackendError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("INCR");
            cmd.arg(self.k(key));
            self.run(cmd).await
        })
    }

    fn put_fenced<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        fence_key: &'a str,
        token: u64,
    ) -> BoxFuture<'a, Result<bool, BackendError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(FENCED)
                .arg(2)
                .arg(self.k(key))
                .arg(self.k(fence_key))
                .arg(value)
                .arg(token);
            let written: i64 = self.run(cmd).await?;
            Ok(written == 1)
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            let answer: String = self.run(redis::cmd("PING")).await?;
            if answer == "PONG" {
                Ok(())
            } else {
                Err(BackendError::Protocol {
                    backend: "redis",
                    message: answer,
                })
            }
        })
    }
}
