//! TLS termination (rustls): certificates loaded from PEM files, the one to present chosen by the
//! client's SNI (exact name, then wildcard, else the first certificate). TLS 1.2 and 1.3; ALPN offers what
//! the listener speaks (`h2`, `http/1.1`).
//!
//! Certificates are read at start and again on every reload; a listener keeps its socket across reloads
//! and only its [`TlsAcceptor`] is swapped. Sessions are resumed from stateless tickets (RFC 8446 §4.6.1)
//! whose keys belong to the process, not to a config generation: a reload does not make every returning
//! client pay a full handshake again. The sessions themselves are driven by wsgate (`session.rs`), which
//! owns their buffers.
//!
//! The loading (`read_certificates`, `load_certified_key`) also serves TLS toward backends
//! (`upstream/tls_client.rs`): trusted roots, and wsgate's own client certificate, and so does the
//! cryptography (`provider`).

pub mod record_layer;
pub mod session;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ProducesTickets;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite};

use self::session::ServerSession;

use crate::config::{Alpn, TlsConfig};

/// A certificate problem, naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct TlsError {
    pub path: PathBuf,
    pub message: String,
}

fn error(path: &Path, message: impl Into<String>) -> TlsError {
    TlsError {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// The cryptography of every TLS session wsgate takes part in, toward clients and toward backends.
/// rustls' providers are made to be combined, and this one takes from each library what it did faster on
/// the x86-64 machine measured (BENCHMARKS.md, "Full handshakes: two libraries"):
/// - aws-lc (rustls' `aws_lc_rs`): the X25519 key exchange (s2n-bignum's), and the signing keys: its RSA
///   uses AVX-512 IFMA where the CPU has it, ring's has no such code; its ECDSA is about as fast as ring's;
/// - ring (rustls' `ring`): everything else, in ring's order of preference: the cipher suites (so the
///   record layer's AEAD), hashes and HKDF, the other groups, signature verification, randomness.
///
/// aws-lc for everything was tried: its SHA-384, which the key schedule of `TLS13_AES_256_GCM_SHA384`
/// spends most on, is slower than ring's there, and its TLS 1.3 AES-GCM sealer would not fit the record
/// layer as it is (it takes the first record a key seals to be number zero, and keys handed over after
/// rustls sent session tickets start later).
pub fn provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.key_provider = rustls::crypto::aws_lc_rs::default_provider().key_provider;
    for group in &mut provider.kx_groups {
        if group.name() == rustls::NamedGroup::X25519 {
            *group = rustls::crypto::aws_lc_rs::kx_group::X25519;
        }
    }
    provider
}

/// Loads every certificate of a listener and builds its acceptor, offering `alpn` in that order.
pub fn acceptor(config: &TlsConfig, alpn: &[Alpn]) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(provider());
    let mut certs = Vec::new();
    for files in &config.certs {
        certs.push(load_one(&files.cert, &files.key, &provider)?);
    }
    let resolver = SniResolver { certs };
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| error(Path::new("<tls>"), e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    server.alpn_protocols = alpn.iter().map(|id| id.id().to_vec()).collect();
    server.ticketer = ticketer().map_err(|e| error(Path::new("<tls>"), e))?;
    // rustls may hand an established TLS 1.3 session's keys to wsgate's record layer
    // (`record_layer.rs`), which keeps less for a long-lived tunnel than rustls' connection does.
    server.enable_secret_extraction = true;
    Ok(TlsAcceptor {
        config: Arc::new(server),
    })
}

/// The process's session-ticket keys (rustls' `Ticketer`: AEAD keys rotated every 6 hours, the previous
/// key still accepted), shared by every listener and config generation.
fn ticketer() -> Result<Arc<dyn ProducesTickets>, String> {
    static TICKETER: OnceLock<Arc<dyn ProducesTickets>> = OnceLock::new();
    if let Some(ticketer) = TICKETER.get() {
        return Ok(Arc::clone(ticketer));
    }
    let made = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| format!("cannot make session ticket keys: {e}"))?;
    Ok(Arc::clone(TICKETER.get_or_init(|| made)))
}

/// A listener's TLS settings: certificates, versions, ALPN and ticket keys. Cheap to clone.
#[derive(Clone)]
pub struct TlsAcceptor {
    config: Arc<rustls::ServerConfig>,
}

impl TlsAcceptor {
    /// Makes the handshake over `io`; the session once it is complete.
    pub async fn accept<IO: AsyncRead + AsyncWrite + Unpin>(
        &self,
        io: IO,
    ) -> std::io::Result<ServerSession<IO>> {
        session::accept(io, Arc::clone(&self.config)).await
    }
}

struct NamedCert {
    /// Lower-cased DNS names from the certificate (subjectAltName, else the common name); may hold `*.` names.
    names: Vec<String>,
    key: Arc<CertifiedKey>,
}

fn load_one(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<NamedCert, TlsError> {
    let chain = read_certificates(cert_path)?;
    let names = inspect(cert_path, &chain[0])?;
    let key_pem =
        std::fs::read(key_path).map_err(|e| error(key_path, format!("cannot read: {e}")))?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| error(key_path, format!("not a PEM private key: {e}")))?
        .ok_or_else(|| {
            error(
                key_path,
                "no private key (PKCS#8, PKCS#1 or SEC1) in the file",
            )
        })?;
    let certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        error(
            key_path,
            format!(
                "key does not fit the certificate in {}: {e}",
                cert_path.display()
            ),
        )
    })?;
    Ok(NamedCert {
        names,
        key: Arc::new(certified),
    })
}

/// Every certificate of a PEM file, in order (a chain, or trusted roots); at least one.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = std::fs::read(path).map_err(|e| error(path, format!("cannot read: {e}")))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| error(path, format!("not a PEM certificate chain: {e}")))?;
    if certs.is_empty() {
        return Err(error(path, "no certificate in the file"));
    }
    Ok(certs)
}

/// A certificate chain and its key, loaded and checked as a listener's are: for wsgate's own client
/// certificate toward backends (mutual TLS).
pub fn load_certified_key(
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    load_one(cert_path, key_path, provider).map(|named| named.key)
}

/// Reads the names of a certificate and warns when it has expired or is not valid yet.
fn inspect(path: &Path, leaf: &CertificateDer<'_>) -> Result<Vec<String>, TlsError> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| error(path, format!("cannot parse the certificate: {e}")))?;
    let validity = cert.validity();
    if !validity.is_valid() {
        tracing::warn!(
            file = %path.display(),
            not_before = %validity.not_before,
            not_after = %validity.not_after,
            "certificate is expired or not yet valid"
        );
    }
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::DNSName(name) => Some(name.to_ascii_lowercase()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    Ok(names)
}

struct SniResolver {
    certs: Vec<NamedCert>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.certs.iter().map(|c| &c.names))
            .finish()
    }
}

impl SniResolver {
    fn pick(&self, sni: Option<&str>) -> Option<&NamedCert> {
        if let Some(sni) = sni.map(str::to_ascii_lowercase) {
            let exact = self.certs.iter().find(|c| c.names.contains(&sni));
            let wildcard = || {
                let (_, parent) = sni.split_once('.')?;
                self.certs
                    .iter()
                    .find(|c| c.names.iter().any(|n| n.strip_prefix("*.") == Some(parent)))
            };
            if let Some(found) = exact.or_else(wildcard) {
                return Some(found);
            }
        }
        self.certs.first()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name()).map(|c| Arc::clone(&c.key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn named(names: &[&str]) -> NamedCert {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        let cert = params.self_signed(&key).expect("cert");
        let der = PrivateKeyDer::try_from(key.serialize_der()).expect("der");
        let provider = rustls::crypto::ring::default_provider();
        let certified =
            CertifiedKey::from_der(vec![cert.der().clone()], der, &provider).expect("certified");
        NamedCert {
            names: names.iter().map(|s| s.to_string()).collect(),
            key: Arc::new(certified),
        }
    }

    #[test]
    fn the_provider_is_ring_with_aws_lc_key_exchange_and_keys() {
        let ring = rustls::crypto::ring::default_provider();
        let ours = provider();
        let names = |p: &CryptoProvider| p.kx_groups.iter().map(|g| g.name()).collect::<Vec<_>>();
        assert_eq!(names(&ours), names(&ring), "ring's groups, in ring's order");
        for (group, ring_group) in ours.kx_groups.iter().zip(&ring.kx_groups) {
            let same_as = |other: &'static dyn rustls::crypto::SupportedKxGroup| {
                std::ptr::addr_eq(*group as *const _, other as *const _)
            };
            if group.name() == rustls::NamedGroup::X25519 {
                assert!(same_as(rustls::crypto::aws_lc_rs::kx_group::X25519));
            } else {
                assert!(same_as(*ring_group), "{:?} is ring's", group.name());
            }
        }
        let suites = |p: &CryptoProvider| {
            p.cipher_suites
                .iter()
                .map(|s| s.suite())
                .collect::<Vec<_>>()
        };
        assert_eq!(suites(&ours), suites(&ring));
        let aws_lc = rustls::crypto::aws_lc_rs::default_provider();
        assert!(
            std::ptr::addr_eq(ours.key_provider, aws_lc.key_provider),
            "aws-lc's signing keys"
        );
        assert!(
            std::ptr::addr_eq(ours.secure_random, ring.secure_random),
            "ring's randomness"
        );
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_first() {
        let resolver = SniResolver {
            certs: vec![
                named(&["default.test"]),
                named(&["*.example.test"]),
                named(&["a.example.test"]),
            ],
        };
        let first = |sni| resolver.pick(sni).map(|c| c.names[0].clone());
        assert_eq!(
            first(Some("a.example.test")).as_deref(),
            Some("a.example.test")
        );
        assert_eq!(
            first(Some("B.Example.Test")).as_deref(),
            Some("*.example.test")
        );
        assert_eq!(
            first(Some("x.y.example.test")).as_deref(),
            Some("default.test")
        );
        assert_eq!(first(Some("other.test")).as_deref(), Some("default.test"));
        assert_eq!(first(None).as_deref(), Some("default.test"));
    }
}
