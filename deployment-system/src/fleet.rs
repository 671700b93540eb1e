//! The platform a rollout drives, behind a trait, and its embedded default: the simulated fleet.
//!
//! The simulated fleet is described by `config/fleet.toml`: regions with free capacity, services
//! with the stable version they run and the health their versions show, and the images a fixture
//! registry holds. Its traffic state (stable version, canary version and weight per region and
//! service) lives in the state store, so it survives a controller restart the way a real
//! platform would, and is shared by replicas when the store is Redis.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tai_core::backend::{BackendError, BoxFuture};
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

/// Whether a region can take a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Free capacity.
    pub free: u32,
    /// What the rollout needs.
    pub needed: u32,
}

/// A platform that runs services in regions.
pub trait Platform: Send + Sync + std::fmt::Debug {
    /// `sim`, or another platform's name.
    fn kind(&self) -> &'static str;
    /// The regions it knows.
    fn regions(&self) -> Vec<String>;
    /// What runs for `service` in `region` (`None`: the service does not run there).
    fn traffic<'a>(
        &'a self,
        region: &'a str,
        service: &'a str,
    ) -> BoxFuture<'a, Result<Option<TrafficState>, BackendError>>;
    /// Sends `weight`% of traffic to `canary` and the rest to `stable` (0 removes the canary).
    fn set_traffic<'a>(
        &'a self,
        region: &'a str,
        service: &'a str,
        stable: &'a str,
        canary: Option<&'a str>,
        weight: u8,
    ) -> BoxFuture<'a, Result<(), BackendError>>;
    /// The capacity check for a rollout of `service` in `region` (`None`: unknown region).
    fn capacity(&self, region: &str, service: &str) -> Option<Capacity>;
}

/// The simulated fleet.
#[derive(Debug, Clone)]
pub struct SimFleet {
    fixture: Arc<FleetFixture>,
    store: Arc<dyn StateStore>,
}

fn key(region: &str, service: &str) -> String {
    format!("dep:fleet:{region}:{service}")
}

impl SimFleet {
    /// A fleet from `fixture`, keeping its traffic state in `store`.
    pub fn new(fixture: FleetFixture, store: Arc<dyn StateStore>) -> Self {
        Self {
            fixture: Arc::new(fixture),
            store,
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

    /// Every region's and service's traffic, for `GET /fleet`.
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
            if let Some(bytes) = self.store.get(&key(region, service)).await? {
                let state = serde_json::from_slice(&bytes).map_err(|e| BackendError::Protocol {
                    backend: "fleet",
                    message: e.to_string(),
                })?;
                return Ok(Some(state));
            }
            Ok(self.fixture.services.get(service).map(|s| TrafficState {
                stable: s.stable.clone(),
                canary: None,
                canary_weight: 0,
            }))
        })
    }
    fn set_traffic<'a>(
        &'a self,
        region: &'a str,
        service: &'a str,
        stable: &'a str,
        canary: Option<&'a str>,
        weight: u8,
    ) -> BoxFuture<'a, Result<(), BackendError>> {
        Box::pin(async move {
            let state = match canary {
                // at 100% the new version becomes the stable one
                Some(c) if weight >= 100 => TrafficState {
                    stable: c.to_owned(),
                    canary: None,
                    canary_weight: 0,
                },
                Some(c) if weight > 0 => TrafficState {
                    stable: stable.to_owned(),
                    canary: Some(c.to_owned()),
                    canary_weight: weight,
                },
                _ => TrafficState {
                    stable: stable.to_owned(),
                    canary: None,
                    canary_weight: 0,
                },
            };
            let bytes = serde_json::to_vec(&state).unwrap_or_default();
            self.store.put(&key(region, service), bytes, None).await
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
        let fleet = SimFleet::new(
            fixture,
            Arc::new(MemoryStore::new(ManualClock::new().shared())),
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
        fleet
            .set_traffic("us-west-2", "api-service", "v1.9.0", Some("v2.0.0"), 5)
            .await
            .expect("mem");
        let t = fleet
            .traffic("us-west-2", "api-service")
            .await
            .expect("mem")
            .expect("runs");
        assert_eq!((t.canary.as_deref(), t.canary_weight), (Some("v2.0.0"), 5));
        fleet
            .set_traffic("us-west-2", "api-service", "v1.9.0", Some("v2.0.0"), 100)
            .await
            .expect("mem");
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
