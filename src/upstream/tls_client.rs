//! TLS toward backends: the rustls client configurations of one config generation, built from the pools'
//! and backends' `tls` tables when the generation is built (at start and on every reload, so the CA and
//! client-certificate files are re-read each time).
//!
//! One `ClientConfig` per distinct table, shared by every backend that uses it: rustls keeps its TLS
//! session cache (tickets and session ids, its default `Resumption`) in the config, so all connections of
//! a pool resume one another's sessions. A reload that finds a table and its files unchanged keeps the
//! client it had, with its session cache and the pooled connections made with it; a changed file gives a
//! new client (a new `ClientId`), and connections verified under the old one are never reused.
//!
//! ALPN offers `http/1.1` alone: backends speak HTTP/1.1, whatever the client spoke to wsgate.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;

use crate::config::{BackendTlsConfig, Config, ConfigError, ConfigErrors};
use crate::tls;
use crate::tls::session::{self, ClientSession};

/// Identifies one client configuration for the keep-alive pool: connections are reused only under the
/// configuration they were made with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientId(u64);

impl ClientId {
    fn next() -> ClientId {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ClientId(NEXT.fetch_add(1, Ordering::Relaxed))
    }
}

/// The client side of one `tls` table, built.
struct TlsClient {
    id: ClientId,
    config: Arc<ClientConfig>,
    /// The certificates its files held: a reload that reads the same keeps this client.
    loaded: Loaded,
}

/// What a table's files held: the roots it trusts (none read for the default roots or without
/// verification) and the client certificate chain. The chain stands for its key too: a key is only
/// accepted with the certificate it belongs to.
#[derive(PartialEq)]
struct Loaded {
    roots: Vec<CertificateDer<'static>>,
    client_chain: Vec<CertificateDer<'static>>,
}

/// TLS toward one backend: the client configuration of its table and the name its certificate must be
/// valid for (sent as SNI when it is a DNS name).
#[derive(Clone)]
pub struct BackendTls {
    client: Arc<TlsClient>,
    server_name: ServerName<'static>,
}

impl BackendTls {
    /// The client configuration connections to this backend are made with.
    pub fn id(&self) -> ClientId {
        self.client.id
    }

    /// The TLS handshake over a connected socket.
    pub async fn handshake(&self, stream: TcpStream) -> std::io::Result<ClientSession<TcpStream>> {
        // Boxed: rustls' connection state is large, and the future of every backend connect (plain ones
        // too) would otherwise be sized for it.
        Box::pin(session::connect(
            stream,
            Arc::clone(&self.client.config),
            self.server_name.clone(),
        ))
        .await
    }
}

/// Two backends are reached the same way when they share the client and the name.
impl PartialEq for BackendTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.client, &other.client) && self.server_name == other.server_name
    }
}

impl fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BackendTls")
            .field("client", &self.client.id)
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// The TLS clients of one config generation, by table.
#[derive(Default)]
pub struct TlsClients {
    clients: HashMap<BackendTlsConfig, Arc<TlsClient>>,
}

impl TlsClients {
    /// Loads the files of every `tls` table of `config` and builds their clients, keeping those of
    /// `previous` whose table and files are unchanged. Every problem is reported, each at its table, as
    /// `file:line: key: message`. Backends whose certificates are not verified are logged at `warn`.
    pub fn load(
        config: &Config,
        previous: Option<&TlsClients>,
    ) -> Result<TlsClients, ConfigErrors> {
        let provider = Arc::new(tls::provider());
        let mut clients = HashMap::new();
        let mut errors = Vec::new();
        for (pool_name, pool) in &config.pools {
            let tables = pool
                .tls
                .iter()
                .chain(pool.backends.iter().filter_map(|b| b.tls.as_ref()))
                .chain(pool.discovery.iter().filter_map(|d| d.tls.as_ref()));
            for table in tables {
                // A table that failed is loaded again at each place it is written, to be reported there.
                if clients.contains_key(table) {
                    continue;
                }
                let old = previous.and_then(|p| p.clients.get(table));
                match client(table, old, &provider) {
                    Ok(client) => {
                        clients.insert(table.clone(), client);
                    }
                    Err(error) => errors.push(error),
                }
            }
            let named = pool
                .backends
                .iter()
                .map(|b| (&b.addr, pool.tls_of(b)))
                .chain(
                    pool.discovery
                        .iter()
                        .map(|d| (&d.name, d.tls.as_ref().or(pool.tls.as_ref()))),
                );
            for (addr, table) in named {
                let Some(table) = table else {
                    continue;
                };
                let name = table.server_name(addr);
                if server_name(name).is_none() {
                    errors.push(table.origin.table_error(format!(
                        "`{name}` (for {addr}) is neither a DNS name nor an IP address",
                    )));
                }
                if !table.verify {
                    tracing::warn!(
                        pool = %pool_name,
                        backend = %addr,
                        "TLS certificate verification toward this backend is OFF (tls.verify = false): \
                         anyone between wsgate and it can read and change the traffic"
                    );
                }
            }
        }
        if errors.is_empty() {
            Ok(TlsClients { clients })
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// How to reach a backend at `addr` whose table is `table`; `None` when the table is not one of the
    /// config these clients were loaded from (`load` refuses a table whose name is not usable).
    pub fn backend(&self, table: &BackendTlsConfig, addr: &str) -> Option<BackendTls> {
        let client = self.clients.get(table)?;
        let server_name = server_name(table.server_name(addr))?;
        Some(BackendTls {
            client: Arc::clone(client),
            server_name,
        })
    }
}

/// A certificate name to check: a DNS name, or an IP address (checked against the certificate's IP
/// addresses; rustls sends no SNI for it).
fn server_name(name: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(name.to_string()).ok()
}

/// Loads one table's files and builds its client; `old` (the previous generation's client for the same
/// table) is kept when the files hold what they held then.
fn client(
    table: &BackendTlsConfig,
    old: Option<&Arc<TlsClient>>,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<TlsClient>, ConfigError> {
    let origin = &table.origin;
    let mut roots = Vec::new();
    for path in &table.ca {
        roots.extend(tls::read_certificates(path).map_err(|e| origin.ca_error(e))?);
    }
    let client_key = match &table.client_cert {
        Some(files) => Some(
            tls::load_certified_key(&files.cert, &files.key, provider)
                .map_err(|e| origin.client_cert_error(e))?,
        ),
        None => None,
    };
    let loaded = Loaded {
        roots,
        client_chain: client_key
            .as_ref()
            .map_or_else(Vec::new, |k| k.cert.clone()),
    };
    if let Some(old) = old.filter(|old| old.loaded == loaded) {
        return Ok(Arc::clone(old));
    }
    let builder = ClientConfig::builder_with_provider(Arc::clone(provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| origin.table_error(e))?;
    let builder = if table.verify {
        let mut store = RootCertStore::empty();
        if loaded.roots.is_empty() {
            store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        for (i, root) in loaded.roots.iter().enumerate() {
            store.add(root.clone()).map_err(|e| {
                origin.ca_error(format!("certificate {} is not a usable root: {e}", i + 1))
            })?;
        }
        builder.with_root_certificates(store)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(Arc::clone(provider))))
    };
    // Resumption stays rustls' default: an in-memory cache of sessions, tickets and session ids on.
    let mut config = match client_key {
        Some(key) => {
            builder.with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(key)))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // rustls may hand an established TLS 1.3 session's keys to wsgate's record layer when a tunnel
    // starts (`tls/record_layer.rs`), which keeps less for a long-lived tunnel than rustls' connection.
    config.enable_secret_extraction = true;
    Ok(Arc::new(TlsClient {
        id: ClientId::next(),
        config: Arc::new(config),
        loaded,
    }))
}

/// `verify = false`: any certificate is accepted, whoever it names and whoever signed it. The signatures
/// of the handshake are still checked against the certificate's key, so the session is at least with
/// the holder of the certificate it shows.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
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
        verify_tls12_signature(
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
        verify_tls13_signature(
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

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::time::Duration;

    use super::*;
    use crate::upstream::{ConnectError, connect};

    /// A folder of test files, removed when dropped.
    struct Dir(PathBuf);

    impl Dir {
        fn new() -> Dir {
            let dir = std::env::temp_dir().join(format!(
                "wsgate-tls-client-{}-{}",
                std::process::id(),
                fastrand::u64(..)
            ));
            std::fs::create_dir_all(&dir).expect("temp dir");
            Dir(dir)
        }

        fn write(&self, name: &str, text: &str) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, text).expect("write");
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    struct Ca {
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
        pem: String,
    }

    fn ca() -> Ca {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Names of their own: a certificate is matched to its issuer by name first.
        let name = format!("wsgate test CA {}", fastrand::u64(..));
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let pem = params.self_signed(&key).expect("CA").pem();
        Ca {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        }
    }

    /// A config of one pool of one backend at `addr`, with `tls` as its table.
    fn config(addr: &str, tls: &str) -> Config {
        let text = format!(
            "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n[[route]]\nname = \"r\"\npool = \"p\"\n\
             [pool.p]\ntls = {tls}\nbackends = [ {{ addr = \"{addr}\" }} ]\n"
        );
        Config::from_toml(&text, "t.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    fn backend_tls(config: &Config, clients: &TlsClients) -> BackendTls {
        let pool = &config.pools["p"];
        let table = pool.tls_of(&pool.backends[0]).expect("a TLS pool");
        clients
            .backend(table, &pool.backends[0].addr)
            .expect("loaded")
    }

    fn ca_table(path: &Path) -> String {
        format!("{{ ca = {:?} }}", path.display().to_string())
    }

    #[test]
    fn server_names_are_dns_names_or_ip_addresses() {
        assert!(matches!(
            server_name("127.0.0.1"),
            Some(ServerName::IpAddress(_))
        ));
        assert!(matches!(server_name("::1"), Some(ServerName::IpAddress(_))));
        assert!(matches!(
            server_name("backend.internal"),
            Some(ServerName::DnsName(_))
        ));
        assert_eq!(server_name("a..b"), None);
    }

    #[test]
    fn a_reload_keeps_a_client_whose_files_are_unchanged_and_replaces_one_whose_files_changed() {
        let dir = Dir::new();
        let path = dir.write("ca.pem", &ca().pem);
        let config = config("127.0.0.1:443", &ca_table(&path));
        let first = TlsClients::load(&config, None).expect("loads");
        let id = backend_tls(&config, &first).id();
        let second = TlsClients::load(&config, Some(&first)).expect("loads");
        assert_eq!(backend_tls(&config, &second), backend_tls(&config, &first));
        assert_eq!(backend_tls(&config, &second).id(), id);

        dir.write("ca.pem", &ca().pem);
        let third = TlsClients::load(&config, Some(&second)).expect("loads");
        assert_ne!(backend_tls(&config, &third).id(), id, "the CA file changed");

        dir.write("ca.pem", "not a certificate");
        let errors = TlsClients::load(&config, Some(&third))
            .err()
            .expect("refused")
            .0;
        assert_eq!(errors.len(), 1, "{errors:?}");
        let shown = errors[0].to_string();
        assert!(
            shown.starts_with("t.toml:8: pool.p.tls.ca: ") && shown.contains("ca.pem"),
            "{shown}"
        );
    }

    #[test]
    fn every_table_with_a_bad_file_is_reported_at_its_place() {
        let dir = Dir::new();
        let missing = dir.0.join("missing.pem");
        let table = ca_table(&missing);
        let text = format!(
            "[[listener]]\nname = \"l\"\nlisten = \"127.0.0.1:0\"\n[[route]]\nname = \"r\"\npool = \"p\"\n\
             [pool.p]\ntls = {table}\nbackends = [ {{ addr = \"h:1\" }},\n  {{ addr = \"h:2\", tls = {table} }},\n  \
             {{ addr = \"h:3\", tls = {{ client_cert = {{ cert = {m:?}, key = {m:?} }} }} }} ]\n",
            m = missing.display().to_string()
        );
        let config = Config::from_toml(&text, "t.toml").unwrap_or_else(|e| panic!("{e}"));
        let errors = TlsClients::load(&config, None).err().expect("refused").0;
        let places: Vec<(usize, &str)> = errors.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(
            places,
            [
                (8, "pool.p.tls.ca"),
                (10, "pool.p.backends[1].tls.ca"),
                (11, "pool.p.backends[2].tls.client_cert"),
            ]
        );
        assert!(
            errors
                .iter()
                .all(|e| e.message.contains("missing.pem: cannot read")),
            "{errors:?}"
        );
    }

    /// A TLS server on loopback presenting a certificate for `names` signed by `ca`; it takes handshakes
    /// and drops them.
    async fn tls_server(ca: &Ca, names: &[&str]) -> std::net::SocketAddr {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params");
        let cert = params.signed_by(&key, &ca.issuer).expect("cert");
        let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move { acceptor.accept(tcp).await });
            }
        });
        addr
    }

    async fn connect_error(config: &Config) -> ConnectError {
        let clients = TlsClients::load(config, None).expect("loads");
        let tls = backend_tls(config, &clients);
        let addr = &config.pools["p"].backends[0].addr;
        match connect(addr, Some(&tls), Duration::from_secs(10), &[]).await {
            Ok(_) => panic!("the handshake was accepted"),
            Err(error) => error,
        }
    }

    #[tokio::test]
    async fn a_refused_certificate_is_a_tls_connect_error_that_says_which_check_failed() {
        let dir = Dir::new();
        let (server_ca, other_ca) = (ca(), ca());
        let addr = tls_server(&server_ca, &["localhost"]).await;

        let other = dir.write("other.pem", &other_ca.pem);
        let error = connect_error(&config(&addr.to_string(), &ca_table(&other))).await;
        assert!(matches!(error, ConnectError::Tls { .. }), "{error:?}");
        let shown = error.to_string();
        assert!(
            shown.contains("invalid peer certificate: UnknownIssuer"),
            "{shown}"
        );

        // The right CA, but the address's own host (127.0.0.1) is not a name the certificate holds.
        let right = dir.write("right.pem", &server_ca.pem);
        let error = connect_error(&config(&addr.to_string(), &ca_table(&right))).await;
        assert!(matches!(error, ConnectError::Tls { .. }), "{error:?}");
        let shown = error.to_string();
        assert!(
            shown
                .contains("invalid peer certificate: certificate not valid for name \"127.0.0.1\""),
            "{shown}"
        );
    }
}
