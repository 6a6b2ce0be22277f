//! TLS for the `idle_tls`, `idle_h2` and `idle_tls_backend` scenarios: a
//! self-signed certificate made at start (rcgen, ECDSA P-256, for
//! [`SERVER_NAME`]) written to the temp dir in the forms the proxies want,
//! client configs that trust only it (one offering `http/1.1` by ALPN, one
//! offering `h2`), and a server config with it for the TLS echo backends
//! (whose CA file, for the proxies, is the certificate itself).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::ServerName;

/// The certificate's only name; clients send it as SNI.
pub const SERVER_NAME: &str = "localhost";

/// Certificate files and the client side, shared by every target's spec.
#[derive(Clone, Debug)]
pub struct TlsSetup {
    /// Certificate (PEM), for wsgate and nginx.
    pub cert: PathBuf,
    /// Private key (PKCS#8 PEM), for wsgate and nginx.
    pub key: PathBuf,
    /// Certificate followed by the key in one PEM file, for HAProxy's `crt`.
    pub bundle: PathBuf,
    /// Trusts the certificate and nothing else; no session resumption, so
    /// every connection makes a full handshake, as distinct clients would.
    /// Offers `http/1.1` by ALPN.
    pub client: Arc<rustls::ClientConfig>,
    /// As `client`, but offers only `h2` by ALPN (`idle_h2`).
    pub client_h2: Arc<rustls::ClientConfig>,
    /// The TLS echo backends' side (`idle_tls_backend`): the certificate and
    /// key, ALPN `http/1.1`.
    pub server: Arc<rustls::ServerConfig>,
}

impl TlsSetup {
    /// Makes the certificate and key and writes them into `dir`.
    pub fn generate(dir: &Path) -> Result<TlsSetup, String> {
        let key = rcgen::KeyPair::generate().map_err(|e| format!("key: {e}"))?;
        let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
            .map_err(|e| format!("certificate params: {e}"))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| format!("certificate: {e}"))?;
        let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());

        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let write = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text)
                .map(|()| p.clone())
                .map_err(|e| format!("{}: {e}", p.display()))
        };
        let cert_path = write("cert.pem", &cert_pem)?;
        let key_path = write("key.pem", &key_pem)?;
        let bundle = write("bundle.pem", &format!("{cert_pem}{key_pem}"))?;

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(cert.der().clone())
            .map_err(|e| format!("root store: {e}"))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("server config: {e}"))?
            .with_no_client_auth()
            .with_single_cert(vec![cert.der().clone()], key_der)
            .map_err(|e| format!("server config: {e}"))?;
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("client config: {e}"))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.resumption = rustls::client::Resumption::disabled();
        let mut client_h2 = client.clone();
        client.alpn_protocols = vec![b"http/1.1".to_vec()];
        client_h2.alpn_protocols = vec![b"h2".to_vec()];
        Ok(TlsSetup {
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
}

pub fn server_name() -> ServerName<'static> {
    ServerName::try_from(SERVER_NAME).expect("a valid DNS name")
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
        let _ = std::fs::remove_dir_all(&dir);
    }
}
