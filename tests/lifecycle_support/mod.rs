//! Object store backends for the lifecycle tests, each a real server on loopback started by the
//! test itself and killed when it ends:
//! - local disk: a folder in the test's temporary directory;
//! - S3: moto's server (`moto_server`, from PyPI `moto[server]`), over plain HTTP and over HTTPS
//!   with a certificate of a private CA the test makes (the `openssl` CLI), trusted through
//!   `[lake] tls_ca_file`;
//! - Azure Blob: Azurite (`azurite-blob`, from npm `azurite`).
//!
//! A server binary missing from PATH is looked for, or installed on the spot, under
//! `$STRATA_TOOLS_DIR` (default `~/.cache/strata`): moto in the virtualenv `moto/`, Azurite with
//! `npm install --prefix azurite/`. If that fails the test fails with the command to run. Every test uses its own bucket or
//! container with a random name, on its own server process.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strata_stages::lifecycle::deps::sha2::{Digest, Sha256};

/// The well-known development account of Azurite (public, documented by Microsoft).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// Which object store a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Local,
    S3,
    /// moto over HTTPS, its certificate signed by a CA of the test's own.
    S3Tls,
    /// gcp-storage-emulator (PyPI), with OAuth disabled through a service-account file.
    Gcs,
    Azure,
}

/// A running object store for one test: its `[lake]` section and the server process (if any),
/// killed on drop.
pub struct Backend {
    pub kind: BackendKind,
    /// The `[lake]` section (and `[lake.options]`) for config.toml.
    pub lake_toml: String,
    /// Bucket or container (S3, Azure).
    pub bucket: String,
    /// Key prefix every archive of this test goes under.
    pub prefix: String,
    /// Local lake root.
    pub local_root: Option<PathBuf>,
    /// `127.0.0.1:<port>` of the server.
    pub addr: Option<String>,
    /// S3Tls: the PEM file of the private CA that signed the server's certificate.
    pub ca_file: Option<PathBuf>,
    /// The server process.
    server: Option<Child>,
    /// The server's storage folder.
    _storage: Option<tempfile::TempDir>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind a free loopback port")
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(addr: &str, child: &mut Child, what: &str, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}) before listening on {addr}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {addr} within 60 s: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// Where the tests install tools missing from PATH: `$STRATA_TOOLS_DIR`, else
/// `~/.cache/strata`.
fn tools_dir() -> PathBuf {
    std::env::var_os("STRATA_TOOLS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into()))
                .join(".cache/strata")
        })
}

/// A Python server from PyPI: `bin` on PATH, or in the tools' virtualenv `venv`, else installed
/// there with pip (`package`).
fn pypi_server(bin: &str, venv: &str, package: &str, what: &str) -> PathBuf {
    if let Some(p) = on_path(bin) {
        return p;
    }
    let venv = tools_dir().join(venv);
    let path = venv.join("bin").join(bin);
    if path.is_file() {
        return path;
    }
    eprintln!(
        "{bin} not found: installing {package} with pip into {}",
        venv.display()
    );
    let ok = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(&venv)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", package])
            .status()
            .is_ok_and(|s| s.success());
    if ok && path.is_file() {
        return path;
    }
    panic!(
        "the {what} tests need {bin}: run `python3 -m venv {0} && {0}/bin/pip install '{package}'` (or put {bin} on PATH), then rerun",
        venv.display()
    )
}

/// `moto_server` (S3).
fn moto_server() -> PathBuf {
    pypi_server("moto_server", "moto", "moto[server]", "S3")
}

/// `gcp-storage-emulator` (GCS).
pub fn gcs_emulator() -> PathBuf {
    pypi_server("gcp-storage-emulator", "gcs", "gcp-storage-emulator", "GCS")
}

fn azurite_prefix() -> PathBuf {
    tools_dir().join("azurite")
}

/// `azurite-blob`, installed with npm if missing.
fn azurite_blob() -> PathBuf {
    if let Some(p) = on_path("azurite-blob") {
        return p;
    }
    let prefix = azurite_prefix();
    let bin = prefix.join("node_modules/.bin/azurite-blob");
    if bin.is_file() {
        return bin;
    }
    eprintln!(
        "azurite-blob not found: installing azurite with npm into {}",
        prefix.display()
    );
    let _ = std::fs::create_dir_all(&prefix);
    let ok = Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
        .arg(&prefix)
        .arg("azurite")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok && bin.is_file() {
        return bin;
    }
    panic!(
        "the Azure tests need Azurite: run `npm install --prefix {} azurite` (npm registry), then rerun",
        prefix.display()
    )
}

fn rand_name(prefix: &str) -> String {
    format!("{prefix}{:08x}", rand::random::<u32>())
}

impl Backend {
    /// Starts `kind` for a test (a lake folder of its own for local disk).
    pub fn start(kind: BackendKind) -> Backend {
        let prefix = rand_name("t");
        match kind {
            BackendKind::Local => {
                let storage = tempfile::tempdir().unwrap();
                let root = storage.path().join("lake");
                Backend {
                    kind,
                    lake_toml: format!(
                        "[lake]\nbackend = \"local\"\npath = \"{}\"\nprefix = \"{prefix}\"\n",
                        root.display()
                    ),
                    bucket: String::new(),
                    prefix,
                    local_root: Some(root),
                    addr: None,
                    ca_file: None,
                    server: None,
                    _storage: Some(storage),
                }
            }
            BackendKind::S3 => {
                let bin = moto_server();
                let port = free_port();
                let addr = format!("127.0.0.1:{port}");
                let storage = tempfile::tempdir().unwrap();
                let log = storage.path().join("moto.log");
                let mut child = Command::new(bin)
                    .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).unwrap())
                    .spawn()
                    .expect("start moto_server");
                wait_listening(&addr, &mut child, "moto_server", &log);
                let bucket = rand_name("strata-");
                let (status, body) = http(&addr, "PUT", &format!("/{bucket}"), &[], b"");
                assert_eq!(status, 200, "creating bucket {bucket} in moto: {body}");
                Backend {
                    kind,
                    lake_toml: format!(
                        "[lake]\nbackend = \"s3\"\nbucket = \"{bucket}\"\nendpoint = \"http://{addr}\"\nregion = \"us-east-1\"\nallow_http = true\nprefix = \"{prefix}\"\n[lake.options]\naws_access_key_id = \"test\"\naws_secret_access_key = \"test\"\n"
                    ),
                    bucket,
                    prefix,
                    local_root: None,
                    addr: Some(addr),
                    ca_file: None,
                    server: Some(child),
                    _storage: Some(storage),
                }
            }
            BackendKind::S3Tls => {
                let bin = moto_server();
                let port = free_port();
                let addr = format!("127.0.0.1:{port}");
                let storage = tempfile::tempdir().unwrap();
                let (ca, cert, key) = private_ca_and_server_cert(storage.path());
                let log = storage.path().join("moto.log");
                let mut child = Command::new(bin)
                    .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                    .arg("-c")
                    .arg(&cert)
                    .arg("-k")
                    .arg(&key)
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).unwrap())
                    .spawn()
                    .expect("start moto_server");
                wait_listening(&addr, &mut child, "moto_server", &log);
                let bucket = rand_name("strata-");
                let endpoint = format!("https://localhost:{port}");
                let (status, body) = https(&ca, "PUT", &format!("{endpoint}/{bucket}"));
                assert_eq!(
                    status, 200,
                    "creating bucket {bucket} in moto (HTTPS): {body}"
                );
                Backend {
                    kind,
                    lake_toml: format!(
                        "[lake]\nbackend = \"s3\"\nbucket = \"{bucket}\"\nendpoint = \"{endpoint}\"\nregion = \"us-east-1\"\ntls_ca_file = \"{}\"\nprefix = \"{prefix}\"\n[lake.options]\naws_access_key_id = \"test\"\naws_secret_access_key = \"test\"\n",
                        ca.display()
                    ),
                    bucket,
                    prefix,
                    local_root: None,
                    addr: Some(addr),
                    ca_file: Some(ca),
                    server: Some(child),
                    _storage: Some(storage),
                }
            }
            BackendKind::Gcs => {
                let bin = gcs_emulator();
                let port = free_port();
                let addr = format!("127.0.0.1:{port}");
                let storage = tempfile::tempdir().unwrap();
                let log = storage.path().join("gcs.log");
                // No `-` in the name: object_store escapes it in XML API paths (`%2D`), which the
                // emulator's router does not unescape before matching bucket names.
                let bucket = rand_name("strata");
                let mut child = Command::new(bin)
                    .args(["start", "-H", "127.0.0.1", "--port", &port.to_string()])
                    .args(["--default-bucket", &bucket, "--in-memory"])
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).unwrap())
                    .spawn()
                    .expect("start gcp-storage-emulator");
                wait_listening(&addr, &mut child, "gcp-storage-emulator", &log);
                // object_store's documented way to an emulator: a service account with OAuth off.
                let account = storage.path().join("service-account.json");
                std::fs::write(
                    &account,
                    format!(r#"{{"disable_oauth": true, "client_email": "", "private_key": "", "private_key_id": "", "gcs_base_url": "http://{addr}"}}"#),
                )
                .unwrap();
                Backend {
                    kind,
                    lake_toml: format!(
                        "[lake]\nbackend = \"gcs\"\nbucket = \"{bucket}\"\nendpoint = \"http://{addr}\"\nallow_http = true\nprefix = \"{prefix}\"\n[lake.options]\ngoogle_service_account = \"{}\"\n",
                        account.display()
                    ),
                    bucket,
                    prefix,
                    local_root: None,
                    addr: Some(addr),
                    ca_file: None,
                    server: Some(child),
                    _storage: Some(storage),
                }
            }
            BackendKind::Azure => {
                let bin = azurite_blob();
                let port = free_port();
                let addr = format!("127.0.0.1:{port}");
                let storage = tempfile::tempdir().unwrap();
                let log = storage.path().join("azurite.log");
                let mut child = Command::new(bin)
                    .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
                    .arg("--location")
                    .arg(storage.path())
                    .args(["--skipApiVersionCheck", "--loose", "--silent"])
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(&log).unwrap())
                    .spawn()
                    .expect("start azurite-blob");
                wait_listening(&addr, &mut child, "azurite-blob", &log);
                let container = rand_name("strata");
                let (status, body) =
                    azure_request(&addr, "PUT", &container, &[("restype", "container")]);
                assert_eq!(
                    status, 201,
                    "creating container {container} in Azurite: {body}"
                );
                Backend {
                    kind,
                    lake_toml: format!(
                        "[lake]\nbackend = \"azure\"\ncontainer = \"{container}\"\naccount = \"{AZURITE_ACCOUNT}\"\nendpoint = \"http://{addr}/{AZURITE_ACCOUNT}\"\nallow_http = true\nprefix = \"{prefix}\"\n[lake.options]\nazure_storage_account_key = \"{AZURITE_KEY}\"\n"
                    ),
                    bucket: container,
                    prefix,
                    local_root: None,
                    addr: Some(addr),
                    ca_file: None,
                    server: Some(child),
                    _storage: Some(storage),
                }
            }
        }
    }

    /// True while some multipart upload is under way in the store (local: a staging file;
    /// S3: ListMultipartUploads; Azure: a blob with uncommitted blocks only).
    pub fn upload_in_progress(&self) -> bool {
        match self.kind {
            BackendKind::Local => {
                fn walk(dir: &Path) -> bool {
                    std::fs::read_dir(dir)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .any(|e| {
                            let p = e.path();
                            if p.is_dir() {
                                walk(&p)
                            } else {
                                p.file_name()
                                    .is_some_and(|n| n.to_string_lossy().contains(".parquet#"))
                            }
                        })
                }
                walk(self.local_root.as_ref().unwrap())
            }
            BackendKind::S3 => {
                let (_, body) = http(
                    self.addr.as_ref().unwrap(),
                    "GET",
                    &format!("/{}?uploads", self.bucket),
                    &[],
                    b"",
                );
                body.contains("<UploadId>")
            }
            BackendKind::Gcs => unreachable!("the GCS emulator is not in the suite (README)"),
            BackendKind::S3Tls => {
                let port = self.addr.as_ref().unwrap().rsplit(':').next().unwrap();
                let url = format!("https://localhost:{port}/{}?uploads", self.bucket);
                let (_, body) = https(self.ca_file.as_ref().unwrap(), "GET", &url);
                body.contains("<UploadId>")
            }
            BackendKind::Azure => {
                let (_, body) = azure_request(
                    self.addr.as_ref().unwrap(),
                    "GET",
                    &self.bucket,
                    &[
                        ("comp", "list"),
                        ("include", "uncommittedblobs"),
                        ("restype", "container"),
                    ],
                );
                body.contains("<Blob>")
            }
        }
    }

    /// Staging files left on local disk (always empty for the cloud backends).
    pub fn local_staging_files(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.to_string_lossy().contains('#') {
                    out.push(p);
                }
            }
        }
        if let Some(root) = &self.local_root {
            walk(root, &mut out);
        }
        out
    }
}

/// A private CA and a server certificate it signed for `localhost` and 127.0.0.1, made with the
/// `openssl` CLI in `dir`: (CA certificate, server certificate, server key), PEM files.
pub fn private_ca_and_server_cert(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let (ca_key, ca, key, csr, cert, ext) = (
        dir.join("ca.key"),
        dir.join("ca.pem"),
        dir.join("server.key"),
        dir.join("server.csr"),
        dir.join("server.pem"),
        dir.join("server.ext"),
    );
    std::fs::write(&ext, "subjectAltName = DNS:localhost, IP:127.0.0.1\n").unwrap();
    let openssl = |args: &[&std::ffi::OsStr]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("run openssl (Debian package openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let s = |x: &str| std::ffi::OsString::from(x);
    openssl(&[
        &s("req"),
        &s("-x509"),
        &s("-newkey"),
        &s("rsa:2048"),
        &s("-nodes"),
        &s("-days"),
        &s("2"),
        &s("-subj"),
        &s("/CN=strata test CA"),
        &s("-keyout"),
        ca_key.as_os_str(),
        &s("-out"),
        ca.as_os_str(),
    ]);
    openssl(&[
        &s("req"),
        &s("-newkey"),
        &s("rsa:2048"),
        &s("-nodes"),
        &s("-subj"),
        &s("/CN=localhost"),
        &s("-keyout"),
        key.as_os_str(),
        &s("-out"),
        csr.as_os_str(),
    ]);
    openssl(&[
        &s("x509"),
        &s("-req"),
        &s("-in"),
        csr.as_os_str(),
        &s("-CA"),
        ca.as_os_str(),
        &s("-CAkey"),
        ca_key.as_os_str(),
        &s("-CAcreateserial"),
        &s("-days"),
        &s("2"),
        &s("-extfile"),
        ext.as_os_str(),
        &s("-out"),
        cert.as_os_str(),
    ]);
    (ca, cert, key)
}

/// One HTTPS request with `curl`, trusting `ca`; returns the status and the body.
pub fn https(ca: &Path, method: &str, url: &str) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "-X", method, "--cacert"])
        .arg(ca)
        .args(["-w", "\n%{http_code}", url])
        .output()
        .expect("run curl (Debian package curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", ""));
    (status.trim().parse().unwrap_or(0), body.to_string())
}

/// A minimal HTTP/1.1 request on loopback; returns the status and the body.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A SharedKey-signed Azure Blob request to Azurite (path-style URLs): `container` plus query
/// parameters, no body.
pub fn azure_request(
    addr: &str,
    method: &str,
    container: &str,
    query: &[(&str, &str)],
) -> (u16, String) {
    let date = chrono::Utc::now()
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    let version = "2021-08-06";
    let path = format!("/{AZURITE_ACCOUNT}/{container}");
    let mut sorted: Vec<_> = query.to_vec();
    sorted.sort();
    let mut canonical = format!("/{AZURITE_ACCOUNT}{path}");
    for (k, v) in &sorted {
        canonical.push_str(&format!("\n{k}:{v}"));
    }
    let to_sign = format!(
        "{method}\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n{canonical}"
    );
    let key = base64_decode(AZURITE_KEY);
    let signature = base64_encode(&hmac_sha256(&key, to_sign.as_bytes()));
    let qs: Vec<String> = sorted.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let url = format!("{path}?{}", qs.join("&"));
    http(
        addr,
        method,
        &url,
        &[
            ("x-ms-date".into(), date),
            ("x-ms-version".into(), version.into()),
            (
                "Authorization".into(),
                format!("SharedKey {AZURITE_ACCOUNT}:{signature}"),
            ),
        ],
        b"",
    )
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(msg);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().to_vec()
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes().filter(|c| *c != b'=') {
        let v = B64.iter().position(|x| *x == c).expect("base64") as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[test]
fn base64_and_hmac_match_known_vectors() {
    assert_eq!(
        base64_encode(b"any carnal pleas"),
        "YW55IGNhcm5hbCBwbGVhcw=="
    );
    assert_eq!(
        base64_decode("YW55IGNhcm5hbCBwbGVhcw=="),
        b"any carnal pleas"
    );
    // RFC 4231 test case 2.
    let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
    assert_eq!(
        mac.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}
