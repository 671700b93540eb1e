//! Lanes: one queue per (region, service), in arrival order.
//!
//! A deployment of a service waits in the lane of the region it is about to take, behind
//! earlier deployments of that service there. The order is the store-issued `seq`, so it holds
//! across replicas. A lane is free when no deployment owns it ([`Deployment::owns`]: running,
//! going back to stable, or done but not yet observed done); the first deployment in line that
//! is not paused takes it. A paused deployment that has not started that region steps out of
//! line. A later deploy of a service supersedes that service's deployments still queued and not
//! started anywhere (waiting behind another in a busy lane), when it covers all of their regions. [`plan`] is pure: the controller
//! carries the plan out.

use std::collections::BTreeMap;

use super::model::Deployment;

/// A lane: (region, service).
pub type Lane = (String, String);

/// What the controller should do now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// Deployments that take the region they wait for, now.
    pub grants: Vec<String>,
    /// Each waiting deployment's place in its lane (1 = next), `None` when out of line.
    pub positions: Vec<(String, Option<usize>)>,
    /// (superseded, by).
    pub supersede: Vec<(String, String)>,
    /// Who owns each owned lane, grants included.
    pub owners: BTreeMap<Lane, String>,
}

/// Every lane a deployment of the active set owns.
pub fn owners<'a>(active: impl IntoIterator<Item = &'a Deployment>) -> BTreeMap<Lane, String> {
    let mut by_seq: Vec<&Deployment> = active.into_iter().collect();
    by_seq.sort_by_key(|d| d.seq);
    let mut owners = BTreeMap::new();
    for d in by_seq {
        for (i, r) in d.regions.iter().enumerate() {
            if d.owns(i) {
                owners
                    .entry((r.region.clone(), d.service.clone()))
                    .or_insert_with(|| d.deployment_id.clone());
            }
        }
    }
    owners
}

/// Plans grants, queue positions and supersessions over the deployments not yet ended.
pub fn plan<'a>(active: impl IntoIterator<Item = &'a Deployment>) -> Plan {
    let mut by_seq: Vec<&Deployment> = active
        .into_iter()
        .filter(|d| !d.status.is_terminal())
        .collect();
    by_seq.sort_by_key(|d| d.seq);
    let mut owners = owners(by_seq.iter().copied());
    let mut supersede = Vec::new();
    for d in &by_seq {
        // only a deployment queued behind another (its lane is busy) and not started anywhere
        let queued = d
            .waiting_for()
            .is_some_and(|r| owners.contains_key(&(r.to_owned(), d.service.clone())));
        if d.started() || !queued {
            continue;
        }
        let later = by_seq.iter().find(|e| {
            e.seq > d.seq
                && e.service == d.service
                && d.regions
                    .iter()
                    .all(|r| e.regions.iter().any(|x| x.region == r.region))
        });
        if let Some(e) = later {
            supersede.push((d.deployment_id.clone(), e.deployment_id.clone()));
        }
    }
    let mut lines: BTreeMap<Lane, Vec<&Deployment>> = BTreeMap::new();
    let mut positions = Vec::new();
    for d in &by_seq {
        if supersede.iter().any(|(id, _)| *id == d.deployment_id) {
            continue;
        }
        let Some(region) = d.waiting_for() else {
            continue;
        };
        if d.paused {
            positions.push((d.deployment_id.clone(), None));
            continue;
        }
        lines
            .entry((region.to_owned(), d.service.clone()))
            .or_default()
            .push(d);
    }
    let mut grants = Vec::new();
    for (lane, line) in lines {
        let mut ahead = 0;
        for d in line {
            if ahead == 0 && !owners.contains_key(&lane) {
                owners.insert(lane.clone(), d.deployment_id.clone());
                grants.push(d.deployment_id.clone());
                positions.push((d.deployment_id.clone(), None));
                continue;
            }
            ahead += 1;
            positions.push((d.deployment_id.clone(), Some(ahead)));
        }
    }
    Plan {
        grants,
        positions,
        supersede,
        owners,
    }
}
