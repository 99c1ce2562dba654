//! The secure channel: TLS 1.3 with raw public keys, and noise as a fallback.
//!
//! Every connection is authenticated and encrypted before anything else runs
//! on it. Two channels are offered, in the order [`MeshConfig::security`]
//! gives (default: TLS, then noise); multistream-select picks the first one
//! both ends speak.
//!
//! - `/shoal/tls-rpk/1`: TLS 1.3 (rustls with the ring provider) where each
//!   side presents its libp2p ed25519 identity key as an RFC 7250 raw public
//!   key instead of an X.509 certificate. Client authentication is mandatory,
//!   the TLS `CertificateVerify` signature proves that each side holds the
//!   key it presented, and the peer id is derived from that key, so a peer
//!   cannot claim another's id. The cipher suites prefer AES-GCM, which on
//!   CPUs with AES instructions (x86-64 AES-NI/VAES, the Pi 5's ARMv8 crypto
//!   extensions) runs about 3× faster than ChaCha20-Poly1305 here; that is
//!   the bulk cost of moving a model between two nodes. Session resumption
//!   is off: every connection does a full handshake.
//! - `/noise`: libp2p's standard noise XX (ChaCha20-Poly1305), for nodes
//!   without TLS in their list and for identities that are not ed25519.
//!
//! [`MeshConfig::security`]: super::MeshConfig::security

use futures::future::{BoxFuture, Either};
use futures::{AsyncRead, AsyncWrite, FutureExt};
use futures_rustls::TlsStream;
use libp2p::core::upgrade::{InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo};
use libp2p::identity::{Keypair, PublicKey, ed25519};
use libp2p::{PeerId, noise};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    CertificateDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The protocol name of shoal's TLS channel.
pub const TLS_PROTOCOL: &str = "/shoal/tls-rpk/1";
/// The protocol name of libp2p's noise channel.
pub const NOISE_PROTOCOL: &str = "/noise";
/// The ALPN both ends of a TLS channel must agree on.
const ALPN: &[u8] = b"shoal/1";

/// DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410): the 32 key bytes follow.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// DER prefix of an ed25519 PKCS#8 v1 private key (RFC 8410): the 32 seed bytes follow.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// A secure channel a node can offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SecureChannel {
    /// TLS 1.3 with raw ed25519 public keys, AES-GCM first ([`TLS_PROTOCOL`]).
    Tls,
    /// libp2p noise XX with ChaCha20-Poly1305 ([`NOISE_PROTOCOL`]).
    Noise,
}

impl SecureChannel {
    /// The default preference: TLS, then noise.
    pub fn defaults() -> Vec<SecureChannel> {
        vec![SecureChannel::Tls, SecureChannel::Noise]
    }

    fn protocol(self) -> &'static str {
        match self {
            SecureChannel::Tls => TLS_PROTOCOL,
            SecureChannel::Noise => NOISE_PROTOCOL,
        }
    }
}

impl std::str::FromStr for SecureChannel {
    type Err = SecureError;
    fn from_str(s: &str) -> Result<Self, SecureError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tls" => Ok(SecureChannel::Tls),
            "noise" => Ok(SecureChannel::Noise),
            other => Err(SecureError::Config(format!(
                "unknown secure channel {other:?} (expected tls or noise)"
            ))),
        }
    }
}

/// Errors setting up or running a secure channel.
#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    /// The configuration cannot be used.
    #[error("secure channel: {0}")]
    Config(String),
    /// The TLS handshake failed (I/O, protocol, or the peer's key was refused).
    #[error("TLS handshake: {0}")]
    Tls(std::io::Error),
    /// The TLS handshake finished but the peer's key cannot be used.
    #[error("TLS peer key: {0}")]
    PeerKey(String),
    /// The noise handshake failed.
    #[error("noise handshake: {0}")]
    Noise(#[from] noise::Error),
    /// The negotiated protocol is not one this node offered.
    #[error("protocol {0} was not offered")]
    NotOffered(String),
}

/// The peer's stream after the handshake: TLS or noise.
pub type SecureStream<C> = Either<TlsStream<C>, noise::Output<C>>;

/// The security upgrade: offers the configured channels in order.
#[derive(Clone)]
pub struct Config {
    offered: Vec<&'static str>,
    tls: Option<Arc<TlsConfigs>>,
    noise: Option<noise::Config>,
}

struct TlsConfigs {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

impl Config {
    /// An upgrade for `key` offering `channels` in that order. TLS needs an
    /// ed25519 identity; with another key type it is left out (noise remains).
    pub fn new(key: &Keypair, channels: &[SecureChannel]) -> Result<Self, SecureError> {
        let mut offered = Vec::new();
        let mut tls = None;
        let mut noise = None;
        for c in channels {
            if offered.contains(&c.protocol()) {
                continue;
            }
            match c {
                SecureChannel::Tls => match tls_configs(key) {
                    Ok(t) => tls = Some(Arc::new(t)),
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS channel unavailable, not offered");
                        continue;
                    }
                },
                SecureChannel::Noise => noise = Some(noise::Config::new(key)?),
            }
            offered.push(c.protocol());
        }
        if offered.is_empty() {
            return Err(SecureError::Config("no secure channel to offer".into()));
        }
        Ok(Self {
            offered,
            tls,
            noise,
        })
    }
}

impl UpgradeInfo for Config {
    type Info = &'static str;
    type InfoIter = Vec<&'static str>;

    fn protocol_info(&self) -> Self::InfoIter {
        self.offered.clone()
    }
}

impl<C> InboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Output = (PeerId, SecureStream<C>);
    type Error = SecureError;
    type Future = BoxFuture<'static, Result<Self::Output, SecureError>>;

    fn upgrade_inbound(self, socket: C, info: Self::Info) -> Self::Future {
        async move {
            match info {
                TLS_PROTOCOL => {
                    let t = self.tls.ok_or(SecureError::NotOffered(info.into()))?;
                    let stream = futures_rustls::TlsAcceptor::from(t.server.clone())
                        .accept(socket)
                        .await
                        .map_err(SecureError::Tls)?;
                    let peer = peer_of(stream.get_ref().1.peer_certificates())?;
                    Ok((peer, Either::Left(TlsStream::Server(stream))))
                }
                NOISE_PROTOCOL => {
                    let n = self.noise.ok_or(SecureError::NotOffered(info.into()))?;
                    let (peer, out) = n.upgrade_inbound(socket, info).await?;
                    Ok((peer, Either::Right(out)))
                }
                other => Err(SecureError::NotOffered(other.into())),
            }
        }
        .boxed()
    }
}

impl<C> OutboundConnectionUpgrade<C> for Config
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Output = (PeerId, SecureStream<C>);
    type Error = SecureError;
    type Future = BoxFuture<'static, Result<Self::Output, SecureError>>;

    fn upgrade_outbound(self, socket: C, info: Self::Info) -> Self::Future {
        async move {
            match info {
                TLS_PROTOCOL => {
                    let t = self.tls.ok_or(SecureError::NotOffered(info.into()))?;
                    // The name is not checked (peers are named by their keys).
                    let name = ServerName::try_from("shoal.invalid")
                        .map_err(|e| SecureError::Config(e.to_string()))?;
                    let stream = futures_rustls::TlsConnector::from(t.client.clone())
                        .connect(name, socket)
                        .await
                        .map_err(SecureError::Tls)?;
                    let peer = peer_of(stream.get_ref().1.peer_certificates())?;
                    Ok((peer, Either::Left(TlsStream::Client(stream))))
                }
                NOISE_PROTOCOL => {
                    let n = self.noise.ok_or(SecureError::NotOffered(info.into()))?;
                    let (peer, out) = n.upgrade_outbound(socket, info).await?;
                    Ok((peer, Either::Right(out)))
                }
                other => Err(SecureError::NotOffered(other.into())),
            }
        }
        .boxed()
    }
}

/// The peer id of the (single) raw public key a finished handshake presented.
fn peer_of(certs: Option<&[CertificateDer<'_>]>) -> Result<PeerId, SecureError> {
    match certs {
        Some([one]) => Ok(PublicKey::from(ed25519_of_spki(one.as_ref())?).to_peer_id()),
        Some(c) => Err(SecureError::PeerKey(format!(
            "expected one raw public key, got {}",
            c.len()
        ))),
        None => Err(SecureError::PeerKey("the peer presented no key".into())),
    }
}

/// Parses an ed25519 SubjectPublicKeyInfo; nothing else is accepted.
fn ed25519_of_spki(der: &[u8]) -> Result<ed25519::PublicKey, SecureError> {
    let key = der
        .strip_prefix(&ED25519_SPKI_PREFIX[..])
        .filter(|k| k.len() == 32)
        .ok_or_else(|| SecureError::PeerKey("not an ed25519 raw public key".into()))?;
    ed25519::PublicKey::try_from_bytes(key).map_err(|e| SecureError::PeerKey(e.to_string()))
}

/// The ring provider with AES-GCM ahead of ChaCha20-Poly1305, TLS 1.3 only.
fn provider() -> CryptoProvider {
    use rustls::crypto::ring::cipher_suite as cs;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cs::TLS13_AES_128_GCM_SHA256,
        cs::TLS13_AES_256_GCM_SHA384,
        cs::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    p
}

fn tls_configs(key: &Keypair) -> Result<TlsConfigs, SecureError> {
    let ed = key
        .clone()
        .try_into_ed25519()
        .map_err(|_| SecureError::Config("TLS needs an ed25519 node identity".into()))?;
    let signer = signer_of(&ed)?;
    tls_configs_for(Arc::new(rustls::sign::CertifiedKey::new(
        vec![spki_of(&ed.public())],
        signer,
    )))
}

/// The raw public key "certificate": the key's SubjectPublicKeyInfo.
fn spki_of(key: &ed25519::PublicKey) -> CertificateDer<'static> {
    let mut spki = ED25519_SPKI_PREFIX.to_vec();
    spki.extend_from_slice(&key.to_bytes());
    CertificateDer::from(spki)
}

/// A rustls signer holding the identity's private key.
fn signer_of(key: &ed25519::Keypair) -> Result<Arc<dyn rustls::sign::SigningKey>, SecureError> {
    let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
    pkcs8.extend_from_slice(key.secret().as_ref());
    rustls::crypto::ring::sign::any_eddsa_type(&PrivatePkcs8KeyDer::from(pkcs8))
        .map_err(|e| SecureError::Config(e.to_string()))
}

fn tls_configs_for(certified: Arc<rustls::sign::CertifiedKey>) -> Result<TlsConfigs, SecureError> {
    let provider = Arc::new(provider());
    let verifier = Arc::new(RawKeyVerifier {
        algs: provider.signature_verification_algorithms,
    });
    let versions = &[&rustls::version::TLS13];

    let mut client = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| SecureError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone())
        .with_client_cert_resolver(Arc::new(
            rustls::client::AlwaysResolvesClientRawPublicKeys::new(certified.clone()),
        ));
    client.alpn_protocols = vec![ALPN.to_vec()];
    client.resumption = rustls::client::Resumption::disabled();
    client.enable_early_data = false;

    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| SecureError::Config(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(
            rustls::server::AlwaysResolvesServerRawPublicKeys::new(certified),
        ));
    server.alpn_protocols = vec![ALPN.to_vec()];
    server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    server.send_tls13_tickets = 0;
    server.max_early_data_size = 0;

    Ok(TlsConfigs {
        client: Arc::new(client),
        server: Arc::new(server),
    })
}

/// Accepts any ed25519 raw public key (peers are named by their keys; who may
/// connect is decided above, by the PSK, the allow-list and bans) and checks
/// the handshake signature against it.
#[derive(Debug)]
struct RawKeyVerifier {
    algs: WebPkiSupportedAlgorithms,
}

impl RawKeyVerifier {
    fn check_key(
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(rustls::Error::General(
                "a raw public key comes without intermediates".into(),
            ));
        }
        ed25519_of_spki(end_entity.as_ref())
            .map(|_| ())
            .map_err(|e| rustls::Error::General(e.to_string()))
    }

    fn verify13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(rustls::Error::PeerMisbehaved(
                rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
            ));
        }
        rustls::crypto::verify_tls13_signature_with_raw_key(
            message,
            &SubjectPublicKeyInfoDer::from(cert.as_ref()),
            dss,
            &self.algs,
        )
    }
}

/// The signature methods both verifier traits share: TLS 1.3 and ed25519
/// only, against the raw key.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General("TLS 1.2 is never negotiated".into()))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            self.verify13(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ED25519]
        }

        fn requires_raw_public_keys(&self) -> bool {
            true
        }
    };
}

impl ServerCertVerifier for RawKeyVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Self::check_key(end_entity, intermediates).map(|_| ServerCertVerified::assertion())
    }

    signature_checks!();
}

impl ClientCertVerifier for RawKeyVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Self::check_key(end_entity, intermediates).map(|_| ClientCertVerified::assertion())
    }

    signature_checks!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use libp2p::tcp::tokio::TcpStream;

    use crate::mesh::test_util::tcp_pair as pair;

    /// Runs one TLS handshake: `client` dials, `server` accepts.
    async fn handshake(
        client: TlsConfigs,
        server: TlsConfigs,
    ) -> (
        Result<(PeerId, SecureStream<TcpStream>), SecureError>,
        Result<(PeerId, SecureStream<TcpStream>), SecureError>,
    ) {
        let (c, s) = pair().await;
        let dialer = Config {
            offered: vec![TLS_PROTOCOL],
            tls: Some(Arc::new(client)),
            noise: None,
        };
        let listener = Config {
            offered: vec![TLS_PROTOCOL],
            tls: Some(Arc::new(server)),
            noise: None,
        };
        tokio::join!(
            dialer.upgrade_outbound(c, TLS_PROTOCOL),
            listener.upgrade_inbound(s, TLS_PROTOCOL)
        )
    }

    #[tokio::test]
    async fn tls_names_both_peers_and_carries_bytes() {
        use futures::{AsyncReadExt, AsyncWriteExt};
        let (a, b) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
        let (out, inb) =
            handshake(tls_configs(&a).expect("tls"), tls_configs(&b).expect("tls")).await;
        let (peer_b, mut to_b) = out.expect("dialer handshake");
        let (peer_a, mut to_a) = inb.expect("listener handshake");
        assert_eq!(peer_b, b.public().to_peer_id());
        assert_eq!(peer_a, a.public().to_peer_id());
        assert!(matches!(to_b, Either::Left(_)), "TLS, not noise");
        let msg = vec![7u8; 100_000];
        let (w, r) = tokio::join!(
            async {
                to_b.write_all(&msg).await?;
                to_b.close().await
            },
            async {
                let mut got = Vec::new();
                to_a.read_to_end(&mut got).await.map(|_| got)
            }
        );
        w.expect("write");
        assert_eq!(r.expect("read"), msg);
    }

    #[tokio::test]
    async fn a_key_the_peer_does_not_hold_is_refused() {
        // The liar presents `victim`'s public key but can only sign with its own.
        let (victim, liar, server) = (
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
        );
        let victim_pub = victim.try_into_ed25519().expect("ed25519").public();
        let liar_key = liar.try_into_ed25519().expect("ed25519");
        let forged = rustls::sign::CertifiedKey::new(
            vec![spki_of(&victim_pub)],
            signer_of(&liar_key).expect("signer"),
        );
        let (out, inb) = handshake(
            tls_configs_for(Arc::new(forged)).expect("tls"),
            tls_configs(&server).expect("tls"),
        )
        .await;
        let Err(err) = inb else {
            panic!("the listener must refuse a forged key")
        };
        assert!(matches!(err, SecureError::Tls(_)), "{err}");
        dialer_gets_nothing(out).await;
    }

    /// In TLS 1.3 the client finishes before the server has checked the
    /// client's key, so a refused dialer may hold a "session": its first read
    /// must then fail (the listener's alert), never give bytes.
    async fn dialer_gets_nothing(out: Result<(PeerId, SecureStream<TcpStream>), SecureError>) {
        use futures::AsyncReadExt;
        if let Ok((_, mut s)) = out {
            let mut b = [0u8; 1];
            let r = s.read(&mut b).await;
            assert!(matches!(r, Err(_) | Ok(0)), "a refused dialer read {r:?}");
        }
    }

    #[tokio::test]
    async fn a_listener_with_a_key_it_does_not_hold_is_refused() {
        let (victim, liar, client) = (
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
            Keypair::generate_ed25519(),
        );
        let forged = rustls::sign::CertifiedKey::new(
            vec![spki_of(
                &victim.try_into_ed25519().expect("ed25519").public(),
            )],
            signer_of(&liar.try_into_ed25519().expect("ed25519")).expect("signer"),
        );
        let (out, inb) = handshake(
            tls_configs(&client).expect("tls"),
            tls_configs_for(Arc::new(forged)).expect("tls"),
        )
        .await;
        let Err(err) = out else {
            panic!("the dialer must refuse a forged key")
        };
        assert!(matches!(err, SecureError::Tls(_)), "{err}");
        assert!(inb.is_err(), "the listener gets no session");
    }

    #[tokio::test]
    async fn a_non_ed25519_key_is_refused() {
        // A key the verifier does not know (an X.509 blob, not an ed25519 SPKI).
        let server = Keypair::generate_ed25519();
        let liar = Keypair::generate_ed25519()
            .try_into_ed25519()
            .expect("ed25519");
        let junk = CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00]);
        let forged = rustls::sign::CertifiedKey::new(vec![junk], signer_of(&liar).expect("signer"));
        let (out, inb) = handshake(
            tls_configs_for(Arc::new(forged)).expect("tls"),
            tls_configs(&server).expect("tls"),
        )
        .await;
        assert!(
            inb.is_err(),
            "the listener must refuse a key it cannot parse"
        );
        dialer_gets_nothing(out).await;
    }

    #[test]
    fn spki_parsing_is_strict() {
        let k = Keypair::generate_ed25519()
            .try_into_ed25519()
            .expect("ed25519");
        let spki = spki_of(&k.public());
        assert_eq!(
            ed25519_of_spki(spki.as_ref()).expect("own SPKI").to_bytes(),
            k.public().to_bytes()
        );
        let mut long = spki.as_ref().to_vec();
        long.push(0);
        assert!(ed25519_of_spki(&long).is_err());
        assert!(ed25519_of_spki(&spki.as_ref()[..40]).is_err());
        let mut other_alg = spki.as_ref().to_vec();
        other_alg[8] = 0x71; // 1.3.101.113 is ed448
        assert!(ed25519_of_spki(&other_alg).is_err());
        assert!(peer_of(None).is_err());
        assert!(peer_of(Some(&[spki.clone(), spki])).is_err());
    }

    #[test]
    fn channel_names_parse() {
        assert_eq!(
            "TLS".parse::<SecureChannel>().ok(),
            Some(SecureChannel::Tls)
        );
        assert_eq!(
            " noise".parse::<SecureChannel>().ok(),
            Some(SecureChannel::Noise)
        );
        assert!("quic".parse::<SecureChannel>().is_err());
        let k = Keypair::generate_ed25519();
        assert!(Config::new(&k, &[]).is_err());
        let both = Config::new(
            &k,
            &[
                SecureChannel::Noise,
                SecureChannel::Tls,
                SecureChannel::Noise,
            ],
        )
        .expect("config");
        assert_eq!(both.protocol_info(), vec![NOISE_PROTOCOL, TLS_PROTOCOL]);
    }
}
