//! The one-JSON-object-per-line report that every bench scenario prints.

use serde::Serialize;
use std::time::Duration;

/// Latencies of individual operations, in the order they were recorded.
#[derive(Debug, Default, Clone)]
pub struct Latencies(Vec<Duration>);

impl Latencies {
    /// An empty set with room for `n` samples.
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }

    /// Records one operation's latency.
    pub fn record(&mut self, d: Duration) {
        self.0.push(d);
    }

    /// Adds every sample of `other`.
    pub fn extend(&mut self, other: Latencies) {
        self.0.extend(other.0);
    }

    /// The `q` quantile (0.0..=1.0) in milliseconds; 0 when nothing was recorded.
    pub fn quantile_ms(&mut self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.sort_unstable();
        let idx = ((self.0.len() - 1) as f64 * q).round() as usize;
        self.0[idx].as_secs_f64() * 1000.0
    }
}

/// One line of bench output, as DESIGN.md fixes it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub ops: u64,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_ops_per_sec: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
    /// Scenario-specific figures (concurrency, replication lag, ...).
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    /// Builds a report from the operation count, the wall time and the latencies.
    pub fn new(scenario: &str, ops: u64, elapsed: Duration, mut latencies: Latencies) -> Self {
        let seconds = elapsed.as_secs_f64();
        Self {
            scenario: scenario.to_owned(),
            ops,
            seconds,
            ops_per_sec: ops as f64 / seconds.max(f64::EPSILON),
            p50_ms: latencies.quantile_ms(0.50),
            p99_ms: latencies.quantile_ms(0.99),
            baseline_ops_per_sec: None,
            ratio: None,
            extra: serde_json::Map::new(),
        }
    }

    /// Records the baseline measured in the same run and the ratio to it.
    pub fn with_baseline(mut self, baseline: &Report) -> Self {
        self.baseline_ops_per_sec = Some(baseline.ops_per_sec);
        self.ratio = Some(self.ops_per_sec / baseline.ops_per_sec.max(f64::EPSILON));
        for key in ["cpu_us_per_op", "broker_cpu_us_per_op"] {
            if let Some(cpu) = baseline.extra.get(key) {
                self = self.with(&format!("baseline_{key}"), cpu.clone());
            }
        }
        self
    }

    /// One report for several rounds of a scenario, each `(run, baseline)` measured one after
    /// the other: the round whose ratio is the median (the lower middle one of an even
    /// number), every figure its own, and, with more than one round, every round's ratio as
    /// `round_ratios`, in the order they ran. On a shared machine one round's ratio can be off
    /// by a third either way; the median of several is the figure to quote.
    ///
    /// # Panics
    /// If `rounds` is empty.
    pub fn median_of_rounds(rounds: Vec<(Report, Report)>) -> Report {
        assert!(!rounds.is_empty(), "median of no rounds");
        let n = rounds.len();
        let mut rounds: Vec<Report> = (rounds.into_iter())
            .map(|(run, base)| run.with_baseline(&base))
            .collect();
        let ratio = |r: &Report| r.ratio.unwrap_or_default();
        let round_ratios: Vec<f64> = (rounds.iter())
            .map(|r| (ratio(r) * 1000.0).round() / 1000.0)
            .collect();
        rounds.sort_by(|a, b| ratio(a).total_cmp(&ratio(b)));
        let report = rounds.swap_remove((n - 1) / 2);
        if n == 1 {
            return report;
        }
        report.with("rounds", n).with("round_ratios", round_ratios)
    }

    /// Adds the CPU the run used per operation, where it could be read: `cpu_us_per_op` for
    /// this process, `broker_cpu_us_per_op` for the local RabbitMQ broker.
    pub fn with_cpu(self, used: &crate::cpu::CpuUse) -> Self {
        let (process, broker) = used.per_op_us(self.ops);
        let round = |us: f64| (us * 100.0).round() / 100.0;
        let mut report = self;
        if let Some(us) = process {
            report = report.with("cpu_us_per_op", round(us));
        }
        if let Some(us) = broker {
            report = report.with("broker_cpu_us_per_op", round(us));
        }
        report
    }

    /// Adds a scenario-specific figure.
    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.extra.insert(key.to_owned(), value.into());
        self
    }

    /// A one-line summary for people.
    pub fn human(&self) -> String {
        let mut s = format!(
            "{:<20} {:>9} ops {:>8.2}s {:>10.0} ops/s  p50 {:>7.3} ms  p99 {:>7.3} ms",
            self.scenario, self.ops, self.seconds, self.ops_per_sec, self.p50_ms, self.p99_ms
        );
        if let (Some(b), Some(r)) = (self.baseline_ops_per_sec, self.ratio) {
            s.push_str(&format!("  baseline {b:.0} ops/s  ratio {r:.2}"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(ops_per_sec: u64) -> Report {
        Report::new(
            "s",
            ops_per_sec,
            Duration::from_secs(1),
            Latencies::default(),
        )
    }

    #[test]
    fn rounds_report_the_round_of_the_median_ratio() {
        let rounds = vec![
            (report(10), report(100)),
            (report(30), report(50)),
            (report(20), report(80)),
            (report(40), report(50)),
        ];
        let r = Report::median_of_rounds(rounds);
        assert_eq!(
            r.ops_per_sec, 20.0,
            "ratios 0.1, 0.25, 0.6, 0.8: the lower middle"
        );
        assert_eq!(r.baseline_ops_per_sec, Some(80.0));
        assert_eq!(r.ratio, Some(0.25));
        assert_eq!(r.extra["rounds"], 4);
        assert_eq!(
            r.extra["round_ratios"],
            serde_json::json!([0.1, 0.6, 0.25, 0.8])
        );
        let one = Report::median_of_rounds(vec![(report(10), report(40))]);
        assert_eq!(one.ratio, Some(0.25));
        assert!(!one.extra.contains_key("rounds"));
    }
}
