//! Idempotency keys with the IETF idempotency-key draft's meaning, kept in the system of record
//! (Stripe's design: a key row with a recovery point, changed in the same transactions as the
//! payment it guards).
//!
//! The first request with a key claims it (`recovery_point = started`) with the fingerprint of
//! its body. Then:
//!
//! - the same key and the same body replays the stored answer (`Idempotent-Replayed: true`),
//!   without reaching the policy or the gateway;
//! - the same key with another body is a 422;
//! - the same key while the first request is still being processed is a 409.
//!
//! A claim on which nothing was sent lapses after `in_flight_ttl`, so a crash before the charge
//! does not lock the key for a day. Once the intent to charge is written (`charge_started`, in
//! the transaction that writes the `PROCESSING` payment), the claim is held until the answer is
//! stored with the payment's final state (`finished`), by the live request or the reconciler:
//! a retry is told the first request is in flight, never allowed to start a second charge.
//! Entries live `IDEMPOTENCY_TTL_SECS` (24 h by default) after their answer.

use std::time::Duration;

use axum::http::StatusCode;
use sha2::Sha256;
use sqlx::Row;
use tai_core::backend::BackendError;
use tai_core::clock::SharedClock;
use tai_core::db::{Database, db_error};
use tai_core::runtime::{ApiError, ErrorType};

/// How long an answer is kept by default.
pub const KEEP_FOR: Duration = Duration::from_secs(24 * 60 * 60);

/// Which claim a final answer belongs to.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Guard<'a> {
    /// The claim holding this token (an outcome decided before any charge).
    Claim(&'a str),
    /// The claim guarding this transaction (a settled charge).
    Payment(&'a str),
}

/// What to do with a request carrying a key.
#[derive(Debug)]
pub enum Claim {
    /// First use: process it. The token identifies this claim: only its holder may start a
    /// charge under it, answer it, or give it up (a claim that lapsed and was taken by a later
    /// request is no longer this one's).
    Proceed {
        /// This claim's token.
        token: String,
    },
    /// Its payment was sent to the gateway and is not settled yet: answer with that payment
    /// (`PROCESSING`), never start another.
    InProgress {
        /// The payment the key guards.
        transaction_id: String,
    },
    /// Seen and answered: send this again.
    Replay {
        /// The HTTP status first sent.
        status: u16,
        /// The body first sent.
        body: serde_json::Value,
    },
}

/// The idempotency keys of one database.
#[derive(Debug, Clone)]
pub struct Idempotency {
    db: Database,
    clock: SharedClock,
    in_flight_ttl: Duration,
    keep_for: Duration,
}

/// A key's first use, waiting to be claimed ([`Idempotency::first_use`]).
#[derive(Debug, Clone)]
pub(crate) struct FirstUse {
    pub(crate) merchant: String,
    pub(crate) key: String,
    fingerprint: String,
    /// The claim's token, if it is inserted.
    pub(crate) token: String,
    now: i64,
    expires_at: i64,
}

/// Fingerprints request bodies with a server key, so that a stored fingerprint reveals
/// nothing of the body: HMAC-SHA256 over the canonical JSON (keys sorted) in which the card is
/// replaced by a keyed hash of its number plus its expiry, and the CVC is dropped (PCI DSS
/// 3.3.1: no CVC after authorization in any form; 3.5.1.1: only keyed hashes of a PAN).
#[derive(Clone)]
pub struct Fingerprinter {
    key: tai_core::secrets::Secret,
}

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprinter(****)")
    }
}

type HmacSha256 = hmac::Hmac<Sha256>;

impl Fingerprinter {
    /// Keyed with `key` (`FINGERPRINT_KEY`, or one generated once and kept in the system of
    /// record).
    pub fn new(key: tai_core::secrets::Secret) -> Self {
        Self { key }
    }

    fn mac(&self, parts: &[&[u8]]) -> String {
        use hmac::Mac;
        // HMAC takes a key of any length
        let mut mac = HmacSha256::new_from_slice(self.key.expose().as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        for p in parts {
            mac.update(p);
        }
        hex::encode(mac.finalize().into_bytes())
    }

    /// The fingerprint of a request body.
    pub fn fingerprint(&self, body: &serde_json::Value) -> String {
        let mut canonical = body.clone();
        if let Some(card) = canonical.get_mut("card").and_then(|c| c.as_object_mut()) {
            let number: String = card
                .get("number")
                .map(|n| match n {
                    serde_json::Value::String(s) => {
                        s.chars().filter(|c| !c.is_whitespace()).collect()
                    }
                    other => other.to_string(),
                })
                .unwrap_or_default();
            card.remove("cvc");
            card.insert(
                "number".into(),
                serde_json::Value::String(self.mac(&[b"pan:", number.as_bytes()])),
            );
        }
        self.mac(&[b"body:", canonical.to_string().as_bytes()])
    }
}

/// The request's `Idempotency-Key` header, checked, if it sent one.
pub fn key_header(headers: &axum::http::HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let k = v.to_str().map_err(|_| {
        ApiError::invalid(
            "idempotency_key_invalid",
            "Idempotency-Key",
            "Idempotency-Key must be visible ASCII.",
        )
    })?;
    validate_key(k)?;
    Ok(Some(k.to_owned()))
}

/// The longest `Idempotency-Key`.
pub const KEY_MAX: usize = 255;

/// [`validate_key`] as a regular expression, for the OpenAPI document.
pub fn key_pattern() -> String {
    format!("^[!-~]{{1,{KEY_MAX}}}$")
}

/// Checks a key's shape: 1 to [`KEY_MAX`] visible ASCII characters.
pub fn validate_key(key: &str) -> Result<(), ApiError> {
    if (1..=KEY_MAX).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "idempotency_key_invalid",
            "Idempotency-Key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters.",
        ))
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX / 4)
}

/// A claim as stored.
#[derive(sqlx::FromRow)]
struct Row_ {
    fingerprint: String,
    recovery_point: String,
    locked_at: Option<i64>,
    response_status: Option<i64>,
    response_body: Option<String>,
    expires_at: i64,
    transaction_id: Option<String>,
}

impl Idempotency {
    /// Keys in `db`; a claim on which nothing was sent lapses after `in_flight_ttl`; answers are
    /// kept `keep_for`.
    pub fn new(
        db: Database,
        clock: SharedClock,
        in_flight_ttl: Duration,
        keep_for: Duration,
    ) -> Self {
        Self {
            db,
            clock,
            in_flight_ttl,
            keep_for,
        }
    }

    fn now(&self) -> i64 {
        self.clock.wall().timestamp_millis()
    }

    async fn read(&self, merchant: &str, key: &str) -> Result<Option<Row_>, BackendError> {
        sqlx::query_as(
            "SELECT fingerprint, recovery_point, locked_at, response_status, response_body, expires_at, \
             transaction_id FROM idempotency_keys WHERE merchant_id = $1 AND idempotency_key = $2",
        )
        .bind(merchant)
        .bind(key)
        .fetch_optional(self.db.pool())
        .await
        .map_err(db_error)
    }

    /// Claims `merchant`'s `key` for a body with `fingerprint`, or says why not.
    pub async fn claim(
        &self,
        merchant: &str,
        key: &str,
        fingerprint: &str,
    ) -> Result<Claim, ClaimError> {
        // a few rounds: a claim that lapses or is re-taken between our write and our read is
        // looked at again
        for _ in 0..3 {
            let now = self.now();
            let first = self.first_use(merchant, key, fingerprint);
            let mut conn = self.db.pool().acquire().await.map_err(db_error)?;
            let inserted = self.insert_claims(&mut conn, &[&first]).await?;
            drop(conn);
            if !inserted.is_empty() {
                return Ok(Claim::Proceed { token: first.token });
            }
            let token = first.token;
            let Some(row) = self.read(merchant, key).await? else {
                continue;
            };
            if row.expires_at <= now && row.recovery_point != "charge_started" {
                // the old entry's time is up: the key is free for a new payment
                let taken = sqlx::query(
                    "UPDATE idempotency_keys SET fingerprint = $1, recovery_point = 'started', locked_at = $2, \
                     transaction_id = NULL, response_status = NULL, response_body = NULL, created_at = $2, \
                     expires_at = $3, claim_token = $7 WHERE merchant_id = $4 AND idempotency_key = $5 AND expires_at = $6",
                )
                .bind(fingerprint)
                .bind(now)
                .bind(now + ms(self.keep_for))
                .bind(merchant)
                .bind(key)
                .bind(row.expires_at)
                .bind(&token)
                .execute(self.db.pool())
                .await
                .map_err(db_error)?;
                if taken.rows_affected() == 1 {
                    return Ok(Claim::Proceed { token });
                }
                continue;
            }
            if row.fingerprint != fingerprint {
                return Err(ClaimError::Mismatch);
            }
            if let (Some(status), Some(body)) = (row.response_status, &row.response_body) {
                let body = serde_json::from_str(body).map_err(|e| {
                    ClaimError::Backend(BackendError::Protocol {
                        backend: "database",
                        message: format!("stored idempotent answer: {e}"),
                    })
                })?;
                return Ok(Claim::Replay {
                    status: u16::try_from(status).unwrap_or(500),
                    body,
                });
            }
            if let (true, Some(txn)) = (
                row.recovery_point == "charge_started",
                row.transaction_id.clone(),
            ) {
                return Ok(Claim::InProgress {
                    transaction_id: txn,
                });
            }
            let lapsed = row.recovery_point == "started"
                && row
                    .locked_at
                    .is_none_or(|at| at <= now - ms(self.in_flight_ttl));
            if !lapsed {
                return Err(ClaimError::InFlight);
            }
            // nothing was sent under the lapsed claim (its request died before the charge)
            let retaken = sqlx::query(
                "UPDATE idempotency_keys SET locked_at = $1, claim_token = $5 WHERE merchant_id = $2 \
                 AND idempotency_key = $3 AND recovery_point = 'started' AND locked_at IS NOT DISTINCT FROM $4",
            )
            .bind(now)
            .bind(merchant)
            .bind(key)
            .bind(row.locked_at)
            .bind(&token)
            .execute(self.db.pool())
            .await
            .map_err(db_error)?;
            if retaken.rows_affected() == 1 {
                return Ok(Claim::Proceed { token });
            }
        }
        Err(ClaimError::InFlight)
    }

    /// A key's entry for its first use, to be inserted by [`Idempotency::insert_claims`].
    pub(crate) fn first_use(&self, merchant: &str, key: &str, fingerprint: &str) -> FirstUse {
        let now = self.now();
        FirstUse {
            merchant: merchant.to_owned(),
            key: key.to_owned(),
            fingerprint: fingerprint.to_owned(),
            token: uuid::Uuid::new_v4().simple().to_string(),
            now,
            expires_at: now + ms(self.keep_for),
        }
    }

    /// Claims keys used for the first time, in one statement; answers the ones claimed (as
    /// `(merchant, key)`). A key used before is left as it is, for [`Idempotency::claim`] to
    /// look at.
    pub(crate) async fn insert_claims(
        &self,
        conn: &mut sqlx::AnyConnection,
        claims: &[&FirstUse],
    ) -> Result<std::collections::HashSet<(String, String)>, BackendError> {
        let sql = format!(
            "INSERT INTO idempotency_keys (merchant_id, idempotency_key, fingerprint, recovery_point, \
             locked_at, created_at, expires_at, claim_token) VALUES {} \
             ON CONFLICT (merchant_id, idempotency_key) DO NOTHING \
             RETURNING merchant_id, idempotency_key",
            tai_core::db::values_rows(claims.len(), 8)
        );
        let mut q = sqlx::query(&sql);
        for c in claims {
            q = q
                .bind(c.merchant.as_str())
                .bind(c.key.as_str())
                .bind(c.fingerprint.as_str())
                .bind("started")
                .bind(c.now)
                .bind(c.now)
                .bind(c.expires_at)
                .bind(c.token.as_str());
        }
        let rows = q
            .persistent(claims.len() == 1)
            .fetch_all(&mut *conn)
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<String, _>(0).map_err(db_error)?,
                    r.try_get::<String, _>(1).map_err(db_error)?,
                ))
            })
            .collect()
    }

    /// Gives claim `token` up when its request failed before its intent to charge was written;
    /// once a charge may have been sent the claim stays (the reconciler finishes it), and a
    /// claim taken over by a later request is not this one's to give up.
    pub async fn release(
        &self,
        merchant: &str,
        key: &str,
        token: &str,
    ) -> Result<bool, BackendError> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE merchant_id = $1 AND idempotency_key = $2 \
             AND recovery_point = 'started' AND claim_token = $3",
        )
        .bind(merchant)
        .bind(key)
        .bind(token)
        .execute(self.db.pool())
        .await
        .map(|r| r.rows_affected() == 1)
        .map_err(db_error)
    }

    /// In the transaction that writes the intent: claim `token` now guards transaction `txn`.
    /// Fails if the claim is no longer this request's (it lapsed and was taken again), so
    /// nothing is charged under a lost claim.
    pub(crate) async fn charge_started(
        &self,
        conn: &mut sqlx::AnyConnection,
        merchant: &str,
        key: &str,
        token: &str,
        txn: &str,
    ) -> Result<(), BackendError> {
        let r = sqlx::query(
            "UPDATE idempotency_keys SET recovery_point = 'charge_started', transaction_id = $1, locked_at = $2 \
             WHERE merchant_id = $3 AND idempotency_key = $4 AND claim_token = $5 AND recovery_point = 'started'",
        )
        .bind(txn)
        .bind(self.now())
        .bind(merchant)
        .bind(key)
        .bind(token)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
        if r.rows_affected() == 1 {
            Ok(())
        } else {
            Err(BackendError::Protocol {
                backend: "database",
                message: "the idempotency claim lapsed before the charge; not charging".into(),
            })
        }
    }

    /// In the transaction that writes the payment's final state: the answer retries replay.
    /// `guard` says which claim this is: the one holding `token` (an outcome decided before any
    /// charge), or the one guarding transaction `txn` (a settled charge). A claim that is no
    /// longer this payment's is left alone.
    pub(crate) async fn finish(
        &self,
        conn: &mut sqlx::AnyConnection,
        merchant: &str,
        key: &str,
        guard: Guard<'_>,
        status: u16,
        body: &serde_json::Value,
    ) -> Result<(), BackendError> {
        let now = self.now();
        let (condition, value) = match guard {
            Guard::Claim(token) => ("recovery_point = 'started' AND claim_token = $6", token),
            Guard::Payment(txn) => ("transaction_id = $6", txn),
        };
        let sql = format!(
            "UPDATE idempotency_keys SET recovery_point = 'finished', response_status = $1, response_body = $2, \
             locked_at = NULL, expires_at = $3 WHERE merchant_id = $4 AND idempotency_key = $5 AND {condition}"
        );
        sqlx::query(&sql)
            .bind(i64::from(status))
            .bind(body.to_string())
            .bind(now + ms(self.keep_for))
            .bind(merchant)
            .bind(key)
            .bind(value)
            .execute(&mut *conn)
            .await
            .map(|_| ())
            .map_err(db_error)
    }

    /// In the transaction that records a refusal given without calling the gateway (its
    /// breaker open): claim `token` is freed, so a retry with the key later is a new attempt
    /// rather than a replay of "unavailable, retry later".
    pub(crate) async fn forget(
        &self,
        conn: &mut sqlx::AnyConnection,
        merchant: &str,
        key: &str,
        token: &str,
    ) -> Result<(), BackendError> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE merchant_id = $1 AND idempotency_key = $2 \
             AND recovery_point = 'started' AND claim_token = $3",
        )
        .bind(merchant)
        .bind(key)
        .bind(token)
        .execute(&mut *conn)
        .await
        .map(|_| ())
        .map_err(db_error)
    }

    /// Deletes entries past their time, except those guarding a charge not settled yet.
    pub async fn sweep(&self) -> Result<u64, BackendError> {
        sqlx::query(
            "DELETE FROM idempotency_keys WHERE expires_at <= $1 AND recovery_point <> 'charge_started'",
        )
        .bind(self.now())
        .execute(self.db.pool())
        .await
        .map(|r| r.rows_affected())
        .map_err(db_error)
    }
}

/// Why a key could not be claimed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Used before with another body.
    #[error("idempotency key reused with a different body")]
    Mismatch,
    /// The first request with this key is still being processed.
    #[error("a request with this idempotency key is in flight")]
    InFlight,
    /// The store failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

impl From<ClaimError> for ApiError {
    fn from(e: ClaimError) -> Self {
        match e {
            ClaimError::Mismatch => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorType::IdempotencyError,
                "idempotency_key_reused",
                "This Idempotency-Key was used with a different request body; use a new key for a new payment.",
            )
            .with_param("Idempotency-Key"),
            ClaimError::InFlight => ApiError::new(
                StatusCode::CONFLICT,
                ErrorType::IdempotencyError,
                "idempotency_key_in_use",
                "A request with this Idempotency-Key is still being processed; retry after it finishes.",
            )
            .with_retry_after(Duration::from_secs(1)),
            ClaimError::Backend(b) => ApiError::unavailable("store_unavailable", format!("The system of record is unavailable: {b}"), Some(Duration::from_secs(1))),
        }
    }
}

#[cfg(test)]
mod tests {
    use tai_core::clock::ManualClock;

    use super::*;

    async fn idem(clock: &ManualClock) -> Idempotency {
        let db = crate::ledger::tests::memory_db().await;
        Idempotency::new(db, clock.shared(), Duration::from_secs(30), KEEP_FOR)
    }

    async fn finish(
        idem: &Idempotency,
        key: &str,
        guard: Guard<'_>,
        status: u16,
        body: serde_json::Value,
    ) {
        let mut conn = idem.db.pool().acquire().await.expect("conn");
        idem.finish(&mut conn, "m", key, guard, status, &body)
            .await
            .expect("db");
    }

    fn token(claim: Result<Claim, ClaimError>) -> String {
        match claim {
            Ok(Claim::Proceed { token }) => token,
            other => panic!("expected to proceed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_claim_with_a_charge_started_is_held_past_the_in_flight_ttl_until_finished() {
        let clock = ManualClock::new();
        let idem = idem(&clock).await;
        let mine = token(idem.claim("m", "k", "f").await);
        {
            let mut conn = idem.db.pool().acquire().await.expect("conn");
            idem.charge_started(&mut conn, "m", "k", &mine, "txn_1")
                .await
                .expect("db");
        }
        assert!(
            !idem.release("m", "k", &mine).await.expect("db"),
            "not released once sent"
        );
        clock.advance(Duration::from_secs(3600));
        assert!(
            matches!(idem.claim("m", "k", "f").await, Ok(Claim::InProgress { transaction_id }) if transaction_id == "txn_1"),
            "a retry an hour on resumes the payment it guards"
        );
        // an answer for another payment, or for the claim as it was, does not touch it
        finish(
            &idem,
            "k",
            Guard::Payment("txn_other"),
            402,
            serde_json::json!({}),
        )
        .await;
        finish(&idem, "k", Guard::Claim(&mine), 402, serde_json::json!({})).await;
        assert!(matches!(
            idem.claim("m", "k", "f").await,
            Ok(Claim::InProgress { .. })
        ));
        finish(
            &idem,
            "k",
            Guard::Payment("txn_1"),
            200,
            serde_json::json!({"ok": true}),
        )
        .await;
        assert!(matches!(
            idem.claim("m", "k", "f").await,
            Ok(Claim::Replay { status: 200, .. })
        ));
        assert!(
            matches!(
                idem.claim("other-merchant", "k", "g").await,
                Ok(Claim::Proceed { .. })
            ),
            "keys are per merchant"
        );
    }

    #[tokio::test]
    async fn a_lapsed_claim_taken_over_is_no_longer_the_first_requests() {
        let clock = ManualClock::new();
        let idem = idem(&clock).await;
        let first = token(idem.claim("m", "k", "f").await);
        clock.advance(Duration::from_secs(30));
        let second = token(idem.claim("m", "k", "f").await);
        assert_ne!(first, second);
        let mut conn = idem.db.pool().acquire().await.expect("conn");
        assert!(
            idem.charge_started(&mut conn, "m", "k", &first, "txn_1")
                .await
                .is_err(),
            "the first request may not charge under a claim it lost"
        );
        idem.forget(&mut conn, "m", "k", &first).await.expect("db");
        drop(conn);
        assert!(!idem.release("m", "k", &first).await.expect("db"));
        let mut conn = idem.db.pool().acquire().await.expect("conn");
        idem.charge_started(&mut conn, "m", "k", &second, "txn_2")
            .await
            .expect("the holder may");
        drop(conn);
        assert!(matches!(
            idem.claim("m", "k", "f").await,
            Ok(Claim::InProgress { transaction_id }) if transaction_id == "txn_2"
        ));
    }

    #[tokio::test]
    async fn claim_replay_mismatch_in_flight_lapse_and_expiry() {
        let clock = ManualClock::new();
        let idem = idem(&clock).await;
        let t = token(idem.claim("m", "k", "f1").await);
        assert!(matches!(
            idem.claim("m", "k", "f1").await,
            Err(ClaimError::InFlight)
        ));
        assert!(matches!(
            idem.claim("m", "k", "f2").await,
            Err(ClaimError::Mismatch)
        ));
        finish(
            &idem,
            "k",
            Guard::Claim(&t),
            200,
            serde_json::json!({"id": 1}),
        )
        .await;
        match idem.claim("m", "k", "f1").await {
            Ok(Claim::Replay { status, body }) => {
                assert_eq!((status, body["id"].as_i64()), (200, Some(1)))
            }
            other => panic!("expected a replay, got {other:?}"),
        }
        assert!(matches!(
            idem.claim("m", "k", "f2").await,
            Err(ClaimError::Mismatch)
        ));
        // an abandoned claim (nothing sent) lapses
        assert!(matches!(
            idem.claim("m", "k2", "f").await,
            Ok(Claim::Proceed { .. })
        ));
        clock.advance(Duration::from_secs(30));
        assert!(matches!(
            idem.claim("m", "k2", "f").await,
            Ok(Claim::Proceed { .. })
        ));
        // answers are kept for the TTL, then the key is free for a new payment
        clock.advance(KEEP_FOR - Duration::from_secs(31));
        assert!(matches!(
            idem.claim("m", "k", "f1").await,
            Ok(Claim::Replay { .. })
        ));
        clock.advance(Duration::from_secs(2));
        assert!(matches!(
            idem.claim("m", "k", "f3").await,
            Ok(Claim::Proceed { .. })
        ));
        assert_eq!(
            idem.sweep().await.expect("db"),
            1,
            "k2's day is over, k's began again"
        );
        clock.advance(KEEP_FOR + Duration::from_secs(1));
        assert_eq!(idem.sweep().await.expect("db"), 1);
    }
}

#[cfg(test)]
mod fingerprint_tests {
    use serde_json::json;

    use super::Fingerprinter;

    #[test]
    fn fingerprints_are_keyed_ignore_the_cvc_and_hold_no_card_data() {
        let f = Fingerprinter::new(tai_core::secrets::Secret::new("server-key"));
        let body = |cvc: &str, number: &str| json!({"amount": "10.00", "customer_id": "c", "card": {"number": number, "exp_month": 12, "exp_year": 2099, "cvc": cvc}});
        let a = f.fingerprint(&body("123", "4242424242424242"));
        assert_eq!(a.len(), 64);
        assert_eq!(
            a,
            f.fingerprint(&body("999", "4242 4242 4242 4242")),
            "the CVC is not part of it"
        );
        assert_ne!(
            a,
            f.fingerprint(&body("123", "4000000000000002")),
            "the card is"
        );
        let other_key = Fingerprinter::new(tai_core::secrets::Secret::new("another-key"));
        assert_ne!(
            a,
            other_key.fingerprint(&body("123", "4242424242424242")),
            "keyed"
        );
        assert!(!a.contains("4242") && !a.contains("123"));
    }
}
