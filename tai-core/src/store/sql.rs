//! The state store in the system of record (`tai_kv`): what a service keeps must survive a
//! restart, so the embedded default is a SQLite file and replicas share PostgreSQL.
//!
//! Same contract as the memory and Redis stores. Each operation is one statement (atomic in
//! both engines), except a fenced write, which reads the fence under a share lock and writes in
//! one transaction, so a deposed leader's write cannot slip in after a newer token was issued.
//! Expired keys read as absent and are deleted by [`SqlStore::sweep`].

use std::time::Duration;

use sqlx::Row;

use super::StateStore;
use crate::backend::{BackendError, BoxFuture};
use crate::clock::SharedClock;
use crate::db::{Database, Dialect, db_error};

/// A [`StateStore`] over a [`Database`].
#[derive(Debug, Clone)]
pub struct SqlStore {
    db: Database,
    clock: SharedClock,
}

const UPSERT: &str = "INSERT INTO tai_kv (key, value, num, version, expires_at) VALUES ($1, $2, NULL, 1, $3) \
     ON CONFLICT (key) DO UPDATE SET value = excluded.value, num = NULL, \
     version = tai_kv.version + 1, expires_at = excluded.expires_at";

impl SqlStore {
    /// A store in `db`'s `tai_kv` table (created by [`Database::migrate_core`]).
    pub fn new(db: Database, clock: SharedClock) -> Self {
        Self { db, clock }
    }

    fn now(&self) -> i64 {
        self.clock.wall().timestamp_millis()
    }

    fn expiry(&self, ttl: Option<Duration>) -> Option<i64> {
        ttl.map(|t| self.now() + i64::try_from(t.as_millis()).unwrap_or(i64::MAX / 2))
    }

    /// Deletes expired keys; answers how many went.
    pub async fn sweep(&self) -> Result<u64, BackendError> {
        sqlx::query("DELETE FROM tai_kv WHERE expires_at IS NOT NULL AND expires_at <= $1")
            .bind(self.now())
            .execute(self.db.pool())
            .await
            .map(|r| r.rows_affected())
            .map_err(db_error)
    }

    /// Sweeps expired keys every `every` until `shutdown` turns true.
    pub async fn sweep_every(
        self,
        every: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.changed() => return,
            }
            match self.sweep().await {
                Ok(0) => {}
                Ok(n) => tracing::debug!(keys = n, "expired keys swept"),
                Err(e) => tracing::warn!(error = %e, "could not sweep expired keys"),
            }
        }
    }
}

/// The smallest string greater than every string starting with `prefix` (keys never hold
/// U+10FFFF), so a prefix scan is an index range in both engines.
fn prefix_end(prefix: &str) -> String {
    format!("{prefix}\u{10FFFF}")
}

impl StateStore for SqlStore {
    fn backend(&self) -> &'static str {
        self.db.dialect().as_str()
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Vec<u8>>, BackendError>> {
        Box::pin(async move {
            let row = sqlx::query(
                "SELECT value, num FROM tai_kv WHERE key = $1 AND (expires_at IS NULL OR expires_at > $2)",
            )
            .bind(key)
            .bind(self.now())
            .fetch_optional(self.db.readers())
            .await
            .map_err(db_error)?;
            let Some(row) = row else { return Ok(None) };
            let value: Option<Vec<u8>> = row.try_get(0).map_err(db_error)?;
            let num: Option<i64> = row.try_get(1).map_err(db_error)?;
            Ok(value.or_else(|| num.map(|n| n.to_string().into_bytes())))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            sqlx::query(UPSERT)
                .bind(key)
                .bind(value)
                .bind(self.expiry(ttl))
                .execute(self.db.pool())
                .await
                .map(|_| ())
                .map_err(db_error)
        })
    }

    fn put_if_absent<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<bool, BackendError>> {
        Box::pin(async move {
            // an expired key counts as absent: the conflicting row is replaced only then
            let sql =
                format!("{UPSERT} WHERE tai_kv.expires_at IS NOT NULL AND tai_kv.expires_at <= $4");
            sqlx::query(&sql)
                .bind(key)
                .bind(value)
                .bind(self.expiry(ttl))
                .bind(self.now())
                .execute(self.db.pool())
                .await
                .map(|r| r.rows_affected() == 1)
                .map_err(db_error)
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
            sqlx::query(
                "UPDATE tai_kv SET value = $1, num = NULL, version = version + 1, expires_at = $2 \
                 WHERE key = $3 AND value = $4 AND (expires_at IS NULL OR expires_at > $5)",
            )
            .bind(value)
            .bind(self.expiry(ttl))
            .bind(key)
            .bind(expected.to_vec())
            .bind(self.now())
            .execute(self.db.pool())
            .await
            .map(|r| r.rows_affected() == 1)
            .map_err(db_error)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<bool, BackendError>> {
        Box::pin(async move {
            let row = sqlx::query("DELETE FROM tai_kv WHERE key = $1 RETURNING expires_at")
                .bind(key)
                .fetch_optional(self.db.pool())
                .await
                .map_err(db_error)?;
            let Some(row) = row else { return Ok(false) };
            let expires: Option<i64> = row.try_get(0).map_err(db_error)?;
            Ok(expires.is_none_or(|e| e > self.now()))
        })
    }

    fn keys<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, BackendError>> {
        Box::pin(async move {
            let rows = sqlx::query(
                "SELECT key FROM tai_kv WHERE key >= $1 AND key < $2 \
                 AND (expires_at IS NULL OR expires_at > $3)",
            )
            .bind(prefix)
            .bind(prefix_end(prefix))
            .bind(self.now())
            .fetch_all(self.db.pool())
            .await
            .map_err(db_error)?;
            let mut keys = Vec::with_capacity(rows.len());
            for row in rows {
                let k: String = row.try_get(0).map_err(db_error)?;
                if k.starts_with(prefix) {
                    keys.push(k);
                }
            }
            keys.sort();
            Ok(keys)
        })
    }

    fn incr<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<u64, BackendError>> {
        Box::pin(async move {
            let now = self.now();
            let row = sqlx::query(
                "INSERT INTO tai_kv (key, value, num, version, expires_at) VALUES ($1, NULL, 1, 1, NULL) \
                 ON CONFLICT (key) DO UPDATE SET \
                   num = CASE WHEN tai_kv.expires_at IS NOT NULL AND tai_kv.expires_at <= $2 THEN 1 ELSE tai_kv.num + 1 END, \
                   value = NULL, version = tai_kv.version + 1, expires_at = NULL \
                 WHERE tai_kv.num IS NOT NULL OR (tai_kv.expires_at IS NOT NULL AND tai_kv.expires_at <= $2) \
                 RETURNING num",
            )
            .bind(key)
            .bind(now)
            .fetch_optional(self.db.pool())
            .await
            .map_err(db_error)?;
            let num: Option<i64> = match row {
                Some(r) => r.try_get(0).map_err(db_error)?,
                None => None,
            };
            num.and_then(|n| u64::try_from(n).ok())
                .ok_or_else(|| BackendError::Protocol {
                    backend: "database",
                    message: format!("{key} does not hold an integer"),
                })
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
            let mut tx = self.db.pool().begin().await.map_err(db_error)?;
            // PostgreSQL: the share lock makes a concurrent increment of the fence wait for
            // this write, so no write lands after a newer token exists. SQLite has one writer.
            let read = match self.db.dialect() {
                Dialect::Postgres => {
                    "SELECT value, num FROM tai_kv WHERE key = $1 AND (expires_at IS NULL OR expires_at > $2) FOR SHARE"
                }
                Dialect::Sqlite => {
                    "SELECT value, num FROM tai_kv WHERE key = $1 AND (expires_at IS NULL OR expires_at > $2)"
                }
            };
            let row = sqlx::query(read)
                .bind(fence_key)
                .bind(self.now())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?;
            let current = match row {
                None => None,
                Some(r) => {
                    let value: Option<Vec<u8>> = r.try_get(0).map_err(db_error)?;
                    let num: Option<i64> = r.try_get(1).map_err(db_error)?;
                    value.or_else(|| num.map(|n| n.to_string().into_bytes()))
                }
            };
            if current.as_deref() != Some(token.to_string().as_bytes()) {
                tx.rollback().await.map_err(db_error)?;
                return Ok(false);
            }
            sqlx::query(UPSERT)
                .bind(key)
                .bind(value)
                .bind(None::<i64>)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            tx.commit().await.map_err(db_error)?;
            Ok(true)
        })
    }

    fn ping(&self) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(self.db.ping())
    }
}
