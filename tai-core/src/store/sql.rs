//! The state store in the system of record (`tai_kv`): what a service keeps must survive a
//! restart, so the embedded default is a SQLite file and replicas share PostgreSQL.
//!
//! Same contract as the memory and Redis stores. Each operation is one statement (atomic in
//! both engines), except a fenced write, which reads the fence under a share lock and writes in
//! one transaction, so a deposed leader's write cannot slip in after a newer token was issued.
//! Expired keys read as absent and are deleted by [`SqlStore::sweep`].
//!
//! Plain puts from concurrent callers are written in groups: one task takes those waiting (up
//! to 64) and writes them in one multi-row upsert, so a busy service pays one
//! statement and one commit for many keys instead of one each. A caller is answered after its
//! group is written; a failed group is written again put by put.

use std::time::Duration;

use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

use super::StateStore;
use crate::backend::{BackendError, BoxFuture};
use crate::clock::SharedClock;
use crate::db::{Database, Dialect, db_error};

/// A [`StateStore`] over a [`Database`].
#[derive(Debug, Clone)]
pub struct SqlStore {
    db: Database,
    clock: SharedClock,
    /// To the task writing puts in groups; `None` in that task and outside a Tokio runtime.
    puts: Option<mpsc::Sender<Put>>,
}

/// The most puts one group writes.
const PUT_GROUP: usize = 64;

/// A put waiting for its group.
#[derive(Debug)]
struct Put {
    key: String,
    value: Vec<u8>,
    expires_at: Option<i64>,
    done: oneshot::Sender<Result<(), BackendError>>,
}

const UPSERT: &str = "INSERT INTO tai_kv (key, value, num, version, expires_at) VALUES ($1, $2, NULL, 1, $3) \
     ON CONFLICT (key) DO UPDATE SET value = excluded.value, num = NULL, \
     version = tai_kv.version + 1, expires_at = excluded.expires_at";

impl SqlStore {
    /// A store in `db`'s `tai_kv` table (created by [`Database::migrate_core`]).
    pub fn new(db: Database, clock: SharedClock) -> Self {
        let mut store = Self {
            db,
            clock,
            puts: None,
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // ends when the last handle to the store is dropped
            let (tx, rx) = mpsc::channel(PUT_GROUP * 4);
            tokio::spawn(store.clone().write_puts(rx));
            store.puts = Some(tx);
        }
        store
    }

    async fn put_alone(
        &self,
        key: &str,
        value: Vec<u8>,
        expires_at: Option<i64>,
    ) -> Result<(), BackendError> {
        let upsert = sqlx::query(UPSERT).bind(key).bind(value).bind(expires_at);
        upsert.execute(self.db.pool()).await.map_err(db_error)?;
        Ok(())
    }

    async fn write_puts(self, mut puts: mpsc::Receiver<Put>) {
        let mut waiting = Vec::with_capacity(PUT_GROUP);
        while puts.recv_many(&mut waiting, PUT_GROUP).await > 0 {
            let group = std::mem::take(&mut waiting);
            if group.len() > 1 {
                match self.put_group(&group).await {
                    Ok(()) => {
                        for put in group {
                            let _ = put.done.send(Ok(()));
                        }
                        continue;
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, puts = group.len(), "a group of puts failed; writing them one by one")
                    }
                }
            }
            for put in group {
                let _ = put
                    .done
                    .send(self.put_alone(&put.key, put.value, put.expires_at).await);
            }
        }
    }

    /// One upsert for the group; of several puts to one key, the last one sent is kept.
    async fn put_group(&self, group: &[Put]) -> Result<(), BackendError> {
        let mut last = std::collections::HashMap::with_capacity(group.len());
        for (i, put) in group.iter().enumerate() {
            last.insert(put.key.as_str(), i);
        }
        let rows: Vec<&Put> = group
            .iter()
            .enumerate()
            .filter(|(i, put)| last.get(put.key.as_str()) == Some(i))
            .map(|(_, put)| put)
            .collect();
        let sql = format!(
            "INSERT INTO tai_kv (key, value, num, version, expires_at) VALUES {} \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value, num = NULL, \
             version = tai_kv.version + 1, expires_at = excluded.expires_at",
            crate::db::values_rows(rows.len(), 5)
        );
        let mut q = sqlx::query(&sql);
        for put in &rows {
            q = q
                .bind(put.key.as_str())
                .bind(put.value.as_slice())
                .bind(None::<i64>)
                .bind(1_i64)
                .bind(put.expires_at);
        }
        q.persistent(false)
            .execute(self.db.pool())
            .await
            .map(|_| ())
            .map_err(db_error)
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

/// A stored value from columns `at` (bytes) and `at + 1` (a counter, read as its digits).
fn stored_value(row: &sqlx::any::AnyRow, at: usize) -> Result<Option<Vec<u8>>, BackendError> {
    let value: Option<Vec<u8>> = row.try_get(at).map_err(db_error)?;
    let num: Option<i64> = row.try_get(at + 1).map_err(db_error)?;
    Ok(value.or_else(|| num.map(|n| n.to_string().into_bytes())))
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
            row.as_ref().map_or(Ok(None), |r| stored_value(r, 0))
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
            let params: Vec<String> = (2..keys.len() + 2).map(|n| format!("${n}")).collect();
            let sql = format!(
                "SELECT value, num, key FROM tai_kv WHERE key IN ({}) \
                 AND (expires_at IS NULL OR expires_at > $1)",
                params.join(", ")
            );
            let mut q = sqlx::query(&sql).bind(self.now());
            for key in keys {
                q = q.bind(*key);
            }
            let rows = q.fetch_all(self.db.readers()).await.map_err(db_error)?;
            let mut found = std::collections::HashMap::with_capacity(rows.len());
            for row in &rows {
                let key: String = row.try_get(2).map_err(db_error)?;
                found.insert(key, stored_value(row, 0)?);
            }
            Ok(keys
                .iter()
                .map(|k| found.get(*k).cloned().flatten())
                .collect())
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Vec<u8>,
        ttl: Option<Duration>,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let expires_at = self.expiry(ttl);
            let Some(writer) = &self.puts else {
                return self.put_alone(key, value, expires_at).await;
            };
            let (done, answer) = oneshot::channel();
            let put = Put {
                key: key.to_owned(),
                value,
                expires_at,
                done,
            };
            match writer.send(put).await {
                Ok(()) => answer.await.unwrap_or_else(|_| {
                    Err(BackendError::Unavailable {
                        backend: "database",
                        message: "the state store's writer stopped before answering".into(),
                    })
                }),
                Err(mpsc::error::SendError(put)) => {
                    self.put_alone(key, put.value, expires_at).await
                }
            }
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
            let current = match &row {
                None => None,
                Some(r) => stored_value(r, 0)?,
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
