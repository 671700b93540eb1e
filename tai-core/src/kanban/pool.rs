//! A pool of workers pulling from one queue. Each worker pulls its next item only once it is
//! free, so work flows to whichever has capacity and the load levels itself across them
//! (Heijunka by pull, not by assignment). Each worker's load is kept for `/status`.

use std::fmt::Display;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use super::SharedQueue;

/// What a worker made of an item. Either way the item is settled (acknowledged); `Failed`
/// counts against the worker on `/status`. An `Err` from the work instead hands the item back
/// to be delivered again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Worked {
    /// Done.
    Done,
    /// Finished with a failure the work recorded itself.
    Failed,
}

/// One item for one worker.
#[derive(Debug, Clone)]
pub struct Job<T> {
    /// Which worker of the pool (0-based).
    pub worker: usize,
    /// The item.
    pub item: T,
    /// 1 on first delivery, more on redeliveries.
    pub attempt: u32,
}

#[derive(Debug, Default)]
struct Load {
    busy: AtomicBool,
    handled: AtomicU64,
    failed: AtomicU64,
}

/// The loads of a pool's workers.
#[derive(Debug, Clone)]
pub struct PoolLoad(Arc<Vec<Load>>);

impl PoolLoad {
    pub(crate) fn new(workers: usize) -> Self {
        Self(Arc::new((0..workers).map(|_| Load::default()).collect()))
    }

    /// How many workers.
    pub fn workers(&self) -> usize {
        self.0.len()
    }

    /// Each worker's load: `worker`, `busy`, `handled`, `failed` (as `/status` shows it).
    pub fn snapshot(&self) -> Value {
        Value::Array(
            self.0
                .iter()
                .enumerate()
                .map(|(worker, l)| {
                    json!({
                        "worker": worker,
                        "busy": l.busy.load(Ordering::Relaxed),
                        "handled": l.handled.load(Ordering::Relaxed),
                        "failed": l.failed.load(Ordering::Relaxed),
                    })
                })
                .collect(),
        )
    }
}

/// Runs worker `worker` until the queue is closed and drained: pulls an item, works it,
/// acknowledges it, or hands it back when the work answers `Err`.
pub(crate) async fn run_worker<T, F, Fut, E>(
    name: Arc<str>,
    queue: SharedQueue<T>,
    worker: usize,
    loads: PoolLoad,
    work: Arc<F>,
) where
    T: Clone + Send + Sync + 'static,
    F: Fn(Job<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Worked, E>> + Send,
    E: Display,
{
    loop {
        let delivery = match queue.pull().await {
            Ok(Some(d)) => d,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(pool = %name, worker, error = %e, "pulling failed; trying again");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let Some(load) = loads.0.get(worker) else {
            return;
        };
        load.busy.store(true, Ordering::Relaxed);
        let worked = work(Job {
            worker,
            item: delivery.item.clone(),
            attempt: delivery.attempt,
        })
        .await
        .map_err(|e| e.to_string());
        load.busy.store(false, Ordering::Relaxed);
        let settled = match worked {
            Ok(outcome) => {
                load.handled.fetch_add(1, Ordering::Relaxed);
                if outcome == Worked::Failed {
                    load.failed.fetch_add(1, Ordering::Relaxed);
                }
                delivery.ack().await
            }
            Err(error) => {
                tracing::warn!(pool = %name, worker, %error, "work failed; the item is handed back");
                delivery.nack().await
            }
        };
        if let Err(e) = settled {
            tracing::warn!(pool = %name, worker, error = %e, "could not settle a delivery");
        }
    }
}
