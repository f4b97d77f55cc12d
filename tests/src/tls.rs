//! Certificates for a private node's TLS listener, made at test time by a CA of the test's own.

use std::path::Path;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

use crate::broker::TlsListener;

/// Writes `ca.pem`, `server.pem`/`server.key` (for `127.0.0.1` and `localhost`) and
/// `client.pem`/`client.key` into `dir`.
pub(crate) fn write_certificates(dir: &Path, port: u16) -> TlsListener {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "offload test CA");
    let ca_key = KeyPair::generate().expect("CA key");
    let ca = ca_params.self_signed(&ca_key).expect("self-signed CA");

    let issue = |names: Vec<String>, common_name: &str| {
        let mut params = CertificateParams::new(names).expect("certificate parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("signed");
        (cert.pem(), key.serialize_pem())
    };
    let (server_pem, server_key) = issue(
        vec!["127.0.0.1".into(), "localhost".into()],
        "offload test broker",
    );
    let (client_pem, client_key) = issue(Vec::new(), "offload test client");

    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write a certificate file");
        path
    };
    let ca_file = write("ca.pem", &ca.pem());
    write("server.pem", &server_pem);
    write("server.key", &server_key);
    TlsListener {
        port,
        ca_file,
        client_cert_file: write("client.pem", &client_pem),
        client_key_file: write("client.key", &client_key),
    }
}
