//! Idempotency keys with the IETF idempotency-key draft's meaning.
//!
//! The first request with a key claims it atomically (`put_if_absent`) with the fingerprint of
//! its body; when it is answered, the answer is stored under the key for 24 hours. Then:
//!
//! - the same key and the same body replays the stored answer (`Idempotent-Replayed: true`),
//!   without reaching the policy or the gateway;
//! - the same key with another body is a 422;
//! - the same key while the first request is still being processed is a 409.
//!
//! The claim expires on its own after `in_flight_ttl`, so a crash before anything was sent does
//! not lock the key for a day. Once a charge is about to be sent, the claim is held for 24 hours
//! instead ([`Idempotency::hold`]): until the answer, or the reconciler, completes it, a retry is
//! told the first request is still in flight rather than allowed to start a second one.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tai_core::backend::BackendError;
use tai_core::runtime::{ApiError, ErrorType};
use tai_core::store::StateStore;

use crate::keys;

/// How long an answer is kept.
pub const KEEP_FOR: Duration = Duration::from_secs(24 * 60 * 60);

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Entry {
    InFlight {
        fingerprint: String,
    },
    Done {
        fingerprint: String,
        status: u16,
        body: serde_json::Value,
    },
}

/// What to do with a request carrying a key.
#[derive(Debug)]
pub enum Claim {
    /// First use: process it, then [`Idempotency::complete`].
    Proceed,
    /// Seen and answered: send this again.
    Replay {
        /// The HTTP status first sent.
        status: u16,
        /// The body first sent.
        body: serde_json::Value,
    },
}

/// The idempotency store.
#[derive(Debug, Clone)]
pub struct Idempotency {
    store: Arc<dyn StateStore>,
    in_flight_ttl: Duration,
}

/// A fingerprint of a request body: SHA-256 of its canonical JSON (keys sorted).
pub fn fingerprint(body: &serde_json::Value) -> String {
    hex::encode(Sha256::digest(body.to_string().as_bytes()))
}

/// Checks a key's shape: 1 to 255 visible ASCII characters.
pub fn validate_key(key: &str) -> Result<(), ApiError> {
    if (1..=255).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "idempotency_key_invalid",
            "Idempotency-Key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters.",
        ))
    }
}

impl Idempotency {
    /// Keys in `store`; a claim lapses after `in_flight_ttl` if never completed.
    pub fn new(store: Arc<dyn StateStore>, in_flight_ttl: Duration) -> Self {
        Self {
            store,
            in_flight_ttl,
        }
    }

    /// Claims `merchant`'s `key` for a body with `fingerprint`, or says why not.
    pub async fn claim(
        &self,
        merchant: &str,
        key: &str,
        fingerprint: &str,
    ) -> Result<Claim, ClaimError> {
        let k = keys::idempotency(merchant, key);
        let mine = serde_json::to_vec(&Entry::InFlight {
            fingerprint: fingerprint.to_owned(),
        })
        .unwrap_or_default();
        // two rounds: a claim that lapses between our write and our read is claimed again
        for _ in 0..2 {
            if self
                .store
                .put_if_absent(&k, mine.clone(), Some(self.in_flight_ttl))
                .await?
            {
                return Ok(Claim::Proceed);
            }
            let entry = self
                .store
                .get(&k)
                .await?
                .and_then(|b| serde_json::from_slice::<Entry>(&b).ok());
            match entry {
                None => continue,
                Some(Entry::Done {
                    fingerprint: f,
                    status,
                    body,
                }) if f == fingerprint => return Ok(Claim::Replay { status, body }),
                Some(Entry::InFlight { fingerprint: f }) if f == fingerprint => {
                    return Err(ClaimError::InFlight);
                }
                Some(_) => return Err(ClaimError::Mismatch),
            }
        }
        Err(ClaimError::InFlight)
    }

    /// Stores the answer for `key`, kept for [`KEEP_FOR`].
    pub async fn complete(
        &self,
        merchant: &str,
        key: &str,
        fingerprint: &str,
        status: u16,
        body: &serde_json::Value,
    ) -> Result<(), BackendError> {
        let entry = Entry::Done {
            fingerprint: fingerprint.to_owned(),
            status,
            body: body.clone(),
        };
        self.store
            .put(
                &keys::idempotency(merchant, key),
                serde_json::to_vec(&entry).unwrap_or_default(),
                Some(KEEP_FOR),
            )
            .await
    }

    /// Keeps a claim in flight for `ttl` (once a charge may have been sent: until the answer or
    /// the reconciler completes it, a retry must get 409, not a second attempt).
    pub async fn hold(
        &self,
        merchant: &str,
        key: &str,
        fingerprint: &str,
        ttl: Duration,
    ) -> Result<(), BackendError> {
        let entry = Entry::InFlight {
            fingerprint: fingerprint.to_owned(),
        };
        self.store
            .put(
                &keys::idempotency(merchant, key),
                serde_json::to_vec(&entry).unwrap_or_default(),
                Some(ttl),
            )
            .await
    }

    /// Gives a claim up (the request failed before anything was charged).
    pub async fn release(&self, merchant: &str, key: &str) -> Result<bool, BackendError> {
        self.store.delete(&keys::idempotency(merchant, key)).await
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
            ClaimError::Backend(b) => ApiError::unavailable("store_unavailable", format!("The state store is unavailable: {b}"), Some(Duration::from_secs(1))),
        }
    }
}

#[cfg(test)]
mod tests {
    use tai_core::clock::ManualClock;
    use tai_core::store::MemoryStore;

    use super::*;

    #[tokio::test]
    async fn a_held_claim_outlives_the_in_flight_ttl_until_completed() {
        let clock = ManualClock::new();
        let idem = Idempotency::new(
            Arc::new(MemoryStore::new(clock.shared())),
            Duration::from_secs(30),
        );
        assert!(matches!(
            idem.claim("m", "k", "f").await,
            Ok(Claim::Proceed)
        ));
        idem.hold("m", "k", "f", KEEP_FOR).await.expect("store");
        clock.advance(Duration::from_secs(3600));
        assert!(
            matches!(idem.claim("m", "k", "f").await, Err(ClaimError::InFlight)),
            "still in flight an hour on"
        );
        idem.complete("m", "k", "f", 200, &serde_json::json!({"ok": true}))
            .await
            .expect("store");
        assert!(matches!(
            idem.claim("m", "k", "f").await,
            Ok(Claim::Replay { status: 200, .. })
        ));
        assert!(
            matches!(
                idem.claim("other-merchant", "k", "g").await,
                Ok(Claim::Proceed)
            ),
            "keys are per merchant"
        );
    }

    #[tokio::test]
    async fn claim_replay_mismatch_in_flight_and_lapse() {
        let clock = ManualClock::new();
        let store = Arc::new(MemoryStore::new(clock.shared()));
        let idem = Idempotency::new(store, Duration::from_secs(30));
        assert!(matches!(
            idem.claim("m", "k", "f1").await,
            Ok(Claim::Proceed)
        ));
        assert!(matches!(
            idem.claim("m", "k", "f1").await,
            Err(ClaimError::InFlight)
        ));
        assert!(matches!(
            idem.claim("m", "k", "f2").await,
            Err(ClaimError::Mismatch)
        ));
        idem.complete("m", "k", "f1", 200, &serde_json::json!({"id": 1}))
            .await
            .expect("store");
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
        // an abandoned claim lapses
        assert!(matches!(
            idem.claim("m", "k2", "f").await,
            Ok(Claim::Proceed)
        ));
        clock.advance(Duration::from_secs(30));
        assert!(matches!(
            idem.claim("m", "k2", "f").await,
            Ok(Claim::Proceed)
        ));
        // answers are kept 24 hours
        clock.advance(KEEP_FOR - Duration::from_secs(31));
        assert!(matches!(
            idem.claim("m", "k", "f1").await,
            Ok(Claim::Replay { .. })
        ));
    }
}
