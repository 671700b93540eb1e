//! HAProxy's per-server counters sampled over time, so a measurement covers exactly the last
//! analysis interval: requests, 5xx and response time of one version's servers.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::haproxy::{Counters, parse_server_name};

/// Samples kept per region (one a tick, a tick every half second: ten minutes).
const KEEP: usize = 1200;

/// One region's samples: when, and every server's counters by (backend, server).
#[derive(Debug, Default)]
pub struct Samples {
    ring: VecDeque<(Instant, Counters)>,
}

/// What a version's servers did over a window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// Responses.
    pub responses: u64,
    /// 5xx responses.
    pub errors: u64,
    /// Response time averaged over the responses, in ms.
    pub rtime_ms: Option<f64>,
}

impl Samples {
    /// Adds a sample taken at `at`.
    pub fn push(&mut self, at: Instant, stats: Counters) {
        if self.ring.len() >= KEEP {
            self.ring.pop_front();
        }
        self.ring.push_back((at, stats));
    }

    /// How long ago the latest sample was taken.
    pub fn age(&self) -> Option<Duration> {
        self.ring.back().map(|(at, _)| at.elapsed())
    }

    /// What `version` of `service` did in the `window` before the latest sample (or since the
    /// oldest sample kept, if the window reaches further back). `None` before two samples.
    pub fn window(&self, service: &str, version: &str, window: Duration) -> Option<Window> {
        let (last_at, last) = self.ring.back()?;
        let from = last_at.checked_sub(window);
        let base = self
            .ring
            .iter()
            .rev()
            .find(|(at, _)| from.is_none_or(|f| *at <= f))
            .or_else(|| self.ring.front())
            .map(|(_, s)| s)?;
        if std::ptr::eq(base, last) {
            return None;
        }
        let mut out = Window {
            responses: 0,
            errors: 0,
            rtime_ms: None,
        };
        let mut weighted = 0.0;
        for ((backend, server), now) in last {
            if backend != service || parse_server_name(server).map(|(v, _)| v) != Some(version) {
                continue;
            }
            // a server added (or re-added) since the base started its counters from zero
            let then = base
                .get(&(backend.clone(), server.clone()))
                .filter(|b| b.responses <= now.responses && b.errors <= now.errors)
                .copied()
                .unwrap_or_default();
            let n = now.responses - then.responses;
            out.responses += n;
            out.errors += now.errors - then.errors;
            weighted += now.rtime_ms * n as f64;
        }
        if out.responses > 0 {
            out.rtime_ms = Some(weighted / out.responses as f64);
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    use crate::proc::haproxy::ServerStat;

    fn stat(responses: u64, errors: u64, rtime_ms: f64) -> ServerStat {
        ServerStat {
            responses,
            errors,
            rtime_ms,
        }
    }

    #[test]
    fn a_window_counts_what_happened_inside_it() {
        let t0 = Instant::now();
        let key = |s: &str| ("api".to_owned(), s.to_owned());
        let mut s = Samples::default();
        assert_eq!(s.window("api", "v2", Duration::from_secs(5)), None);
        s.push(
            t0,
            BTreeMap::from([
                (key("v2-i0"), stat(100, 50, 9.0)),
                (key("v1-i0"), stat(1000, 0, 1.0)),
            ]),
        );
        s.push(
            t0 + Duration::from_secs(5),
            BTreeMap::from([
                (key("v2-i0"), stat(110, 51, 9.0)),
                (key("v1-i0"), stat(1100, 0, 1.0)),
            ]),
        );
        s.push(
            t0 + Duration::from_secs(10),
            BTreeMap::from([
                (key("v2-i0"), stat(130, 55, 10.0)),
                // a new server counts from zero
                (key("v2-i1"), stat(10, 0, 20.0)),
                (key("v1-i0"), stat(1200, 0, 1.0)),
            ]),
        );
        let w = s
            .window("api", "v2", Duration::from_secs(5))
            .expect("two samples");
        assert_eq!((w.responses, w.errors), (30, 4));
        let rt = w.rtime_ms.expect("responses");
        assert!((rt - (10.0 * 20.0 + 20.0 * 10.0) / 30.0).abs() < 1e-9);
        // a window longer than what is kept starts at the oldest sample
        let all = s
            .window("api", "v2", Duration::from_secs(60))
            .expect("kept");
        assert_eq!((all.responses, all.errors), (40, 5));
        assert_eq!(
            s.window("api", "v9", Duration::from_secs(5))
                .map(|w| w.responses),
            Some(0)
        );
    }
}
