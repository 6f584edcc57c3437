//! The hot read path's own Redis connection.
//!
//! Reading is where a stage spends most of its own CPU: every event arrives as a dozen RESP
//! bulk strings. The generic client turns each reply into a tree of owned values; here a reply
//! is read into one buffer, and each [`super::RawFields`] is a slice of it, so a thousand entries cost
//! one allocation, not twenty-five thousand. Only `XREADGROUP` goes through [`ReadConnection`];
//! every other call uses the pooled `redis` client.
//!
//! On a Redis Cluster ([`ReadTarget::cluster`]) the connection goes to a seed node first and
//! follows the `MOVED`/`ASK` replies ([`super::Redirect`]) to the node that serves the stream's
//! slot: a redirected XREADGROUP ran nowhere and delivered nothing, so it is sent again there.

use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::codec::put_bulk;
use super::entry::Entry;
use super::group::Consumer;
use super::reply::{Reader, ReplyError, Scanner};

/// Failures of the read connection.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("redis connection failed")]
    Io(#[from] std::io::Error),
    #[error("invalid redis URL")]
    Url(#[source] redis::RedisError),
    /// The TLS handshake failed (the server and the cause are named).
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsConnectError),
    /// An address kind this connection does not know.
    #[error("unsupported redis address {0}")]
    Unsupported(String),
    /// `rediss://` without a TLS config ([`crate::db::redis_read_target`] builds both).
    #[error("rediss:// needs a TLS config")]
    NoTlsConfig,
    /// A plain connection that the server dropped at once.
    #[error(
        "redis {server} closed the plain connection at once: it may require TLS (use rediss://)"
    )]
    PlainRefused {
        /// `host:port`.
        server: String,
        #[source]
        source: Box<ReadError>,
    },
    /// No handshake answer in time.
    #[error(
        "no TLS handshake answer from redis {server} within {timeout:?}: it may not speak TLS"
    )]
    HandshakeTimeout {
        /// `host:port`.
        server: String,
        /// The limit.
        timeout: Duration,
    },
    /// An error reply (e.g. `NOGROUP …`) or a malformed one.
    #[error(transparent)]
    Reply(#[from] ReplyError),
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis closed the connection")]
    Closed,
    /// A cluster node named in a `MOVED`/`ASK` reply is not `host:port`, or the seed is a
    /// Unix socket.
    #[error("cannot follow the cluster redirect to `{0}`")]
    BadRedirect(String),
    /// Redirected more than [`MAX_REDIRECTS`] times in a row (the cluster is resharding).
    #[error("redirected {} times in a row; last: {last}", MAX_REDIRECTS)]
    TooManyRedirects {
        /// The last redirect.
        last: super::Redirect,
    },
}

/// `MOVED`/`ASK` replies followed for one read before giving up (the runner retries later).
pub const MAX_REDIRECTS: usize = 5;

/// Where a [`ReadConnection`] goes: the `[redis] url` and, for `rediss://`, the rustls config
/// of [`crate::tls`] (see [`crate::db::redis_read_target`]).
#[derive(Clone, Debug)]
pub struct ReadTarget {
    /// The Redis URL.
    pub url: String,
    /// The TLS client config, for `rediss://`.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// A Redis Cluster (`[redis] cluster = true`): follow `MOVED`/`ASK`.
    pub cluster: bool,
    /// Cluster only: more seed nodes, tried in turn after [`Self::url`] (same user, password
    /// and TLS as it).
    pub seeds: Vec<String>,
}

impl ReadTarget {
    /// A target without TLS (`redis://` or a Unix socket).
    pub fn plain(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            tls: None,
            cluster: false,
            seeds: Vec::new(),
        }
    }
}

/// A byte stream to Redis: TCP, TLS over TCP or a Unix socket.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One connection used only to read entries (`XREADGROUP`).
pub struct ReadConnection {
    /// The socket.
    io: Box<dyn Io>,
    /// Bytes received and not yet handed out; each reply is split off and shared by its entries.
    buf: BytesMut,
    /// Where the reply being received ends, so far.
    scanner: Scanner,
    /// The command being sent, reused between calls.
    out: BytesMut,
    /// Cluster mode: how to reach the node a redirect names.
    cluster: Option<ClusterNode>,
}

/// A cluster read connection's way to other nodes.
struct ClusterNode {
    /// The node this connection is to (user, password, database and TLS as the seed's): a
    /// redirect changes only the host and port.
    info: redis::ConnectionInfo,
    /// The TLS client config, for `rediss://`.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Send `ASKING` before each read: this node is importing the slot and an `ASK` sent us
    /// here. Cleared by the next `MOVED`.
    asking: bool,
}

/// Whether the server hung up (closed or reset) rather than answered.
fn hung_up(e: &ReadError) -> bool {
    match e {
        ReadError::Closed => true,
        ReadError::Io(io) => crate::tls::is_hang_up(io),
        _ => false,
    }
}

/// Replies are read in pieces of at least this much.
const READ_CHUNK: usize = 256 * 1024;

/// How long past its BLOCK time a read may take before the connection is given up.
const REPLY_GRACE: Duration = Duration::from_secs(10);

impl ReadConnection {
    /// Connects as `target` says (host and port, TLS, or a Unix socket; user, password,
    /// database), then checks the connection with PING.
    /// On a cluster, tries the seeds in turn; the first read follows the redirect to the
    /// stream's node.
    pub async fn connect(target: &ReadTarget) -> Result<Self, ReadError> {
        let parse = |url: &str| {
            redis::IntoConnectionInfo::into_connection_info(url).map_err(ReadError::Url)
        };
        if !target.cluster {
            return Self::open(&parse(&target.url)?, target.tls.clone()).await;
        }
        let mut failed = None;
        for url in std::iter::once(&target.url).chain(&target.seeds) {
            let info = parse(url)?;
            match Self::open(&info, target.tls.clone()).await {
                Ok(mut conn) => {
                    conn.cluster = Some(ClusterNode {
                        info,
                        tls: target.tls.clone(),
                        asking: false,
                    });
                    return Ok(conn);
                }
                Err(e) => failed = Some(e),
            }
        }
        Err(failed.unwrap_or(ReadError::Closed))
    }

    /// `host:port` of the node a cluster connection is to (`None` for a standalone server).
    pub fn cluster_node(&self) -> Option<String> {
        self.cluster.as_ref().map(|c| match c.info.addr() {
            redis::ConnectionAddr::Tcp(h, p)
            | redis::ConnectionAddr::TcpTls {
                host: h, port: p, ..
            } => format!("{h}:{p}"),
            other => other.to_string(),
        })
    }

    /// Connects to the node a redirect names, as this connection's seed (same credentials and
    /// TLS); `ASK` makes the next reads send `ASKING` first.
    async fn follow(&mut self, to: &super::Redirect) -> Result<(), ReadError> {
        let Some(node) = self.cluster.as_ref() else {
            return Err(ReplyError::Redirect(to.clone()).into());
        };
        let bad = || ReadError::BadRedirect(to.node.clone());
        let (host, port) = to.node.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let addr = match node.info.addr() {
            // `MOVED 3999 :6381`: the same host (the node knows no endpoint of its own).
            redis::ConnectionAddr::Tcp(current, _) => redis::ConnectionAddr::Tcp(
                if host.is_empty() { current } else { host }.to_owned(),
                port,
            ),
            redis::ConnectionAddr::TcpTls {
                host: current,
                insecure,
                tls_params,
                ..
            } => redis::ConnectionAddr::TcpTls {
                host: if host.is_empty() { current } else { host }.to_owned(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => return Err(bad()),
        };
        let info = node.info.clone().set_addr(addr);
        let tls = node.tls.clone();
        let mut next = Self::open(&info, tls.clone()).await?;
        next.cluster = Some(ClusterNode {
            info,
            tls,
            asking: to.ask,
        });
        *self = next;
        Ok(())
    }

    /// Connects to the one server `info` names.
    async fn open(
        info: &redis::ConnectionInfo,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Self, ReadError> {
        let mut plain_server = None;
        let io: Box<dyn Io> = match info.addr() {
            redis::ConnectionAddr::Tcp(host, port) => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                s.set_nodelay(true)?;
                plain_server = Some(format!("{host}:{port}"));
                Box::new(s)
            }
            redis::ConnectionAddr::TcpTls { host, port, .. } => {
                let config = tls.ok_or(ReadError::NoTlsConfig)?;
                let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await?;
                s.set_nodelay(true)?;
                let server = format!("{host}:{port}");
                let name = rustls::pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
                let handshake = tokio_rustls::TlsConnector::from(config).connect(name, s);
                let timeout = Duration::from_secs(10);
                match tokio::time::timeout(timeout, handshake).await {
                    Ok(Ok(tls)) => Box::new(tls),
                    Ok(Err(e)) => return Err(crate::tls::TlsConnectError::new(server, e)?.into()),
                    Err(_) => return Err(ReadError::HandshakeTimeout { server, timeout }),
                }
            }
            #[cfg(unix)]
            redis::ConnectionAddr::Unix(path) => {
                Box::new(tokio::net::UnixStream::connect(path).await?)
            }
            other => return Err(ReadError::Unsupported(other.to_string())),
        };
        let mut conn = Self {
            io,
            buf: BytesMut::with_capacity(READ_CHUNK),
            scanner: Scanner::default(),
            out: BytesMut::new(),
            cluster: None,
        };
        let settings = info.redis_settings();
        let timeout = Duration::from_secs(10);
        let setup = async {
            if let Some(password) = settings.password() {
                let mut args: Vec<&[u8]> = vec![b"AUTH"];
                if let Some(user) = settings.username() {
                    args.push(user.as_bytes());
                }
                args.push(password.as_bytes());
                conn.simple(&args, timeout).await?;
            }
            if settings.db() != 0 {
                let db = settings.db().to_string();
                conn.simple(&[b"SELECT", db.as_bytes()], timeout).await?;
            }
            conn.simple(&[b"PING"], timeout).await
        };
        match (setup.await, plain_server) {
            (Ok(()), _) => Ok(conn),
            (Err(e), Some(server)) if hung_up(&e) => Err(ReadError::PlainRefused {
                server,
                source: Box::new(e),
            }),
            (Err(e), _) => Err(e),
        }
    }

    /// Sends a command whose reply is a status or an error.
    async fn simple(&mut self, args: &[&[u8]], timeout: Duration) -> Result<(), ReadError> {
        let reply = self.call(args, timeout).await?;
        match reply.first() {
            Some(b'-') => {
                Err(ReplyError::from_reply(&reply[1..reply.len().saturating_sub(2)]).into())
            }
            _ => Ok(()),
        }
    }

    /// Sends one command and returns its whole reply.
    async fn call(&mut self, args: &[&[u8]], timeout: Duration) -> Result<Bytes, ReadError> {
        self.out.clear();
        self.out.put_u8(b'*');
        self.out
            .put_slice(itoa::Buffer::new().format(args.len()).as_bytes());
        self.out.put_slice(b"\r\n");
        for a in args {
            put_bulk(&mut self.out, a);
        }
        let work = async {
            self.io.write_all(&self.out).await?;
            loop {
                if let Some(len) = self.scanner.scan(&self.buf)? {
                    return Ok(self.buf.split_to(len).freeze());
                }
                self.buf.reserve(READ_CHUNK);
                if self.io.read_buf(&mut self.buf).await? == 0 {
                    return Err(ReadError::Closed);
                }
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| ReadError::Timeout(timeout))?
    }

    /// `XREADGROUP GROUP group consumer COUNT count BLOCK block_ms STREAMS stream >`: new
    /// entries for `consumer` (none when the block time passed). On a cluster, a `MOVED` or
    /// `ASK` reply (nothing was read) moves the connection to the node named and reads there.
    pub async fn read_new(
        &mut self,
        consumer: &Consumer<'_>,
        count: usize,
        block_ms: u64,
    ) -> Result<Vec<Entry>, ReadError> {
        let mut redirects = 0;
        loop {
            match self.read_here(consumer, count, block_ms).await {
                Err(ReadError::Reply(ReplyError::Redirect(to))) if self.cluster.is_some() => {
                    if redirects == MAX_REDIRECTS {
                        return Err(ReadError::TooManyRedirects { last: to });
                    }
                    redirects += 1;
                    tracing::debug!(stream = consumer.group.stream, redirect = %to, "following a cluster redirect");
                    self.follow(&to).await?;
                }
                other => return other,
            }
        }
    }

    /// One XREADGROUP on this connection's server.
    async fn read_here(
        &mut self,
        consumer: &Consumer<'_>,
        count: usize,
        block_ms: u64,
    ) -> Result<Vec<Entry>, ReadError> {
        if self.cluster.as_ref().is_some_and(|c| c.asking) {
            self.simple(&[b"ASKING"], REPLY_GRACE).await?;
        }
        let (mut count_buf, mut block_buf) = (itoa::Buffer::new(), itoa::Buffer::new());
        let args: [&[u8]; 11] = [
            b"XREADGROUP",
            b"GROUP",
            consumer.group.name.as_bytes(),
            consumer.name.as_bytes(),
            b"COUNT",
            count_buf.format(count).as_bytes(),
            b"BLOCK",
            block_buf.format(block_ms).as_bytes(),
            b"STREAMS",
            consumer.group.stream.as_bytes(),
            b">",
        ];
        let reply = self
            .call(&args, Duration::from_millis(block_ms) + REPLY_GRACE)
            .await?;
        let mut r = Reader { buf: reply, pos: 0 };
        // [[stream, entries]], or nil when the block time passed.
        let Some(streams) = r.array()? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for _ in 0..streams {
            if r.array()? != Some(2) {
                return Err(ReplyError::Protocol("a stream is not [name, entries]").into());
            }
            r.bulk()?;
            let (entries, _deleted) = r.entries(1)?;
            if out.is_empty() {
                out = entries;
            } else {
                out.extend(entries);
            }
        }
        Ok(out)
    }
}
