//! TLS for `wss://`: the server's certificate and key, and whom an agent
//! trusts. Pure: PEM bytes in, rustls configurations out; the caller reads
//! the files. One crypto provider in the tree: ring.
//!
//! An agent trusts either the system roots or what `--ca-cert` gives. The
//! latter may be a private CA that signed the server's certificate, or the
//! server's own self-signed certificate, as `openssl req -x509` makes it in
//! one line. OpenSSL marks such a certificate `CA:TRUE`, which webpki refuses
//! as a server certificate (`CaUsedAsEndEntity`); [`client_config_with_ca`]
//! accepts that one refusal for a certificate that is byte for byte one of
//! those given, and still checks its name and validity.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_name};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig,
    SignatureScheme,
};

/// Why a TLS configuration could not be built; names what was wrong.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The PEM held no certificate.
    #[error("no certificate found in the {what} PEM")]
    NoCertificate {
        /// Which input (`certificate`, `CA certificate`).
        what: &'static str,
    },
    /// The PEM could not be read.
    #[error("bad {what} PEM: {reason}")]
    BadPem {
        /// Which input.
        what: &'static str,
        /// The parser's complaint.
        reason: String,
    },
    /// No trust root at all: nothing could ever be verified.
    #[error("no trusted root certificates (give a CA certificate)")]
    NoRoots,
    /// rustls refused the material (a key that does not match, a bad certificate).
    #[error("{context}: {source}")]
    Rustls {
        /// What was being done.
        context: &'static str,
        /// The cause.
        source: rustls::Error,
    },
}

/// The crypto provider of every configuration built here.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM document, in order.
pub fn parse_certificates(
    pem: &[u8],
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadPem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { what });
    }
    Ok(certs)
}

/// The first private key in a PEM document: PKCS#8, PKCS#1 (RSA) or SEC1 (EC).
pub fn parse_private_key(pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::BadPem {
        what: "private key",
        reason: e.to_string(),
    })
}

/// A server configuration from a certificate chain and its key, HTTP/1.1 only
/// (WebSockets run over HTTP/1.1 here).
pub fn server_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<ServerConfig, TlsError> {
    let certs = parse_certificates(cert_pem, "certificate")?;
    let key = parse_private_key(key_pem)?;
    let rustls = |context| move |source| TlsError::Rustls { context, source };
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(rustls("TLS versions"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(rustls("certificate and key"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// An agent's configuration trusting `roots` (the system's).
pub fn client_config_with_roots(
    roots: impl IntoIterator<Item = CertificateDer<'static>>,
) -> Result<ClientConfig, TlsError> {
    let mut store = RootCertStore::empty();
    let (added, _ignored) = store.add_parsable_certificates(roots);
    if added == 0 {
        return Err(TlsError::NoRoots);
    }
    let verifier = webpki_verifier(store)?;
    client_config(verifier)
}

/// An agent's configuration trusting the certificates of `ca_pem`: CAs, or
/// the server's own (pinned) certificate.
pub fn client_config_with_ca(ca_pem: &[u8]) -> Result<ClientConfig, TlsError> {
    let pinned = parse_certificates(ca_pem, "CA certificate")?;
    let mut store = RootCertStore::empty();
    for cert in &pinned {
        store.add(cert.clone()).map_err(|source| TlsError::Rustls {
            context: "CA certificate",
            source,
        })?;
    }
    let verifier = Arc::new(PinnedOrWebPki {
        inner: webpki_verifier(store)?,
        pinned,
    });
    client_config(verifier)
}

fn webpki_verifier(store: RootCertStore) -> Result<Arc<WebPkiServerVerifier>, TlsError> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider())
        .build()
        .map_err(|e| TlsError::Rustls {
            context: "trust roots",
            source: rustls::Error::General(e.to_string()),
        })
}

fn client_config(verifier: Arc<dyn ServerCertVerifier>) -> Result<ClientConfig, TlsError> {
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Rustls {
            context: "TLS versions",
            source,
        })?
        .dangerous() // the verifier below is webpki's, with one reasoned exception
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// webpki's verification, except that a pinned certificate refused only for
/// being a CA (`CaUsedAsEndEntity`) is accepted once its name checks out.
#[derive(Debug)]
struct PinnedOrWebPki {
    inner: Arc<WebPkiServerVerifier>,
    pinned: Vec<CertificateDer<'static>>,
}

impl ServerCertVerifier for PinnedOrWebPki {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        match verdict {
            Err(e) if is_ca_used_as_end_entity(&e) && self.is_pinned(end_entity) => {
                // webpki checks the validity dates before the CA flag, so a
                // refusal for the flag means the dates passed
                verify_server_name(&ParsedCertificate::try_from(end_entity)?, server_name)?;
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

impl PinnedOrWebPki {
    fn is_pinned(&self, cert: &CertificateDer<'_>) -> bool {
        self.pinned.iter().any(|p| p.as_ref() == cert.as_ref())
    }
}

fn is_ca_used_as_end_entity(error: &rustls::Error) -> bool {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(other)) => matches!(
            other.0.downcast_ref::<webpki::Error>(),
            Some(webpki::Error::CaUsedAsEndEntity)
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests;
