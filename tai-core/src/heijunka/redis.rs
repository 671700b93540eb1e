//! Heijunka in Redis: the same GCRA and sliding window as in memory, shared by every replica.
//!
//! Each check is one Lua script, so read-decide-write is atomic, and time is Redis's own clock
//! (`TIME`), so replicas whose clocks disagree still share one timeline.

use std::time::Duration;

use redis::aio::ConnectionManager;

use super::{Quota, RateDecision, RateLimiter, WindowCounter, WindowDecision};
use crate::backend::{BackendError, BoxFuture};

fn unavailable(e: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable {
        backend: "redis",
        message: e.to_string(),
    }
}

async fn eval<T: redis::FromRedisValue>(
    conn: &ConnectionManager,
    cmd: redis::Cmd,
) -> Result<T, BackendError> {
    let mut conn = conn.clone();
    tokio::time::timeout(Duration::from_secs(2), cmd.query_async::<T>(&mut conn))
        .await
        .map_err(|_| unavailable("no answer within 2 s"))?
        .map_err(unavailable)
}

/// GCRA: the key holds the theoretical arrival time (µs); a request is allowed when it would
/// not arrive earlier than `burst` intervals ahead of it.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local tolerance = interval * burst
if new_tat - tolerance > now then
  return {0, 0, string.format('%.0f', new_tat - tolerance - now), string.format('%.0f', tat - now)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
local remaining = math.floor((tolerance - (new_tat - now)) / interval)
return {1, remaining, '0', string.format('%.0f', new_tat - now)}
";

/// A keyed GCRA limiter in Redis.
#[derive(Clone)]
pub struct RedisGcra {
    conn: ConnectionManager,
    prefix: String,
    quota: Quota,
}

impl std::fmt::Debug for RedisGcra {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisGcra")
            .field("prefix", &self.prefix)
            .field("quota", &self.quota)
            .finish_non_exhaustive()
    }
}

impl RedisGcra {
    /// Keys are `prefix` + the caller's key.
    pub fn new(conn: ConnectionManager, prefix: &str, quota: Quota) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
            quota: Quota {
                burst: quota.burst.max(1),
                interval: quota.interval.max(Duration::from_micros(1)),
            },
        }
    }
}

impl RateLimiter for RedisGcra {
    fn check<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<RateDecision, BackendError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("EVAL");
            let interval_us = u64::try_from(self.quota.interval.as_micros()).unwrap_or(u64::MAX);
            cmd.arg(GCRA)
                .arg(1)
                .arg(format!("{}{key}", self.prefix))
                .arg(interval_us)
                .arg(self.quota.burst);
            let (allowed, remaining, retry_us, reset_us): (i64, i64, String, String) =
                eval(&self.conn, cmd).await?;
            let us = |s: &str| Duration::from_micros(s.parse::<u64>().unwrap_or(0));
            Ok(RateDecision {
                allowed: allowed == 1,
                limit: self.quota.burst,
                remaining: u32::try_from(remaining.max(0)).unwrap_or(0),
                retry_after: (allowed != 1).then(|| us(&retry_us)),
                reset_after: us(&reset_us),
            })
        })
    }
    fn quota(&self) -> Quota {
        self.quota
    }
}

/// Sliding window: a sorted set of event times (µs); events at or before `now - window` leave.
const WINDOW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local window = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now - window))
redis.call('ZADD', KEYS[1], string.format('%.0f', now), string.format('%.0f', now) .. ':' .. ARGV[3])
local count = redis.call('ZCARD', KEYS[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000) + 1)
local retry = '0'
if count > limit then
  local e = redis.call('ZRANGE', KEYS[1], count - limit - 1, count - limit - 1, 'WITHSCORES')
  retry = string.format('%.0f', tonumber(e[2]) + window - now)
end
return {count, retry}
";

/// A keyed exact sliding-window counter in Redis.
#[derive(Clone)]
pub struct RedisWindowCounter {
    conn: ConnectionManager,
    prefix: String,
    window: Duration,
    limit: u64,
}

impl std::fmt::Debug for RedisWindowCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisWindowCounter")
            .field("prefix", &self.prefix)
            .field("window", &self.window)
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl RedisWindowCounter {
    /// Counts events over `window`, allowing `limit`; keys are `prefix` + the caller's key.
    pub fn new(conn: ConnectionManager, prefix: &str, window: Duration, limit: u64) -> Self {
        Self {
            conn,
            prefix: prefix.to_owned(),
            window,
            limit,
        }
    }
}

impl WindowCounter for RedisWindowCounter {
    fn hit<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<WindowDecision, BackendError>> {
        Box::pin(async move {
            let mut cmd = redis::cmd("EVAL");
            let window_us = u64::try_from(self.window.as_micros()).unwrap_or(u64::MAX);
            // a random tag keeps two events in the same microsecond apart
            cmd.arg(WINDOW)
                .arg(1)
                .arg(format!("{}{key}", self.prefix))
                .arg(window_us)
                .arg(self.limit)
                .arg(rand::random::<u64>());
            let (count, retry_us): (u64, String) = eval(&self.conn, cmd).await?;
            let allowed = count <= self.limit;
            Ok(WindowDecision {
                count,
                allowed,
                remaining: self.limit.saturating_sub(count),
                retry_after: (!allowed)
                    .then(|| Duration::from_micros(retry_us.parse::<u64>().unwrap_or(0))),
            })
        })
    }
    fn window(&self) -> Duration {
        self.window
    }
    fn limit(&self) -> u64 {
        self.limit
    }
}
