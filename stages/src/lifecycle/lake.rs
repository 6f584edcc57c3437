//! The lake: an `object_store` (local disk, S3, Azure Blob / ADLS Gen2, GCS) built from
//! `[lake]`, archive paths, and [`Upload`], the bounded-memory writer that makes an object
//! visible only once it is complete.
//!
//! Paths are `<prefix>/<table>/date=YYYY-MM-DD/<chunk>-<uuid>.parquet` (the date of the chunk's
//! range start, UTC). Every attempt gets a new UUID, so nothing ever overwrites an archive;
//! single-part objects are additionally written with `PutMode::Create` where the store has it.
//! Objects that fail verification move to `<prefix>/_rejected/…`, outside every table's folder.
//!
//! Credentials never live in `[lake]`: each object store backend reads them from the environment
//! (`AWS_*`, `AZURE_*`, `GOOGLE_*`, as `object_store`'s `from_env` builders do). `[lake.options]`
//! passes any further `object_store` builder key (e.g. `aws_virtual_hosted_style_request`).
//!
//! # Layout
//! - [`LakeConfig`], [`LakeBackend`]: the `[lake]` section, shared by archiver and confirmer.
//! - [`Lake`]: the opened store and archive paths; [`Upload`]: the bounded multipart upload.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use chrono::{TimeZone, Utc};
use futures_util::StreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use strata_pipeline::StageError;

/// Which object store holds the lake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LakeBackend {
    /// A folder on local disk (`path`).
    #[default]
    Local,
    /// Amazon S3 or an S3-compatible server (`bucket`, optional `endpoint`).
    S3,
    /// Azure Blob Storage or ADLS Gen2 (`container`, `account`).
    Azure,
    /// Google Cloud Storage (`bucket`).
    Gcs,
}

impl LakeBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            LakeBackend::Local => "local",
            LakeBackend::S3 => "s3",
            LakeBackend::Azure => "azure",
            LakeBackend::Gcs => "gcs",
        }
    }
}

/// Where archives go (`[lake]`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LakeConfig {
    /// The object store: `local`, `s3`, `azure` or `gcs`.
    pub backend: LakeBackend,
    /// `local` only: the lake's root folder, created if missing (relative to the config file).
    pub path: PathBuf,
    /// `s3` and `gcs`: the bucket.
    pub bucket: Option<String>,
    /// `azure`: the blob container.
    pub container: Option<String>,
    /// `azure`: the storage account (else `AZURE_STORAGE_ACCOUNT_NAME`).
    pub account: Option<String>,
    /// Key prefix inside the bucket, container or folder; files go to
    /// `<prefix>/<table>/date=YYYY-MM-DD/<chunk>-<uuid>.parquet`.
    pub prefix: String,
    /// A custom endpoint URL: `s3` (S3-compatible servers), `azure` (Azurite, private links),
    /// `gcs` (the JSON/XML API base URL of an emulator or a private endpoint).
    pub endpoint: Option<String>,
    /// A PEM file of CA certificates trusted for the store's HTTPS endpoint, besides the
    /// operating system's (an S3-compatible server with a private CA). Read when the lake opens.
    pub tls_ca_file: Option<PathBuf>,
    /// `s3`: the region (else `AWS_REGION` / `AWS_DEFAULT_REGION`).
    pub region: Option<String>,
    /// Allow plain `http://` endpoints (test servers on loopback); off for real clouds.
    pub allow_http: bool,
    /// Further `object_store` builder keys for the chosen backend (`aws_*`, `azure_*`,
    /// `google_*`), applied after the environment.
    pub options: BTreeMap<String, String>,
}

/// `[lake.options]` may hold credentials (`aws_secret_access_key`, `azure_storage_account_key`):
/// their keys are shown, their values never.
impl std::fmt::Debug for LakeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let options: Vec<&String> = self.options.keys().collect();
        f.debug_struct("LakeConfig")
            .field("backend", &self.backend)
            .field("path", &self.path)
            .field("bucket", &self.bucket)
            .field("container", &self.container)
            .field("account", &self.account)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("region", &self.region)
            .field("allow_http", &self.allow_http)
            .field("options (values hidden)", &options)
            .finish()
    }
}

impl Default for LakeConfig {
    fn default() -> Self {
        Self {
            backend: LakeBackend::Local,
            path: PathBuf::from("./lake"),
            bucket: None,
            container: None,
            account: None,
            prefix: String::new(),
            endpoint: None,
            tls_ca_file: None,
            region: None,
            allow_http: false,
            options: BTreeMap::new(),
        }
    }
}

impl LakeConfig {
    /// Checks the keys the chosen backend needs; `Err` names the missing key.
    pub fn validate(&self) -> Result<(), String> {
        match self.backend {
            LakeBackend::Local if self.path.as_os_str().is_empty() => {
                Err("[lake] path must not be empty for backend = \"local\"".into())
            }
            LakeBackend::S3 | LakeBackend::Gcs
                if self.bucket.as_deref().unwrap_or("").is_empty() =>
            {
                Err(format!(
                    "[lake] bucket is required for backend = \"{}\"",
                    self.backend.as_str()
                ))
            }
            LakeBackend::Azure if self.container.as_deref().unwrap_or("").is_empty() => {
                Err("[lake] container is required for backend = \"azure\"".into())
            }
            _ => Ok(()),
        }
    }
}

/// Why the lake could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error("[lake]: {0}")]
    Config(String),
    #[error("[lake] options: `{key}` is not a {backend} option")]
    UnknownOption { key: String, backend: &'static str },
    #[error("[lake] path {path}: cannot create the folder")]
    CreateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("[lake] tls_ca_file {path}: cannot read it")]
    CaFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("[lake] tls_ca_file {path}: not a PEM file of certificates")]
    CaPem {
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error("[lake] tls_ca_file {path}: holds no certificate")]
    CaEmpty { path: String },
    #[error("[lake] backend = \"{backend}\": cannot open the object store")]
    Build {
        backend: &'static str,
        #[source]
        source: object_store::Error,
    },
}

/// An open lake.
#[derive(Debug, Clone)]
pub struct Lake {
    /// The object store.
    pub store: Arc<dyn ObjectStore>,
    /// Key prefix of every archive (may be empty).
    prefix: String,
    /// URL of the store's root, for `lakehouse_path` (`file:///…`, `s3://bucket`, …).
    root_url: String,
    /// The local root folder, to clean up staging files of crashed uploads (local only).
    local_root: Option<std::path::PathBuf>,
}

impl Lake {
    /// Opens the lake `[lake]` describes, with credentials from the environment.
    /// Opens the lake for a stage: shared by its workers, a failure fatal.
    pub fn open_shared(config: &LakeConfig) -> Result<Arc<Self>, StageError> {
        Self::open(config)
            .map(Arc::new)
            .map_err(|e| StageError::fatal(strata_pipeline::error_chain(&e)))
    }

    pub fn open(config: &LakeConfig) -> Result<Self, LakeError> {
        config.validate().map_err(LakeError::Config)?;
        let endpoint = config.endpoint.clone().filter(|e| !e.is_empty());
        let prefix = config.prefix.trim_matches('/').to_string();
        let backend = config.backend.as_str();
        let build = |source| LakeError::Build { backend, source };
        let unknown = |key: &String| LakeError::UnknownOption {
            key: key.clone(),
            backend,
        };
        let client = client_options(config)?;
        let (store, root_url, local_root): (Arc<dyn ObjectStore>, String, _) = match config.backend
        {
            LakeBackend::Local => {
                std::fs::create_dir_all(&config.path).map_err(|source| LakeError::CreateDir {
                    path: config.path.display().to_string(),
                    source,
                })?;
                let root =
                    std::fs::canonicalize(&config.path).map_err(|source| LakeError::CreateDir {
                        path: config.path.display().to_string(),
                        source,
                    })?;
                // fsync: the chunk is dropped once its archive is verified, so the file must
                // survive a power loss like an object in a cloud store does.
                let store = LocalFileSystem::new_with_prefix(&root)
                    .map_err(build)?
                    .with_fsync(true);
                (
                    Arc::new(store),
                    format!("file://{}", root.display()),
                    Some(root),
                )
            }
            LakeBackend::S3 => {
                let bucket = config.bucket.clone().unwrap_or_default();
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(&bucket)
                    .with_client_options(client);
                if let Some(e) = &endpoint {
                    b = b.with_endpoint(e);
                }
                if let Some(r) = &config.region {
                    b = b.with_region(r);
                }
                for (k, v) in &config.options {
                    let key: AmazonS3ConfigKey = k.parse().map_err(|_| unknown(k))?;
                    b = b.with_config(key, v);
                }
                (
                    Arc::new(b.build().map_err(build)?),
                    format!("s3://{bucket}"),
                    None,
                )
            }
            LakeBackend::Azure => {
                let container = config.container.clone().unwrap_or_default();
                let mut b = MicrosoftAzureBuilder::from_env()
                    .with_container_name(&container)
                    .with_client_options(client);
                if let Some(a) = &config.account {
                    b = b.with_account(a);
                }
                if let Some(e) = &endpoint {
                    b = b.with_endpoint(e.clone());
                }
                for (k, v) in &config.options {
                    let key: AzureConfigKey = k.parse().map_err(|_| unknown(k))?;
                    b = b.with_config(key, v);
                }
                (
                    Arc::new(b.build().map_err(build)?),
                    format!("az://{container}"),
                    None,
                )
            }
            LakeBackend::Gcs => {
                let bucket = config.bucket.clone().unwrap_or_default();
                let mut b = GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(&bucket)
                    .with_client_options(client);
                if let Some(e) = &endpoint {
                    b = b.with_base_url(e);
                }
                for (k, v) in &config.options {
                    let key: GoogleConfigKey = k.parse().map_err(|_| unknown(k))?;
                    b = b.with_config(key, v);
                }
                (
                    Arc::new(b.build().map_err(build)?),
                    format!("gs://{bucket}"),
                    None,
                )
            }
        };
        Ok(Self {
            store,
            prefix,
            root_url,
            local_root,
        })
    }

    fn with_prefix(&self, rest: &str) -> String {
        if self.prefix.is_empty() {
            rest.to_string()
        } else {
            format!("{}/{rest}", self.prefix)
        }
    }

    /// A new, never-used key for an archive of `chunk` (a bare relation name) whose range starts
    /// at `range_start_us`.
    pub fn new_key(&self, table: &str, chunk: &str, range_start_us: i64) -> String {
        let date = Utc
            .timestamp_micros(range_start_us)
            .single()
            .unwrap_or_default()
            .format("%Y-%m-%d");
        self.with_prefix(&format!(
            "{table}/date={date}/{chunk}-{}.parquet",
            uuid::Uuid::new_v4()
        ))
    }

    /// Where a rejected object of `key` is moved.
    pub fn rejected_key(&self, key: &str) -> String {
        let rest = key
            .strip_prefix(&self.prefix)
            .map(|r| r.trim_start_matches('/'))
            .unwrap_or(key);
        self.with_prefix(&format!("_rejected/{rest}"))
    }

    /// The URL people and other tools use for `key`.
    pub fn url(&self, key: &str) -> String {
        format!("{}/{key}", self.root_url)
    }

    /// Removes what an unfinished attempt may have left at `key`: the object (complete but never
    /// recorded) and, on local disk, multipart staging files (`<key>#<n>`). Missing is fine.
    pub async fn discard(&self, key: &str) -> Result<(), object_store::Error> {
        match self.store.delete(&Path::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
        if let Some(root) = &self.local_root {
            let file = root.join(key);
            if let (Some(dir), Some(name)) = (file.parent(), file.file_name()) {
                let stem = format!("{}#", name.to_string_lossy());
                if let Ok(entries) = std::fs::read_dir(dir) {
                    for e in entries.flatten() {
                        if e.file_name().to_string_lossy().starts_with(&stem) {
                            let _ = std::fs::remove_file(e.path());
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Moves a rejected object out of the table's folder, so lake readers never see it;
    /// returns the new key (None when there was nothing to move).
    pub async fn reject(&self, key: &str) -> Result<Option<String>, object_store::Error> {
        let to = self.rejected_key(key);
        match self
            .store
            .rename(&Path::from(key), &Path::from(to.as_str()))
            .await
        {
            Ok(()) => Ok(Some(to)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// SHA-256 (hex) and size of the object at `key`, read back in full, streaming.
    pub async fn digest(&self, key: &str) -> Result<(String, u64), object_store::Error> {
        let mut stream = self.store.get(&Path::from(key)).await?.into_stream();
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(piece) = stream.next().await {
            let piece = piece?;
            size += piece.len() as u64;
            hasher.update(&piece);
        }
        Ok((hex(&hasher.finalize()), size))
    }
}

/// The HTTP client settings every cloud backend shares: `allow_http` and the extra CAs of
/// `tls_ca_file` (HTTPS goes through rustls, the TLS stack of every strata connection).
fn client_options(config: &LakeConfig) -> Result<object_store::ClientOptions, LakeError> {
    let mut options = object_store::ClientOptions::new().with_allow_http(config.allow_http);
    if let Some(file) = &config.tls_ca_file {
        let path = file.display().to_string();
        let pem = std::fs::read(file).map_err(|source| LakeError::CaFile {
            path: path.clone(),
            source,
        })?;
        let certs = object_store::Certificate::from_pem_bundle(&pem).map_err(|source| {
            LakeError::CaPem {
                path: path.clone(),
                source,
            }
        })?;
        if certs.is_empty() {
            return Err(LakeError::CaEmpty { path });
        }
        for cert in certs {
            options = options.with_root_certificate(cert);
        }
    }
    Ok(options)
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// How a store error is retried: credentials and unsupported operations need an operator, the
/// rest (network, throttling, 5xx) waits.
pub fn store_error(context: &str, e: object_store::Error) -> StageError {
    let message = format!("{context}: {e}");
    match e {
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. }
        | object_store::Error::NotSupported { .. }
        | object_store::Error::NotImplemented { .. } => StageError::fatal(message),
        _ => StageError::backoff(message),
    }
}

/// Writes one object in pieces with bounded memory: up to one part is buffered; past that, a
/// multipart upload carries the parts (at most `max_concurrent` in flight) and the object appears
/// only when the upload completes. Small objects are one conditional PUT. Dropped or failed
/// uploads are aborted by [`Upload::abort`]; a crashed process leaves no visible object.
pub struct Upload {
    /// The store written to.
    store: Arc<dyn ObjectStore>,
    /// The object's key.
    path: Path,
    /// Bytes per part.
    part_size: usize,
    /// Parts in flight at most.
    max_concurrent: usize,
    /// Bytes not yet handed to a part (only before the multipart upload starts).
    pending: Vec<Bytes>,
    /// Size of `pending`.
    pending_len: usize,
    /// The multipart upload, once the object outgrew one part.
    multipart: Option<WriteMultipart>,
    /// Bytes written.
    bytes: u64,
}

impl Upload {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        key: &str,
        part_size: usize,
        max_concurrent: usize,
    ) -> Self {
        Self {
            store,
            path: Path::from(key),
            part_size: part_size.max(5 << 20),
            max_concurrent: max_concurrent.max(1),
            pending: Vec::new(),
            pending_len: 0,
            multipart: None,
            bytes: 0,
        }
    }

    /// Appends `data` to the object.
    pub async fn write(&mut self, data: Bytes) -> Result<(), object_store::Error> {
        self.bytes += data.len() as u64;
        if self.multipart.is_none() {
            self.pending_len += data.len();
            self.pending.push(data);
            if self.pending_len <= self.part_size {
                return Ok(());
            }
            let upload = self.store.put_multipart(&self.path).await?;
            let mut mp = WriteMultipart::new_with_chunk_size(upload, self.part_size);
            for piece in self.pending.drain(..) {
                mp.write(&piece);
            }
            self.pending_len = 0;
            self.multipart = Some(mp);
        } else if let Some(mp) = self.multipart.as_mut() {
            mp.write(&data);
        }
        if let Some(mp) = self.multipart.as_mut() {
            mp.wait_for_capacity(self.max_concurrent).await?;
        }
        Ok(())
    }

    /// Completes the object (only now does it become visible); returns its size.
    pub async fn finish(mut self) -> Result<u64, object_store::Error> {
        match self.multipart.take() {
            Some(mp) => {
                mp.finish().await?;
            }
            None => {
                let payload: PutPayload = self.pending.drain(..).collect();
                let create = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                match self
                    .store
                    .put_opts(&self.path, payload.clone(), create)
                    .await
                {
                    Ok(_) => {}
                    // Stores without conditional writes: the key is a fresh UUID anyway.
                    Err(object_store::Error::NotImplemented { .. }) => {
                        self.store.put(&self.path, payload).await?;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(self.bytes)
    }

    /// Abandons the object: nothing becomes visible.
    pub async fn abort(mut self) {
        if let Some(mp) = self.multipart.take() {
            if let Err(e) = mp.abort().await {
                tracing::warn!(path = %self.path, error = %e, "aborting a multipart upload failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn lake_sections_parse_and_name_missing_keys() {
        let lake: LakeConfig = toml::from_str(
            "backend = \"s3\"\nbucket = \"b\"\nendpoint = \"http://127.0.0.1:9000\"\nallow_http = true\n[options]\naws_secret_access_key = \"s3cr3t-k3y\"\n",
        )
        .unwrap();
        assert_eq!(lake.backend, LakeBackend::S3);
        assert_eq!(lake.options["aws_secret_access_key"], "s3cr3t-k3y");
        // Debug shows the option's key, never its value.
        let debug = format!("{lake:?}");
        assert!(debug.contains("aws_secret_access_key"), "{debug}");
        assert!(!debug.contains("s3cr3t-k3y"), "{debug}");
        assert!(lake.validate().is_ok());
        let lake: LakeConfig = toml::from_str("backend = \"azure\"\n").unwrap();
        assert!(lake.validate().unwrap_err().contains("container"));
        assert!(toml::from_str::<LakeConfig>("root = \"x\"\n").is_err());
        assert_eq!(LakeConfig::default().path, PathBuf::from("./lake"));
        let a: crate::lifecycle::archiver::ArchiverConfig =
            toml::from_str("zstd_level = 5\n").unwrap();
        assert_eq!((a.zstd_level, a.workers), (5, 1));
    }

    use super::*;

    #[tokio::test]
    async fn uploads_are_complete_or_absent_and_keys_never_repeat() {
        let dir = tempfile_dir();
        let config = LakeConfig {
            path: dir.clone(),
            prefix: "/p/".into(),
            ..Default::default()
        };
        let lake = Lake::open(&config).unwrap();
        let k1 = lake.new_key("metrics", "metrics_p20261101_000000", 1_793_491_200_000_000);
        let k2 = lake.new_key("metrics", "metrics_p20261101_000000", 1_793_491_200_000_000);
        assert_ne!(k1, k2);
        assert!(k1.starts_with("p/metrics/date=2026-11-01/metrics_p20261101_000000-"));
        assert!(k1.ends_with(".parquet"));
        assert_eq!(
            lake.rejected_key("p/metrics/x.parquet"),
            "p/_rejected/metrics/x.parquet"
        );

        // Large: multipart, invisible until finished.
        let part = 5 << 20;
        let mut up = Upload::new(lake.store.clone(), &k1, part, 2);
        let data = Bytes::from(vec![7u8; part + 1000]);
        up.write(data.clone()).await.unwrap();
        up.write(data.clone()).await.unwrap();
        assert!(lake.store.head(&Path::from(k1.as_str())).await.is_err());
        let bytes = up.finish().await.unwrap();
        assert_eq!(bytes, 2 * data.len() as u64);
        let mut whole = Sha256::new();
        whole.update(&data);
        whole.update(&data);
        let (sha, size) = lake.digest(&k1).await.unwrap();
        assert_eq!((sha, size), (hex(&whole.finalize()), bytes));

        // Aborted: nothing left.
        let mut up = Upload::new(lake.store.clone(), &k2, part, 2);
        up.write(data.clone()).await.unwrap();
        up.write(data).await.unwrap();
        up.abort().await;
        assert!(lake.store.head(&Path::from(k2.as_str())).await.is_err());

        // Small: one conditional PUT that refuses to overwrite.
        let mut up = Upload::new(lake.store.clone(), &k1, part, 2);
        up.write(Bytes::from_static(b"x")).await.unwrap();
        assert!(matches!(
            up.finish().await,
            Err(object_store::Error::AlreadyExists { .. })
        ));
        let moved = lake.reject(&k1).await.unwrap().unwrap();
        assert!(moved.starts_with("p/_rejected/metrics/"));
        assert!(lake.reject(&k1).await.unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("strata-lake-test-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
