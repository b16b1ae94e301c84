//! Certificates made at test time (rcgen on ring), for the TLS tests.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, date_time_ymd,
};

/// A certificate and its private key, PEM.
pub struct Pem {
    pub cert: String,
    pub key: String,
}

/// Names every server certificate here is made for.
pub fn local_names() -> Vec<String> {
    vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
}

fn params(names: Vec<String>, ca: bool, years: (i32, i32)) -> CertificateParams {
    let mut params = CertificateParams::new(names).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    if ca {
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    params.not_before = date_time_ymd(years.0, 1, 1);
    params.not_after = date_time_ymd(years.1, 1, 1);
    params
}

/// A self-signed certificate for `names` with `key`, valid from January 1st of
/// `years.0` to January 1st of `years.1`; `ca` sets `CA:TRUE`.
pub fn self_signed_with(key: KeyPair, names: Vec<String>, ca: bool, years: (i32, i32)) -> Pem {
    let cert = params(names, ca, years).self_signed(&key).unwrap();
    Pem {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// What an operator makes with `openssl req -x509 ... -subj /CN=localhost
/// -addext "subjectAltName=DNS:localhost,IP:127.0.0.1"`: self-signed, `CA:TRUE`.
pub fn self_signed_ca_true() -> Pem {
    self_signed_with(
        KeyPair::generate().unwrap(),
        local_names(),
        true,
        (2020, 2100),
    )
}

/// A private CA (its certificate, PEM) and a server certificate it signed.
pub fn private_ca() -> (String, Pem) {
    let mut ca_params = params(Vec::new(), true, (2020, 2100));
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "zlayer test CA");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let server = params(local_names(), false, (2020, 2100))
        .signed_by(&key, &ca)
        .unwrap();
    let pem = Pem {
        cert: server.pem(),
        key: key.serialize_pem(),
    };
    (ca.pem(), pem)
}
