//! A private CA made at test time, for the TLS tests: a server certificate for 127.0.0.1 and a
//! client certificate, both issued by it.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct Pki {
    /// The CA's certificate, PEM: what `tls_ca` names.
    pub ca_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
    ca_der: CertificateDer<'static>,
    server_cert: CertificateDer<'static>,
    server_key: Vec<u8>,
}

fn must<T, E: std::fmt::Display>(result: Result<T, E>) -> T {
    result.unwrap_or_else(|e| panic!("test PKI: {e}"))
}

impl Pki {
    pub fn new() -> Pki {
        let mut ca_params = must(CertificateParams::new(Vec::<String>::new()));
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Projector test CA");
        let ca = must(CertifiedIssuer::self_signed(
            ca_params,
            must(KeyPair::generate()),
        ));
        let server_key = must(KeyPair::generate());
        let server = must(
            must(CertificateParams::new(vec!["127.0.0.1".to_string()])).signed_by(&server_key, &ca),
        );
        let client_key = must(KeyPair::generate());
        let client = must(
            must(CertificateParams::new(vec!["projector-client".to_string()]))
                .signed_by(&client_key, &ca),
        );
        Pki {
            ca_pem: ca.pem(),
            client_cert_pem: client.pem(),
            client_key_pem: client_key.serialize_pem(),
            ca_der: ca.der().clone(),
            server_cert: server.der().clone(),
            server_key: server_key.serialize_der(),
        }
    }

    /// The server's TLS configuration; with `require_client`, it asks for a client certificate
    /// the CA issued.
    pub fn server(&self, require_client: bool) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = must(
            rustls::ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions(),
        );
        let builder = if require_client {
            let mut roots = rustls::RootCertStore::empty();
            must(roots.add(self.ca_der.clone()));
            let verifier = must(
                rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build(),
            );
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key.clone()));
        Arc::new(must(
            builder.with_single_cert(vec![self.server_cert.clone()], key),
        ))
    }
}
