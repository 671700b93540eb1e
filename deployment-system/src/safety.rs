//! The Policy: safety checks before anything moves.
//!
//! Facts are gathered first (does the image exist, does each region exist and have room, what
//! stable version runs there to roll back to); the decision over them is pure and names every
//! failed check, so a rejected deployment says all that is wrong at once.

use std::sync::Arc;

use rust_decimal::Decimal;
use tai_core::backend::BackendError;
use tai_core::pipeline::FactSource;
use tai_core::policy::{Decision, Policy, Reason, Verdict};

use crate::fleet::{Capacity, Platform};
use crate::registry::ImageRegistry;
use crate::signal::DeployRequest;

/// What is known about one target region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionFacts {
    /// The region.
    pub region: String,
    /// Its capacity, `None` if the platform does not know the region.
    pub capacity: Option<Capacity>,
    /// The version to roll back to, if the service runs there.
    pub stable: Option<String>,
}

/// The facts the safety policy decides over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetyFacts {
    /// Whether the image exists in the registry.
    pub image_exists: bool,
    /// Per target region.
    pub regions: Vec<RegionFacts>,
}

/// Gathers [`SafetyFacts`] from the registry and the platform.
#[derive(Debug, Clone)]
pub struct SafetyFactSource {
    /// The registry.
    pub registry: Arc<dyn ImageRegistry>,
    /// The platform.
    pub platform: Arc<dyn Platform>,
}

impl FactSource<DeployRequest> for SafetyFactSource {
    type Facts = SafetyFacts;
    type Error = BackendError;

    async fn gather(&self, req: &DeployRequest) -> Result<SafetyFacts, BackendError> {
        let image_exists = self
            .registry
            .exists(&req.service, &req.version, &req.image)
            .await?;
        let mut regions = Vec::new();
        for region in &req.regions {
            let capacity = self.platform.capacity(region, &req.service);
            let stable = match capacity {
                Some(_) => self
                    .platform
                    .traffic(region, &req.service)
                    .await?
                    .map(|t| t.stable),
                None => None,
            };
            regions.push(RegionFacts {
                region: region.clone(),
                capacity,
                stable,
            });
        }
        Ok(SafetyFacts {
            image_exists,
            regions,
        })
    }
}

/// The safety checks.
#[derive(Debug, Clone, Copy, Default)]
pub struct SafetyPolicy;

impl Policy<DeployRequest, SafetyFacts> for SafetyPolicy {
    fn evaluate(&self, req: &DeployRequest, facts: &SafetyFacts) -> Verdict {
        let mut reasons = Vec::new();
        if !facts.image_exists {
            reasons.push(Reason::new(
                "image_not_found",
                format!("{} is not in the registry", req.image),
                "the image exists",
                Decimal::ONE,
            ));
        }
        for r in &facts.regions {
            match r.capacity {
                None => reasons.push(Reason::new(
                    "unknown_region",
                    format!("{} is not a known region", r.region),
                    "a known region",
                    Decimal::ONE,
                )),
                Some(c) if c.free < c.needed => reasons.push(Reason::new(
                    "insufficient_capacity",
                    format!(
                        "{} has {} free, the rollout needs {}",
                        r.region, c.free, c.needed
                    ),
                    format!(">= {}", c.needed),
                    Decimal::ONE,
                )),
                Some(_) if r.stable.is_none() => reasons.push(Reason::new(
                    "no_rollback_target",
                    format!(
                        "{} does not run in {}, so there is nothing to roll back to",
                        req.service, r.region
                    ),
                    "a stable version runs there",
                    Decimal::ONE,
                )),
                Some(_) => {}
            }
        }
        let decision = if reasons.is_empty() {
            Decision::Allow
        } else {
            Decision::Deny
        };
        Verdict {
            decision,
            score: Decimal::from(reasons.len()),
            reasons,
        }
    }
}
