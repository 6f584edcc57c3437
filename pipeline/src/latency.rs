//! A lock-free histogram of end-to-end latency (XADD of the source event → COMMIT).

use std::sync::atomic::{AtomicU64, Ordering};

/// Buckets double from 1 ms: bucket `i` holds latencies below `2^i` ms (the last is open-ended).
const BUCKETS: usize = 24;

#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Rows per bucket.
    counts: [AtomicU64; BUCKETS],
}

impl LatencyHistogram {
    /// Records `rows` rows that waited `ms` milliseconds.
    pub fn record(&self, ms: u64, rows: u64) {
        let i = (64 - ms.leading_zeros() as usize).min(BUCKETS - 1);
        self.counts[i].fetch_add(rows, Ordering::Relaxed);
    }

    /// The upper bound in ms of the bucket holding quantile `q` (0..=1); None when empty.
    pub fn quantile_ms(&self, q: f64) -> Option<u64> {
        let counts: Vec<u64> = self
            .counts
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let target = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in counts.iter().enumerate() {
            seen += c;
            if seen >= target {
                return Some(1u64 << i);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn quantiles_land_in_power_of_two_buckets() {
        let h = super::LatencyHistogram::default();
        assert_eq!(h.quantile_ms(0.5), None);
        h.record(3, 90);
        h.record(700, 10);
        assert_eq!(h.quantile_ms(0.5), Some(4));
        assert_eq!(h.quantile_ms(0.99), Some(1024));
    }
}
