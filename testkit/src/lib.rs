//! Servers a test or a benchmark owns, so it can kill and restart them: a `redis-server` with
//! AOF on and a PostgreSQL cluster (initdb + pg_ctl), each on a free loopback port in a
//! temporary folder that is removed with it. Shared by `tests/` and `bench/`.
//!
//! # Layout
//! - [`OwnRedis`]: `redis-server` with `appendfsync always` (or no persistence at all,
//!   [`OwnRedis::start_ephemeral`]), optionally with a replica; restart on the same port.
//! - [`OwnPostgres`]: a cluster of its own, trust auth, user `postgres`; crash-stop and start.
//! - [`free_port`], [`rss_kb`]: a free loopback port; a process's resident memory.
//! - [`tls`]: test certificates (rcgen), a TLS-only `redis-server`, a PostgreSQL with `ssl = on`.
//! - [`cluster`]: [`OwnCluster`], a Redis Cluster of 3 masters and 3 replicas; slot migration
//!   and failover by hand.

pub mod cluster;
pub mod tls;

pub use cluster::OwnCluster;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, up: bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() != up {
        assert!(
            Instant::now() < deadline,
            "{what} on port {port} did not {}",
            if up { "start" } else { "stop" }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `redis-server` with `appendonly yes` and `appendfsync always`.
pub struct OwnRedis {
    /// Its loopback port.
    pub port: u16,
    /// Holds the AOF and the log.
    dir: tempfile::TempDir,
    child: Option<Child>,
    /// AOF on (`appendfsync always`); off: no persistence at all.
    persistent: bool,
    /// A replica's master's port ([`OwnRedis::start_replica`]).
    replica_of: Option<u16>,
}

impl OwnRedis {
    /// Starts a server on a free port and waits until it answers.
    pub fn start() -> Self {
        Self::start_with(true)
    }

    /// Like [`OwnRedis::start`], with no persistence at all (`--save "" --appendonly no`), as
    /// [`OwnCluster`]'s nodes run: for a benchmark comparing the two.
    pub fn start_ephemeral() -> Self {
        Self::start_with(false)
    }

    fn start_with(persistent: bool) -> Self {
        let mut r = OwnRedis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            persistent,
            replica_of: None,
        };
        r.launch();
        r
    }

    /// A replica of this server (`--replicaof`, persistence as this one's), once its link to
    /// this server is up and the initial sync is done.
    pub fn start_replica(&self) -> Self {
        let mut r = OwnRedis {
            port: free_port(),
            dir: tempfile::tempdir().unwrap(),
            child: None,
            persistent: self.persistent,
            replica_of: Some(self.port),
        };
        r.launch();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = Command::new("redis-cli")
                .args(["-h", "127.0.0.1", "-p", &r.port.to_string()])
                .args(["INFO", "replication"])
                .output()
                .expect("redis-cli (apt install redis-tools)");
            let info = String::from_utf8_lossy(&out.stdout);
            let up = info.lines().any(|l| l.trim() == "master_link_status:up")
                && info
                    .lines()
                    .any(|l| l.trim() == "master_sync_in_progress:0");
            if up {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "the replica on {} did not sync with {}: {info}",
                r.port,
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                if self.persistent { "yes" } else { "no" },
            ])
            .args(["--appendfsync", "always", "--dir"])
            .arg(self.dir.path())
            .args(
                self.replica_of
                    .map(|m| vec!["--replicaof".to_string(), "127.0.0.1".into(), m.to_string()])
                    .unwrap_or_default(),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt install redis-server)");
        self.child = Some(child);
        wait_for_port(self.port, true, "redis-server");
    }

    /// Stops the server (SIGTERM: it flushes the AOF) and starts it again on the same port.
    pub fn restart(&mut self, down_for: Duration) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        wait_for_port(self.port, false, "redis-server");
        std::thread::sleep(down_for);
        self.launch();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn pg_bin(tool: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries (apt install postgresql)")
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join(tool).exists())
        .collect();
    dirs.sort();
    dirs.pop().expect("no PostgreSQL bin folder").join(tool)
}

/// Runs a PostgreSQL tool, as the `postgres` user when we are root (initdb refuses root).
fn pg_command(tool: &str) -> Command {
    let root = unsafe { libc::geteuid() } == 0;
    let mut c = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(pg_bin(tool));
        c
    } else {
        Command::new(pg_bin(tool))
    };
    c.stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn run(mut c: Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A PostgreSQL cluster of its own, trust auth, user `postgres`.
pub struct OwnPostgres {
    /// Its loopback port.
    pub port: u16,
    /// Holds the cluster (`data/`) and its log.
    dir: tempfile::TempDir,
}

impl OwnPostgres {
    /// Runs initdb and starts the cluster on a free port (fsync off: tests crash it on purpose).
    pub fn start() -> Self {
        Self::init(None, |_| {})
    }

    /// [`OwnPostgres::start`], with `configure` run on the data folder between initdb and the
    /// first start (to add TLS files, `postgresql.conf` settings, `pg_hba.conf` rules).
    pub fn start_configured(configure: impl FnOnce(&Path)) -> Self {
        Self::init(None, configure)
    }

    /// Like [`OwnPostgres::start`], but connections over TCP must give `password` for user
    /// `postgres` (scram-sha-256), so a test can check a password really is sent.
    pub fn start_with_password(password: &str) -> Self {
        Self::init(Some(password), |_| {})
    }

    /// initdb (trust, or scram-sha-256 over TCP with `password`), `configure`, start.
    fn init(password: Option<&str>, configure: impl FnOnce(&Path)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let pg = OwnPostgres {
            port: free_port(),
            dir,
        };
        let mut init = pg_command("initdb");
        match password {
            None => {
                init.args(["-U", "postgres", "--auth=trust"]);
            }
            Some(password) => {
                let file = pg.dir.path().join("pwfile");
                std::fs::write(&file, format!("{password}\n")).unwrap();
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
                init.args([
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                ])
                .arg(format!("--pwfile={}", file.display()));
            }
        }
        init.arg("-D").arg(pg.data());
        run(init, "initdb");
        configure(&pg.data());
        pg.launch();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    fn launch(&self) {
        let mut c = pg_command("pg_ctl");
        c.args(["-w", "-D"])
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .arg("-o")
            .arg(format!(
                "-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off",
                self.port,
                self.socket_dir().display()
            ));
        c.arg("start");
        run(c, "pg_ctl start");
        wait_for_port(self.port, true, "postgres");
    }

    /// Stops the server like a crash (`-m immediate`: recovery on the next start).
    pub fn stop(&self) {
        let mut c = pg_command("pg_ctl");
        c.args(["-w", "-m", "immediate", "-D"])
            .arg(self.data())
            .arg("stop");
        run(c, "pg_ctl stop");
        wait_for_port(self.port, false, "postgres");
    }

    /// Starts the cluster again after [`OwnPostgres::stop`].
    pub fn start_again(&self) {
        self.launch();
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let mut c = pg_command("pg_ctl");
        c.args(["-w", "-m", "immediate", "-D"])
            .arg(self.data())
            .arg("stop");
        let _ = c.output();
    }
}

/// Resident memory (VmRSS) of process `pid`, from /proc, in KiB.
pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
