//! Latency histograms: one HDR histogram per connection task (no sharing on the hot path),
//! merged at the end.

use hdrhistogram::Histogram;
use serde_json::{Value, json};

/// Nanoseconds, 1 ns to 60 s, 3 significant digits.
pub struct Latency(Histogram<u64>);

const HIGHEST_NS: u64 = 60_000_000_000;

impl Latency {
    pub fn new() -> Self {
        Latency(Histogram::new_with_bounds(1, HIGHEST_NS, 3).expect("valid histogram bounds"))
    }

    pub fn record_ns(&mut self, ns: u64) {
        self.0.saturating_record(ns.clamp(1, HIGHEST_NS));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so this cannot fail.
        let _ = self.0.add(&other.0);
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    fn us(&self, q: f64) -> f64 {
        self.0.value_at_quantile(q) as f64 / 1000.0
    }

    /// Percentiles in microseconds for the JSON report.
    pub fn to_json(&self) -> Value {
        if self.count() == 0 {
            return Value::Null;
        }
        json!({
            "count": self.count(),
            "mean": round2(self.0.mean() / 1000.0),
            "p50": self.us(0.50),
            "p90": self.us(0.90),
            "p99": self.us(0.99),
            "p999": self.us(0.999),
            "max": self.0.max() as f64 / 1000.0,
        })
    }

    /// One human line: `p50 61us  p90 80us  p99 150us  p99.9 1.2ms  max 3.4ms`.
    pub fn summary(&self) -> String {
        if self.count() == 0 {
            return "no samples".into();
        }
        format!(
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            fmt_us(self.us(0.5)),
            fmt_us(self.us(0.9)),
            fmt_us(self.us(0.99)),
            fmt_us(self.us(0.999)),
            fmt_us(self.0.max() as f64 / 1000.0)
        )
    }
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// `850us`, `1.25ms`, `2.1s`.
pub fn fmt_us(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0}us")
    } else if us < 1_000_000.0 {
        format!("{:.2}ms", us / 1000.0)
    } else {
        format!("{:.2}s", us / 1_000_000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_merge() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        for i in 1..=900 {
            a.record_ns(i * 1000);
        }
        for _ in 0..100 {
            b.record_ns(5_000_000);
        }
        a.merge(&b);
        assert_eq!(a.count(), 1000);
        let j = a.to_json();
        assert!((j["p50"].as_f64().unwrap() - 500.0).abs() < 1.0);
        assert!((j["p99"].as_f64().unwrap() - 5000.0).abs() < 5.0);
        assert_eq!(Latency::new().to_json(), Value::Null);
        assert_eq!(fmt_us(1250.0), "1.25ms");
    }
}
