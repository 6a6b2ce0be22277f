//! TLS for the TLS scenarios (`idle_tls`, `idle_h2`, `idle_tls_backend` and
//! the `tls` group: `wss*`, `tls_handshake`, `tls_resume`, `https`, `h2`,
//! `wss16k_tls_backend`): a self-signed certificate made at start for
//! [`SERVER_NAME`] (ECDSA P-256 with rcgen, or RSA-2048 with the `openssl`
//! command line, [`KeyType`]) written to the temp dir in the forms the
//! proxies want, client configs that trust only it and offer only TLS 1.3
//! (one offering `http/1.1` by ALPN, one offering `h2`), and a server config
//! with it for the TLS echo backends (whose CA file, for the proxies, is the
//! certificate itself).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::ClientConnection;
use rustls::client::Resumption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};

/// The certificate's only name; clients send it as SNI.
pub const SERVER_NAME: &str = "localhost";

/// The certificate's key (`--tls-key`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyType {
    /// ECDSA P-256, made with rcgen.
    #[default]
    Ecdsa,
    /// RSA 2048 bits, made with `openssl req -x509 -newkey rsa:2048` (rcgen's
    /// ring backend cannot make RSA keys).
    Rsa2048,
}

impl KeyType {
    /// As in the records' `tls_key` and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Ecdsa => "ecdsa",
            KeyType::Rsa2048 => "rsa2048",
        }
    }
}

/// Certificate files and the client side, shared by every target's spec.
#[derive(Clone, Debug)]
pub struct TlsSetup {
    /// The certificate's key type.
    pub key_type: KeyType,
    /// Certificate (PEM), for wsgate and nginx.
    pub cert: PathBuf,
    /// Private key (PKCS#8 PEM), for wsgate and nginx.
    pub key: PathBuf,
    /// Certificate followed by the key in one PEM file, for HAProxy's `crt`.
    pub bundle: PathBuf,
    /// Trusts the certificate and nothing else; offers only TLS 1.3; no
    /// session resumption, so every connection makes a full handshake, as
    /// distinct clients would. Offers `http/1.1` by ALPN.
    pub client: Arc<rustls::ClientConfig>,
    /// As `client`, but offers only `h2` by ALPN (`idle_h2`).
    pub client_h2: Arc<rustls::ClientConfig>,
    /// The TLS echo backends' side (`idle_tls_backend`,
    /// `wss16k_tls_backend`): the certificate and key, ALPN `http/1.1`, TLS
    /// 1.2 and 1.3 (the proxies' settings toward backends decide).
    pub server: Arc<rustls::ServerConfig>,
}

impl TlsSetup {
    /// Makes the certificate and key (ECDSA P-256) and writes them into `dir`.
    #[cfg(test)]
    pub fn generate(dir: &Path) -> Result<TlsSetup, String> {
        TlsSetup::generate_with(dir, KeyType::Ecdsa)
    }

    /// Makes a certificate and key of `key_type` and writes them into `dir`.
    pub fn generate_with(dir: &Path, key_type: KeyType) -> Result<TlsSetup, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text)
                .map(|()| p.clone())
                .map_err(|e| format!("{}: {e}", p.display()))
        };
        let (cert_pem, key_pem) = match key_type {
            KeyType::Ecdsa => {
                let key = rcgen::KeyPair::generate().map_err(|e| format!("key: {e}"))?;
                let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
                    .map_err(|e| format!("certificate params: {e}"))?;
                let cert = params
                    .self_signed(&key)
                    .map_err(|e| format!("certificate: {e}"))?;
                (cert.pem(), key.serialize_pem())
            }
            KeyType::Rsa2048 => openssl_rsa2048(dir)?,
        };
        let cert_path = write("cert.pem", &cert_pem)?;
        let key_path = write("key.pem", &key_pem)?;
        let bundle = write("bundle.pem", &format!("{cert_pem}{key_pem}"))?;

        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| format!("{}: {e}", cert_path.display()))?;
        let key_der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| format!("{}: {e}", key_path.display()))?;
        if !matches!(key_der, PrivateKeyDer::Pkcs8(_)) {
            return Err(format!("{}: not a PKCS#8 key", key_path.display()));
        }
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(cert_der.clone())
            .map_err(|e| format!("root store: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("server config: {e}"))?
            .with_no_client_auth()
            .with_single_cert(vec![cert_der], key_der)
            .map_err(|e| format!("server config: {e}"))?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| format!("client config: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.resumption = Resumption::disabled();
        let mut client_h2 = client.clone();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        client_h2.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsSetup {
            key_type,
            cert: cert_path,
            key: key_path,
            bundle,
            client: Arc::new(client),
            client_h2: Arc::new(client_h2),
            server: Arc::new(server),
        })
    }

    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.client.clone())
    }

    /// A connector offering only `h2` by ALPN.
    pub fn h2_connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.client_h2.clone())
    }

    /// As [`TlsSetup::connector`], but with a session cache of its own
    /// (rustls' in-memory cache, TLS 1.3 tickets), so that after its first
    /// connection every handshake it makes offers resumption (`tls_resume`:
    /// one per loop, as one client reconnecting).
    pub fn resuming_connector(&self) -> tokio_rustls::TlsConnector {
        let mut c = (*self.client).clone();
        c.resumption = Resumption::in_memory_sessions(64);
        tokio_rustls::TlsConnector::from(Arc::new(c))
    }
}

/// `openssl req -x509 -newkey rsa:2048 -nodes` into `dir`: the certificate
/// (`CN` and subjectAltName `localhost`, not a CA, 30 days) and its PKCS#8
/// key, as PEM text.
fn openssl_rsa2048(dir: &Path) -> Result<(String, String), String> {
    let (cert, key) = (dir.join("rsa-cert.pem"), dir.join("rsa-key.pem"));
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args([
            "-subj",
            &format!("/CN={SERVER_NAME}"),
            "-addext",
            &format!("subjectAltName=DNS:{SERVER_NAME}"),
            // openssl.cnf's v3_ca makes a CA certificate, which webpki (rustls)
            // refuses as a server's own (CaUsedAsEndEntity).
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-days",
            "30",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            format!("cannot run openssl (needed for --tls-key rsa2048; bash benches/install-peers.sh): {e}")
        })?;
    if !out.status.success() {
        return Err(format!(
            "openssl req failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let pair = (read(&cert)?, read(&key)?);
    let _ = std::fs::remove_file(&cert);
    let _ = std::fs::remove_file(&key);
    if !pair.1.contains("BEGIN PRIVATE KEY") {
        return Err("openssl did not write a PKCS#8 key".into());
    }
    Ok(pair)
}

pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("a valid DNS name")
}

/// What a TLS session negotiated, as rustls names it (`TLSv1_3`,
/// `TLS13_AES_256_GCM_SHA384`, `X25519`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Negotiated {
    pub version: Option<String>,
    pub cipher: Option<String>,
    pub group: Option<String>,
    pub alpn: Option<String>,
}

impl Negotiated {
    /// A client session's, once its handshake is done.
    pub fn of_client(c: &ClientConnection) -> Negotiated {
        Negotiated::of(c)
    }

    /// A server session's (the TLS echo backends'), once its handshake is done.
    pub fn of_server(c: &rustls::ServerConnection) -> Negotiated {
        Negotiated::of(c)
    }

    fn of(c: &rustls::CommonState) -> Negotiated {
        Negotiated {
            version: c.protocol_version().map(|v| format!("{v:?}")),
            cipher: c
                .negotiated_cipher_suite()
                .map(|s| format!("{:?}", s.suite())),
            group: c
                .negotiated_key_exchange_group()
                .map(|g| format!("{:?}", g.name())),
            alpn: c
                .alpn_protocol()
                .map(|a| String::from_utf8_lossy(a).into_owned()),
        }
    }

    /// `TLSv1_3 TLS13_AES_256_GCM_SHA384 X25519`, `?` for what is unknown.
    pub fn summary(&self) -> String {
        let f = |v: &Option<String>| v.clone().unwrap_or_else(|| "?".into());
        format!(
            "{} {} {}",
            f(&self.version),
            f(&self.cipher),
            f(&self.group)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_written_and_the_bundle_holds_both() {
        let dir = std::env::temp_dir().join(format!("wsgate-bench-tls-{}", std::process::id()));
        let t = TlsSetup::generate(&dir).unwrap();
        let cert = std::fs::read_to_string(&t.cert).unwrap();
        let key = std::fs::read_to_string(&t.key).unwrap();
        let bundle = std::fs::read_to_string(&t.bundle).unwrap();
        assert!(cert.contains("BEGIN CERTIFICATE") && key.contains("PRIVATE KEY"));
        assert_eq!(bundle, format!("{cert}{key}"));
        assert_eq!(t.client.alpn_protocols, [b"http/1.1".to_vec()]);
        assert_eq!(t.client_h2.alpn_protocols, [b"h2".to_vec()]);
        assert_eq!(t.server.alpn_protocols, [b"http/1.1".to_vec()]);
        assert_eq!(t.key_type, KeyType::Ecdsa);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// One handshake over an in-memory pipe; what the client saw.
    async fn handshake(
        connector: &tokio_rustls::TlsConnector,
        server: Arc<rustls::ServerConfig>,
    ) -> Result<(Negotiated, Option<rustls::HandshakeKind>), String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (c, s) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let srv = tokio::spawn(async move {
            let mut s = acceptor.accept(s).await.map_err(|e| e.to_string())?;
            // A byte from the server carries its session tickets to the client.
            s.write_all(b"x").await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            let mut b = [0u8; 1];
            let _ = s.read(&mut b).await;
            Ok::<_, String>(())
        });
        let mut tls = connector
            .connect(server_name(), c)
            .await
            .map_err(|e| e.to_string())?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await.map_err(|e| e.to_string())?;
        let conn = tls.get_ref().1;
        let seen = (Negotiated::of_client(conn), conn.handshake_kind());
        tls.shutdown().await.map_err(|e| e.to_string())?;
        srv.await.map_err(|e| e.to_string())??;
        Ok(seen)
    }

    #[tokio::test]
    async fn clients_offer_only_tls13_and_resume_only_when_asked() {
        let dir = std::env::temp_dir().join(format!("wsgate-bench-tls13-{}", std::process::id()));
        let t = TlsSetup::generate(&dir).unwrap();
        let (n, kind) = handshake(&t.connector(), t.server.clone()).await.unwrap();
        assert_eq!(n.version.as_deref(), Some("TLSv1_3"));
        assert_eq!(n.cipher.as_deref(), Some("TLS13_AES_256_GCM_SHA384"));
        assert_eq!(n.group.as_deref(), Some("X25519"));
        assert_eq!(n.alpn.as_deref(), Some("http/1.1"));
        assert_eq!(kind, Some(rustls::HandshakeKind::Full));
        // Without resumption every handshake is full, with it the second resumes.
        let (_, kind) = handshake(&t.connector(), t.server.clone()).await.unwrap();
        assert_eq!(kind, Some(rustls::HandshakeKind::Full));
        let resuming = t.resuming_connector();
        let (_, kind) = handshake(&resuming, t.server.clone()).await.unwrap();
        assert_eq!(kind, Some(rustls::HandshakeKind::Full));
        let (_, kind) = handshake(&resuming, t.server.clone()).await.unwrap();
        assert_eq!(kind, Some(rustls::HandshakeKind::Resumed));
        // A server that speaks only TLS 1.2 gets no handshake.
        let mut tls12 = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_file(&t.cert).unwrap()],
            PrivateKeyDer::from_pem_file(&t.key).unwrap(),
        )
        .unwrap();
        tls12.alpn_protocols = vec![b"http/1.1".to_vec()];
        assert!(handshake(&t.connector(), Arc::new(tls12)).await.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Needs the openssl command line; skipped (passes) without it.
    #[tokio::test]
    async fn rsa2048_comes_from_openssl_as_pkcs8_and_serves() {
        if std::process::Command::new("openssl")
            .arg("version")
            .output()
            .is_err()
        {
            eprintln!("openssl not installed; skipped");
            return;
        }
        let dir = std::env::temp_dir().join(format!("wsgate-bench-rsa-{}", std::process::id()));
        let t = TlsSetup::generate_with(&dir, KeyType::Rsa2048).unwrap();
        let key = std::fs::read_to_string(&t.key).unwrap();
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
        assert_eq!(t.key_type.name(), "rsa2048");
        assert!(!dir.join("rsa-key.pem").exists());
        // The rustls clients take it as the server's certificate.
        let (n, _) = handshake(&t.connector(), t.server.clone()).await.unwrap();
        assert_eq!(n.version.as_deref(), Some("TLSv1_3"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
