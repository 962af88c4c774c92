//! Governance requests counted by outcome, with their latency: what `/metrics` and the
//! daemon's summary report about the calls to Core (or to the embedded local policy).

use std::{
    sync::atomic::{AtomicU64, AtomicU8, Ordering},
    time::Duration,
};

use serde::Serialize;

use super::client::CoreOutcome;

/// Upper bounds (seconds) of the latency histogram's buckets. From a loopback local
/// policy (well under a millisecond) to a Core call that hits the default 30 s timeout.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// How a governance request ended, as in [`CoreOutcome`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An answer with a JSON body.
    Ok,
    /// A 2xx/3xx answer without a JSON body.
    NonJson,
    /// HTTP status ≥ 400.
    HttpError,
    Timeout,
    /// Connection refused, DNS, TLS or I/O failure.
    Network,
}

impl Outcome {
    pub const ALL: [Outcome; 5] = [
        Outcome::Ok,
        Outcome::NonJson,
        Outcome::HttpError,
        Outcome::Timeout,
        Outcome::Network,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::NonJson => "non_json",
            Outcome::HttpError => "http_error",
            Outcome::Timeout => "timeout",
            Outcome::Network => "network",
        }
    }

    pub fn of<T>(outcome: &CoreOutcome<T>) -> Outcome {
        match outcome {
            CoreOutcome::Ok(_) => Outcome::Ok,
            CoreOutcome::NonJson { .. } => Outcome::NonJson,
            CoreOutcome::HttpError { .. } | CoreOutcome::AuthRefused(_) => Outcome::HttpError,
            CoreOutcome::Timeout => Outcome::Timeout,
            CoreOutcome::Network(_) => Outcome::Network,
        }
    }
}

/// Core reachability as last seen (0: unknown, before the first call).
const REACH_YES: u8 = 1;
const REACH_NO: u8 = 2;

/// Shared by every task of one governor.
#[derive(Default)]
pub struct Requests {
    by_outcome: [AtomicU64; 5],
    /// Non-cumulative: `buckets[i]` counts latencies in (LATENCY_BUCKETS[i-1], LATENCY_BUCKETS[i]];
    /// the last slot counts the ones above every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    latency_nanos: AtomicU64,
    reachable: AtomicU8,
}

impl Requests {
    pub fn record<T>(&self, outcome: &CoreOutcome<T>, took: Duration) {
        let o = Outcome::of(outcome);
        self.by_outcome[Outcome::ALL.iter().position(|x| *x == o).unwrap_or(0)]
            .fetch_add(1, Ordering::Relaxed);
        let secs = took.as_secs_f64();
        let slot = LATENCY_BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        self.latency_nanos.fetch_add(
            u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        // Core answered (even with a refusal) unless the network failed, it timed out, or
        // it said it is unavailable itself (5xx).
        let down = match outcome {
            CoreOutcome::Timeout | CoreOutcome::Network(_) => true,
            CoreOutcome::HttpError { status, .. } => *status >= 500,
            _ => false,
        };
        self.set_reachable(!down);
    }

    pub fn set_reachable(&self, yes: bool) {
        self.reachable
            .store(if yes { REACH_YES } else { REACH_NO }, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> RequestStats {
        let buckets = LATENCY_BUCKETS
            .iter()
            .zip(&self.buckets)
            .map(|(bound, n)| (*bound, n.load(Ordering::Relaxed)))
            .collect();
        RequestStats {
            by_outcome: Outcome::ALL
                .iter()
                .zip(&self.by_outcome)
                .map(|(o, n)| (o.as_str(), n.load(Ordering::Relaxed)))
                .collect(),
            latency_buckets: buckets,
            latency_count: self.buckets.iter().map(|n| n.load(Ordering::Relaxed)).sum(),
            latency_sum_nanos: self.latency_nanos.load(Ordering::Relaxed),
            core_reachable: match self.reachable.load(Ordering::Relaxed) {
                REACH_YES => Some(true),
                REACH_NO => Some(false),
                _ => None,
            },
        }
    }
}

/// A snapshot of [`Requests`].
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct RequestStats {
    /// Every outcome, in [`Outcome::ALL`] order (zeros included).
    pub by_outcome: Vec<(&'static str, u64)>,
    /// Counts per bucket, by upper bound (seconds); not cumulative (the encoder sums
    /// them), and latencies above the last bound are only in `latency_count`.
    #[serde(skip)]
    pub latency_buckets: Vec<(f64, u64)>,
    pub latency_count: u64,
    pub latency_sum_nanos: u64,
    /// `None` until the first call (or always, without Core).
    pub core_reachable: Option<bool>,
}

impl RequestStats {
    pub fn total(&self) -> u64 {
        self.by_outcome.iter().map(|(_, n)| n).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_latencies_and_reachability_are_counted_per_request() {
        let r = Requests::default();
        assert_eq!(r.snapshot().core_reachable, None);
        r.record(&CoreOutcome::Ok(()), Duration::from_micros(300));
        r.record(&CoreOutcome::<()>::Timeout, Duration::from_secs(31));
        assert_eq!(r.snapshot().core_reachable, Some(false));
        r.record(
            &CoreOutcome::<()>::HttpError {
                status: 403,
                body: String::new(),
            },
            Duration::from_millis(20),
        );
        let s = r.snapshot();
        assert_eq!(s.core_reachable, Some(true), "a 403 is an answer");
        assert_eq!(
            s.by_outcome,
            vec![
                ("ok", 1),
                ("non_json", 0),
                ("http_error", 1),
                ("timeout", 1),
                ("network", 0)
            ]
        );
        assert_eq!((s.total(), s.latency_count), (3, 3));
        // 300 µs in the first bucket, 20 ms in the 0.025 s one, 31 s above every bound.
        assert_eq!(s.latency_buckets[0], (0.001, 1));
        assert_eq!(s.latency_buckets[4], (0.025, 1));
        assert_eq!(s.latency_buckets.iter().map(|b| b.1).sum::<u64>(), 2);
        assert_eq!(s.latency_sum_nanos, 31_020_300_000);
    }
}
