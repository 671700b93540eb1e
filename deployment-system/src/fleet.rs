//! The platform a rollout drives, behind a trait, and its embedded default: the simulated fleet.
//!
//! The simulated fleet is described by `config/fleet.toml`: regions with free capacity, services
//! with the stable version they run and the health their versions show, and the images a fixture
//! registry holds. Its traffic state (stable version, canary version and weight per region and
//! service) lives in the state store, so it survives a controller restart the way a real
//! platform would, and is shared by replicas when the store is Redis.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tai_core::backend::{BackendError, BoxFuture};
use tai_core::clock::SharedClock;
use tai_core::store::StateStore;

/// The fixture compiled in, so the binary runs from any directory.
pub const DEFAULT_FLEET: &str = include_str!("../../config/fleet.toml");

/// Health figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct HealthSample {
    /// Share of failed requests.
    pub error_rate: f64,
    /// p99 latency in ms.
    pub p99_ms: f64,
}

/// A service in the fixture.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ServiceFixture {
    /// Stable version everywhere.
    pub stable: String,
    /// Capacity a rollout needs in a region.
    pub surge: u32,
    /// Health of the stable version (and of new versions unless `new_versions` says otherwise).
    pub healthy: HealthSample,
    /// Health of any version other than the stable one.
    pub new_versions: Option<HealthSample>,
    /// Health of new versions in particular regions, overriding `new_versions` there.
    #[serde(default)]
    pub new_versions_in: BTreeMap<String, HealthSample>,
}

/// A region in the fixture.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RegionFixture {
    /// Capacity free for surges.
    pub free_capacity: u32,
}

/// The whole fixture.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct FleetFixture {
    /// `service:version` images that exist.
    pub images: Vec<String>,
    /// Regions.
    pub regions: BTreeMap<String, RegionFixture>,
    /// Services.
    pub services: BTreeMap<String, ServiceFixture>,
}

impl FleetFixture {
    /// Parses a fixture.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}

/// What runs for one service in one region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficState {
    /// The version taking the rest of the traffic.
    pub stable: String,
    /// The version under test, if any.
    pub canary: Option<String>,
    /// Its share of traffic, 0..=100.
    pub canary_weight: u8,
}

impl TrafficState {
    /// `weight`% to `canary`, the rest to `stable`, in its one normal form: at 100% the canary
    /// is the stable version, at 0% (or without a canary) only `stable` runs.
    pub fn split(stable: &str, canary: Option<&str>, weight: u8) -> Self {
        match canary {
            Some(c) if weight >= 100 => Self::only(c),
            Some(c) if weight > 0 && c != stable => Self {
                stable: stable.to_owned(),
                canary: Some(c.to_owned()),
                canary_weight: weight,
            },
            _ => Self::only(stable),
        }
    }

    /// All traffic to `version`.
    pub fn only(version: &str) -> Self {
        Self {
            stable: version.to_owned(),
            canary: None,
            canary_weight: 0,
        }
    }
}

/// Whether a region can take a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Free capacity.
    pub free: u32,
    /// What the rollout needs.
    pub needed: u32,
}

/// The outcome of a fenced traffic change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The platform took the change.
    Done,
    /// The platform refused it: it already applied a change with the newer token `newer`, so
    /// the writer was deposed.
    Refused {
        /// The newest token the platform has applied.
        newer: u64,
    },
}

/// A platform that runs services in regions.
pub trait Platform: Send + Sync + std::fmt::Debug {
    /// `sim`, or another platform's name.
    fn kind(&self) -> &'static str;
    /// The regions it knows.
    fn regions(&self) -> Vec<String>;
    /// What the platform observes running for `service` in `region` (`None`: the service does
    /// not run there).
    fn traffic<'a>(
        &'a self,
        region: &'a str,
        service: &'a str,
    ) -> BoxFuture<'a, Result<Option<TrafficState>, BackendError>>;
    /// Sets the traffic of `service` in `region` to `desired`, fenced by the controller lease's
    /// `token`: a platform refuses a token older than the newest it has applied there.
    fn set_traffic<'a>(
        &'a self,
        region: &'a str,
        service: &'a str,
        desired: &'a TrafficState,
        token: u64,
    ) -> BoxFuture<'a, Result<Applied, BackendError>>;
    /// The newest fencing token the platform applied for `service` in `region` (0: none).
    fn applied_token<'a>(
        &'a self,
        region: &'a str,
        service: &'a str,
    ) -> BoxFuture<'a, Result<u64, BackendError>>;
    /// The capacity check for a rollout of `service` in `region` (`None`: unknown region).
    fn capacity(&self, region: &str, service: &str) -> Option<Capacity>;
}

/// The simulated fleet.
#[derive(Debug, Clone)]
pub struct SimFleet {
    fixture: Arc<FleetFixture>,
    store: Arc<dyn StateStore>,
    clock: SharedClock,
}

/// What the simulated fleet keeps per (region, service): the traffic and the newest fencing
/// token applied there.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    stable: String,
    canary: Option<String>,
    canary_weight: u8,
    #[serde(default)]
    token: u64,
}

fn key(region: &str, service: &str) -> String {
    format!("dep:fleet:{region}:{service}")
}

const FAULTS_KEY: &str = "dep:fleet:faults";

fn fleet_error(message: String) -> BackendError {
    BackendError::Protocol {
        backend: "fleet",
        message,
    }
}

impl SimFleet {
    /// A fleet from `fixture`, keeping its traffic state in `store`.
    pub fn new(fixture: FleetFixture, store: Arc<dyn StateStore>, clock: SharedClock) -> Self {
        Self {
            fixture: Arc::new(fixture),
            store,
            clock,
        }
    }

    /// The fixture.
    pub fn fixture(&self) -> &FleetFixture {
        &self.fixture
    }

    /// The simulated health of `version` of `service` in `region`.
    pub fn health(&self, service: &str, version: &str, region: &str) -> Option<HealthSample> {
        let s = self.fixture.services.get(service)?;
        if version == s.stable {
            Some(s.healthy)
        } else {
            Some(
                s.new_versions_in
                    .get(region)
                    .copied()
                    .or(s.new_versions)
                    .unwrap_or(s.healthy),
            )
        }
    }

    /// A drill: every traffic change fails for `secs` seconds from now (0 ends the drill). Kept
    /// in the store, so it holds across restarts and for every replica sharing the store.
    pub async fn set_faults(&self, secs: f64) -> Result<Option<DateTime<Utc>>, BackendError> {
        if secs <= 0.0 {
            self.store.delete(FAULTS_KEY).await?;
            return Ok(None);
        }
        let until =
            self.clock.wall() + chrono::Duration::milliseconds((secs * 1000.0).round() as i64);
        self.store
            .put(
                FAULTS_KEY,
                until.timestamp_millis().to_string().into_bytes(),
                None,
            )
            .await?;
        Ok(Some(until))
    }

    /// Until when traffic changes fail, if a drill is on.
    pub async fn faults_until(&self) -> Result<Option<DateTime<Utc>>, BackendError> {
        let Some(bytes) = self.store.get(FAULTS_KEY).await? else {
            return Ok(None);
        };
        let until = std::str::from_utf8(&bytes)
            .ok()
            .and_then(|t| t.parse::<i64>().ok())
            .and_then(DateTime::<Utc>::from_timestamp_millis);
        Ok(until.filter(|u| *u > self.clock.wall()))
    }

    /// Every region's and service's observed traffic, for `GET /fleet`.
    pub async fn snapshot(
        &self,
    ) -> Result<BTreeMap<String, BTreeMap<String, TrafficState>>, BackendError> {
        let mut out = BTreeMap::new();
        for region in self.fixture.regions.keys() {
            let mut services = BTreeMap::new();
            for service in self.fixture.services.keys() {
                if let Some(t) = self.traffic(region, service).await? {
                    services.insert(service.clone(), t);
                }
            }
            out.insert(region.clone(), services);
        }
        Ok(out)
    }

    async fn stored(
        &self,
        region: &str,
        service: &str,
    ) -> Result<Option<(Vec<u8>, Stored)>, BackendError> {
        match self.store.get(&key(region, service)).await? {
            Some(bytes) => {
                let s: Stored =
                    serde_json::from_slice(&bytes).map_err(|e| fleet_error(e.to_string()))?;
                Ok(Some((bytes, s)))
            }
            None => Ok(None),
        }
    }
}

impl Platform for SimFleet {
    fn kind(&self) -> &'static str {
        "sim"
    }
    fn regions(&self) -> Vec<String> {
        self.fixture.regions.keys().cloned().collect()
    }
    fn traffic<'a>(
        &'a self,
        region: &'a str,
        service: &'a str,
    ) -> BoxFuture<'a, Result<Option<TrafficState>, BackendError>> {
        Box::pin(async move {
            if !self.fixture.regions.contains_key(region) {
                return Ok(None);
            }
            if let Some((_, s)) = self.stored(region, service).await? {
                return Ok(Some(TrafficState {
                    stable: s.stable,
                    canary: s.canary,
                    canary_weight: s.canary_weight,
                }));
            }
            Ok(self
                .fixture
                .services
                .get(service)
                .map(|s| TrafficState::only(&s.stable)))
        })
    }
    fn set_traffic<'a>(
        &'a self,
        region: &'a str,
        service: &'a str,
        desired: &'a TrafficState,
        token: u64,
    ) -> BoxFuture<'a, Result<Applied, BackendError>> {
        Box::pin(async move {
            if let Some(until) = self.faults_until().await? {
                return Err(BackendError::Unavailable {
                    backend: "fleet",
                    message: format!("fault drill: traffic changes fail until {until}"),
                });
            }
            let new = Stored {
                stable: desired.stable.clone(),
                canary: desired.canary.clone(),
                canary_weight: desired.canary_weight,
                token,
            };
            let bytes = serde_json::to_vec(&new).map_err(|e| fleet_error(e.to_string()))?;
            let k = key(region, service);
            // compare-and-swap against what was read, so a newer token cannot be overwritten
            // between the check and the write
            for _ in 0..8 {
                let written = match self.stored(region, service).await? {
                    Some((_, old)) if old.token > token => {
                        return Ok(Applied::Refused { newer: old.token });
                    }
                    Some((old_bytes, _)) => {
                        self.store
                            .compare_and_swap(&k, &old_bytes, bytes.clone(), None)
                            .await?
                    }
                    None => self.store.put_if_absent(&k, bytes.clone(), None).await?,
                };
                if written {
                    return Ok(Applied::Done);
                }
            }
            Err(BackendError::Unavailable {
                backend: "fleet",
                message: format!("{region}/{service}: traffic kept changing under this write"),
            })
        })
    }
    fn applied_token<'a>(
        &'a self,
        region: &'a str,
        service: &'a str,
    ) -> BoxFuture<'a, Result<u64, BackendError>> {
        Box::pin(async move {
            Ok(self
                .stored(region, service)
                .await?
                .map(|(_, s)| s.token)
                .unwrap_or(0))
        })
    }
    fn capacity(&self, region: &str, service: &str) -> Option<Capacity> {
        let r = self.fixture.regions.get(region)?;
        let needed = self
            .fixture
            .services
            .get(service)
            .map(|s| s.surge)
            .unwrap_or(0);
        Some(Capacity {
            free: r.free_capacity,
            needed,
        })
    }
}

#[cfg(test)]
mod tests {
    use tai_core::clock::ManualClock;
    use tai_core::store::MemoryStore;

    use super::*;
    use crate::registry::ImageRegistry;

    #[tokio::test]
    async fn the_fixture_and_traffic_state() {
        let fixture = FleetFixture::from_toml(DEFAULT_FLEET).expect("fixture");
        let clock = ManualClock::new();
        let fleet = SimFleet::new(
            fixture,
            Arc::new(MemoryStore::new(clock.shared())),
            clock.shared(),
        );
        assert_eq!(fleet.regions(), vec!["eu-west-1", "us-east-1", "us-west-2"]);
        let t = fleet
            .traffic("us-west-2", "api-service")
            .await
            .expect("mem")
            .expect("runs");
        assert_eq!(t.stable, "v1.9.0");
        assert!(
            fleet
                .traffic("mars-1", "api-service")
                .await
                .expect("mem")
                .is_none()
        );
        let canary = TrafficState::split("v1.9.0", Some("v2.0.0"), 5);
        assert_eq!(
            fleet
                .set_traffic("us-west-2", "api-service", &canary, 2)
                .await
                .expect("mem"),
            Applied::Done
        );
        let t = fleet
            .traffic("us-west-2", "api-service")
            .await
            .expect("mem")
            .expect("runs");
        assert_eq!((t.canary.as_deref(), t.canary_weight), (Some("v2.0.0"), 5));
        // a deposed writer (older token) is refused and changes nothing
        assert_eq!(
            fleet
                .set_traffic("us-west-2", "api-service", &TrafficState::only("v1.9.0"), 1)
                .await
                .expect("mem"),
            Applied::Refused { newer: 2 }
        );
        // a drill fails traffic changes until it lapses
        fleet.set_faults(2.0).await.expect("mem");
        let full = TrafficState::split("v1.9.0", Some("v2.0.0"), 100);
        assert!(
            fleet
                .set_traffic("us-west-2", "api-service", &full, 2)
                .await
                .is_err()
        );
        clock.advance(std::time::Duration::from_secs(3));
        assert_eq!(
            fleet
                .set_traffic("us-west-2", "api-service", &full, 2)
                .await
                .expect("mem"),
            Applied::Done
        );
        assert_eq!(
            fleet
                .traffic("us-west-2", "api-service")
                .await
                .expect("mem")
                .expect("runs")
                .stable,
            "v2.0.0"
        );
        assert_eq!(
            fleet
                .health("bad-service", "v1.0.0", "us-west-2")
                .map(|h| h.error_rate),
            Some(0.12)
        );
        assert_eq!(
            fleet
                .health("bad-service", "v0.9.0", "us-west-2")
                .map(|h| h.error_rate),
            Some(0.001)
        );
        let reg = crate::registry::FixtureRegistry::new(fleet.fixture());
        assert!(
            reg.exists("api-service", "v2.0.0", "x")
                .await
                .expect("fixture")
        );
        assert!(
            !reg.exists("api-service", "v9.9.9", "x")
                .await
                .expect("fixture")
        );
    }
}
