//! Replicas: a standby answers reads from a view it reloads when the leader changes anything,
//! accepts new deployments into the store for the leader to pick up, and forwards operator
//! commands to the leader through the store, waiting for the answer.

use std::sync::Arc;
use std::time::Duration;

use tai_core::backend::BackendError;
use tai_core::store::StateStore;

use super::controller::{Controller, key};
use super::handle::{Op, OpError};
use super::model::Deployment;

pub(super) const CMD_PREFIX: &str = "dep:cmd:";
pub(super) const CMD_SEQ: &str = "dep:cmdseq";
pub(super) const CHANGE_SEQ: &str = "dep:changeseq";
pub(super) const CREATE_SEQ: &str = "dep:createseq";
const RESULT_PREFIX: &str = "dep:cmdresult:";

#[derive(serde::Serialize, serde::Deserialize)]
struct Forwarded {
    id: String,
    op: Op,
}

#[derive(serde::Serialize, serde::Deserialize)]
enum ForwardedAnswer {
    Done(Box<Deployment>),
    NotFound,
    Conflict(String),
    Failed(String),
}

/// What a replica remembers between looks at the store.
#[derive(Debug)]
pub(super) struct ReplicaState {
    pub(super) last_sync: std::time::Instant,
    pub(super) last_commands: std::time::Instant,
    last_full: std::time::Instant,
    commands_seen: Vec<u8>,
    synced: std::collections::HashMap<&'static str, Vec<u8>>,
}

impl ReplicaState {
    pub(super) fn new() -> Self {
        let long_ago = std::time::Instant::now()
            .checked_sub(Duration::from_secs(60))
            .unwrap_or_else(std::time::Instant::now);
        Self {
            last_sync: long_ago,
            last_commands: long_ago,
            last_full: long_ago,
            commands_seen: Vec::new(),
            synced: std::collections::HashMap::new(),
        }
    }

    /// Makes the next turn reload every record (a deposed leader's view is stale).
    pub(super) fn resync_now(&mut self) {
        *self = Self {
            last_commands: self.last_commands,
            ..Self::new()
        };
    }
}

/// Reads the deployment stored at `key`: `None` when it is gone, or unreadable (logged and
/// skipped, so one bad record does not stop the others).
pub(super) async fn read_record(
    store: &dyn StateStore,
    key: &str,
) -> Result<Option<Deployment>, BackendError> {
    let Some(bytes) = store.get(key).await? else {
        return Ok(None);
    };
    match serde_json::from_slice::<Deployment>(&bytes) {
        Ok(d) => Ok(Some(d)),
        Err(e) => {
            tracing::error!(key = %key, error = %e, "unreadable deployment record; skipped");
            Ok(None)
        }
    }
}

/// Hands `op` on deployment `id` to the lease holder and waits (up to 5 s) for its answer.
pub(super) async fn forward(
    store: Arc<dyn StateStore>,
    id: &str,
    op: Op,
) -> Result<Deployment, OpError> {
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let cmd = serde_json::to_vec(&Forwarded {
        id: id.to_owned(),
        op,
    })
    .unwrap_or_default();
    store
        .put(
            &format!("{CMD_PREFIX}{nonce}"),
            cmd,
            Some(Duration::from_secs(30)),
        )
        .await?;
    if let Err(e) = store.incr(CMD_SEQ).await {
        let _ = store.delete(&format!("{CMD_PREFIX}{nonce}")).await;
        return Err(e.into());
    }
    let result_key = format!("{RESULT_PREFIX}{nonce}");
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut extended = false;
    loop {
        if tokio::time::Instant::now() >= deadline {
            // nobody took it: take it back, so it does not run later by surprise; if the
            // leader already took it, it ran or runs: wait for its answer a while longer
            match store.delete(&format!("{CMD_PREFIX}{nonce}")).await {
                Ok(false) if !extended => {
                    extended = true;
                    deadline += Duration::from_secs(5);
                }
                _ => return Err(OpError::NotLeader),
            }
        }
        if let Some(bytes) = store.get(&result_key).await? {
            let _ = store.delete(&result_key).await;
            return match serde_json::from_slice::<ForwardedAnswer>(&bytes) {
                Ok(ForwardedAnswer::Done(d)) => Ok(*d),
                Ok(ForwardedAnswer::NotFound) => Err(OpError::NotFound),
                Ok(ForwardedAnswer::Conflict(m)) => Err(OpError::Conflict(m)),
                Ok(ForwardedAnswer::Failed(m)) => {
                    Err(OpError::Backend(BackendError::Unavailable {
                        backend: "controller",
                        message: m,
                    }))
                }
                Err(e) => Err(OpError::Backend(BackendError::Protocol {
                    backend: "controller",
                    message: e.to_string(),
                })),
            };
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

impl Controller {
    /// Reloads deployments from the store: all of them on a standby (to answer reads), and on
    /// the leader the ones it does not know yet (accepted by standbys) or, on `takeover`, all.
    /// Answers whether every record was read (a new leader drives nothing until then).
    pub(super) async fn sync(&mut self, takeover: bool) -> bool {
        self.replica.last_sync = std::time::Instant::now();
        // a standby reloads when the leader changed anything, the leader when a standby
        // accepted a deployment (and every 5 s regardless, in case a signal was lost): one
        // read decides, the key scan only follows a change
        let leader = self.lease.token().is_some();
        let watched = if leader { CREATE_SEQ } else { CHANGE_SEQ };
        let mut seen = None;
        if !takeover {
            match self.store.get(watched).await {
                Ok(seq) => {
                    let seq = seq.unwrap_or_default();
                    let due = leader && self.replica.last_full.elapsed() >= Duration::from_secs(5);
                    if self.replica.synced.get(watched) == Some(&seq) && !due {
                        self.metrics.set_in_progress(self.handle.in_progress());
                        return true;
                    }
                    seen = Some(seq);
                }
                Err(_) => return false,
            }
        }
        let keys = match self.store.keys("dep:dpl:").await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list deployments");
                return false;
            }
        };
        let mut complete = true;
        for k in keys {
            let id = k.trim_start_matches("dep:dpl:").to_owned();
            let known = self.handle.get(&id).is_some();
            if leader && known && !takeover {
                continue;
            }
            let d = match read_record(self.store.as_ref(), &k).await {
                Ok(Some(d)) => d,
                Ok(None) => continue,
                Err(_) => {
                    complete = false;
                    continue;
                }
            };
            if d.status.is_terminal() {
                self.published
                    .entry(d.deployment_id.clone())
                    .or_insert(d.events.len());
            }
            self.update_view(&d);
        }
        if complete {
            // remembered only once the scan went through, so a failed one is repeated
            if let Some(seq) = seen {
                self.replica.synced.insert(watched, seq);
            }
            if leader {
                self.replica.last_full = std::time::Instant::now();
            }
        }
        self.metrics.set_in_progress(self.handle.in_progress());
        complete
    }

    /// Runs the operator commands standbys forwarded, and leaves each answer where its standby
    /// waits for it.
    pub(super) async fn take_forwarded(&mut self) {
        self.replica.last_commands = std::time::Instant::now();
        // one read tells whether anything was forwarded since the last look; only then list
        // the commands (a key scan is far dearer than a read in a shared Redis)
        let seq = match self.store.get(CMD_SEQ).await {
            Ok(v) => v.unwrap_or_default(),
            Err(_) => return,
        };
        if seq == self.replica.commands_seen {
            return;
        }
        let Ok(keys) = self.store.keys(CMD_PREFIX).await else {
            return;
        };
        self.replica.commands_seen = seq;
        for k in keys {
            let Ok(Some(bytes)) = self.store.get(&k).await else {
                continue;
            };
            // delete first: if another leader raced us, only one of us runs it
            if !matches!(self.store.delete(&k).await, Ok(true)) {
                continue;
            }
            let Ok(cmd) = serde_json::from_slice::<Forwarded>(&bytes) else {
                continue;
            };
            let answer = match self.operate(&cmd.id, cmd.op).await {
                Ok(d) => ForwardedAnswer::Done(Box::new(d)),
                Err(OpError::NotFound) => ForwardedAnswer::NotFound,
                Err(OpError::Conflict(m)) => ForwardedAnswer::Conflict(m),
                Err(e) => ForwardedAnswer::Failed(e.to_string()),
            };
            let nonce = &k[CMD_PREFIX.len()..];
            let _ = self
                .store
                .put(
                    &format!("{RESULT_PREFIX}{nonce}"),
                    serde_json::to_vec(&answer).unwrap_or_default(),
                    Some(Duration::from_secs(30)),
                )
                .await;
        }
    }

    /// A standby stores a new deployment as accepted; the leader picks it up on its next sync.
    pub(super) async fn accept_on_standby(&mut self, d: &Deployment) -> Result<(), BackendError> {
        let bytes = serde_json::to_vec(d).map_err(|e| BackendError::Protocol {
            backend: "controller",
            message: e.to_string(),
        })?;
        self.store
            .put_if_absent(&key(&d.deployment_id), bytes, None)
            .await?;
        // the leader loads it on its next look (at the latest within 5 s, even if this
        // signal is lost); other standbys on the change signal
        if let Err(e) = self.store.incr(CREATE_SEQ).await {
            tracing::warn!(deployment_id = %d.deployment_id, error = %e, "could not signal the leader; it finds the deployment on its next full look");
        }
        let _ = self.store.incr(CHANGE_SEQ).await;
        self.update_view(d);
        Ok(())
    }
}
