//! HTTPS origins: in-process nodes on 127.0.0.1 (mDNS off, static peers) pull
//! an artifact that no peer holds from an in-process HTTPS Range server
//! (tokio-rustls, a CA and leaf certificates made by rcgen), bound to
//! 127.0.0.1:0. The server publishes the file and its `.manifest` next to it,
//! like `scripts/range-server.py`, honours `Range` and `If-Range`, and counts
//! the connections it accepts.
//!
//! Waits are bounded (a hang fails the test); nothing asserts on durations.

use anyhow::{Context, Result, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use shoal::mesh::MeshConfig;
use shoal::mesh::download::Phase;
use shoal::mesh::origin::{Origin, OriginError};
use shoal::node::Node;
use shoal::store::{AddOptions, ArtifactId, ArtifactStatus, SignedRelease, Store, StoreOptions};
use shoal_testnet::{
    TestNode, WAIT, assert_identical, loopback_config, make_file, pull_until_end, start_node,
    wait_peers,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: usize = 6 << 20;
const NAME: &str = "https-model:v1";

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A test CA and a server certificate it signed.
struct Pki {
    /// The CA certificate, PEM (what `origin_ca_file` points at).
    ca_file: PathBuf,
    /// The server's certificate chain and key.
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
}

/// A fresh CA in `dir/<label>-ca.pem` and a leaf for `names` signed by it.
fn make_pki(dir: &Path, label: &str, names: &[&str]) -> Result<Pki> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("shoal test CA {label}"));
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let ca = ca_params.self_signed(&ca_key)?;
    let leaf_key = rcgen::KeyPair::generate()?;
    let mut leaf_params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    leaf_params.distinguished_name.push(
        rcgen::DnType::CommonName,
        names.first().copied().unwrap_or("x"),
    );
    let leaf = leaf_params.signed_by(&leaf_key, &ca, &ca_key)?;
    let ca_file = dir.join(format!("{label}-ca.pem"));
    std::fs::write(&ca_file, ca.pem())?;
    Ok(Pki {
        ca_file,
        chain: vec![leaf.der().clone()],
        key: leaf_key.serialize_der(),
    })
}

/// Path → (bytes, ETag).
type Files = HashMap<String, (Arc<Vec<u8>>, String)>;

/// What the server holds and how it behaves.
struct ServerState {
    files: std::sync::Mutex<Files>,
    /// After this many 206 answers for `change_path`, its bytes become `changed` (new ETag).
    change_after: Option<(String, u64, Arc<Vec<u8>>)>,
    /// Answer range requests even when If-Range does not match (a broken server).
    ignore_if_range: bool,
    accepts: AtomicU64,
    handshakes: AtomicU64,
    partials: AtomicU64,
    full_answers: AtomicU64,
}

impl ServerState {
    fn files(&self) -> std::sync::MutexGuard<'_, Files> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The Range server: TLS with a [`Pki`], or plain HTTP without one.
struct HttpsServer {
    port: u16,
    scheme: &'static str,
    state: Arc<ServerState>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for HttpsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl HttpsServer {
    async fn start(
        pki: Option<&Pki>,
        change_after: Option<(String, u64, Arc<Vec<u8>>)>,
        ignore_if_range: bool,
    ) -> Result<Self> {
        let acceptor = match pki {
            Some(pki) => {
                let config = rustls::ServerConfig::builder_with_provider(ring())
                    .with_safe_default_protocol_versions()?
                    .with_no_client_auth()
                    .with_single_cert(
                        pki.chain.clone(),
                        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key.clone())),
                    )?;
                Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
            }
            None => None,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(ServerState {
            files: std::sync::Mutex::new(HashMap::new()),
            change_after,
            ignore_if_range,
            accepts: AtomicU64::new(0),
            handshakes: AtomicU64::new(0),
            partials: AtomicU64::new(0),
            full_answers: AtomicU64::new(0),
        });
        let st = state.clone();
        let scheme = if acceptor.is_some() { "https" } else { "http" };
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                st.accepts.fetch_add(1, Ordering::Relaxed);
                let (acceptor, st) = (acceptor.clone(), st.clone());
                tokio::spawn(async move {
                    let Some(acceptor) = acceptor else {
                        let _ = tokio::time::timeout(WAIT, answer(tcp, &st)).await;
                        return;
                    };
                    // A client that rejects the certificate ends here.
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    st.handshakes.fetch_add(1, Ordering::Relaxed);
                    let _ = tokio::time::timeout(WAIT, answer(tls, &st)).await;
                });
            }
        });
        Ok(Self {
            port,
            scheme,
            state,
            task,
        })
    }

    fn url(&self, host: &str, path: &str) -> String {
        format!("{}://{host}:{}{path}", self.scheme, self.port)
    }

    fn put(&self, path: &str, bytes: Vec<u8>, etag: &str) {
        self.state
            .files()
            .insert(path.to_owned(), (Arc::new(bytes), etag.to_owned()));
    }

    fn accepts(&self) -> u64 {
        self.state.accepts.load(Ordering::Relaxed)
    }
}

/// Answers one request on `s` (Range, ETag and If-Range like scripts/range-server.py), then closes.
async fn answer<S>(mut s: S, st: &ServerState) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await?;
        if n == 0 || head.len() > 64 << 10 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut lines = text.split("\r\n");
    let path = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/")
        .to_owned();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let file = {
        let mut files = st.files();
        if let Some((p, after, changed)) = &st.change_after
            && *p == path
            && st.partials.load(Ordering::Relaxed) >= *after
        {
            files.insert(p.clone(), (changed.clone(), "\"changed\"".into()));
        }
        files.get(&path).cloned()
    };
    let Some((data, etag)) = file else {
        s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await?;
        return s.shutdown().await;
    };
    let size = data.len();
    let mut range = None;
    if let Some(r) = headers.get("range") {
        let if_range_ok = st.ignore_if_range || headers.get("if-range").is_none_or(|v| *v == etag);
        if if_range_ok {
            let parsed = r
                .strip_prefix("bytes=")
                .and_then(|r| r.split_once('-'))
                .and_then(|(a, b)| Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()?)));
            match parsed {
                Some((a, b)) if a <= b && a < size => range = Some((a, b.min(size - 1))),
                _ => {
                    s.write_all(b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .await?;
                    return s.shutdown().await;
                }
            }
        }
    }
    let (status, body, extra) = match range {
        Some((a, b)) => {
            st.partials.fetch_add(1, Ordering::Relaxed);
            (
                "206 Partial Content",
                &data[a..=b],
                format!("Content-Range: bytes {a}-{b}/{size}\r\n"),
            )
        }
        None => {
            st.full_answers.fetch_add(1, Ordering::Relaxed);
            ("200 OK", &data[..], String::new())
        }
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nETag: {etag}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    s.shutdown().await
}

/// A publisher's store (not a node: no peer holds the artifact) with `src`
/// added and signed as [`NAME`], naming `origin` as its origin.
struct Publisher {
    id: ArtifactId,
    key: [u8; 32],
    release: SignedRelease,
    manifest: Vec<u8>,
    _dir: tempfile::TempDir,
}

fn publish(src: &Path, origin: &str) -> Result<Publisher> {
    let dir = tempfile::tempdir()?;
    let store = Store::open(&dir.path().join("store"), StoreOptions::default())?;
    let id = store.add_file(src, &AddOptions::default())?;
    let key = store.keygen(false)?;
    let release = store.publish(&id, NAME, Some(origin.to_owned()))?;
    let manifest = store.manifest_bytes(&id)?.context("manifest")?;
    Ok(Publisher {
        id,
        key,
        release,
        manifest,
        _dir: dir,
    })
}

/// Serves the publisher's file at `/model.bin` and its manifest at `/model.bin.manifest`.
fn serve_artifact(server: &HttpsServer, publisher: &Publisher, src: &Path) -> Result<()> {
    server.put("/model.bin", std::fs::read(src)?, "\"v1\"");
    server.put("/model.bin.manifest", publisher.manifest.clone(), "\"m1\"");
    Ok(())
}

/// A node on loopback that trusts the publisher and knows its release.
async fn node_with_release(config: MeshConfig, publisher: &Publisher) -> Result<TestNode> {
    let n = start_node(config, None).await?;
    n.node.store().trust_add(publisher.key, "publisher")?;
    n.node.store().apply_release(&publisher.release)?;
    Ok(n)
}

/// Config for a node that may use origins, with `ca` as its extra CA file;
/// failing searches and stalls give up after a few seconds.
fn origin_config(ca: Option<&Path>) -> MeshConfig {
    let mut c = loopback_config(Vec::new());
    c.origin_ca_file = ca.map(Path::to_owned);
    c.download.find_timeout = Duration::from_secs(3);
    c.download.stall_timeout = Duration::from_secs(4);
    c.download.origin_delay = Duration::from_millis(100);
    c
}

fn assert_not_active(node: &Node, id: ArtifactId) -> Result<()> {
    let status = node.store().status(&id)?;
    assert_ne!(
        status,
        Some(ArtifactStatus::Active),
        "nothing may be active"
    );
    assert!(node.store().artifact_path(&id).is_err());
    Ok(())
}

fn fixture(dir: &tempfile::TempDir, seed: u64) -> Result<PathBuf> {
    make_file(&dir.path().join("model.bin"), SIZE, seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_from_an_https_origin_with_the_configured_ca() -> Result<()> {
    init_tracing();
    let tmp = tempfile::tempdir()?;
    let src = fixture(&tmp, 11)?;
    let pki = make_pki(tmp.path(), "site", &["127.0.0.1", "localhost"])?;
    let server = HttpsServer::start(Some(&pki), None, false).await?;
    let publisher = publish(&src, &server.url("127.0.0.1", "/model.bin"))?;
    serve_artifact(&server, &publisher, &src)?;
    let n = node_with_release(origin_config(Some(&pki.ca_file)), &publisher).await?;
    let p = pull_until_end(&n.node, NAME).await?;
    if p.phase != Phase::Done {
        bail!("pull failed: {:?}", p.error);
    }
    assert_identical(&n.node, publisher.id, &src).await?;
    assert_eq!(
        p.bytes_from_origin, SIZE as u64,
        "every byte from the origin"
    );
    assert_eq!(p.bytes_from_peers, 0);
    assert_eq!(p.bad_chunks, 0);
    let partials = server.state.partials.load(Ordering::Relaxed);
    assert!(
        partials >= 2,
        "the file came in range requests ({partials})"
    );
    assert_eq!(
        server.state.full_answers.load(Ordering::Relaxed),
        1,
        "only the manifest is a full answer"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_ca_fails_with_a_tls_error_and_stores_nothing_active() -> Result<()> {
    init_tracing();
    let tmp = tempfile::tempdir()?;
    let src = fixture(&tmp, 12)?;
    let pki = make_pki(tmp.path(), "site", &["127.0.0.1"])?;
    let other = make_pki(tmp.path(), "other", &["127.0.0.1"])?;
    let server = HttpsServer::start(Some(&pki), None, false).await?;
    let url = server.url("127.0.0.1", "/model.bin");
    let publisher = publish(&src, &url)?;
    serve_artifact(&server, &publisher, &src)?;

    // The origin names the reason.
    let e = Origin::new(&url, Some(&other.ca_file))?
        .manifest(&publisher.id)
        .await
        .expect_err("an untrusted certificate must be refused");
    match &e {
        OriginError::Tls { host, reason } => {
            assert_eq!(host, "127.0.0.1");
            assert!(reason.contains("UnknownIssuer"), "{reason}");
            assert!(reason.contains("origin_ca_file"), "hint missing: {reason}");
        }
        other => bail!("expected a TLS error, got {other:?}"),
    }
    assert!(
        e.to_string().starts_with("TLS with 127.0.0.1 failed"),
        "{e}"
    );
    // Only the system bundle (no CA file): refused as well.
    match Origin::new(&url, None) {
        Ok(o) => match o.manifest(&publisher.id).await {
            Err(OriginError::Tls { reason, .. }) => {
                assert!(reason.contains("UnknownIssuer"), "{reason}")
            }
            other => bail!("expected a TLS error, got {other:?}"),
        },
        Err(OriginError::NoTrustRoots) => {}
        Err(other) => bail!("unexpected {other:?}"),
    }

    // A node trusting another CA: the pull fails and nothing is stored as active.
    let n = node_with_release(origin_config(Some(&other.ca_file)), &publisher).await?;
    let p = pull_until_end(&n.node, NAME).await?;
    assert_eq!(p.phase, Phase::Failed, "the pull must fail");
    // The pull's own error names the origin's reason.
    let err = p.error.clone().unwrap_or_default();
    assert!(
        err.contains("origin: TLS") && err.contains("UnknownIssuer"),
        "the failed pull should say why: {err}"
    );
    assert_eq!(p.bytes_from_origin, 0);
    assert_not_active(&n.node, publisher.id)?;
    assert!(server.accepts() > 0, "the node did try the origin");
    assert_eq!(
        server.state.handshakes.load(Ordering::Relaxed),
        0,
        "no TLS session may be completed"
    );
    assert_eq!(server.state.partials.load(Ordering::Relaxed), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_for_another_host_name_fails() -> Result<()> {
    init_tracing();
    let tmp = tempfile::tempdir()?;
    let src = fixture(&tmp, 13)?;
    // Signed by the trusted CA, but for another name than the URL's host.
    let pki = make_pki(tmp.path(), "site", &["origin.example.lan"])?;
    let server = HttpsServer::start(Some(&pki), None, false).await?;
    let url = server.url("127.0.0.1", "/model.bin");
    let publisher = publish(&src, &url)?;
    serve_artifact(&server, &publisher, &src)?;

    match Origin::new(&url, Some(&pki.ca_file))?.fetch(0, 1024).await {
        Err(OriginError::Tls { reason, .. }) => {
            assert!(reason.contains("not valid for name"), "{reason}");
            assert!(
                reason.contains("another host name"),
                "hint missing: {reason}"
            );
        }
        other => bail!(
            "expected a TLS name error, got {:?}",
            other.map(|b| b.len())
        ),
    }
    let n = node_with_release(origin_config(Some(&pki.ca_file)), &publisher).await?;
    let p = pull_until_end(&n.node, NAME).await?;
    assert_eq!(p.phase, Phase::Failed, "the pull must fail");
    assert_not_active(&n.node, publisher.id)?;
    assert!(server.accepts() > 0);
    assert_eq!(server.state.handshakes.load(Ordering::Relaxed), 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etag_change_mid_download_is_refused() -> Result<()> {
    init_tracing();
    let tmp = tempfile::tempdir()?;
    let src = fixture(&tmp, 14)?;
    let pki = make_pki(tmp.path(), "site", &["127.0.0.1"])?;
    let changed = Arc::new(std::fs::read(make_file(
        &tmp.path().join("changed.bin"),
        SIZE,
        99,
    )?)?);

    // A server honouring If-Range: after 3 ranges the file changes, later
    // ranges with the old ETag get the whole new file (200), which is refused.
    let server = HttpsServer::start(
        Some(&pki),
        Some(("/model.bin".into(), 3, changed.clone())),
        false,
    )
    .await?;
    let url = server.url("127.0.0.1", "/model.bin");
    let publisher = publish(&src, &url)?;
    serve_artifact(&server, &publisher, &src)?;
    let n = node_with_release(origin_config(Some(&pki.ca_file)), &publisher).await?;
    let p = pull_until_end(&n.node, NAME).await?;
    assert_eq!(
        p.phase,
        Phase::Failed,
        "a changed file must not complete the pull"
    );
    assert!(p.bytes_from_origin < SIZE as u64);
    assert_eq!(p.bad_chunks, 0, "no byte of the new version was stored");
    assert_not_active(&n.node, publisher.id)?;
    assert!(
        server.state.full_answers.load(Ordering::Relaxed) >= 2,
        "If-Range sent with the pinned ETag"
    );

    // The same through the origin directly: once the file changed, a server
    // honouring If-Range answers 200 (refused); one that ignores it answers
    // 206 with the new ETag (refused too).
    let src_bytes = std::fs::read(&src)?;
    let honest = HttpsServer::start(
        Some(&pki),
        Some(("/model.bin".into(), 1, changed.clone())),
        false,
    )
    .await?;
    honest.put("/model.bin", src_bytes.clone(), "\"v1\"");
    let origin = Origin::new(&honest.url("127.0.0.1", "/model.bin"), Some(&pki.ca_file))?;
    assert_eq!(origin.fetch(0, 4096).await?, src_bytes[..4096]);
    assert_eq!(origin.etag().as_deref(), Some("\"v1\""));
    match origin.fetch(4096, 4096).await {
        Err(OriginError::Status { status: 200, .. }) => {}
        other => bail!("expected a refused 200, got {:?}", other.map(|b| b.len())),
    }
    let broken =
        HttpsServer::start(Some(&pki), Some(("/model.bin".into(), 1, changed)), true).await?;
    broken.put("/model.bin", src_bytes.clone(), "\"v1\"");
    let origin = Origin::new(&broken.url("127.0.0.1", "/model.bin"), Some(&pki.ca_file))?;
    let first = origin.fetch(0, 4096).await?;
    assert_eq!(origin.etag().as_deref(), Some("\"v1\""));
    assert_eq!(first, src_bytes[..4096]);
    match origin.fetch(4096, 4096).await {
        Err(OriginError::EtagChanged { was, now }) => {
            assert_eq!((was.as_str(), now.as_str()), ("\"v1\"", "\"changed\""));
        }
        other => bail!("expected EtagChanged, got {:?}", other.map(|b| b.len())),
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_node_never_connects_to_the_origin() -> Result<()> {
    init_tracing();
    let tmp = tempfile::tempdir()?;
    let src = fixture(&tmp, 15)?;
    let pki = make_pki(tmp.path(), "site", &["127.0.0.1"])?;
    let server = HttpsServer::start(Some(&pki), None, false).await?;
    let publisher = publish(&src, &server.url("127.0.0.1", "/model.bin"))?;
    serve_artifact(&server, &publisher, &src)?;

    // Offline with no peer: the pull fails without a single connection to the origin.
    let mut cfg = origin_config(Some(&pki.ca_file));
    cfg.offline = true;
    let alone = node_with_release(cfg, &publisher).await?;
    let p = pull_until_end(&alone.node, NAME).await?;
    assert_eq!(p.phase, Phase::Failed);
    assert_eq!(server.accepts(), 0, "an offline node contacted the origin");
    assert_not_active(&alone.node, publisher.id)?;

    // An online node fetches from the origin (the server does count), then an
    // offline node next to it gets every byte from that peer, none from the origin.
    let online = node_with_release(origin_config(Some(&pki.ca_file)), &publisher).await?;
    let p = pull_until_end(&online.node, NAME).await?;
    if p.phase != Phase::Done {
        bail!("online pull failed: {:?}", p.error);
    }
    let after_online = server.accepts();
    assert!(after_online > 0);
    let mut cfg = origin_config(Some(&pki.ca_file));
    cfg.peers = vec![online.addr.clone()];
    cfg.offline = true;
    let offline = node_with_release(cfg, &publisher).await?;
    wait_peers(&offline.node, 1).await?;
    let p = pull_until_end(&offline.node, NAME).await?;
    if p.phase != Phase::Done {
        bail!("offline pull from the peer failed: {:?}", p.error);
    }
    assert_identical(&offline.node, publisher.id, &src).await?;
    assert_eq!(p.bytes_from_origin, 0);
    assert_eq!(p.bytes_from_peers, SIZE as u64);
    assert_eq!(
        server.accepts(),
        after_online,
        "an offline node contacted the origin"
    );
    Ok(())
}

/// The same client over plain TCP: `http://` origins keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_origins_still_work() -> Result<()> {
    init_tracing();
    let tmp = tempfile::tempdir()?;
    let src = fixture(&tmp, 16)?;
    let server = HttpsServer::start(None, None, false).await?;
    let publisher = publish(&src, &server.url("127.0.0.1", "/model.bin"))?;
    serve_artifact(&server, &publisher, &src)?;
    let n = node_with_release(origin_config(None), &publisher).await?;
    let p = pull_until_end(&n.node, NAME).await?;
    if p.phase != Phase::Done {
        bail!("pull failed: {:?}", p.error);
    }
    assert_identical(&n.node, publisher.id, &src).await?;
    assert_eq!(p.bytes_from_origin, SIZE as u64);
    Ok(())
}
