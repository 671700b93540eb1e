//! A lease with fencing tokens, for a worker that must run in one replica at a time (a rollout
//! loop, a reconciler).
//!
//! The holder renews the lease three times per time-to-live; a standby tries to take it a few
//! times a second and takes it once it lapses. Each taking draws a new fencing token from a
//! counter in the store, so every write the holder makes can carry its token, and a store or a
//! platform that remembers the newest token it saw refuses a deposed holder's late write
//! (Kleppmann's fencing; the pattern Kubernetes' leader election leaves to its users).
//!
//! [`Lease::tick`] reports changes: [`Change::Took`] (with the previous holder when one had held
//! it) and [`Change::Lost`]. [`Lease::status`] is what `/status` shows. Taking a lease from a
//! holder that lapsed (crashed, hung, cut off) is a takeover, counted; taking one its holder
//! gave up on shutdown ([`Lease::release`], a rolling restart) is a handover, not counted.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::store::StateStore;

/// This replica's part in a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Holds the lease and does the work.
    Leader,
    /// Waits to take over.
    Standby,
}

/// What `/status` shows of a lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LeaseStatus {
    /// This replica's role.
    pub role: Role,
    /// This replica's id.
    pub instance: String,
    /// Who holds the lease, as last read (`None`: nobody, or not read yet).
    pub holder: Option<String>,
    /// This replica's fencing token while it leads.
    pub token: Option<u64>,
    /// How many times this replica took the lease over from another holder.
    pub takeovers: u64,
}

/// A change of role reported by [`Lease::tick`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Nothing changed.
    None,
    /// This replica took the lease with `token`; `from` names the previous holder if one was
    /// seen holding it (a takeover), `None` on a first start.
    Took {
        /// The new fencing token.
        token: u64,
        /// The previous holder, when known.
        from: Option<String>,
    },
    /// This replica lost the lease (another took it, or renewing failed).
    Lost,
}

/// A lease on `key` in a [`StateStore`], with its fencing counter at `fence_key`.
#[derive(Debug)]
pub struct Lease {
    store: Arc<dyn StateStore>,
    name: String,
    key: String,
    fence_key: String,
    /// Who last gave the lease up on shutdown ([`Lease::release`]).
    released_key: String,
    instance: String,
    ttl: Duration,
    token: Option<u64>,
    last: Option<Instant>,
    last_holder: Option<String>,
    status: Arc<RwLock<LeaseStatus>>,
    takeovers: Option<prometheus::IntCounter>,
}

impl Lease {
    /// A lease named `name` (e.g. `controller`), kept at `{prefix}lease` with its fencing
    /// counter at `{prefix}fence`, lasting `ttl` without renewal.
    pub fn new(store: Arc<dyn StateStore>, name: &str, prefix: &str, ttl: Duration) -> Self {
        let instance = format!("{name}_{}", uuid::Uuid::new_v4().simple());
        let status = LeaseStatus {
            role: Role::Standby,
            instance: instance.clone(),
            holder: None,
            token: None,
            takeovers: 0,
        };
        Self {
            store,
            name: name.to_owned(),
            key: format!("{prefix}lease"),
            fence_key: format!("{prefix}fence"),
            released_key: format!("{prefix}released"),
            instance,
            ttl: ttl.max(Duration::from_millis(300)),
            token: None,
            last: None,
            last_holder: None,
            status: Arc::new(RwLock::new(status)),
            takeovers: None,
        }
    }

    /// Counts takeovers in `counter` (e.g. `lease_takeovers_total{lease="controller"}`).
    pub fn with_takeover_counter(mut self, counter: prometheus::IntCounter) -> Self {
        self.takeovers = Some(counter);
        self
    }

    /// The lease's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This replica's id in the lease.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The key a fenced write checks ([`StateStore::put_fenced`]).
    pub fn fence_key(&self) -> &str {
        &self.fence_key
    }

    /// The fencing token while this replica leads.
    pub fn token(&self) -> Option<u64> {
        self.token
    }

    /// How long the lease lasts without renewal.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// A shared view of the lease for `/status`.
    pub fn status(&self) -> Arc<RwLock<LeaseStatus>> {
        self.status.clone()
    }

    fn publish(&self) {
        let mut s = self.status.write().unwrap_or_else(|p| p.into_inner());
        s.role = if self.token.is_some() {
            Role::Leader
        } else {
            Role::Standby
        };
        s.token = self.token;
        s.holder = if self.token.is_some() {
            Some(self.instance.clone())
        } else {
            self.last_holder.clone()
        };
    }

    /// Gives the lease up in this replica's view after a fenced write was refused (a newer
    /// holder exists). The stored lease is left to lapse or to its new holder.
    pub fn lost(&mut self) {
        if self.token.take().is_some() {
            tracing::warn!(lease = %self.name, instance = %self.instance, "a newer holder fenced this replica out; standing by");
        }
        self.publish();
    }

    /// Gives the lease up on shutdown, so that a standby takes it at its next try (a quarter
    /// second) instead of waiting for it to lapse. Only this replica's own lease is touched: it
    /// is swapped, if still this replica's, for an entry that expires at once. The work the
    /// lease guarded must have stopped: this replica leads no more either way.
    pub async fn release(&mut self) {
        if self.token.take().is_none() {
            return;
        }
        let me = self.instance.as_bytes().to_vec();
        // who gave it up, written first so that the next holder never finds the lease free
        // without it: it takes a handover, not a takeover (best effort: the lease goes anyway)
        if let Err(e) = self
            .store
            .put(&self.released_key, me.clone(), Some(self.ttl))
            .await
        {
            tracing::debug!(lease = %self.name, error = %e, "could not note the release");
        }
        match self
            .store
            .compare_and_swap(
                &self.key,
                &me,
                b"released".to_vec(),
                Some(Duration::from_millis(1)),
            )
            .await
        {
            Ok(true) => {
                tracing::info!(lease = %self.name, instance = %self.instance, "released the {} lease", self.name);
            }
            // another holder already: nothing of this replica's to give up
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(lease = %self.name, error = %e, "could not release the lease; it lapses after its time to live");
            }
        }
        self.publish();
    }

    /// Renews or tries to take the lease when it is time to (the holder three times per
    /// time-to-live, a standby four times a second), and reports a change of role.
    pub async fn tick(&mut self) -> Change {
        let every = if self.token.is_some() {
            self.ttl / 3
        } else {
            (self.ttl / 4).min(Duration::from_millis(250))
        };
        if self.last.is_some_and(|t| t.elapsed() < every) {
            return Change::None;
        }
        self.last = Some(Instant::now());
        let me = self.instance.as_bytes().to_vec();
        let change = match self.token {
            Some(token) => match self
                .store
                .compare_and_swap(&self.key, &me, me.clone(), Some(self.ttl))
                .await
            {
                Ok(true) => Change::None,
                Ok(false) => {
                    tracing::warn!(lease = %self.name, instance = %self.instance, token, "lost the lease; standing by");
                    self.token = None;
                    Change::Lost
                }
                Err(e) => {
                    // unable to renew: stop before the lease could pass to another replica
                    tracing::warn!(lease = %self.name, instance = %self.instance, error = %e, "cannot renew the lease; standing by");
                    self.token = None;
                    Change::Lost
                }
            },
            None => match self
                .store
                .put_if_absent(&self.key, me.clone(), Some(self.ttl))
                .await
            {
                Ok(true) => match self.store.incr(&self.fence_key).await {
                    Ok(token) => {
                        let from = self.last_holder.take().filter(|h| *h != self.instance);
                        let handed_over = match &from {
                            Some(prev) => {
                                self
                                .store
                                .get(&self.released_key)
                                .await
                                .ok()
                                .flatten()
                                .is_some_and(|by| by == prev.as_bytes())
                                // seen in the instant between its release and its expiry
                                || prev == "released"
                            }
                            None => false,
                        };
                        if let Some(prev) = from.as_ref().filter(|_| handed_over) {
                            tracing::info!(lease = %self.name, instance = %self.instance, token, previous = %prev, "took the {} lease handed over", self.name);
                        } else if let Some(prev) = &from {
                            if let Some(c) = &self.takeovers {
                                c.inc();
                            }
                            self.status
                                .write()
                                .unwrap_or_else(|p| p.into_inner())
                                .takeovers += 1;
                            tracing::warn!(lease = %self.name, instance = %self.instance, token, previous = %prev, "took the {} lease over", self.name);
                        }
                        tracing::info!(lease = %self.name, instance = %self.instance, token, "took the {} lease", self.name);
                        self.token = Some(token);
                        Change::Took { token, from }
                    }
                    Err(e) => {
                        // holding the lease without a token would be unfenced: let it lapse
                        tracing::warn!(lease = %self.name, error = %e, "took the lease but could not draw a fencing token");
                        Change::None
                    }
                },
                Ok(false) => {
                    if let Ok(Some(holder)) = self.store.get(&self.key).await {
                        self.last_holder = Some(String::from_utf8_lossy(&holder).into_owned());
                    }
                    Change::None
                }
                Err(e) => {
                    tracing::debug!(lease = %self.name, error = %e, "cannot reach the lease");
                    Change::None
                }
            },
        };
        self.publish();
        change
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::MemoryStore;

    #[tokio::test]
    async fn a_released_lease_is_taken_at_the_next_try_without_waiting_for_it_to_lapse() {
        let clock = ManualClock::new();
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new(clock.shared()));
        // long enough that only a release lets the standby in during this test
        let ttl = Duration::from_secs(600);
        let mut a = Lease::new(store.clone(), "reconciler", "r:", ttl);
        let mut b = Lease::new(store.clone(), "reconciler", "r:", ttl);
        assert!(matches!(a.tick().await, Change::Took { .. }));
        assert_eq!(b.tick().await, Change::None, "held by a");
        a.release().await;
        assert_eq!(a.token(), None, "a leads no more");
        clock.advance(Duration::from_millis(2));
        b.last = None; // its next try, without waiting a quarter second
        let Change::Took { token, from } = b.tick().await else {
            panic!("b takes the released lease at its next try");
        };
        assert_eq!(token, 2, "with a newer fencing token");
        assert_eq!(from.as_deref(), Some(a.instance()), "from a");
        assert_eq!(
            b.status().read().expect("status").takeovers,
            0,
            "a lease given up on shutdown is handed over, not taken over"
        );
        // a replica that still thinks it leads cannot release what another holds
        a.token = Some(1);
        a.release().await;
        b.last = None;
        assert_eq!(b.tick().await, Change::None);
        assert_eq!(b.token(), Some(2));
    }

    #[tokio::test]
    async fn one_holder_at_a_time_and_a_takeover_draws_a_newer_token() {
        let clock = ManualClock::new();
        let store: Arc<dyn StateStore> = Arc::new(MemoryStore::new(clock.shared()));
        let ttl = Duration::from_millis(300);
        let mut a = Lease::new(store.clone(), "controller", "t:", ttl);
        let mut b = Lease::new(store.clone(), "controller", "t:", ttl);
        let Change::Took { token: ta, from } = a.tick().await else {
            panic!("the first replica takes the free lease");
        };
        assert_eq!(from, None, "a first start is no takeover");
        assert_eq!(b.tick().await, Change::None);
        let sb = b.status().read().expect("status").clone();
        assert_eq!(
            (sb.role, sb.holder.as_deref()),
            (Role::Standby, Some(a.instance()))
        );
        // a writes fenced; the holder lapses (a paused) and b takes over with a newer token
        assert!(
            store
                .put_fenced("x", b"a".to_vec(), a.fence_key(), ta)
                .await
                .expect("mem")
        );
        clock.advance(Duration::from_millis(400));
        b.last = None;
        let Change::Took { token: tb, from } = b.tick().await else {
            panic!("the standby takes the lapsed lease");
        };
        assert!(tb > ta);
        assert_eq!(
            from.as_deref(),
            Some(a.instance()),
            "reported as a takeover"
        );
        assert_eq!(b.status().read().expect("status").takeovers, 1);
        // the deposed holder's late write is refused, and its next renewal finds it lost
        assert!(
            !store
                .put_fenced("x", b"stale".to_vec(), a.fence_key(), ta)
                .await
                .expect("mem")
        );
        a.last = None;
        assert_eq!(a.tick().await, Change::Lost);
        assert_eq!(a.status().read().expect("status").role, Role::Standby);
        assert_eq!(b.tick().await, Change::None, "the holder renews quietly");
    }
}
