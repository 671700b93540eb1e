//! The system of record: the relational database that keeps what must survive a crash.
//!
//! Payments, idempotency keys, events waiting for the stream (the outbox) and deployments are
//! records of what happened; losing them is losing money or a rollout. They live in a database
//! chosen by `DATABASE_URL`:
//!
//! - `sqlite://PATH` (the default: `TAI_DATA_DIR/<service>.db`): one file on disk in WAL mode,
//!   for one node. Nothing to install, and a restart loses nothing.
//! - `postgres://…`: for several replicas sharing one state.
//! - `memory`: an in-memory SQLite database, gone with the process (fast tests).
//!
//! One SQL dialect serves both engines (`$N` parameters, `ON CONFLICT`, `RETURNING`); where
//! they differ (column types, row locks) a [`SchemaChange`] or a query names both. Schema
//! changes are embedded in the binaries and applied at start through sqlx's migrator, so a
//! new version upgrades the schema it finds. Hot, shared, short-lived state (rate limits,
//! velocity windows, locks) belongs in Redis, not here.

use std::borrow::Cow;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, Executor};

use crate::backend::BackendError;

/// Which engine a [`Database`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite: a file (or memory), one node.
    Sqlite,
    /// PostgreSQL: shared by replicas.
    Postgres,
}

impl Dialect {
    /// `sqlite` or `postgres`, as `/status` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
        }
    }
}

/// One change to the schema, written for both engines. Versions are unique across everything
/// that shares a database (tai-core's tables use 1..999, each service its own range above).
#[derive(Debug, Clone, Copy)]
pub struct SchemaChange {
    /// Applied in ascending order, once.
    pub version: i64,
    /// For people reading `_sqlx_migrations`.
    pub description: &'static str,
    /// The statements for SQLite.
    pub sqlite: &'static str,
    /// The statements for PostgreSQL.
    pub postgres: &'static str,
}

/// A pool of connections to the system of record.
#[derive(Debug, Clone)]
pub struct Database {
    pool: AnyPool,
    /// SQLite on a file: read-only connections beside the one writer (WAL lets them read while
    /// it writes), so reads do not queue behind writes. PostgreSQL and `memory` read from `pool`.
    readers: Option<AnyPool>,
    dialect: Dialect,
    location: String,
}

/// The `VALUES` rows of a multi-row statement in the one dialect both engines read: `rows`
/// groups of `columns` numbered parameters, `($1, $2), ($3, $4)` for two rows of two. One
/// statement writing many rows costs one round trip (on SQLite, one hop to its worker thread)
/// where a statement per row costs one each.
pub fn values_rows(rows: usize, columns: usize) -> String {
    let mut out = String::with_capacity(rows * columns * 5);
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for c in 0..columns {
            if c > 0 {
                out.push_str(", ");
            }
            out.push('$');
            out.push_str(&(r * columns + c + 1).to_string());
        }
        out.push(')');
    }
    out
}

/// Turns a database error into the backend error callers map to a 503.
pub fn db_error(e: sqlx::Error) -> BackendError {
    match e {
        sqlx::Error::Database(d) => BackendError::Protocol {
            backend: "database",
            message: d.to_string(),
        },
        sqlx::Error::ColumnDecode { .. }
        | sqlx::Error::Decode(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::TypeNotFound { .. } => BackendError::Protocol {
            backend: "database",
            message: e.to_string(),
        },
        other => BackendError::Unavailable {
            backend: "database",
            message: other.to_string(),
        },
    }
}

/// What `DATABASE_URL` names, resolved: the engine, the URL to connect with, and where it is
/// (for logs and `/status`, without credentials).
fn resolve(url: &str) -> Result<(Dialect, String, String), BackendError> {
    let refuse = |why: String| BackendError::Unavailable {
        backend: "database",
        message: why,
    };
    if url == "memory" || url == "sqlite::memory:" {
        return Ok((Dialect::Sqlite, "sqlite::memory:".into(), "memory".into()));
    }
    if let Some(rest) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        let path = rest.split('?').next().unwrap_or(rest);
        if path.is_empty() {
            return Err(refuse("DATABASE_URL sqlite:// needs a file path".into()));
        }
        let path = std::path::Path::new(path);
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        std::fs::create_dir_all(dir)
            .map_err(|e| refuse(format!("cannot create {}: {e}", dir.display())))?;
        let dir = std::fs::canonicalize(dir)
            .map_err(|e| refuse(format!("cannot resolve {}: {e}", dir.display())))?;
        let file = dir.join(path.file_name().unwrap_or_default());
        let shown = file.display().to_string();
        return Ok((Dialect::Sqlite, format!("sqlite://{shown}?mode=rwc"), shown));
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok((
            Dialect::Postgres,
            url.to_owned(),
            crate::runtime::config::mask_url(url),
        ));
    }
    Err(refuse(format!(
        "DATABASE_URL must be sqlite://PATH, postgres://USER@HOST/DB or memory, not {}",
        crate::runtime::config::mask_url(url)
    )))
}

/// SQLite's read-only connections beside its one writer.
const SQLITE_READERS: u32 = 2;

impl Database {
    /// Connects to `url` (`sqlite://PATH`, `postgres://…` or `memory`) with at most
    /// `max_connections` connections (PostgreSQL; SQLite uses one: its writes are serial anyway,
    /// and one connection never waits on its own process's lock).
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, BackendError> {
        sqlx::any::install_default_drivers();
        let (dialect, url, location) = resolve(url)?;
        // No ping before each acquire: it doubles the round trips of every statement outside a
        // transaction, and a broken connection fails the statement with an error (a 503)
        // anyway, after which the pool replaces it.
        let mut options = AnyPoolOptions::new()
            .acquire_timeout(Duration::from_secs(5))
            .test_before_acquire(false);
        options = match dialect {
            // An in-memory database lives as long as its one connection: never close it.
            Dialect::Sqlite => options
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        // WAL: readers do not block the writer. synchronous=NORMAL: a commit
                        // survives the process being killed (the WAL is in the OS's hands);
                        // only a power cut can lose the last commits.
                        conn.execute("PRAGMA journal_mode=WAL").await?;
                        conn.execute("PRAGMA synchronous=NORMAL").await?;
                        conn.execute("PRAGMA busy_timeout=5000").await?;
                        Ok(())
                    })
                }),
            Dialect::Postgres => options.max_connections(max_connections.max(1)),
        };
        let pool = Self::open(options, &url, &location).await?;
        // a file's readers open once the writer has set WAL mode up
        let readers = match dialect {
            Dialect::Sqlite if location != "memory" => {
                let readers = AnyPoolOptions::new()
                    .acquire_timeout(Duration::from_secs(5))
                    .test_before_acquire(false)
                    .max_connections(SQLITE_READERS)
                    .idle_timeout(None)
                    .max_lifetime(None)
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            conn.execute("PRAGMA busy_timeout=5000").await?;
                            conn.execute("PRAGMA query_only=ON").await?;
                            Ok(())
                        })
                    });
                Some(Self::open(readers, &url, &location).await?)
            }
            _ => None,
        };
        Ok(Self {
            pool,
            readers,
            dialect,
            location,
        })
    }

    async fn open(
        options: AnyPoolOptions,
        url: &str,
        location: &str,
    ) -> Result<AnyPool, BackendError> {
        tokio::time::timeout(Duration::from_secs(10), options.connect(url))
            .await
            .map_err(|_| BackendError::Unavailable {
                backend: "database",
                message: format!("connecting to {location} timed out after 10 s"),
            })?
            .map_err(|e| BackendError::Unavailable {
                backend: "database",
                message: format!("{location}: {e}"),
            })
    }

    /// The pool for reads outside a transaction: SQLite's read-only connections, which do not
    /// wait for the writer; the one pool elsewhere. A read sees every committed write.
    pub fn readers(&self) -> &AnyPool {
        self.readers.as_ref().unwrap_or(&self.pool)
    }

    /// The connection pool, for queries.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// The engine.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Where it is, without credentials: a file path, `memory`, or a masked URL.
    pub fn location(&self) -> &str {
        &self.location
    }

    /// Applies the `changes` not applied yet, in version order, each in a transaction.
    pub async fn migrate(&self, changes: &[SchemaChange]) -> Result<(), BackendError> {
        let migrations: Vec<Migration> = changes
            .iter()
            .map(|c| {
                Migration::new(
                    c.version,
                    Cow::Borrowed(c.description),
                    MigrationType::Simple,
                    Cow::Borrowed(match self.dialect {
                        Dialect::Sqlite => c.sqlite,
                        Dialect::Postgres => c.postgres,
                    }),
                    false,
                )
            })
            .collect();
        // tai-core and the service each bring their own changes to one database, so neither
        // set knows all the applied versions: missing ones are the other's, not an error.
        let mut migrator = Migrator {
            migrations: Cow::Owned(migrations),
            ..Migrator::DEFAULT
        };
        migrator.set_ignore_missing(true);
        migrator
            .run(&self.pool)
            .await
            .map_err(|e| BackendError::Unavailable {
                backend: "database",
                message: format!("migrating {}: {e}", self.location),
            })
    }

    /// Applies tai-core's own tables (the key-value store and the outbox).
    pub async fn migrate_core(&self) -> Result<(), BackendError> {
        self.migrate(CORE_SCHEMA).await
    }

    /// Answers whether the database answers (`/ready`).
    pub async fn ping(&self) -> Result<(), BackendError> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map(|_| ())
            .map_err(db_error)
    }
}

/// tai-core's own tables: the key-value state store and the outbox.
const CORE_SCHEMA: &[SchemaChange] = &[SchemaChange {
    version: 1,
    description: "tai-core key-value store and outbox",
    sqlite: r#"
        CREATE TABLE IF NOT EXISTS tai_kv (
            key TEXT PRIMARY KEY,
            value BLOB,
            num BIGINT,
            version BIGINT NOT NULL DEFAULT 1,
            expires_at BIGINT
        );
        CREATE INDEX IF NOT EXISTS tai_kv_expires ON tai_kv (expires_at) WHERE expires_at IS NOT NULL;
        CREATE TABLE IF NOT EXISTS tai_outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            event_id TEXT NOT NULL UNIQUE,
            subject TEXT NOT NULL,
            payload BLOB NOT NULL,
            created_at BIGINT NOT NULL,
            published_at BIGINT
        );
        CREATE INDEX IF NOT EXISTS tai_outbox_unpublished ON tai_outbox (seq) WHERE published_at IS NULL;
    "#,
    postgres: r#"
        CREATE TABLE IF NOT EXISTS tai_kv (
            key TEXT COLLATE "C" PRIMARY KEY,
            value BYTEA,
            num BIGINT,
            version BIGINT NOT NULL DEFAULT 1,
            expires_at BIGINT
        );
        CREATE INDEX IF NOT EXISTS tai_kv_expires ON tai_kv (expires_at) WHERE expires_at IS NOT NULL;
        CREATE TABLE IF NOT EXISTS tai_outbox (
            seq BIGSERIAL PRIMARY KEY,
            event_id TEXT NOT NULL UNIQUE,
            subject TEXT NOT NULL,
            payload BYTEA NOT NULL,
            created_at BIGINT NOT NULL,
            published_at BIGINT
        );
        CREATE INDEX IF NOT EXISTS tai_outbox_unpublished ON tai_outbox (seq) WHERE published_at IS NULL;
    "#,
}];

#[cfg(test)]
mod tests;
