//! CPU and memory of the processes a run involves, read from /proc.
//!
//! Guarantee: figures are measured, never estimated: utime+stime deltas of the
//! named processes (clock ticks per second from `getconf CLK_TCK`) and their
//! resident memory; a process that is gone counts what was last read of it.

use std::collections::BTreeMap;
use std::time::Duration;

/// Who is measured: a role and how its processes are found.
#[derive(Debug, Clone)]
pub enum Who {
    /// These pids (tally child, the private broker, the private ClickHouse).
    Pids(Vec<u32>),
    /// Every process whose `comm` is this name (Postgres: all its processes).
    Comm(&'static str),
    /// The threads of a process whose `comm` is this name (noida-db's
    /// `autosave` thread, which re-serializes its whole state).
    Threads(u32, &'static str),
}

impl Who {
    pub fn pids(&self) -> Vec<u32> {
        match self {
            Who::Pids(p) => p.clone(),
            Who::Comm(name) => pids_by_comm(name),
            Who::Threads(..) => Vec::new(),
        }
    }

    /// CPU ticks of each process (or thread) now.
    fn ticks(&self) -> BTreeMap<u32, u64> {
        match self {
            Who::Threads(pid, name) => threads_by_comm(*pid, name)
                .into_iter()
                .filter_map(|t| Some((t, thread_ticks(*pid, t)?)))
                .collect(),
            _ => self
                .pids()
                .into_iter()
                .filter_map(|p| Some((p, cpu_ticks_with_children(p)?)))
                .collect(),
        }
    }
}

/// Thread ids of `pid` whose `comm` is `name`.
fn threads_by_comm(pid: u32, name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|tid| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .is_ok_and(|c| c.trim() == name)
        })
        .collect()
}

/// utime + stime of one thread in clock ticks.
fn thread_ticks(pid: u32, tid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; fields after `(comm)` start at 3.
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// Ticks per second of /proc/<pid>/stat utime and stime.
pub fn clk_tck() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

/// Pids of every process named `name` (as in /proc/<pid>/comm).
pub fn pids_by_comm(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name)
        })
        .collect()
}

/// utime + stime of a process in clock ticks.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    Some(stat_fields(pid, 14..=15)?.iter().sum())
}

/// utime + stime plus cutime + cstime (children that exited and were waited
/// for): a Postgres backend that lives and ends within a run is counted by
/// the postmaster's cutime/cstime when it exits.
pub fn cpu_ticks_with_children(pid: u32) -> Option<u64> {
    Some(stat_fields(pid, 14..=17)?.iter().sum())
}

/// Numeric fields of /proc/<pid>/stat by their 1-based number (`man 5 proc`).
fn stat_fields(pid: u32, range: std::ops::RangeInclusive<usize>) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after `(comm)` start at field 3 (state).
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    range
        .map(|f| fields.get(f.checked_sub(3)?)?.parse().ok())
        .collect()
}

/// A field of /proc/<pid>/status in kB (VmRSS, VmHWM).
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| {
            rest.trim_start_matches(':')
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
}

/// CPU ticks per pid of every role at one instant.
#[derive(Debug, Clone, Default)]
pub struct Snapshot(BTreeMap<&'static str, BTreeMap<u32, u64>>);

/// The roles measured in every phase.
#[derive(Debug, Clone)]
pub struct Roles(pub Vec<(&'static str, Who)>);

impl Roles {
    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        for (role, who) in &self.0 {
            s.0.insert(role, who.ticks());
        }
        s
    }
}

/// CPU seconds per role between two snapshots. A process present only in
/// `after` started in between (counted from zero); one present only in
/// `before` ended: its parent's cutime/cstime holds its whole life, so its
/// reading in `before` is subtracted.
pub fn cpu_seconds(
    before: &Snapshot,
    after: &Snapshot,
    tck: u64,
) -> BTreeMap<&'static str, Duration> {
    let mut out = BTreeMap::new();
    for (role, now) in &after.0 {
        let then = before.0.get(role);
        let grown: u64 = now.values().sum();
        let gone: u64 = then.map_or(0, |m| m.values().sum());
        let ticks = grown.saturating_sub(gone);
        out.insert(*role, Duration::from_millis(ticks * 1000 / tck.max(1)));
    }
    out
}

/// Nanoseconds per step of a fixed integer loop (the median of 5 rounds of
/// 20M xorshift steps, about 0.1 s in all): the same work every time, so it
/// shows how fast the CPU was when a phase ended. On a shared VM host it moves
/// by tens of percent between runs, and every CPU-seconds figure with it.
// display only
#[allow(clippy::float_arithmetic, clippy::cast_precision_loss)]
pub fn cpu_probe_ns() -> f64 {
    const STEPS: u64 = 20_000_000;
    let mut rounds: Vec<f64> = (0..5)
        .map(|r| {
            let t = std::time::Instant::now();
            let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ r;
            for _ in 0..STEPS {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
            }
            std::hint::black_box(x);
            t.elapsed().as_nanos() as f64 / STEPS as f64
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[2]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_parsing_on_self() {
        let pid = std::process::id();
        assert!(status_kb(pid, "VmRSS").unwrap_or(0) > 0);
        assert!(status_kb(pid, "VmHWM").unwrap_or(0) > 0);
        assert!(cpu_ticks(pid).is_some());
        assert!(clk_tck() > 0);
        // The main thread is named like the process.
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let name: &'static str = Box::leak(comm.trim().to_string().into_boxed_str());
        let threads = Who::Threads(pid, name).ticks();
        assert!(threads.contains_key(&pid), "{threads:?}");
    }

    #[test]
    fn deltas_count_started_and_ended_processes() {
        let mut a = Snapshot::default();
        a.0.insert("x", BTreeMap::from([(1, 100), (2, 50)]));
        let mut b = Snapshot::default();
        // pid 2 ended after 30 more ticks, which its parent (pid 1) took over
        b.0.insert("x", BTreeMap::from([(1, 150 + 80), (3, 20)]));
        assert_eq!(cpu_seconds(&a, &b, 100)["x"], Duration::from_millis(1000));
    }
}
