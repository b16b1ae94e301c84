use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConnection, ServerConnection};

use super::*;

#[allow(dead_code, unreachable_pub, clippy::unwrap_used)]
#[path = "../../tests/common/certs.rs"]
mod certs;

/// Runs a TLS handshake in memory; the client's error if it fails.
fn handshake(client: ClientConfig, server: ServerConfig, name: &str) -> Result<(), rustls::Error> {
    let name = ServerName::try_from(name.to_owned()).expect("a server name");
    let mut client = ClientConnection::new(Arc::new(client), name)?;
    let mut server = ServerConnection::new(Arc::new(server))?;
    for _ in 0..10 {
        let mut wire = Vec::new();
        client.write_tls(&mut wire).expect("to memory");
        server.read_tls(&mut &wire[..]).expect("from memory");
        // a server-side error is the client's fault here; the client reports it too
        let _ = server.process_new_packets();
        let mut wire = Vec::new();
        server.write_tls(&mut wire).expect("to memory");
        client.read_tls(&mut &wire[..]).expect("from memory");
        client.process_new_packets()?;
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    Err(rustls::Error::General("handshake did not finish".into()))
}

fn server(pem: &certs::Pem) -> ServerConfig {
    server_config(pem.cert.as_bytes(), pem.key.as_bytes()).expect("a server config")
}

#[test]
fn a_private_ca_is_trusted_for_the_certificates_it_signed() {
    let (ca, pem) = certs::private_ca();
    let client = client_config_with_ca(ca.as_bytes()).unwrap();
    handshake(client.clone(), server(&pem), "localhost").unwrap();
    handshake(client, server(&pem), "127.0.0.1").unwrap();
}

#[test]
fn a_pinned_self_signed_ca_true_certificate_is_accepted() {
    let pem = certs::self_signed_ca_true();
    let client = client_config_with_ca(pem.cert.as_bytes()).unwrap();
    handshake(client, server(&pem), "localhost").unwrap();
}

#[test]
fn webpki_alone_refuses_that_certificate() {
    // the reason for PinnedOrWebPki: without it, the one-line openssl certificate fails
    let pem = certs::self_signed_ca_true();
    let mut store = RootCertStore::empty();
    store
        .add(parse_certificates(pem.cert.as_bytes(), "x").unwrap()[0].clone())
        .unwrap();
    let plain = client_config(webpki_verifier(store).unwrap()).unwrap();
    let error = handshake(plain, server(&pem), "localhost").unwrap_err();
    assert!(is_ca_used_as_end_entity(&error), "{error:?}");
}

#[test]
fn a_pinned_certificate_still_has_its_name_checked() {
    let pem = certs::self_signed_ca_true();
    let client = client_config_with_ca(pem.cert.as_bytes()).unwrap();
    let error = handshake(client, server(&pem), "example.com").unwrap_err();
    assert!(
        matches!(
            error,
            rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. })
        ),
        "{error:?}"
    );
}

#[test]
fn a_pinned_certificate_still_has_its_dates_checked() {
    let key = rcgen::KeyPair::generate().unwrap();
    let expired = certs::self_signed_with(key, certs::local_names(), true, (2001, 2002));
    let client = client_config_with_ca(expired.cert.as_bytes()).unwrap();
    let error = handshake(client, server(&expired), "localhost").unwrap_err();
    assert!(
        matches!(
            error,
            rustls::Error::InvalidCertificate(CertificateError::ExpiredContext { .. })
        ),
        "{error:?}"
    );
}

#[test]
fn a_certificate_nobody_vouches_for_is_refused() {
    let (ca, _) = certs::private_ca();
    let key = rcgen::KeyPair::generate().unwrap();
    let stranger = certs::self_signed_with(key, certs::local_names(), false, (2020, 2100));
    let client = client_config_with_ca(ca.as_bytes()).unwrap();
    let error = handshake(client, server(&stranger), "localhost").unwrap_err();
    assert!(
        matches!(
            error,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        ),
        "{error:?}"
    );
}

#[test]
fn a_ca_true_certificate_signed_by_the_ca_but_not_pinned_is_refused() {
    // only the exact pinned bytes get the exception, not anything a CA signed
    let (ca, _) = certs::private_ca();
    let client = client_config_with_ca(ca.as_bytes()).unwrap();
    let pem = certs::self_signed_ca_true();
    assert!(handshake(client, server(&pem), "localhost").is_err());
}

/// A certificate made at test time for a fixture key (keys/README.md).
fn with_fixture_key(pkcs8: &str, key_file: &str) -> certs::Pem {
    let signer = rcgen::KeyPair::from_pem(pkcs8).unwrap();
    let mut pem = certs::self_signed_with(signer, certs::local_names(), false, (2020, 2100));
    pem.key = key_file.to_owned();
    pem
}

#[test]
fn keys_load_in_pkcs8_pkcs1_and_sec1() {
    let rsa8 = include_str!("../../tests/data/keys/rsa-pkcs8.pem");
    let ec8 = include_str!("../../tests/data/keys/ec-pkcs8.pem");
    for (pkcs8, file) in [
        (rsa8, rsa8),
        (rsa8, include_str!("../../tests/data/keys/rsa-pkcs1.pem")),
        (ec8, ec8),
        (ec8, include_str!("../../tests/data/keys/ec-sec1.pem")),
    ] {
        let pem = with_fixture_key(pkcs8, file);
        let client = client_config_with_ca(pem.cert.as_bytes()).unwrap();
        handshake(client, server(&pem), "localhost").unwrap();
    }
}

#[test]
fn bad_material_is_named() {
    let pem = certs::self_signed_ca_true();
    let error = server_config(b"", pem.key.as_bytes()).unwrap_err();
    assert_eq!(
        error.to_string(),
        "no certificate found in the certificate PEM"
    );
    let error = server_config(pem.cert.as_bytes(), b"nothing").unwrap_err();
    assert!(
        error.to_string().starts_with("bad private key PEM"),
        "{error}"
    );
    let other = certs::self_signed_ca_true();
    let error = server_config(pem.cert.as_bytes(), other.key.as_bytes()).unwrap_err();
    assert!(
        error.to_string().starts_with("certificate and key"),
        "{error}"
    );
    let error = client_config_with_ca(b"").unwrap_err();
    assert_eq!(
        error.to_string(),
        "no certificate found in the CA certificate PEM"
    );
    assert!(matches!(
        client_config_with_roots(Vec::new()),
        Err(TlsError::NoRoots)
    ));
}
