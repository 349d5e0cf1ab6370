//! Per-module request counters, kept outside route tables (like instance state) so that a
//! table swap keeps them. Atomics only: the request path updates them without locks; the
//! proxy's metrics endpoint reads them.
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (milliseconds) of the request-duration histogram buckets.
pub const LATENCY_BUCKETS_MS: [u64; 12] =
    [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 60000];

/// What happened to requests routed to one module.
#[derive(Debug, Default)]
pub struct ModuleStats {
    /// Responses by status class: index 1..=5 for 1xx..5xx, 0 for no response sent.
    pub responses: [AtomicU64; 6],
    /// Refused by a deny rule (404).
    pub denied: AtomicU64,
    /// Refused for an oversized body (413).
    pub body_too_large: AtomicU64,
    /// Answered 503 because no instance was available.
    pub no_instance: AtomicU64,
    /// Retries after a connect failure.
    pub retries: AtomicU64,
    /// Instances taken down by failed requests.
    pub passive_ejections: AtomicU64,
    /// Requests that followed a valid routing cookie to its instance.
    pub affinity_kept: AtomicU64,
    /// Routing cookies issued to sessions that had none.
    pub affinity_new: AtomicU64,
    /// Sessions moved because their instance was down, removed or past its drain deadline.
    pub affinity_repinned: AtomicU64,
    /// Routing cookies that were forged, stale or malformed (ignored).
    pub affinity_invalid: AtomicU64,
    /// New pins chosen by hashing the backend's session cookie.
    pub affinity_hash_fallback: AtomicU64,
    /// Cumulative histogram buckets (plus one for +Inf) and sum, in microseconds.
    pub latency_buckets: [AtomicU64; LATENCY_BUCKETS_MS.len() + 1],
    pub latency_sum_us: AtomicU64,
}

impl ModuleStats {
    #[inline]
    pub fn record_response(&self, status: u16, micros: u64) {
        let class = (status / 100).min(5) as usize;
        self.responses[class].fetch_add(1, Ordering::Relaxed);
        let ms = micros / 1000;
        let bucket = LATENCY_BUCKETS_MS
            .iter()
            .position(|&b| ms < b)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.latency_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us.fetch_add(micros, Ordering::Relaxed);
    }

    #[inline]
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}
