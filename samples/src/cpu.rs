//! CPU time spent during a measured run: by this process (the nodes, clients and endpoints a
//! scenario runs in it) and, when it runs on this machine, by the RabbitMQ broker.
//!
//! On a shared machine the CPU an operation costs is a steadier figure than throughput: a
//! neighbour's load slows a run down, but leaves what each operation costs mostly unchanged.
//!
//! ```
//! let clock = rhinobus_samples::cpu::CpuClock::start();
//! let _busy: u64 = (0..1_000_000u64).sum();
//! let used = clock.stop();
//! assert!(used.process.is_some());
//! ```

use std::time::Duration;

/// CPU readings taken when a run started.
#[derive(Debug, Clone)]
pub struct CpuClock {
    process: Option<Duration>,
    broker: Option<(u32, Duration)>,
}

/// CPU time used between [`CpuClock::start`] and [`CpuClock::stop`]; `None` where it could not
/// be read (no local broker, or not Linux).
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    /// By this process, every thread (user and system time).
    pub process: Option<Duration>,
    /// By the RabbitMQ broker, when the run used one on this machine and exactly one
    /// `beam.smp` runs here.
    pub broker: Option<Duration>,
}

impl CpuClock {
    /// Takes the starting readings of this process.
    pub fn start() -> Self {
        Self {
            process: process_cpu(),
            broker: None,
        }
    }

    /// [`start`](Self::start), and of the broker at `amqp_url` too when it runs on this
    /// machine (the URL names a loopback host).
    pub fn start_with_broker(amqp_url: &str) -> Self {
        let local = amqp_url
            .split_once("://")
            .map(|(_, rest)| rest.rsplit_once('@').map_or(rest, |(_, host)| host))
            .is_some_and(|host| {
                host.starts_with("127.")
                    || host.starts_with("localhost")
                    || host.starts_with("[::1]")
            });
        Self {
            broker: (local.then(broker_pid).flatten()).and_then(|pid| Some((pid, proc_cpu(pid)?))),
            ..Self::start()
        }
    }

    /// What was used since [`start`](Self::start).
    pub fn stop(&self) -> CpuUse {
        CpuUse {
            process: self
                .process
                .and_then(|start| Some(process_cpu()?.saturating_sub(start))),
            broker: self
                .broker
                .and_then(|(pid, start)| Some(proc_cpu(pid)?.saturating_sub(start))),
        }
    }
}

impl CpuUse {
    /// Microseconds of process and broker CPU per operation, for the report.
    pub fn per_op_us(&self, ops: u64) -> (Option<f64>, Option<f64>) {
        let per_op = |d: Duration| d.as_secs_f64() * 1e6 / ops.max(1) as f64;
        (self.process.map(per_op), self.broker.map(per_op))
    }
}

/// This process's user plus system time, every thread, from `getrusage`.
fn process_cpu() -> Option<Duration> {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole `rusage` into the pointer it is given, which points at
    // one, and RUSAGE_SELF is a valid `who`.
    let usage = unsafe {
        if libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) != 0 {
            return None;
        }
        usage.assume_init()
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Some(time(usage.ru_utime) + time(usage.ru_stime))
}

/// The pid of the one `beam.smp` (RabbitMQ's Erlang VM) running here, if there is exactly one.
fn broker_pid() -> Option<u32> {
    let mut found = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == "beam.smp" {
            if found.is_some() {
                return None;
            }
            found = Some(pid);
        }
    }
    found
}

/// User plus system time of process `pid`, from `/proc/<pid>/stat`.
fn proc_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in parentheses, may itself hold spaces: count fields after it.
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // Fields 14 and 15 of the line (utime, stime) are the 12th and 13th after the name.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|t| *t > 0)?;
    Some(Duration::from_secs_f64(
        (utime + stime) as f64 / ticks as f64,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_broker_on_this_machine_is_measured() {
        for remote in [
            "amqp://guest:guest@rabbit.example:5672/%2f",
            "amqp://10.0.0.7",
        ] {
            assert!(
                CpuClock::start_with_broker(remote).broker.is_none(),
                "{remote}"
            );
        }
    }

    #[test]
    fn reads_this_process_through_both_paths() {
        let by_rusage = process_cpu().expect("getrusage");
        let by_proc = proc_cpu(std::process::id()).expect("/proc/self/stat");
        // Both count the same threads; /proc counts in ticks, so allow a few.
        let gap = by_rusage.abs_diff(by_proc);
        assert!(
            gap < Duration::from_millis(100),
            "{by_rusage:?} vs {by_proc:?}"
        );
        // Spin until 20 ms of CPU show (a loaded machine may give less than wall time).
        let clock = CpuClock::start();
        let spin = std::time::Instant::now();
        let mut used = Duration::ZERO;
        while used < Duration::from_millis(20) && spin.elapsed() < Duration::from_secs(10) {
            std::hint::black_box(0u64);
            used = clock.stop().process.expect("process CPU");
        }
        assert!(used >= Duration::from_millis(20), "{used:?} in 10 s");
    }
}
