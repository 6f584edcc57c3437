//! TLS servers a test or benchmark owns: certificates generated with rcgen into a temporary
//! folder ([`TestCerts`]), a TLS-only `redis-server` ([`OwnTlsRedis`]) and a PostgreSQL
//! cluster with `ssl = on` and the `pg_hba.conf` rules given ([`start_postgres_tls`]).
//!
//! The server certificates name `localhost` only, so connecting to `127.0.0.1` is a host-name
//! mismatch on purpose.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

use crate::{free_port, wait_for_port, OwnPostgres};

/// A CA, a server certificate for `localhost` signed by it, an expired one, a client
/// certificate (CN `postgres`), and a second CA that signed nothing. All PEM files.
pub struct TestCerts {
    /// The CA that signed the server and client certificates.
    pub ca: PathBuf,
    /// A CA that signed nothing here ("wrong CA").
    pub other_ca: PathBuf,
    /// Server certificate for `localhost`, valid now.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// Server certificate for `localhost` that expired in 2020.
    pub expired_cert: PathBuf,
    /// Its key.
    pub expired_key: PathBuf,
    /// Client certificate, CN `postgres` (PostgreSQL `cert` auth maps CN to the user).
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// Holds the files.
    dir: tempfile::TempDir,
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

impl TestCerts {
    /// Generates everything into a new temporary folder (readable by the `postgres` user).
    pub fn generate() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let write = |name: &str, text: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
            p
        };
        let issuer = ca("strata test CA");
        let other = ca("some other CA");
        let leaf = |cn: &str, sans: Vec<String>, eku, expired: bool| {
            let mut params = CertificateParams::new(sans).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            params.extended_key_usages = vec![eku];
            if expired {
                params.not_before = rcgen::date_time_ymd(2019, 1, 1);
                params.not_after = rcgen::date_time_ymd(2020, 1, 1);
            }
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let host = vec!["localhost".to_string()];
        let server = leaf(
            "localhost",
            host.clone(),
            ExtendedKeyUsagePurpose::ServerAuth,
            false,
        );
        let expired = leaf("localhost", host, ExtendedKeyUsagePurpose::ServerAuth, true);
        let client = leaf(
            "postgres",
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            false,
        );
        TestCerts {
            ca: write("ca.pem", issuer.pem()),
            other_ca: write("other-ca.pem", other.pem()),
            server_cert: write("server.pem", server.0),
            server_key: write("server.key", server.1),
            expired_cert: write("expired.pem", expired.0),
            expired_key: write("expired.key", expired.1),
            client_cert: write("client.pem", client.0),
            client_key: write("client.key", client.1),
            dir,
        }
    }

    /// The folder holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// How an [`OwnTlsRedis`] is set up.
pub struct RedisTls<'a> {
    /// Server certificate and key.
    pub cert: &'a Path,
    /// Its key.
    pub key: &'a Path,
    /// CA for client certificates.
    pub ca: &'a Path,
    /// `--tls-auth-clients yes`: a client certificate signed by `ca` is required.
    pub auth_clients: bool,
    /// Also serve plain TCP on another port (to compare plain and TLS on one server).
    pub also_plain: bool,
}

/// A `redis-server` that speaks TLS (`--tls-port P`; plain TCP too only with
/// [`RedisTls::also_plain`]), no persistence.
pub struct OwnTlsRedis {
    /// Its loopback TLS port.
    pub port: u16,
    /// Its plain port, with [`RedisTls::also_plain`].
    pub plain_port: Option<u16>,
    /// Its working folder.
    dir: tempfile::TempDir,
    /// The server process.
    child: Child,
}

impl OwnTlsRedis {
    /// Starts the server with `tls` and waits until its port accepts connections.
    pub fn start(tls: &RedisTls<'_>) -> Self {
        let port = free_port();
        let plain_port = tls.also_plain.then(free_port);
        let plain = plain_port.unwrap_or(0).to_string();
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &plain,
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(["--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(tls.cert)
            .arg("--tls-key-file")
            .arg(tls.key)
            .arg("--tls-ca-cert-file")
            .arg(tls.ca)
            .args([
                "--tls-auth-clients",
                if tls.auth_clients { "yes" } else { "no" },
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server built with TLS");
        wait_for_port(port, true, "redis-server (TLS)");
        OwnTlsRedis {
            port,
            plain_port,
            dir,
            child,
        }
    }

    /// Its working folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `rediss://localhost:<port>` (the name its certificate holds).
    pub fn url(&self) -> String {
        format!("rediss://localhost:{}", self.port)
    }
}

impl Drop for OwnTlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL cluster with `ssl = on`, `cert`/`key` as its certificate, `certs.ca` trusted
/// for client certificates, and `hba` as the whole of `pg_hba.conf`, e.g.
/// `hostssl all all 127.0.0.1/32 cert`. `OwnPostgres::url` gives `127.0.0.1`; use
/// `localhost` for host-name verification.
pub fn start_postgres_tls(certs: &TestCerts, cert: &Path, key: &Path, hba: &str) -> OwnPostgres {
    OwnPostgres::start_configured(|data| {
        let owner = std::fs::metadata(data).unwrap();
        for (from, to, mode) in [
            (cert, "server.crt", 0o644),
            (key, "server.key", 0o600),
            (certs.ca.as_path(), "root.crt", 0o644),
        ] {
            let dest = data.join(to);
            std::fs::copy(from, &dest).unwrap();
            std::os::unix::fs::chown(&dest, Some(owner.uid()), Some(owner.gid())).unwrap();
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap();
        text.push_str(
            "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\nssl_ca_file = 'root.crt'\n",
        );
        std::fs::write(&conf, text).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            format!("local all all trust\n{hba}\n"),
        )
        .unwrap();
    })
}
