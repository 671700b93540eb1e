//! Group commit: the idempotency claims, intents, settlements and confirmations of concurrent
//! payments written together.
//!
//! Each payment needs two durable writes on its way through (the intent before the gateway is
//! called, the outcome after), and a database pays per statement and per transaction, not per
//! row: SQLite hands every statement to its one writer thread, PostgreSQL waits for the log
//! flush at every commit. So one task takes what requests have waiting (up to [`MAX`]) and
//! writes it in one transaction of a few multi-row statements:
//!
//! - the intents in one `INSERT` (with each key's `charge_started` recovery point);
//! - the settlements in one upsert that is a compare-and-swap per row (`ON CONFLICT ... DO
//!   UPDATE ... WHERE version = the version read AND status = 'PROCESSING'`, `RETURNING` the
//!   ones it moved), then the winners' keys and their events (three statements for all of
//!   them, [`crate::events::emit_many`]);
//! - the confirmations (the confirmation workers' marks) in one `UPDATE ... RETURNING`;
//! - the idempotency keys used for the first time in one `INSERT ... ON CONFLICT DO NOTHING
//!   RETURNING` (a key used before is looked at by [`crate::idempotency::Idempotency::claim`],
//!   outside the group).
//!
//! A caller is answered only after the commit, so what it is told is durable, as when it wrote
//! alone. One payment appears at most once in a group: a second settlement of it (the
//! reconciler racing the request) is written after the group and loses its compare-and-swap
//! there. If the group's transaction fails, nothing of it is kept and each payment is written
//! alone, so one bad payment (a lapsed idempotency claim, an event already announced) fails
//! only itself. Under light load a group is one payment, written exactly as before.

use std::collections::{HashMap, HashSet};

use sqlx::Row;
use tai_core::backend::BackendError;
use tai_core::db::db_error;
use tokio::sync::{mpsc, oneshot};

use super::{Ledger, corrupt, event_type, payment_rows};
use crate::idempotency::FirstUse;
use crate::record::PaymentRecord;

/// The most payments one group writes.
pub(crate) const MAX: usize = 64;

/// A write waiting for its group.
#[derive(Debug)]
pub(crate) enum Job {
    /// [`Ledger::begin_charge`].
    Intent {
        record: PaymentRecord,
        done: oneshot::Sender<Result<i64, BackendError>>,
    },
    /// [`Ledger::settle`].
    Settle {
        record: PaymentRecord,
        version: i64,
        done: oneshot::Sender<Result<bool, BackendError>>,
    },
    /// [`Ledger::claim`]: a key's first use.
    Claim {
        claim: FirstUse,
        /// `merchant` NUL `key`: one claim of a key per group.
        slot: String,
        done: oneshot::Sender<Result<bool, BackendError>>,
    },
    /// [`Ledger::confirm`].
    Confirm {
        id: String,
        done: oneshot::Sender<Result<bool, BackendError>>,
    },
}

fn lost() -> BackendError {
    BackendError::Unavailable {
        backend: "database",
        message: "the ledger's writer stopped before answering".into(),
    }
}

impl Job {
    /// Writes an intent with the next group; alone where there is no writer.
    pub(crate) async fn intent(
        ledger: &Ledger,
        record: &PaymentRecord,
    ) -> Result<i64, BackendError> {
        let Some(writer) = &ledger.group else {
            return ledger.begin_charge_alone(record).await;
        };
        let (done, answer) = oneshot::channel();
        let job = Job::Intent {
            record: record.clone(),
            done,
        };
        if writer.send(job).await.is_err() {
            return ledger.begin_charge_alone(record).await;
        }
        answer.await.unwrap_or_else(|_| Err(lost()))
    }

    /// Writes a settlement with the next group; alone where there is no writer.
    pub(crate) async fn settle(
        ledger: &Ledger,
        record: &PaymentRecord,
        version: i64,
    ) -> Result<bool, BackendError> {
        let Some(writer) = &ledger.group else {
            return ledger.settle_alone(record, version).await;
        };
        let (done, answer) = oneshot::channel();
        let job = Job::Settle {
            record: record.clone(),
            version,
            done,
        };
        if writer.send(job).await.is_err() {
            return ledger.settle_alone(record, version).await;
        }
        answer.await.unwrap_or_else(|_| Err(lost()))
    }

    /// Marks a success confirmed with the next group; alone where there is no writer.
    pub(crate) async fn confirm(ledger: &Ledger, id: &str) -> Result<bool, BackendError> {
        let Some(writer) = &ledger.group else {
            return ledger.confirm_alone(id).await;
        };
        let (done, answer) = oneshot::channel();
        let job = Job::Confirm {
            id: id.to_owned(),
            done,
        };
        if writer.send(job).await.is_err() {
            return ledger.confirm_alone(id).await;
        }
        answer.await.unwrap_or_else(|_| Err(lost()))
    }

    /// Claims a key's first use with the next group; answers whether it was claimed.
    pub(crate) async fn claim(ledger: &Ledger, claim: FirstUse) -> Result<bool, BackendError> {
        let Some(writer) = &ledger.group else {
            return ledger.claim_alone(&claim).await;
        };
        let (done, answer) = oneshot::channel();
        let slot = format!("{}\u{0}{}", claim.merchant, claim.key);
        let job = Job::Claim { claim, slot, done };
        match writer.send(job).await {
            Ok(()) => answer.await.unwrap_or_else(|_| Err(lost())),
            Err(mpsc::error::SendError(Job::Claim { claim, .. })) => {
                ledger.claim_alone(&claim).await
            }
            Err(_) => Err(lost()),
        }
    }

    /// What the job is about: a payment, or a key; a group has one job of each at most.
    fn payment(&self) -> &str {
        match self {
            Job::Intent { record, .. } | Job::Settle { record, .. } => &record.transaction_id,
            Job::Confirm { id, .. } => id,
            Job::Claim { slot, .. } => slot,
        }
    }

    /// Written in its own transaction, and answered.
    async fn alone(self, ledger: &Ledger) {
        // a caller that stopped waiting drops its receiver: nothing to tell it
        match self {
            Job::Intent { record, done } => {
                let _ = done.send(ledger.begin_charge_alone(&record).await);
            }
            Job::Settle {
                record,
                version,
                done,
            } => {
                let _ = done.send(ledger.settle_alone(&record, version).await);
            }
            Job::Confirm { id, done } => {
                let _ = done.send(ledger.confirm_alone(&id).await);
            }
            Job::Claim { claim, done, .. } => {
                let _ = done.send(ledger.claim_alone(&claim).await);
            }
        }
    }

    /// Answered after its group committed; `moved` holds the settlements and confirmations
    /// that changed their payment.
    fn committed(self, moved: &HashSet<String>) {
        match self {
            Job::Intent { done, .. } => {
                let _ = done.send(Ok(1));
            }
            Job::Settle { record, done, .. } => {
                let _ = done.send(Ok(moved.contains(&record.transaction_id)));
            }
            Job::Confirm { id, done } => {
                let _ = done.send(Ok(moved.contains(&id)));
            }
            Job::Claim { slot, done, .. } => {
                let _ = done.send(Ok(moved.contains(&slot)));
            }
        }
    }
}

/// The writer: takes what is waiting, writes it as one group, answers; ends when every ledger
/// handle is gone.
pub(crate) async fn write(ledger: Ledger, mut jobs: mpsc::Receiver<Job>) {
    let mut waiting = Vec::with_capacity(MAX);
    while jobs.recv_many(&mut waiting, MAX).await > 0 {
        ledger.commit_group(std::mem::take(&mut waiting)).await;
    }
}

impl Ledger {
    async fn commit_group(&self, jobs: Vec<Job>) {
        if jobs.len() == 1 {
            for job in jobs {
                job.alone(self).await;
            }
            return;
        }
        let mut seen = HashSet::new();
        let (group, after): (Vec<Job>, Vec<Job>) = jobs
            .into_iter()
            .partition(|j| seen.insert(j.payment().to_owned()));
        self.largest_group
            .fetch_max(group.len(), std::sync::atomic::Ordering::Relaxed);
        match self.write_group(&group).await {
            Ok(won) => {
                for job in group {
                    job.committed(&won);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, payments = group.len(), "a group commit failed; writing its payments one by one");
                for job in group {
                    job.alone(self).await;
                }
            }
        }
        for job in after {
            job.alone(self).await;
        }
    }

    /// One transaction for the group; answers the settlements that moved. Nothing is kept if
    /// it fails.
    async fn write_group(&self, jobs: &[Job]) -> Result<HashSet<String>, BackendError> {
        let mut intents = Vec::new();
        let mut settles = Vec::new();
        let mut confirms = Vec::new();
        let mut claims = Vec::new();
        for job in jobs {
            match job {
                Job::Intent { record, .. } => intents.push(record),
                Job::Settle {
                    record, version, ..
                } => settles.push((record, *version)),
                Job::Confirm { id, .. } => confirms.push(id.as_str()),
                Job::Claim { claim, .. } => claims.push(claim),
            }
        }
        // one order for every writer, so that two replicas' groups on PostgreSQL lock rows in
        // the same order
        intents.sort_by(|a, b| a.transaction_id.cmp(&b.transaction_id));
        settles.sort_by(|a, b| a.0.transaction_id.cmp(&b.0.transaction_id));
        let mut tx = self.db.pool().begin().await.map_err(db_error)?;
        let mut claimed = HashSet::new();
        if !claims.is_empty() {
            for (merchant, key) in self.idempotency.insert_claims(&mut tx, &claims).await? {
                claimed.insert(format!("{merchant}\u{0}{key}"));
            }
        }
        if !intents.is_empty() {
            self.insert_many(&mut tx, &intents).await?;
            for record in &intents {
                self.charge_started(&mut tx, record).await?;
            }
        }
        let mut won = self.settle_many(&mut tx, &settles).await?;
        let mut events = Vec::new();
        for (record, _) in settles
            .iter()
            .filter(|(r, _)| won.contains(&r.transaction_id))
        {
            self.answer(&mut tx, record, true).await?;
            if let Some(kind) = event_type(record.status) {
                events.push((
                    self.new_event(kind, &record.transaction_id, &record.merchant_id),
                    record.public(),
                ));
            }
        }
        crate::events::emit_many(&mut tx, &events).await?;
        won.extend(self.confirm_many(&mut tx, &confirms).await?);
        won.extend(claimed);
        tx.commit().await.map_err(db_error)?;
        Ok(won)
    }

    /// [`Ledger::confirm`] for many payments in one statement; answers the ones confirmed now.
    async fn confirm_many(
        &self,
        conn: &mut sqlx::AnyConnection,
        ids: &[&str],
    ) -> Result<HashSet<String>, BackendError> {
        if ids.is_empty() {
            return Ok(HashSet::new());
        }
        let params: Vec<String> = (2..ids.len() + 2).map(|n| format!("${n}")).collect();
        let sql = format!(
            "UPDATE payments SET confirmed_at = $1, version = version + 1 \
             WHERE status = 'SUCCESS' AND confirmed_at IS NULL AND transaction_id IN ({}) \
             RETURNING transaction_id",
            params.join(", ")
        );
        let mut q = sqlx::query(&sql).bind(self.now());
        for id in ids {
            q = q.bind(*id);
        }
        let rows = q
            .persistent(ids.len() == 1)
            .fetch_all(&mut *conn)
            .await
            .map_err(db_error)?;
        rows.iter()
            .map(|r| r.try_get::<String, _>(0).map_err(db_error))
            .collect()
    }

    /// [`Ledger::settle`]'s compare-and-swap for many payments in one statement: each row moves
    /// only from `PROCESSING` at the version its caller read. Answers the ones that moved.
    async fn settle_many(
        &self,
        conn: &mut sqlx::AnyConnection,
        settles: &[(&PaymentRecord, i64)],
    ) -> Result<HashSet<String>, BackendError> {
        if settles.is_empty() {
            return Ok(HashSet::new());
        }
        // an upsert, because both engines update many rows from one VALUES list that way; the
        // insert half never happens for a payment with an intent (checked below)
        let sql = payment_rows(
            settles.len(),
            "ON CONFLICT (transaction_id) DO UPDATE SET status = excluded.status, record = excluded.record, \
             updated_at = excluded.updated_at, version = payments.version + 1, recheck_until = NULL, \
             expires_at = excluded.expires_at, op = excluded.op, next_check_at = NULL \
             WHERE payments.version = excluded.version AND payments.status = 'PROCESSING' \
             RETURNING transaction_id, version",
        );
        let q = self.bind_payments(sqlx::query(&sql), settles)?;
        let rows = q
            .persistent(settles.len() == 1)
            .fetch_all(&mut *conn)
            .await
            .map_err(db_error)?;
        let expected: HashMap<&str, i64> = settles
            .iter()
            .map(|(r, v)| (r.transaction_id.as_str(), *v))
            .collect();
        let mut won = HashSet::with_capacity(rows.len());
        for row in &rows {
            let id: String = row.try_get(0).map_err(db_error)?;
            let version: i64 = row.try_get(1).map_err(db_error)?;
            // a row left at the version named was inserted, not moved: there was no intent
            if expected.get(id.as_str()).map(|v| v + 1) != Some(version) {
                return Err(corrupt(&id, "a settlement found no intent to settle"));
            }
            won.insert(id);
        }
        Ok(won)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use tai_core::clock::ManualClock;

    use super::*;
    use crate::ledger::tests::ledger;
    use crate::reconcile::tests::processing;
    use crate::record::PaymentStatus;

    fn unkeyed(id: &str, clock: &ManualClock) -> PaymentRecord {
        let mut rec = processing(id, &format!("m:{id}"), clock);
        rec.idempotency_key = None;
        rec.fingerprint = None;
        rec
    }

    fn ended(rec: &PaymentRecord, status: PaymentStatus) -> PaymentRecord {
        let mut rec = rec.clone();
        rec.status = status;
        rec.http_status = if status == PaymentStatus::Success {
            200
        } else {
            502
        };
        rec
    }

    #[tokio::test]
    async fn concurrent_payments_written_in_groups_each_settle_once_with_one_event() {
        let clock = ManualClock::new();
        let ledger = ledger(&clock).await;
        let ids: Vec<String> = (0..40).map(|i| format!("txn_{i:02}")).collect();
        let intents = futures_util::future::join_all(ids.iter().map(|id| {
            let ledger = ledger.clone();
            let rec = unkeyed(id, &clock);
            async move { ledger.begin_charge(&rec).await }
        }))
        .await;
        assert!(intents.iter().all(|v| matches!(v, Ok(1))), "{intents:?}");
        // each payment settled twice at once, as the request and the reconciler would: one
        // success, one failure from the same version; exactly one of each pair moves it
        let settles = futures_util::future::join_all(ids.iter().flat_map(|id| {
            let rec = unkeyed(id, &clock);
            [
                ended(&rec, PaymentStatus::Success),
                ended(&rec, PaymentStatus::Failed),
            ]
            .map(|rec| {
                let ledger = ledger.clone();
                async move { ledger.settle(&rec, 1).await }
            })
        }))
        .await;
        assert!(
            ledger.largest_group.load(Ordering::Relaxed) > 1,
            "the writes were grouped"
        );
        for (pair, id) in settles.chunks(2).zip(&ids) {
            let won: Vec<bool> = pair.iter().map(|r| *r.as_ref().expect("settle")).collect();
            assert_eq!(won, [true, false], "{id}: the first settlement wins, once");
            let read = ledger.get(id).await.expect("get").expect("stored");
            assert_eq!(read.record.status, PaymentStatus::Success, "{id}");
            assert_eq!(read.version, 2, "{id}");
        }
        // confirmed once each, though asked twice at once
        let confirms = futures_util::future::join_all(ids.iter().flat_map(|id| {
            [id, id].map(|id| {
                let ledger = ledger.clone();
                async move { ledger.confirm(id).await }
            })
        }))
        .await;
        for (pair, id) in confirms.chunks(2).zip(&ids) {
            let done: Vec<bool> = pair.iter().map(|r| *r.as_ref().expect("confirm")).collect();
            assert_eq!(done, [true, false], "{id}");
            let read = ledger.get(id).await.expect("get").expect("stored");
            assert!(read.record.confirmed_at.is_some(), "{id}");
        }
        // a whole group of stale settlements moves nothing
        let stale = futures_util::future::join_all(ids.iter().map(|id| {
            let ledger = ledger.clone();
            let rec = ended(&unkeyed(id, &clock), PaymentStatus::Failed);
            async move { ledger.settle(&rec, 1).await }
        }))
        .await;
        assert!(stale.iter().all(|r| matches!(r, Ok(false))), "{stale:?}");
        for id in &ids {
            let read = ledger.get(id).await.expect("get").expect("stored");
            assert_eq!(read.record.status, PaymentStatus::Success, "{id}");
        }
        let events = tai_core::outbox::read(ledger.database(), 0, 100)
            .await
            .expect("events");
        let mut about: Vec<String> = events
            .iter()
            .map(|e| {
                assert_eq!(e.subject, "payments.events.payment.succeeded");
                e.event_id.clone()
            })
            .collect();
        about.sort();
        let expected: Vec<String> = ids
            .iter()
            .map(|id| crate::events::event_id(id, "payment.succeeded"))
            .collect();
        assert_eq!(
            about, expected,
            "one event per payment, none for the losers"
        );
    }

    #[tokio::test]
    async fn keys_claimed_at_once_in_a_group_are_each_claimed_once() {
        use crate::idempotency::{Claim, ClaimError};
        let clock = ManualClock::new();
        let ledger = ledger(&clock).await;
        // keys k0..k19 once each, and k7 and k11 twice: the second of a pair is in flight;
        // the same key of another merchant is another key
        let mut asked: Vec<(&str, String)> = (0..20).map(|i| ("m", format!("k{i}"))).collect();
        asked.insert(9, ("m", "k7".into()));
        asked.insert(15, ("m", "k11".into()));
        asked.push(("other", "k0".into()));
        let answers = futures_util::future::join_all(asked.iter().map(|(m, k)| {
            let ledger = ledger.clone();
            async move { ledger.claim(m, k, "fp").await }
        }))
        .await;
        assert!(ledger.largest_group.load(Ordering::Relaxed) > 1);
        let mut seen = HashSet::new();
        for ((m, k), answer) in asked.iter().zip(&answers) {
            if seen.insert((m, k)) {
                assert!(
                    matches!(answer, Ok(Claim::Proceed { .. })),
                    "{m} {k}: {answer:?}"
                );
            } else {
                assert!(
                    matches!(answer, Err(ClaimError::InFlight)),
                    "{m} {k} again: {answer:?}"
                );
            }
        }
        // a key used before is looked at as before: another body is refused
        assert!(matches!(
            ledger.claim("m", "k3", "another body").await,
            Err(ClaimError::Mismatch)
        ));
    }

    #[tokio::test]
    async fn a_payment_that_cannot_be_written_fails_alone_and_not_its_group() {
        let clock = ManualClock::new();
        let ledger = ledger(&clock).await;
        // a request whose idempotency claim is no longer its own: its intent must be refused
        let token = match ledger.idempotency().claim("m", "client-key", "fp").await {
            Ok(crate::idempotency::Claim::Proceed { token }) => token,
            other => panic!("claim: {other:?}"),
        };
        let mut lapsed = processing("txn_lapsed", "m:lapsed", &clock);
        lapsed.claim_token = Some(format!("not-{token}"));
        let mut records: Vec<PaymentRecord> = (0..10)
            .map(|i| unkeyed(&format!("txn_ok_{i}"), &clock))
            .collect();
        records.insert(5, lapsed);
        let answers = futures_util::future::join_all(records.iter().map(|rec| {
            let ledger = ledger.clone();
            async move { ledger.begin_charge(rec).await }
        }))
        .await;
        assert!(ledger.largest_group.load(Ordering::Relaxed) > 1);
        for (rec, answer) in records.iter().zip(&answers) {
            let stored = ledger.get(&rec.transaction_id).await.expect("get");
            if rec.transaction_id == "txn_lapsed" {
                assert!(answer.is_err(), "a lapsed claim starts no charge");
                assert!(stored.is_none(), "and leaves no intent");
            } else {
                assert!(
                    matches!(answer, Ok(1)),
                    "{}: {answer:?}",
                    rec.transaction_id
                );
                assert_eq!(
                    stored.expect("intent").record.status,
                    PaymentStatus::Processing
                );
            }
        }
    }
}
