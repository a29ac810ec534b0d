//! TLS at the edge: certificates from PEM files, SNI selection (exact names and wildcards), a
//! default certificate for clients without SNI, ALPN `h2` and `http/1.1`, TLS 1.2 and 1.3
//! with rustls's safe defaults, session resumption (stateful cache and tickets), and reload
//! of changed files without a restart.
//!
//! The certificate set is an immutable [`CertStore`] behind an `ArcSwap`, like the backend
//! snapshot: a reload builds a whole new store off the handshake path and swaps it in; a
//! broken file is refused with a log line and the old store keeps serving. Open connections
//! keep the certificate they were made with.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

/// A certificate problem, naming the file and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsError {
    pub file: PathBuf,
    pub problem: String,
    pub fix: String,
}

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {}\n  fix: {}",
            self.file.display(),
            self.problem,
            self.fix
        )
    }
}

impl std::error::Error for TlsError {}

/// One `[[tls.certificates]]` entry of the configuration: a certificate chain and its key.
/// Part of the configuration schema (`config` re-exports it), defined here so that the
/// dependency goes one way: `config` validates certificates with this module, and this module
/// needs nothing from `config`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// PEM certificate chain: the server certificate first, then intermediates.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC).
    pub key: PathBuf,
}

/// One loaded certificate chain with its key, the names it covers and when it expires.
#[derive(Debug)]
pub struct LoadedCert {
    pub files: CertificateFiles,
    pub key: Arc<CertifiedKey>,
    /// DNS names from the subject alternative names, lower case (`*.` for wildcards).
    pub names: Vec<String>,
    /// Seconds since the Unix epoch.
    pub not_after: i64,
    /// The raw file contents, to tell whether a reload changed anything.
    source: PemPair,
}

impl LoadedCert {
    /// True when this certificate is valid for `host` (exact or one-label wildcard).
    pub fn covers(&self, host: &str) -> bool {
        self.names.iter().any(|name| name_matches(name, host))
    }
}

fn name_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix)),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// The certificates in force; the first is the default for clients without SNI.
#[derive(Debug)]
pub struct CertStore {
    pub certs: Vec<LoadedCert>,
}

impl CertStore {
    /// Loads every configured certificate; any problem fails the whole load.
    pub fn load(files: &[CertificateFiles]) -> Result<CertStore, TlsError> {
        let sources = read_sources(files)?;
        CertStore::from_sources(files, sources)
    }

    /// Builds the store from the files' bytes as read, so what was compared with the
    /// running store is what gets loaded, even when a file changes meanwhile.
    fn from_sources(
        files: &[CertificateFiles],
        sources: Vec<PemPair>,
    ) -> Result<CertStore, TlsError> {
        let certs = files
            .iter()
            .zip(sources)
            .map(|(files, (cert_pem, key_pem))| load_cert(files, cert_pem, key_pem))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(CertStore { certs })
    }

    /// The certificate for an SNI name: an exact name wins over a wildcard; no match (or no
    /// SNI) gets the default.
    pub fn select(&self, sni: Option<&str>) -> Option<&Arc<CertifiedKey>> {
        if let Some(host) = sni {
            let exact = self
                .certs
                .iter()
                .find(|c| c.names.iter().any(|n| n.eq_ignore_ascii_case(host)));
            if let Some(cert) = exact.or_else(|| self.certs.iter().find(|c| c.covers(host))) {
                return Some(&cert.key);
            }
        }
        self.certs.first().map(|c| &c.key)
    }

    /// True when a reload would read the same bytes again.
    fn same_sources(&self, other: &[PemPair]) -> bool {
        self.certs.len() == other.len() && self.certs.iter().zip(other).all(|(c, o)| &c.source == o)
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError {
        file: path.to_path_buf(),
        problem: format!("cannot read the {what}: {e}"),
        fix: format!("point the setting at a readable PEM {what} file"),
    })
}

/// A certificate chain and its private key, as read from their PEM files.
type PemPair = (Vec<u8>, Vec<u8>);

/// Each configured certificate chain and key, as bytes.
fn read_sources(files: &[CertificateFiles]) -> Result<Vec<PemPair>, TlsError> {
    files
        .iter()
        .map(|f| {
            Ok((
                read(&f.cert, "certificate chain")?,
                read(&f.key, "private key")?,
            ))
        })
        .collect()
}

fn load_cert(
    files: &CertificateFiles,
    cert_pem: Vec<u8>,
    key_pem: Vec<u8>,
) -> Result<LoadedCert, TlsError> {
    let bad_cert = |problem: String| TlsError {
        file: files.cert.clone(),
        problem,
        fix: "give a PEM file with the server certificate first, then its intermediates".into(),
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad_cert(format!("not a PEM certificate chain: {e}")))?;
    let Some(leaf) = chain.first() else {
        return Err(bad_cert("no certificate in the file".into()));
    };
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError {
        file: files.key.clone(),
        problem: format!("no usable private key (PKCS#8, PKCS#1 RSA or SEC1 EC): {e}"),
        fix: "give the PEM private key that belongs to the certificate".into(),
    })?;
    let signing_key =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| TlsError {
            file: files.key.clone(),
            problem: format!("unsupported private key: {e}"),
            fix: "use an RSA, ECDSA (P-256/P-384) or Ed25519 key".into(),
        })?;
    let certified = CertifiedKey::new(chain.clone(), signing_key);
    certified.keys_match().map_err(|_| TlsError {
        file: files.key.clone(),
        problem: format!(
            "the key does not match the certificate in {}",
            files.cert.display()
        ),
        fix: "pair each certificate with its own private key".into(),
    })?;

    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| bad_cert(format!("cannot parse the certificate: {e}")))?;
    let not_after = parsed.validity().not_after.timestamp();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64;
    if not_after < now {
        return Err(TlsError {
            file: files.cert.clone(),
            problem: format!("the certificate expired at {}", parsed.validity().not_after),
            fix: "renew the certificate (or let cert-manager do it) and point the setting at the new file".into(),
        });
    }
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        if let Some(cn) = parsed.subject().iter_common_name().next() {
            if let Ok(cn) = cn.as_str() {
                names.push(cn.to_ascii_lowercase());
            }
        }
    }
    Ok(LoadedCert {
        files: files.clone(),
        key: Arc::new(certified),
        names,
        not_after,
        source: (cert_pem, key_pem),
    })
}

/// Picks the certificate per handshake from the current store.
#[derive(Debug)]
pub struct SniResolver {
    store: Arc<ArcSwap<CertStore>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.store.load().select(hello.server_name()).cloned()
    }
}

/// The TLS side of the server: the store, and the rustls config built on it.
pub struct Tls {
    pub store: Arc<ArcSwap<CertStore>>,
    pub config: Arc<ServerConfig>,
    files: Vec<CertificateFiles>,
    /// File checks done so far (changed or not, accepted or refused).
    checks: std::sync::atomic::AtomicU64,
}

impl Tls {
    pub fn new(files: &[CertificateFiles]) -> Result<Tls, TlsError> {
        let store = Arc::new(ArcSwap::from_pointee(CertStore::load(files)?));
        let mut provider = rustls::crypto::ring::default_provider();
        // AES-128-GCM first. rustls (like OpenSSL) lists AES-256-GCM-SHA384 first, and
        // OpenSSL-based clients (Python's requests, so the ClearML SDK) ask for it first;
        // its SHA-384 handshake hashing and 14 AES rounds cost measurably more per handshake
        // and byte than AES-128-GCM-SHA256 (SHA-NI), for no practical gain in strength.
        provider
            .cipher_suites
            .sort_by_key(|suite| match suite.suite() {
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
                rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 1,
                rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
                | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 2,
                _ => 3,
            });
        let mut config = ServerConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError {
                file: PathBuf::new(),
                problem: format!("TLS setup failed: {e}"),
                fix: "report this as a bug".into(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SniResolver {
                store: store.clone(),
            }));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // Our order above, not the client's.
        config.ignore_client_order = true;
        // Resumption: the default stateful cache, plus stateless tickets.
        if let Ok(ticketer) = rustls::crypto::ring::Ticketer::new() {
            config.ticketer = ticketer;
        }
        Ok(Tls {
            store,
            config: Arc::new(config),
            files: files.to_vec(),
            checks: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// Re-reads the files; swaps in a new store when they changed and are valid. A broken
    /// file is logged and the old certificates keep serving.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let result = self.reload_inner();
        self.checks
            .fetch_add(1, std::sync::atomic::Ordering::Release);
        result
    }

    /// How many times the files have been checked.
    pub fn checks(&self) -> u64 {
        self.checks.load(std::sync::atomic::Ordering::Acquire)
    }

    fn reload_inner(&self) -> Result<bool, TlsError> {
        let sources = read_sources(&self.files)?;
        if self.store.load().same_sources(&sources) {
            return Ok(false);
        }
        let store = CertStore::from_sources(&self.files, sources)?;
        self.store.store(Arc::new(store));
        Ok(true)
    }

    /// Polls the files every `interval` (a Kubernetes Secret update swaps a symlink, which
    /// file-change notifications often miss) until aborted.
    pub async fn watch(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        let mut last_error: Option<TlsError> = None;
        loop {
            ticker.tick().await;
            match self.reload() {
                Ok(true) => {
                    last_error = None;
                    let names: Vec<String> = self
                        .store
                        .load()
                        .certs
                        .iter()
                        .flat_map(|c| c.names.clone())
                        .collect();
                    tracing::info!(?names, "certificates reloaded: new handshakes use them");
                }
                Ok(false) => last_error = None,
                Err(e) => {
                    if last_error.as_ref() != Some(&e) {
                        tracing::error!(error = %e, "certificate reload refused; the previous certificates keep serving");
                    }
                    last_error = Some(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(name_matches("*.example.com", "api.example.com"));
        assert!(name_matches("*.example.com", "API.Example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(name_matches("app.example.org", "APP.example.org"));
    }
}
