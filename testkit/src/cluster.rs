//! A Redis Cluster a test or a benchmark owns: 3 masters and 3 replicas (`redis-server
//! --cluster-enabled yes`, no persistence) on free loopback ports, each in its own temporary
//! folder, joined with `redis-cli --cluster create`; killed and removed on drop. Also what a
//! test needs to move a slot by hand (so a client sees `ASK` and then `MOVED`) and to fail a
//! master over to its replica.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tls::TestCerts;
use crate::{free_port, wait_for_port};

/// One `redis-server` of the cluster.
struct Node {
    /// Its client port.
    port: u16,
    /// Holds `nodes.conf` and the log (kept across [`OwnCluster::kill`] and
    /// [`OwnCluster::restart`], so a restarted node knows the cluster).
    dir: tempfile::TempDir,
    /// The server process; `None` after [`OwnCluster::kill`].
    child: Option<Child>,
}

/// 3 masters + 3 replicas on loopback.
pub struct OwnCluster {
    /// The six servers, in `--cluster create` order (the first three become masters).
    nodes: Vec<Node>,
    /// TLS only ([`OwnCluster::start_tls`]): the CA file `redis-cli` trusts.
    tls_ca: Option<PathBuf>,
    /// TLS only: the nodes' certificate, key, CA, client certificate and its key, to start a
    /// killed node again.
    tls_files: Option<[PathBuf; 5]>,
}

/// TLS settings of the nodes of [`OwnCluster::start_tls`].
struct NodeTls<'a> {
    /// Server certificate (it names `localhost`).
    cert: &'a Path,
    /// Its key.
    key: &'a Path,
    /// The CA.
    ca: &'a Path,
    /// The certificate a node shows when it connects to another's cluster bus: Redis requires
    /// one there whatever `tls-auth-clients` says, and with the client-auth purpose, which the
    /// server certificate lacks.
    client_cert: &'a Path,
    /// Its key.
    client_key: &'a Path,
}

impl OwnCluster {
    /// Starts six nodes, creates the cluster (`--cluster-replicas 1`) and waits until every
    /// node says `cluster_state:ok` and knows all six.
    pub fn start() -> Self {
        Self::create(None)
    }

    /// Like [`OwnCluster::start`], TLS only (`--tls-cluster yes`, `--tls-replication yes`, no
    /// client certificates required) with `certs`' server certificate, and the nodes announce
    /// the host name `localhost` (`cluster-preferred-endpoint-type hostname`), the name the
    /// certificate holds, so redirects can be verified. Seeds: [`OwnCluster::tls_urls`].
    pub fn start_tls(certs: &TestCerts) -> Self {
        Self::create(Some(NodeTls {
            cert: &certs.server_cert,
            key: &certs.server_key,
            ca: &certs.ca,
            client_cert: &certs.client_cert,
            client_key: &certs.client_key,
        }))
    }

    fn create(tls: Option<NodeTls<'_>>) -> Self {
        let nodes: Vec<Node> = (0..6).map(|_| Node::launch(tls.as_ref())).collect();
        let cluster = OwnCluster {
            nodes,
            tls_ca: tls.as_ref().map(|t| t.ca.to_path_buf()),
            tls_files: tls
                .map(|t| [t.cert, t.key, t.ca, t.client_cert, t.client_key].map(Path::to_path_buf)),
        };
        let mut create = cluster.cli_command(cluster.nodes[0].port);
        create.arg("--cluster").arg("create");
        for n in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = create
            .output()
            .expect("redis-cli (apt install redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_stable(Duration::from_secs(60));
        cluster
    }

    /// Client ports of all six nodes.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `redis://127.0.0.1:<port>` of every node (seed URLs).
    pub fn urls(&self) -> Vec<String> {
        self.ports()
            .into_iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// `rediss://localhost:<port>` of every node of a TLS cluster.
    pub fn tls_urls(&self) -> Vec<String> {
        self.ports()
            .into_iter()
            .map(|p| format!("rediss://localhost:{p}"))
            .collect()
    }

    /// Runs `redis-cli -p port <args>` and returns its output (trimmed).
    pub fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = self
            .cli_command(port)
            .args(args)
            .output()
            .expect("redis-cli");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `redis-cli -h 127.0.0.1 -p port` (with `--tls --cacert` for a TLS cluster).
    fn cli_command(&self, port: u16) -> Command {
        let mut c = Command::new("redis-cli");
        c.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
        if let Some(ca) = &self.tls_ca {
            c.arg("--tls").arg("--cacert").arg(ca);
        }
        c
    }

    /// The port of a node that runs (not [`OwnCluster::kill`]ed), to ask about the cluster.
    fn live_port(&self) -> u16 {
        self.nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a live node")
            .port
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> u16 {
        let out = self.cli(self.live_port(), &["CLUSTER", "KEYSLOT", key]);
        out.parse()
            .unwrap_or_else(|_| panic!("CLUSTER KEYSLOT: {out}"))
    }

    /// Ports of the masters serving slots (by `CLUSTER NODES` of the first node).
    pub fn masters(&self) -> Vec<u16> {
        self.nodes_table()
            .into_iter()
            .filter(|n| n.master && !n.slots.is_empty())
            .map(|n| n.port)
            .collect()
    }

    /// Port of the master serving `slot`.
    pub fn master_of(&self, slot: u16) -> u16 {
        self.nodes_table()
            .into_iter()
            .find(|n| n.master && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
            .port
    }

    /// A replica of the master on `master_port`.
    pub fn replica_of(&self, master_port: u16) -> u16 {
        let table = self.nodes_table();
        let id = &table
            .iter()
            .find(|n| n.port == master_port)
            .expect("master")
            .id;
        table
            .iter()
            .find(|n| n.master_id.as_deref() == Some(id.as_str()))
            .unwrap_or_else(|| panic!("no replica of {master_port}"))
            .port
    }

    /// `CLUSTER MYID` of the node on `port`.
    pub fn id_of(&self, port: u16) -> String {
        self.cli(port, &["CLUSTER", "MYID"])
    }

    /// Moves `slot` to the master on `to` the way `redis-cli --cluster reshard` does, with
    /// `pause` after each step so clients meet every state of it: `IMPORTING`/`MIGRATING`
    /// (keys still at the source), the keys `MIGRATE`d (the source answers `ASK`), then
    /// `SETSLOT … NODE` everywhere (`MOVED`).
    pub fn migrate_slot(&self, slot: u16, to: u16, pause: Duration) {
        let m = self.begin_migration(slot, to);
        std::thread::sleep(pause);
        self.move_keys(&m);
        std::thread::sleep(pause);
        self.end_migration(&m);
    }

    /// The first step of moving `slot` to the master on `to`: `SETSLOT … IMPORTING` there,
    /// `SETSLOT … MIGRATING` at its master.
    pub fn begin_migration(&self, slot: u16, to: u16) -> Migration {
        let from = self.master_of(slot);
        assert_ne!(from, to, "slot {slot} is already on {to}");
        let m = Migration {
            slot,
            from,
            to,
            from_id: self.id_of(from),
            to_id: self.id_of(to),
        };
        let s = slot.to_string();
        self.ok(to, &["CLUSTER", "SETSLOT", &s, "IMPORTING", &m.from_id]);
        self.ok(from, &["CLUSTER", "SETSLOT", &s, "MIGRATING", &m.to_id]);
        m
    }

    /// `MIGRATE`s every key of the slot (in batches; each batch is atomic): from now on the
    /// source answers `ASK` for them.
    pub fn move_keys(&self, m: &Migration) {
        let s = m.slot.to_string();
        loop {
            let keys = self.cli(m.from, &["CLUSTER", "GETKEYSINSLOT", &s, "1000"]);
            let keys: Vec<&str> = keys.lines().filter(|k| !k.is_empty()).collect();
            if keys.is_empty() {
                return;
            }
            let port = m.to.to_string();
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "10000", "KEYS"];
            args.extend(keys);
            self.ok(m.from, &args);
        }
    }

    /// `SETSLOT … NODE` on the target, the source and the other masters; waits until the
    /// cluster agrees.
    pub fn end_migration(&self, m: &Migration) {
        let s = m.slot.to_string();
        self.ok(m.to, &["CLUSTER", "SETSLOT", &s, "NODE", &m.to_id]);
        self.ok(m.from, &["CLUSTER", "SETSLOT", &s, "NODE", &m.to_id]);
        for other in self.masters() {
            if other != m.to && other != m.from {
                self.ok(other, &["CLUSTER", "SETSLOT", &s, "NODE", &m.to_id]);
            }
        }
        self.wait_stable(Duration::from_secs(30));
        assert_eq!(self.master_of(m.slot), m.to, "slot {} moved", m.slot);
    }

    /// Runs a command that must answer `OK`.
    fn ok(&self, port: u16, args: &[&str]) {
        let out = self.cli(port, args);
        assert_eq!(out, "OK", "redis-cli -p {port} {args:?}");
    }

    /// `CLUSTER FAILOVER` on `replica` (a manual, coordinated failover: no write is lost),
    /// then waits until it is a master everyone agrees on.
    pub fn failover(&self, replica: u16) {
        let out = self.cli(replica, &["CLUSTER", "FAILOVER"]);
        assert_eq!(out, "OK", "CLUSTER FAILOVER on {replica}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.masters().contains(&replica) {
            assert!(Instant::now() < deadline, "{replica} did not become master");
            std::thread::sleep(Duration::from_millis(100));
        }
        self.wait_stable(Duration::from_secs(30));
    }

    /// kill -9 of the node on `port` (no chance to replicate what it has not sent yet). Its
    /// folder stays, for [`OwnCluster::restart`].
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("node");
        let mut child = node.child.take().expect("the node runs");
        child.kill().expect("SIGKILL");
        let _ = child.wait();
    }

    /// `CLUSTER FAILOVER TAKEOVER` on `replica`, whose master is dead: it takes the slots
    /// without any agreement, then waits until the live nodes agree it serves them (with one
    /// replica fewer, the dead master's).
    pub fn takeover(&self, replica: u16) {
        let out = self.cli(replica, &["CLUSTER", "FAILOVER", "TAKEOVER"]);
        assert_eq!(out, "OK", "CLUSTER FAILOVER TAKEOVER on {replica}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.masters().contains(&replica) {
            assert!(Instant::now() < deadline, "{replica} did not become master");
            std::thread::sleep(Duration::from_millis(100));
        }
        self.wait_stable(Duration::from_secs(30));
    }

    /// Starts a [`OwnCluster::kill`]ed node again on its port with its `nodes.conf` (and no
    /// data: the nodes keep none): it learns that another node took its slots and becomes its
    /// replica (a full resync). Waits until every node sees three replicas again.
    pub fn restart(&mut self, port: u16) {
        let tls = self
            .tls_files
            .as_ref()
            .map(|[cert, key, ca, client_cert, client_key]| NodeTls {
                cert,
                key,
                ca,
                client_cert,
                client_key,
            });
        let node = self.nodes.iter().find(|n| n.port == port).expect("node");
        assert!(node.child.is_none(), "{port} runs already");
        let child = Node::spawn(port, node.dir.path(), tls.as_ref());
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("node")
            .child = Some(child);
        self.wait_stable(Duration::from_secs(60));
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self
            .cli(port, &["INFO", "replication"])
            .lines()
            .any(|l| l.trim() == "master_link_status:up")
        {
            assert!(
                Instant::now() < deadline,
                "{port} did not resync as a replica"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every running node says `cluster_state:ok`, sees a replica for each
    /// running node beyond the three masters, and all agree on the slot map.
    fn wait_stable(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let live: Vec<&Node> = self.nodes.iter().filter(|n| n.child.is_some()).collect();
        let want_replicas = live.len() - 3;
        loop {
            let ok = live.iter().all(|n| {
                self.cli(n.port, &["CLUSTER", "INFO"])
                    .lines()
                    .any(|l| l.trim() == "cluster_state:ok")
            });
            let maps: Vec<Vec<MasterSlots>> = live
                .iter()
                .map(|n| {
                    let mut m: Vec<_> = parse_nodes(&self.cli(n.port, &["CLUSTER", "NODES"]))
                        .into_iter()
                        .filter(|x| x.master && !x.slots.is_empty())
                        .map(|x| (x.port, x.slots))
                        .collect();
                    m.sort();
                    m
                })
                .collect();
            let replicas = live.iter().all(|n| {
                parse_nodes(&self.cli(n.port, &["CLUSTER", "NODES"]))
                    .iter()
                    .filter(|x| !x.master && x.master_id.is_some() && !x.failed)
                    .count()
                    == want_replicas
            });
            let agree = maps.windows(2).all(|w| w[0] == w[1]) && maps[0].len() == 3 && replicas;
            if ok && agree {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not settle");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn nodes_table(&self) -> Vec<NodeLine> {
        parse_nodes(&self.cli(self.live_port(), &["CLUSTER", "NODES"]))
    }
}

/// A slot being moved ([`OwnCluster::begin_migration`]).
pub struct Migration {
    /// The slot.
    pub slot: u16,
    /// Port of the master it leaves.
    pub from: u16,
    /// Port of the master it goes to.
    pub to: u16,
    /// Node ID of `from`.
    from_id: String,
    /// Node ID of `to`.
    to_id: String,
}

/// A master's port and the slot ranges it serves.
type MasterSlots = (u16, Vec<(u16, u16)>);

/// One line of `CLUSTER NODES`.
struct NodeLine {
    /// The node ID.
    id: String,
    /// Client port.
    port: u16,
    /// A master (else a replica).
    master: bool,
    /// Flagged `fail` (or `fail?`): unreachable.
    failed: bool,
    /// A replica's master.
    master_id: Option<String>,
    /// Slot ranges served (inclusive).
    slots: Vec<(u16, u16)>,
}

fn parse_nodes(text: &str) -> Vec<NodeLine> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() < 8 {
                return None;
            }
            // 127.0.0.1:30001@40001
            let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let master = f[2].split(',').any(|x| x == "master");
            let failed = f[2].split(',').any(|x| x == "fail" || x == "fail?");
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|x| (x, x)),
                })
                .collect();
            Some(NodeLine {
                id: f[0].to_string(),
                port,
                master,
                failed,
                master_id: (f[3] != "-").then(|| f[3].to_string()),
                slots,
            })
        })
        .collect()
}

/// A free port whose cluster bus port (`+10000`, what `--cluster create` expects unless told)
/// is free too.
fn free_node_port() -> u16 {
    loop {
        let p = free_port();
        if p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

impl Node {
    fn launch(tls: Option<&NodeTls<'_>>) -> Self {
        let port = free_node_port();
        let dir = tempfile::tempdir().unwrap();
        let child = Node::spawn(port, dir.path(), tls);
        Node {
            port,
            dir,
            child: Some(child),
        }
    }

    /// Starts `redis-server` on `port` with its files in `dir`; returns once it listens.
    fn spawn(port: u16, dir: &Path, tls: Option<&NodeTls<'_>>) -> Child {
        let mut server = Command::new("redis-server");
        server.args(["--bind", "127.0.0.1"]);
        match tls {
            None => {
                server.args(["--port", &port.to_string()]);
            }
            Some(t) => {
                server
                    .args(["--port", "0", "--tls-port", &port.to_string()])
                    .arg("--tls-cert-file")
                    .arg(t.cert)
                    .arg("--tls-key-file")
                    .arg(t.key)
                    .arg("--tls-ca-cert-file")
                    .arg(t.ca)
                    .arg("--tls-client-cert-file")
                    .arg(t.client_cert)
                    .arg("--tls-client-key-file")
                    .arg(t.client_key)
                    .args(["--tls-auth-clients", "no", "--tls-cluster", "yes"])
                    .args(["--tls-replication", "yes"])
                    .args(["--cluster-announce-hostname", "localhost"])
                    .args(["--cluster-preferred-endpoint-type", "hostname"]);
            }
        }
        let child = server
            .args(["--cluster-enabled", "yes", "--cluster-config-file"])
            .arg(dir.join("nodes.conf"))
            .args([
                "--cluster-node-timeout",
                "3000",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .arg("--logfile")
            .arg(dir.join("log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt install redis-server)");
        wait_for_port(port, true, "redis-server (cluster node)");
        child
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut child) = n.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
