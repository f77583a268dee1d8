//! TLS for a feed: the Mozilla roots, plus the CA certificates of a private PKI (`tls_ca`), and a
//! client certificate for feeds that ask for one (`tls_client_cert`, `tls_client_key`); and what a
//! refused certificate means, said so that a person knows what to change.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::config::{ConfigError, ConfigSource, FeedConfig};

/// The built-in roots only: for tools that read a feed without a config.
pub fn default_config() -> Result<ClientConfig, rustls::Error> {
    Ok(builder()?
        .with_root_certificates(built_in_roots())
        .with_no_client_auth())
}

/// The TLS configuration `feed` asks for; a file that cannot be used is a mistake located at
/// its key.
pub fn for_feed(feed: &FeedConfig, source: &ConfigSource) -> Result<ClientConfig, ConfigError> {
    let mut roots = built_in_roots();
    if let Some(ca) = &feed.tls_ca {
        let located = |message: String| ConfigError::new(source.locate(ca), message);
        let certificates = read_certificates(ca.get_ref()).map_err(located)?;
        for certificate in certificates {
            roots
                .add(certificate)
                .map_err(|err| located(format!("tls_ca {}: {err}", ca.get_ref().display())))?;
        }
    }
    let builder = builder()
        .map_err(|err| ConfigError::new(source.locate(&feed.name), err.to_string()))?
        .with_root_certificates(roots);
    match (&feed.tls_client_cert, &feed.tls_client_key) {
        (Some(cert), Some(key)) => {
            let chain = read_certificates(cert.get_ref())
                .map_err(|message| ConfigError::new(source.locate(cert), message))?;
            let private = PrivateKeyDer::from_pem_file(key.get_ref()).map_err(|err| {
                ConfigError::new(
                    source.locate(key),
                    format!(
                        "tls_client_key {}: no PEM private key in it ({err})",
                        key.get_ref().display()
                    ),
                )
            })?;
            builder
                .with_client_auth_cert(chain, private)
                .map_err(|err| {
                    ConfigError::new(
                        source.locate(key),
                        format!("tls_client_key does not go with tls_client_cert: {err}"),
                    )
                })
        }
        // `Config::load` refuses one without the other.
        _ => Ok(builder.with_no_client_auth()),
    }
}

type Builder = rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>;

/// The provider is named, not looked up: the lookup panics if a dependency enables a second one.
fn builder() -> Result<Builder, rustls::Error> {
    ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
}

fn built_in_roots() -> RootCertStore {
    RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned())
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certificates: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|certificates| certificates.collect())
        .map_err(|err| format!("{}: {err}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(certificates)
}

/// What a TLS failure (the causes of a failed connection) means for the person reading it, if it
/// is about certificates.
pub fn explain(causes: &str) -> Option<&'static str> {
    let says = |sign: &str| causes.contains(sign);
    if says("CertificateRequired") || says("certificate required") {
        return Some(
            "the feed asks for a client certificate: set tls_client_cert and tls_client_key",
        );
    }
    if !says("invalid peer certificate") {
        return None;
    }
    Some(if says("UnknownIssuer") {
        "its certificate is not signed by a certificate authority this daemon trusts (for a private CA, set tls_ca to the CA's certificate)"
    } else if says("CaUsedAsEndEntity") {
        "the server presents a CA's certificate as its own: it needs a certificate the CA issued for its host name"
    } else if says("NotValidForName") {
        "its certificate is for another host name than the feed URL's"
    } else if says("Expired") {
        "its certificate has expired"
    } else if says("NotValidYet") {
        "its certificate is not valid yet (is the clock right?)"
    } else if says("Revoked") {
        "its certificate was revoked"
    } else {
        "its certificate is not trusted"
    })
}
