//! `redis-get` and `redis-set`: the reference the DHT scenarios are measured against, taken
//! with Redis's own `redis-benchmark` against the local Redis in the same run.

use crate::report::{Latencies, Report};
use std::process::Command;
use std::time::Duration;

/// Runs `redis-benchmark` for GET and SET with `clients` connections, `ops` requests and
/// 100-byte values. `None` (with the reason on stderr) when Redis or the tool is missing, so
/// the DHT figures are still printed, just without a baseline.
pub fn redis_benchmark(ops: u64, clients: usize, port: u16) -> Option<(Report, Report)> {
    let out = Command::new("redis-benchmark")
        .args(["-q", "--csv", "-t", "get,set", "-d", "100"])
        .args([
            "-c",
            &clients.to_string(),
            "-n",
            &ops.to_string(),
            "-p",
            &port.to_string(),
        ])
        .output();
    let out = match out {
        Ok(out) if out.status.success() => out,
        Ok(out) => {
            eprintln!(
                "bench: redis-benchmark failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            return None;
        }
        Err(e) => {
            eprintln!("bench: no Redis baseline (redis-benchmark: {e})");
            return None;
        }
    };
    let csv = String::from_utf8_lossy(&out.stdout);
    let row = |test: &str| {
        let line = csv
            .lines()
            .find(|l| l.starts_with(&format!("\"{test}\"")))?;
        let cells: Vec<f64> = line
            .split(',')
            .skip(1)
            .map(|c| c.trim_matches('"').parse().ok())
            .collect::<Option<_>>()?;
        // rps, avg, min, p50, p95, p99, max
        let (rps, p50, p99) = (*cells.first()?, *cells.get(3)?, *cells.get(5)?);
        let mut report = Report::new(
            &format!("redis-{}", test.to_lowercase()),
            ops,
            Duration::from_secs_f64(ops as f64 / rps),
            Latencies::default(),
        );
        report.p50_ms = p50;
        report.p99_ms = p99;
        Some(report.with("clients", clients))
    };
    match (row("GET"), row("SET")) {
        (Some(get), Some(set)) => Some((get, set)),
        _ => {
            eprintln!("bench: could not read redis-benchmark's output:\n{csv}");
            None
        }
    }
}
