//! Roles a service asks the runtime for by name. The runtime picks each one's backend from the
//! configuration, names it on `/status` (`backends.<role>`) and keeps it bounded; the service
//! never names a backend type.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::Runtime;
use crate::backend::BackendError;
use crate::heijunka::{
    GcraLimiter, MemoryWindowCounter, Quota, RateLimiter, RedisGcra, RedisWindowCounter,
    WindowCounter,
};
use crate::store::StateStore;

/// Whether this replica holds a singleton lease ([`Runtime::singleton`]), as its keeper last
/// saw it.
#[derive(Debug, Clone)]
pub struct Leadership {
    held: watch::Receiver<Option<(u64, Instant)>>,
    valid_for: Duration,
}

impl Leadership {
    /// The fencing token while this replica leads: the lease was renewed recently enough that
    /// no other replica can hold it yet. A keeper stuck on an unanswering store stops leading
    /// before the stored lease could lapse.
    pub fn token(&self) -> Option<u64> {
        self.held
            .borrow()
            .filter(|(_, renewed)| renewed.elapsed() < self.valid_for)
            .map(|(token, _)| token)
    }

    /// Whether this replica leads now.
    pub fn is_leader(&self) -> bool {
        self.token().is_some()
    }
}

/// How often an in-process limiter forgets the keys whose allowance has come back in full.
const LIMITER_SWEEP: Duration = Duration::from_secs(30);

impl Runtime {
    /// Runs `tick` every `period` under the supervisor, as the worker `name`, until shutdown
    /// (which does not wait for the next period).
    pub fn every<F, Fut>(&mut self, name: &str, period: Duration, tick: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let tick = Arc::new(tick);
        self.supervise(name, move |mut shutdown| {
            let tick = tick.clone();
            async move {
                loop {
                    tick().await;
                    tokio::select! {
                        _ = tokio::time::sleep(period) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        });
    }

    /// The rate limiter for `role` (GCRA, `quota` per key): in Redis, shared by every replica
    /// under `<REDIS_KEY_PREFIX><role>:`, when `REDIS_URL` is set; in process otherwise, its
    /// idle keys forgotten every 30 s so that many keys do not grow the process.
    pub async fn rate_limiter(
        &mut self,
        role: &str,
        quota: Quota,
    ) -> Result<Arc<dyn RateLimiter>, BackendError> {
        self.connect_redis().await?;
        let limiter: Arc<dyn RateLimiter> = match &self.redis {
            Some(redis) => Arc::new(RedisGcra::new(
                redis.connection(),
                &format!("{}{role}:", redis.prefix()),
                quota,
            )),
            None => {
                let memory = GcraLimiter::new(quota, self.clock.clone());
                let sweeper = memory.clone();
                self.every(&format!("{role}_sweep"), LIMITER_SWEEP, move || {
                    sweeper.shrink();
                    std::future::ready(())
                });
                Arc::new(memory)
            }
        };
        self.set_backend(role, self.hot_backend());
        Ok(limiter)
    }

    /// The sliding-window counter for `role` (`limit` hits per key within `window`): in Redis,
    /// shared by every replica under `<REDIS_KEY_PREFIX><role>:`, when `REDIS_URL` is set; in
    /// process otherwise (idle keys swept as the map grows).
    pub async fn window_counter(
        &mut self,
        role: &str,
        window: Duration,
        limit: u64,
    ) -> Result<Arc<dyn WindowCounter>, BackendError> {
        self.connect_redis().await?;
        let counter: Arc<dyn WindowCounter> = match &self.redis {
            Some(redis) => Arc::new(RedisWindowCounter::new(
                redis.connection(),
                &format!("{}{role}:", redis.prefix()),
                window,
                limit,
            )),
            None => Arc::new(MemoryWindowCounter::new(window, limit, self.clock.clone())),
        };
        self.set_backend(role, self.hot_backend());
        Ok(counter)
    }

    /// The store for hot, short-lived state every replica must see (recent facts, locks):
    /// Redis when `REDIS_URL` is set, the state store otherwise.
    pub async fn hot_store(&mut self) -> Result<Arc<dyn StateStore>, BackendError> {
        self.connect_redis().await?;
        match &self.redis {
            Some(redis) => Ok(Arc::new(redis.clone())),
            None => self.state_store().await,
        }
    }

    /// A lease for a singleton worker (a reconciler, a relay): kept by a worker of its own
    /// (`<name>_lease`), renewed three times per `ttl` while held and tried four times a second
    /// otherwise, in `store` under `prefix`, shown on `/status` (`leases.<name>`) with its
    /// takeovers counted ([`Runtime::lease`]). The worker asks [`Leadership::is_leader`] before
    /// each round of work; a replica that dies lets the lease lapse and another takes it over
    /// within `ttl`.
    pub fn singleton(
        &mut self,
        name: &str,
        store: Arc<dyn StateStore>,
        prefix: &str,
        ttl: Duration,
    ) -> Leadership {
        let lease = Arc::new(tokio::sync::Mutex::new(
            self.lease(name, store, prefix, ttl),
        ));
        let (tx, held) = watch::channel(None);
        let tx = Arc::new(tx);
        let every = (ttl / 4).min(Duration::from_millis(250));
        self.supervise(&format!("{name}_lease"), move |mut shutdown| {
            let (lease, tx) = (lease.clone(), tx.clone());
            async move {
                loop {
                    {
                        let mut lease = lease.lock().await;
                        lease.tick().await;
                        // a token after a tick means the last renewal, at most ttl/3 ago,
                        // succeeded
                        tx.send_replace(lease.token().map(|t| (t, Instant::now())));
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(every) => {}
                        _ = shutdown.changed() => break,
                    }
                }
                // stopping: lead no more, and let a standby take over now, not after a lapse
                tx.send_replace(None);
                lease.lock().await.release().await;
            }
        });
        Leadership {
            held,
            valid_for: ttl * 2 / 3,
        }
    }

    /// A pool of `workers` workers (at least one) pulling from `queue`, each under the
    /// supervisor (`<name>` for one worker, `<name>-<i>` for several), with their loads on
    /// `/status` as `<name>`: each pulls its next item once it is free, `work` answers what it
    /// made of it, and an `Err` hands the item back to be delivered again. Answers the loads.
    pub fn worker_pool<T, F, Fut, E>(
        &mut self,
        name: &str,
        queue: crate::kanban::SharedQueue<T>,
        workers: usize,
        work: F,
    ) -> crate::kanban::PoolLoad
    where
        T: Clone + Send + Sync + 'static,
        F: Fn(crate::kanban::Job<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<crate::kanban::Worked, E>> + Send + 'static,
        E: std::fmt::Display + 'static,
    {
        let loads = crate::kanban::PoolLoad::new(workers.max(1));
        let (work, label): (_, Arc<str>) = (Arc::new(work), name.into());
        for worker in 0..loads.workers() {
            let (queue, loads, work, label) =
                (queue.clone(), loads.clone(), work.clone(), label.clone());
            let worker_name = if workers <= 1 {
                name.to_owned()
            } else {
                format!("{name}-{worker}")
            };
            self.supervise(&worker_name, move |_| {
                crate::kanban::run_worker(
                    label.clone(),
                    queue.clone(),
                    worker,
                    loads.clone(),
                    work.clone(),
                )
            });
        }
        let shown = loads.clone();
        self.add_status_section(name, move || shown.snapshot());
        loads
    }

    fn hot_backend(&self) -> &'static str {
        if self.redis.is_some() {
            "redis"
        } else {
            "memory"
        }
    }
}
