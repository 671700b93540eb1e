//! Traffic shares as HAProxy server weights, and back: the weight each server of the stable
//! and canary versions gets for a split, and the split a set of reported weights amounts to.
//! Pure, so the round trip is tested without a router.

use std::collections::BTreeMap;

use crate::fleet::TrafficState;

/// HAProxy's largest server weight.
const MAX_WEIGHT: u64 = 256;

/// The weight of each stable server and each canary server so that `n_canary` canary servers
/// carry `share`% of the requests and `n_stable` stable servers the rest (weighted
/// round-robin). A version with no server gets 0; with all the traffic, 100.
pub fn server_weights(share: u8, n_stable: usize, n_canary: usize) -> (u32, u32) {
    let share = u64::from(share.min(100));
    if n_canary == 0 || share == 0 {
        return (100, 0);
    }
    if n_stable == 0 || share == 100 {
        return (0, 100);
    }
    // n_canary * c : n_stable * s = share : 100 - share
    let s = (100 - share) * n_canary as u64;
    let c = share * n_stable as u64;
    let top = s.max(c);
    if top <= MAX_WEIGHT {
        return (s as u32, c as u32);
    }
    let scale = |w: u64| ((w * MAX_WEIGHT + top / 2) / top).max(1) as u32;
    (scale(s), scale(c))
}

/// The split that `weights` (total weight of ready, running servers per version) amounts to,
/// named after `asked` where its versions are the ones weighted; `None` when no server takes
/// traffic.
pub fn observed(weights: &BTreeMap<String, u64>, asked: &TrafficState) -> Option<TrafficState> {
    let total: u64 = weights.values().sum();
    if total == 0 {
        return None;
    }
    let weighted: Vec<(&String, u64)> = weights
        .iter()
        .filter(|(_, w)| **w > 0)
        .map(|(v, w)| (v, *w))
        .collect();
    if let [(only, _)] = weighted.as_slice() {
        return Some(TrafficState::only(only));
    }
    if weighted.len() > 2 {
        // no split of two versions describes it, so none is reported as in place
        return None;
    }
    // the stable side is the asked stable version if it is weighted, else the heaviest
    let stable = weighted
        .iter()
        .find(|(v, _)| **v == asked.stable)
        .or_else(|| weighted.iter().max_by_key(|(_, w)| *w))
        .map(|(v, _)| (*v).clone())?;
    let (canary, cw) = weighted
        .iter()
        .filter(|(v, _)| **v != stable)
        .max_by_key(|(v, w)| (Some(*v) == asked.canary.as_ref(), *w))
        .map(|(v, w)| ((*v).clone(), *w))?;
    let pct = ((cw * 100 + total / 2) / total).min(100) as u8;
    Some(TrafficState::split(&stable, Some(&canary), pct))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn w(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(v, w)| ((*v).to_owned(), *w)).collect()
    }

    #[test]
    fn weights_give_the_asked_share() {
        assert_eq!(server_weights(5, 2, 2), (190, 10));
        assert_eq!(server_weights(0, 2, 2), (100, 0));
        assert_eq!(server_weights(100, 2, 2), (0, 100));
        assert_eq!(server_weights(25, 2, 0), (100, 0));
        let asked = TrafficState::split("v1", Some("v2"), 5);
        assert_eq!(
            observed(&w(&[("v1", 380), ("v2", 20)]), &asked),
            Some(asked.clone())
        );
        assert_eq!(
            observed(&w(&[("v1", 380), ("v2", 0)]), &asked),
            Some(TrafficState::only("v1"))
        );
        assert_eq!(observed(&w(&[("v1", 0)]), &asked), None);
        // three versions weighted is no two-way split at all
        assert_eq!(
            observed(&w(&[("v1", 50), ("v2", 25), ("v3", 25)]), &asked),
            None
        );
        // a version other than the asked canary is reported as it is
        assert_eq!(
            observed(&w(&[("v1", 50), ("v3", 50)]), &asked),
            Some(TrafficState::split("v1", Some("v3"), 50))
        );
    }

    proptest! {
        // what the weights carry reads back as the asked split, within a percent when the
        // weights had to be scaled down to HAProxy's 256
        #[test]
        fn the_split_round_trips(share in 1u8..100, ns in 1usize..=4, nc in 1usize..=4) {
            let (s, c) = server_weights(share, ns, nc);
            prop_assert!(s <= 256 && c <= 256 && s > 0 && c > 0);
            let asked = TrafficState::split("v1", Some("v2"), share);
            let seen = observed(&w(&[("v1", u64::from(s) * ns as u64), ("v2", u64::from(c) * nc as u64)]), &asked)
                .expect("weighted");
            let got = if seen.stable == "v2" { 100 } else { seen.canary_weight };
            prop_assert!((i32::from(got) - i32::from(share)).abs() <= 1, "{share}% read back as {got}%");
            if ns.max(nc) <= 2 {
                prop_assert_eq!(seen, asked);
            }
        }
    }
}
