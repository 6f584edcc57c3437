//! The one TLS client setup strata uses for PostgreSQL and Redis: rustls with the aws-lc-rs
//! provider (the one object_store/reqwest already compile for the lake), installed explicitly
//! by [`install_crypto_provider`].
//!
//! # Layout
//! - [`TlsSettings`] → [`client_config`]: roots from a PEM file or the OS store, an optional
//!   client certificate, and how much of the server's certificate is checked ([`Verify`]).
//! - [`TlsConfigError`]: a file that cannot be read or holds no usable PEM, named.
//! - [`TlsFailure`] / [`failure_of`]: why a handshake failed, read from the rustls error types in
//!   an error's source chain (never from message text); [`TlsConnectError`] adds the server.

use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

/// The crypto provider of every rustls config in the process (aws-lc-rs). Installed once as
/// the process default so libraries that call `ClientConfig::builder()` (the `redis` crate,
/// reqwest) use the same one.
pub fn install_crypto_provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            // Err: another provider was installed first (only possible from a test harness);
            // ours is still used for the configs built here.
            let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
            CryptoProvider::get_default()
                .cloned()
                .unwrap_or_else(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        })
        .clone()
}

/// Where trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    /// The operating system's store (rustls-native-certs).
    System,
    /// A PEM file of one or more CA certificates.
    File(PathBuf),
}

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Chain to a trusted root, validity dates and the host name (libpq `verify-full`).
    Full,
    /// Chain and dates, not the host name (libpq `verify-ca`).
    ChainOnly,
    /// Nothing: encrypted, not authenticated (libpq `require` without a root certificate,
    /// Redis `tls_insecure_skip_verify`).
    None,
}

/// What a TLS client config is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// Trusted CAs (ignored with [`Verify::None`]).
    pub roots: Roots,
    /// Client certificate chain and its private key, both PEM, for certificate authentication.
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// How much of the server's certificate is checked.
    pub verify: Verify,
}

/// A TLS setting that cannot be used; each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// A file that cannot be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A file that is not PEM (or holds no private key, for a key file).
    #[error("{path} is not valid PEM")]
    Pem {
        /// The file.
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A PEM file without a `CERTIFICATE` block.
    #[error("{path} holds no certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A CA file whose certificate cannot be a trust anchor.
    #[error("{path} holds no usable CA certificate")]
    NoUsableCa {
        /// The file.
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// `sslrootcert=system` or no CA file, and the OS store is empty.
    #[error("the operating system's CA store holds no certificate")]
    NoSystemRoots,
    /// A client certificate and a key that rustls refuses together.
    #[error("client certificate {cert} and key {key} do not go together")]
    ClientCert {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// Only one of the certificate and key files is set.
    #[error("{0} is set without its pair (a client certificate needs both the certificate and the key file)")]
    HalfClientCert(PathBuf),
    /// webpki refused the root store.
    #[error("cannot build the certificate verifier")]
    Verifier(#[source] rustls::client::VerifierBuilderError),
    /// The provider supports no protocol version (cannot happen with aws-lc-rs).
    #[error("cannot set up TLS")]
    Rustls(#[source] rustls::Error),
}

fn read(path: &Path) -> Result<Vec<u8>, TlsConfigError> {
    std::fs::read(path).map_err(|source| TlsConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The certificates of a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsConfigError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsConfigError::Pem {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsConfigError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsConfigError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| TlsConfigError::Pem {
        path: path.to_path_buf(),
        source,
    })
}

/// The trusted roots `roots` names.
pub fn root_store(roots: &Roots) -> Result<RootCertStore, TlsConfigError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::File(path) => {
            for cert in load_certs(path)? {
                store
                    .add(cert)
                    .map_err(|source| TlsConfigError::NoUsableCa {
                        path: path.clone(),
                        source,
                    })?;
            }
        }
        Roots::System => {
            // Certificates the store cannot parse are skipped, as browsers do.
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            if store.is_empty() {
                return Err(TlsConfigError::NoSystemRoots);
            }
        }
    }
    Ok(store)
}

/// Builds the client config `settings` describe (ALPN none; TLS 1.2 and 1.3).
pub fn client_config(settings: &TlsSettings) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let provider = install_crypto_provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(TlsConfigError::Rustls)?;
    let verifier: Arc<dyn ServerCertVerifier> = match settings.verify {
        Verify::None => Arc::new(NoVerification(provider)),
        verify => {
            let store = Arc::new(root_store(&settings.roots)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(store, provider)
                .build()
                .map_err(TlsConfigError::Verifier)?;
            if verify == Verify::Full {
                webpki
            } else {
                Arc::new(ChainOnly(webpki))
            }
        }
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let config = match &settings.client_cert {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|source| TlsConfigError::ClientCert {
                cert: cert.clone(),
                key: key.clone(),
                source,
            })?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// `verify-ca`: the chain is verified by webpki; only a host-name mismatch is accepted (webpki
/// checks the name after the chain, so a name error means the chain was good).
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// No check of the certificate (only of the handshake signatures, so the session is still
/// bound to the key the server presented). Used only when explicitly asked for.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Why a TLS handshake (or the first exchange after it) failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TlsFailure {
    #[error("the server's certificate is not signed by a trusted CA (unknown issuer)")]
    UnknownCa,
    #[error("the server's certificate is not valid for this host name")]
    NameMismatch,
    #[error("the server's certificate has expired")]
    Expired,
    #[error("the server's certificate is not valid yet")]
    NotValidYet,
    #[error("the server's certificate is revoked")]
    Revoked,
    #[error("the server's certificate is invalid ({0:?})")]
    BadCertificate(CertificateError),
    #[error("the server does not speak TLS")]
    NotTls,
    #[error("the server refused our client certificate (TLS alert {0:?})")]
    ClientCertRefused(rustls::AlertDescription),
    #[error("the server ended the handshake (TLS alert {0:?})")]
    Alert(rustls::AlertDescription),
    #[error("the server presented no certificate")]
    NoCertificate,
    #[error("TLS error: {0}")]
    Other(rustls::Error),
}

impl TlsFailure {
    /// The failure a rustls error stands for.
    pub fn from_rustls(e: &rustls::Error) -> Self {
        use rustls::AlertDescription as A;
        match e {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => Self::UnknownCa,
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => Self::NameMismatch,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    Self::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    Self::NotValidYet
                }
                CertificateError::Revoked => Self::Revoked,
                other => Self::BadCertificate(other.clone()),
            },
            rustls::Error::InvalidMessage(_) | rustls::Error::PeerSentOversizedRecord => {
                Self::NotTls
            }
            rustls::Error::NoCertificatesPresented => Self::NoCertificate,
            rustls::Error::AlertReceived(
                a @ (A::CertificateRequired
                | A::BadCertificate
                | A::UnknownCA
                | A::CertificateUnknown
                | A::CertificateExpired
                | A::AccessDenied),
            ) => Self::ClientCertRefused(*a),
            rustls::Error::AlertReceived(a) => Self::Alert(*a),
            other => Self::Other(other.clone()),
        }
    }
}

/// Calls `f` on each error of `err`'s source chain until it returns `Some`. Errors shared as
/// `Arc<dyn Error>` (as the `redis` crate keeps them) are looked into, and so is the error inside
/// a `std::io::Error` (whose `source()` skips it).
pub fn find_in_chain<'a, T>(
    err: &'a (dyn StdError + 'static),
    f: &mut impl FnMut(&'a (dyn StdError + 'static)) -> Option<T>,
) -> Option<T> {
    let mut cur: Option<&'a (dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(found) = f(e) {
            return Some(found);
        }
        if let Some(shared) = e.downcast_ref::<Arc<dyn StdError + Send + Sync>>() {
            let inner: &'a (dyn StdError + 'static) = &**shared;
            if let Some(found) = find_in_chain(inner, f) {
                return Some(found);
            }
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            let inner: &'a (dyn StdError + 'static) = inner;
            if let Some(found) = find_in_chain(inner, f) {
                return Some(found);
            }
        }
        cur = e.source();
    }
    None
}

/// The TLS failure somewhere in `err`'s source chain: a `rustls::Error`, directly or inside a
/// `std::io::Error` (as tokio-rustls and the `redis` crate report it).
pub fn failure_of(err: &(dyn StdError + 'static)) -> Option<TlsFailure> {
    find_in_chain(err, &mut |e| {
        if let Some(f) = e.downcast_ref::<TlsConnectError>() {
            return Some(f.failure.clone());
        }
        e.downcast_ref::<rustls::Error>()
            .map(TlsFailure::from_rustls)
    })
}

/// A failed TLS handshake with `server`.
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake with {server} failed: {failure}")]
pub struct TlsConnectError {
    /// `host:port` of the server, as configured.
    pub server: String,
    /// Why, from the rustls error.
    pub failure: TlsFailure,
    /// The error tokio-rustls returned.
    #[source]
    pub source: std::io::Error,
}

impl TlsConnectError {
    /// Classifies a handshake error of tokio-rustls; `None` when it holds no rustls error
    /// (the socket failed: the caller reports it as an I/O error).
    pub fn new(server: String, source: std::io::Error) -> Result<Self, std::io::Error> {
        match failure_of(&source) {
            Some(failure) => Ok(Self {
                server,
                failure,
                source,
            }),
            None => Err(source),
        }
    }
}

/// Whether an I/O error means the peer hung up on us (a TLS-only server dropping a plain
/// client, or a plain server dropping a handshake).
pub fn is_hang_up(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::ConnectionReset | K::UnexpectedEof | K::BrokenPipe | K::ConnectionAborted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_read_from_the_rustls_error_inside_io_errors() {
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
        );
        assert_eq!(failure_of(&io), Some(TlsFailure::UnknownCa));
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType),
        );
        assert_eq!(failure_of(&io), Some(TlsFailure::NotTls));
        let plain = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert_eq!(failure_of(&plain), None);
    }

    #[test]
    fn missing_files_are_named() {
        let err = client_config(&TlsSettings {
            roots: Roots::File("/nonexistent/ca.pem".into()),
            client_cert: None,
            verify: Verify::Full,
        })
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        assert!(matches!(err, TlsConfigError::Read { .. }));
    }
}
