//! QUIC endpoints of the control plane. The coordinator makes a fresh self-signed certificate at every
//! start; workers trust exactly that certificate, by the SHA-256 fingerprint in their join token, and no
//! certificate authority at all. Framed messages of `acrf_common::protocol` travel on one bidirectional
//! stream per worker.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

const ALPN: &[u8] = b"acrf/1";
/// The name in the certificate; the pin, not the name, is what is checked.
const SERVER_NAME: &str = "acrf-coordinator";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport(idle: Duration) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(Some(idle.try_into().expect("idle timeout fits QUIC's range")));
    Arc::new(t)
}

/// The coordinator's certificate for this run.
pub struct Identity {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
    pub fingerprint: [u8; 32],
}

impl Identity {
    pub fn generate() -> Result<Identity> {
        let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])?;
        Ok(Identity::from_der(ck.cert.der().to_vec(), ck.signing_key.serialize_der()))
    }

    fn from_der(cert: Vec<u8>, key: Vec<u8>) -> Identity {
        let cert = CertificateDer::from(cert);
        let fingerprint = Sha256::digest(&cert).into();
        Identity { cert, key: PrivatePkcs8KeyDer::from(key), fingerprint }
    }

    /// The identity and the job secret as a file body (JSON with hex fields).
    pub fn to_bytes(&self, secret: &[u8; 32]) -> Vec<u8> {
        serde_json::json!({
            "cert": hex::encode(self.cert.as_ref()),
            "key": hex::encode(self.key.secret_pkcs8_der()),
            "secret": hex::encode(secret),
        })
        .to_string()
        .into_bytes()
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<(Identity, [u8; 32])> {
        let v: serde_json::Value = serde_json::from_slice(bytes)?;
        let field = |k: &str| -> Result<Vec<u8>> {
            Ok(hex::decode(v.get(k).and_then(|x| x.as_str()).with_context(|| format!("no `{k}`"))?)?)
        };
        let secret: [u8; 32] = field("secret")?.try_into().map_err(|_| anyhow::anyhow!("`secret` is not 32 bytes"))?;
        Ok((Identity::from_der(field("cert")?, field("key")?), secret))
    }
}

/// A QUIC server on `listen` presenting `id`; connections idle for `idle` are closed.
pub fn server(listen: SocketAddr, id: &Identity, idle: Duration) -> Result<quinn::Endpoint> {
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![id.cert.clone()], PrivateKeyDer::Pkcs8(id.key.clone_key()))?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(crypto)?));
    config.transport_config(transport(idle));
    quinn::Endpoint::server(config, listen).with_context(|| format!("listening on {listen}"))
}

/// Every address of a join token answered with another certificate than the one the token pins: the token
/// belongs to another coordinator, or to this one before it restarted without its identity file. Unlike an
/// unreachable coordinator this does not pass, so a worker gives up at once instead of dialling again.
#[derive(Debug, thiserror::Error)]
#[error(
    "the coordinator at {addr} presents certificate {seen}, not the one this join token pins ({pinned}): the token \
     is another coordinator's, or from before this one restarted without `--identity`; get its current token"
)]
pub struct CertificateMismatch {
    pub addr: SocketAddr,
    pub seen: String,
    pub pinned: String,
}

/// Connects to the first reachable of `addrs`, accepting only the certificate with `fingerprint`; fails with
/// [`CertificateMismatch`] when every address presented another one.
pub async fn connect(addrs: &[SocketAddr], fingerprint: [u8; 32], idle: Duration) -> Result<quinn::Connection> {
    let seen = Arc::new(Mutex::new(None));
    let verifier = Pinned { fingerprint, provider: provider(), mismatch: seen.clone() };
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let mut config = quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(crypto)?));
    config.transport_config(transport(idle));
    let (mut last, mut mismatches) = (None, Vec::new());
    for addr in addrs {
        let bind: SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("valid");
        let mut endpoint = quinn::Endpoint::client(bind)?;
        endpoint.set_default_client_config(config.clone());
        match endpoint.connect(*addr, SERVER_NAME)?.await {
            Ok(conn) => return Ok(conn),
            Err(e) => {
                let foreign: Option<[u8; 32]> = seen.lock().unwrap_or_else(PoisonError::into_inner).take();
                if let Some(cert) = foreign {
                    mismatches.push(CertificateMismatch {
                        addr: *addr,
                        seen: hex::encode(cert),
                        pinned: hex::encode(fingerprint),
                    });
                }
                last = Some(anyhow::anyhow!("coordinator at {addr}: {e}"));
            }
        }
    }
    if !addrs.is_empty() && mismatches.len() == addrs.len() {
        return Err(mismatches.swap_remove(0).into());
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("the join token names no coordinator address")))
}

/// Trusts one certificate, by fingerprint; signatures are still verified with the provider's algorithms,
/// so only the holder of that certificate's key can complete the handshake. A certificate it refuses is
/// kept in `mismatch`, for `connect` to tell a foreign coordinator from an unreachable one.
#[derive(Debug)]
struct Pinned {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
    mismatch: Arc<Mutex<Option<[u8; 32]>>>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen: [u8; 32] = Sha256::digest(end_entity).into();
        if seen == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            *self.mismatch.lock().unwrap_or_else(PoisonError::into_inner) = Some(seen);
            Err(rustls::Error::General(format!(
                "the coordinator's certificate {} is not the one in the join token ({})",
                hex::encode(seen),
                hex::encode(self.fingerprint)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
