//! PostgreSQL TLS as libpq spells it: `sslmode`, `sslrootcert`, `sslcert`, `sslkey` in the URL
//! (`postgres://…?sslmode=verify-full` or the key=value form) or in `PGSSLMODE`,
//! `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY` (the URL wins). tokio-postgres itself parses only
//! `sslmode=disable|prefer|require`, so [`split_url`] takes these keys out of the URL before
//! tokio-postgres sees it, and [`RustlsConnect`] is its `MakeTlsConnect` over tokio-rustls
//! with the config of [`crate::tls::client_config`].
//!
//! Semantics (libpq's, with two decisions):
//! - `disable`: plain TCP. Also the default when no `sslmode` is given (libpq's default,
//!   `prefer`, would encrypt without checking anything and fall back to plain silently).
//! - `prefer`: TLS if the server offers it, not verified; plain otherwise.
//! - `require`: TLS or fail. Not verified, unless `sslrootcert` is given: then it acts as
//!   `verify-ca`, as libpq does when a root certificate file exists.
//! - `verify-ca`: the chain must lead to `sslrootcert` (default: the OS store); any host name.
//! - `verify-full`: as `verify-ca`, and the certificate must name the host connected to.
//! - `sslrootcert=system`: the OS store; as in libpq it implies, and requires, `verify-full`.
//! - `sslcert` + `sslkey`: client certificate (both required; libpq's `~/.postgresql` defaults
//!   are not read). `allow` is not supported.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

use crate::tls::{Roots, TlsConfigError, TlsConnectError, TlsSettings, Verify};

/// libpq's `sslmode` values strata supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS if offered, unverified.
    Prefer,
    /// TLS, unverified (verify-ca with an `sslrootcert`).
    Require,
    /// TLS, chain verified.
    VerifyCa,
    /// TLS, chain and host name verified.
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<Self, SslParamError> {
        Ok(match s {
            "disable" => Self::Disable,
            "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            other => return Err(SslParamError::Mode(other.to_string())),
        })
    }

    /// Its libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }
}

/// TLS parameters that do not make sense.
#[derive(Debug, thiserror::Error)]
pub enum SslParamError {
    /// Not one of the five modes.
    #[error("unsupported sslmode `{0}` (disable, prefer, require, verify-ca or verify-full)")]
    Mode(String),
    /// libpq's rule for the OS store.
    #[error("sslrootcert=system needs sslmode=verify-full (it is `{0}`)")]
    SystemNeedsVerifyFull(&'static str),
    /// One of the client certificate's two files.
    #[error("sslcert and sslkey must be given together")]
    CertWithoutKey,
    /// A file that cannot be used.
    #[error(transparent)]
    Files(#[from] TlsConfigError),
}

/// The TLS keys found in a connection string or the environment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SslParams {
    /// `sslmode`.
    pub mode: Option<String>,
    /// `sslrootcert`: a PEM file or `system`.
    pub root_cert: Option<String>,
    /// `sslcert`: the client certificate (PEM).
    pub cert: Option<String>,
    /// `sslkey`: its private key (PEM).
    pub key: Option<String>,
}

impl SslParams {
    fn slot(&mut self, key: &str) -> Option<&mut Option<String>> {
        match key {
            "sslmode" => Some(&mut self.mode),
            "sslrootcert" => Some(&mut self.root_cert),
            "sslcert" => Some(&mut self.cert),
            "sslkey" => Some(&mut self.key),
            _ => None,
        }
    }

    /// Fills what the URL left unset from `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`.
    pub fn with_env(mut self, var: impl Fn(&str) -> Option<String>) -> Self {
        for (key, name) in [
            ("sslmode", "PGSSLMODE"),
            ("sslrootcert", "PGSSLROOTCERT"),
            ("sslcert", "PGSSLCERT"),
            ("sslkey", "PGSSLKEY"),
        ] {
            let slot = self.slot(key).expect("known key");
            if slot.is_none() {
                *slot = var(name).filter(|v| !v.is_empty());
            }
        }
        self
    }
}

/// Takes `sslmode`, `sslrootcert`, `sslcert` and `sslkey` out of a connection string (URL or
/// key=value form); returns what is left for tokio-postgres and the values taken.
pub fn split_url(url: &str) -> (String, SslParams) {
    let mut params = SslParams::default();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return (url.to_string(), params);
        };
        let mut kept = Vec::new();
        for pair in query.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match params.slot(&percent_decode(k)) {
                Some(slot) => *slot = Some(percent_decode(v)),
                None => kept.push(pair),
            }
        }
        let rest = if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        return (rest, params);
    }
    // key=value form: `key = value`, the value bare or in single quotes, `\` escaping.
    let mut rest = String::new();
    let mut chars = url.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
            continue;
        }
        let mut key = String::new();
        while let Some(&(_, c)) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|&(_, c)| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_some_and(|&(_, c)| c == '=') {
            chars.next();
        }
        while chars.peek().is_some_and(|&(_, c)| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        let quoted = chars.peek().is_some_and(|&(_, c)| c == '\'');
        if quoted {
            chars.next();
        }
        while let Some((_, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(n);
                    }
                }
                '\'' if quoted => break,
                c if !quoted && c.is_whitespace() => break,
                c => value.push(c),
            }
        }
        let end = chars.peek().map_or(url.len(), |&(i, _)| i);
        match params.slot(&key) {
            Some(slot) => *slot = Some(value),
            None => {
                rest.push_str(url[start..end].trim_end());
                rest.push(' ');
            }
        }
    }
    (rest.trim_end().to_string(), params)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How a PostgreSQL connection is secured, decided once from [`SslParams`].
#[derive(Clone)]
pub struct PgTls {
    /// The effective `sslmode`.
    pub mode: SslMode,
    /// The rustls config; `None` with `disable`.
    pub(crate) config: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for PgTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTls").field("mode", &self.mode).finish()
    }
}

impl PgTls {
    /// Plain TCP.
    pub fn disabled() -> Self {
        Self {
            mode: SslMode::Disable,
            config: None,
        }
    }

    /// Decides the mode and builds the rustls config (reading the files now, so a missing
    /// one is reported when the URL is read, not at the first connection).
    pub fn from_params(p: &SslParams) -> Result<Self, SslParamError> {
        let system = p.root_cert.as_deref() == Some("system");
        let mode = match p.mode.as_deref() {
            Some(m) => SslMode::parse(m)?,
            None if system => SslMode::VerifyFull,
            None => SslMode::Disable,
        };
        if system && mode != SslMode::VerifyFull {
            return Err(SslParamError::SystemNeedsVerifyFull(mode.as_str()));
        }
        if mode == SslMode::Disable {
            return Ok(Self::disabled());
        }
        let client_cert = match (&p.cert, &p.key) {
            (Some(c), Some(k)) => Some((PathBuf::from(c), PathBuf::from(k))),
            (None, None) => None,
            _ => return Err(SslParamError::CertWithoutKey),
        };
        let roots = match p.root_cert.as_deref() {
            None | Some("system") => Roots::System,
            Some(path) => Roots::File(PathBuf::from(path)),
        };
        let verify = match mode {
            SslMode::Disable | SslMode::Prefer => Verify::None,
            SslMode::Require if p.root_cert.is_some() => Verify::ChainOnly,
            SslMode::Require => Verify::None,
            SslMode::VerifyCa => Verify::ChainOnly,
            SslMode::VerifyFull => Verify::Full,
        };
        let config = crate::tls::client_config(&TlsSettings {
            roots,
            client_cert,
            verify,
        })?;
        Ok(Self {
            mode,
            config: Some(config),
        })
    }

    /// tokio-postgres's own mode for this one.
    pub fn tokio_mode(&self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as T;
        match self.mode {
            SslMode::Disable => T::Disable,
            SslMode::Prefer => T::Prefer,
            _ => T::Require,
        }
    }
}

/// tokio-postgres's TLS connector over tokio-rustls.
#[derive(Clone)]
pub struct RustlsConnect {
    /// The client config of every handshake.
    config: Arc<rustls::ClientConfig>,
    /// The port, to name the server in errors (tokio-postgres hands over only the host).
    port: u16,
}

impl RustlsConnect {
    /// A connector with `config`, naming servers `host:port` in its errors.
    pub fn new(config: Arc<rustls::ClientConfig>, port: u16) -> Self {
        Self { config, port }
    }
}

/// One handshake to be made.
pub struct RustlsHandshake {
    /// The shared config.
    config: Arc<rustls::ClientConfig>,
    /// The name checked against the certificate; `None` for a Unix socket (no TLS there).
    name: Option<ServerName<'static>>,
    /// `host:port`, for errors.
    server: String,
}

impl<S> MakeTlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsHandshake;
    type Error = std::io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsHandshake, std::io::Error> {
        let name = if domain.is_empty() {
            None
        } else {
            Some(
                ServerName::try_from(domain.to_string())
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?,
            )
        };
        Ok(RustlsHandshake {
            config: self.config.clone(),
            name,
            server: format!("{domain}:{}", self.port),
        })
    }
}

type HandshakeFuture<S> = Pin<
    Box<
        dyn Future<Output = Result<RustlsStream<S>, Box<dyn std::error::Error + Send + Sync>>>
            + Send,
    >,
>;

impl<S> TlsConnect<S> for RustlsHandshake
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = HandshakeFuture<S>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let Some(name) = self.name else {
                return Err("TLS over a Unix socket is not supported".into());
            };
            let connector = tokio_rustls::TlsConnector::from(self.config);
            match connector.connect(name, stream).await {
                Ok(s) => Ok(RustlsStream(s)),
                Err(e) => Err(match TlsConnectError::new(self.server, e) {
                    Ok(tls) => Box::new(tls) as Box<dyn std::error::Error + Send + Sync>,
                    Err(io) => Box::new(io),
                }),
            }
        })
    }
}

/// A TLS stream tokio-postgres can use.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        // SCRAM's channel binding is optional (`channel_binding=prefer`); none offered.
        ChannelBinding::none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_form_keys_are_taken_out_and_others_kept() {
        let (rest, p) = split_url(
            "postgres://u@h:5/db?sslmode=verify-full&application_name=x&sslrootcert=%2Ftmp%2Fca.pem",
        );
        assert_eq!(rest, "postgres://u@h:5/db?application_name=x");
        assert_eq!(p.mode.as_deref(), Some("verify-full"));
        assert_eq!(p.root_cert.as_deref(), Some("/tmp/ca.pem"));
        let (rest, p) = split_url("postgres://u@h/db?sslmode=require");
        assert_eq!(rest, "postgres://u@h/db");
        assert_eq!(p.mode.as_deref(), Some("require"));
        let (rest, p) = split_url("postgres://u@h/db");
        assert_eq!(
            (rest.as_str(), p),
            ("postgres://u@h/db", SslParams::default())
        );
    }

    #[test]
    fn key_value_form_keys_are_taken_out_and_others_kept() {
        let (rest, p) = split_url(
            "host=h port=5 sslmode = verify-ca sslcert='/a b/c.pem' sslkey=/k.pem user=u",
        );
        assert_eq!(rest, "host=h port=5 user=u");
        assert_eq!(p.mode.as_deref(), Some("verify-ca"));
        assert_eq!(p.cert.as_deref(), Some("/a b/c.pem"));
        assert_eq!(p.key.as_deref(), Some("/k.pem"));
        rest.parse::<tokio_postgres::Config>().unwrap();
    }

    #[test]
    fn the_environment_fills_only_what_the_url_left_unset() {
        let (_, p) = split_url("postgres://h/db?sslmode=require");
        let p = p.with_env(|k| match k {
            "PGSSLMODE" => Some("disable".into()),
            "PGSSLROOTCERT" => Some("/ca.pem".into()),
            _ => None,
        });
        assert_eq!(p.mode.as_deref(), Some("require"));
        assert_eq!(p.root_cert.as_deref(), Some("/ca.pem"));
    }

    #[test]
    fn modes_default_to_disable_and_system_roots_need_verify_full() {
        assert_eq!(
            PgTls::from_params(&SslParams::default()).unwrap().mode,
            SslMode::Disable
        );
        let p = SslParams {
            mode: Some("require".into()),
            root_cert: Some("system".into()),
            ..Default::default()
        };
        assert!(matches!(
            PgTls::from_params(&p),
            Err(SslParamError::SystemNeedsVerifyFull("require"))
        ));
        let p = SslParams {
            mode: Some("allow".into()),
            ..Default::default()
        };
        assert!(matches!(
            PgTls::from_params(&p),
            Err(SslParamError::Mode(_))
        ));
        let p = SslParams {
            mode: Some("require".into()),
            ..Default::default()
        };
        assert_eq!(PgTls::from_params(&p).unwrap().mode, SslMode::Require);
    }
}
