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
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    process_cpu_ticks(&stat).map(|t| t as f64 / ticks_per_second())
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

/// utime + stime of a /proc/<pid>/stat line (fields 14 and 15, counted after the command name,
/// which may hold spaces and parentheses).
fn process_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
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
        assert!(machine_busy_secs().is_some_and(|s| s > 0.0));
    }
}
