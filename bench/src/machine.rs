//! What the benchmark reads from `/proc`: the machine it ran on and a process's peak RSS.

/// The machine a run was measured on.
#[derive(Debug, Clone)]
pub struct Machine {
    /// CPUs this process may run on.
    pub nproc: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu: String,
    /// `MemTotal` from /proc/meminfo, in MiB.
    pub mem_total_mib: u64,
}

impl Machine {
    pub fn read() -> Self {
        let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| field(&text, "model name").map(str::to_string))
            .unwrap_or_else(|| "unknown".into());
        let mem_total_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| kib(&text, "MemTotal"))
            .map_or(0, |kb| kb / 1024);
        Self {
            nproc,
            cpu,
            mem_total_mib,
        }
    }
}

/// The value of the first `name: value` line of a /proc text file.
fn field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == name).then(|| v.trim())
    })
}

/// A `name:   1234 kB` line, in kB.
fn kib(text: &str, name: &str) -> Option<u64> {
    field(text, name)?.split_whitespace().next()?.parse().ok()
}

/// The peak resident set size (VmHWM) of process `pid` in kB; None once it has exited.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib(&status, "VmHWM")
}

/// Clock ticks per second of /proc's CPU times.
fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// CPU seconds every CPU of the machine has spent busy (not idle nor waiting for I/O) since boot.
pub fn machine_busy_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map_while(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: u64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    Some(busy as f64 / ticks_per_second())
}

/// CPU seconds (user + system) process `pid` has used; None once it has exited.
pub fn process_cpu_secs(pid: u32) -> Option<f64> {
    process_usage(pid).map(|u| u.cpu_secs())
}

/// What a process has used so far, beyond its CPU seconds: where a change of cost per event
/// goes (kernel time, page faults of freshly mapped memory, wake-ups).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessUsage {
    /// utime: CPU seconds in user space.
    pub user_secs: f64,
    /// stime: CPU seconds in the kernel (system calls, page faults).
    pub sys_secs: f64,
    /// minflt: page faults served without I/O (each first touch of memory the allocator took
    /// from the kernel).
    pub minor_faults: u64,
    /// Times a thread gave up the CPU to wait (a read, a timer, a lock): wake-ups.
    pub voluntary_switches: u64,
    /// Times a thread was preempted: the box's contention, not the process's work.
    pub involuntary_switches: u64,
}

impl ProcessUsage {
    pub fn cpu_secs(&self) -> f64 {
        self.user_secs + self.sys_secs
    }

    /// The sum of two processes' usage.
    pub fn plus(self, o: Self) -> Self {
        Self {
            user_secs: self.user_secs + o.user_secs,
            sys_secs: self.sys_secs + o.sys_secs,
            minor_faults: self.minor_faults + o.minor_faults,
            voluntary_switches: self.voluntary_switches + o.voluntary_switches,
            involuntary_switches: self.involuntary_switches + o.involuntary_switches,
        }
    }
}

/// [`ProcessUsage`] of process `pid` (/proc/<pid>/stat and status); None once it has exited.
pub fn process_usage(pid: u32) -> Option<ProcessUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let (minor_faults, user, sys) = stat_fields(&stat)?;
    let count = |name: &str| field(&status, name).and_then(|v| v.parse().ok());
    Some(ProcessUsage {
        user_secs: user as f64 / ticks_per_second(),
        sys_secs: sys as f64 / ticks_per_second(),
        minor_faults,
        voluntary_switches: count("voluntary_ctxt_switches")?,
        involuntary_switches: count("nonvoluntary_ctxt_switches")?,
    })
}

/// CPU seconds used so far by PostgreSQL on this machine on behalf of database `db`: the server
/// and its background processes, and the client backends of `db` (not those of other databases,
/// e.g. other people's tests). Processes that exit between two readings take their CPU time with
/// them, so compare readings only across a window in which the backends of interest stay open.
pub fn postgres_cpu_secs(db: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    let ticks: u64 = dir
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            if process_comm(&stat) != Some("postgres") {
                return None;
            }
            let title = std::fs::read(e.path().join("cmdline")).ok()?;
            let title = String::from_utf8_lossy(&title).replace('\0', " ");
            serves_database(&title, db).then(|| process_cpu_ticks(&stat))?
        })
        .sum();
    ticks as f64 / ticks_per_second()
}

/// Whether a PostgreSQL process title belongs to database `db`: a client backend's title reads
/// `postgres: [cluster: ]user database host(port) state`; any other process (the postmaster,
/// the checkpointer, the WAL writer, …) serves every database.
fn serves_database(title: &str, db: &str) -> bool {
    let tokens: Vec<&str> = title.split_whitespace().collect();
    let address = tokens
        .iter()
        .position(|t| t.starts_with("[local]") || (t.contains('(') && t.ends_with(')')));
    match address {
        Some(i) if i >= 1 => tokens[i - 1] == db,
        _ => true,
    }
}

/// The command name of a /proc/<pid>/stat line.
fn process_comm(stat: &str) -> Option<&str> {
    Some(&stat[stat.find('(')? + 1..stat.rfind(')')?])
}

/// utime + stime of a /proc/<pid>/stat line.
fn process_cpu_ticks(stat: &str) -> Option<u64> {
    stat_fields(stat).map(|(_, utime, stime)| utime + stime)
}

/// minflt, utime and stime of a /proc/<pid>/stat line (fields 10, 14 and 15, counted after the
/// command name, which may hold spaces and parentheses).
fn stat_fields(stat: &str) -> Option<(u64, u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let at = |i: usize| fields.get(i)?.parse().ok();
    Some((at(7)?, at(11)?, at(12)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_fields() {
        let status = "Name:\tstrata\nVmPeak:\t  900 kB\nVmHWM:\t   12345 kB\n";
        assert_eq!(kib(status, "VmHWM"), Some(12345));
        assert_eq!(kib(status, "VmRSS"), None);
        assert_eq!(
            field("model name\t: AMD EPYC 7B13\n", "model name"),
            Some("AMD EPYC 7B13")
        );
        assert!(peak_rss_kib(std::process::id()).is_some_and(|kb| kb > 0));
        let stat = "42 (tokio (rt) x) S 1 42 42 0 -1 4194560 100 0 0 0 250 17 0 0 20 0 9 0";
        assert_eq!(process_cpu_ticks(stat), Some(267));
        assert_eq!(stat_fields(stat), Some((100, 250, 17)));
        assert_eq!(process_comm(stat), Some("tokio (rt) x"));
        let backend = "postgres: 15/main: postgres strata_bench 127.0.0.1(51234) COPY";
        assert!(serves_database(backend, "strata_bench"));
        assert!(!serves_database(backend, "other_bench"));
        assert!(!serves_database(
            "postgres: alice tests [local] idle",
            "strata_bench"
        ));
        assert!(serves_database(
            "postgres: 15/main: checkpointer ",
            "strata_bench"
        ));
        assert!(serves_database(
            "/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/15/main",
            "strata_bench"
        ));
        assert!(process_cpu_secs(std::process::id()).is_some());
        let me = process_usage(std::process::id()).expect("own usage");
        assert!(me.minor_faults > 0 && me.voluntary_switches + me.involuntary_switches > 0);
        assert!(machine_busy_secs().is_some_and(|s| s > 0.0));
    }
}
