//! Mesh commands: `serve` (the daemon), and `pull`, `peers`, `status`, `psk new`,
//! which talk to a running daemon over its admin HTTP API.

use super::Ctx;
use super::ops::ConfigSource;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use shoal::api::admin::{PeersReport, PullRequest, PullStarted, StatusReport};
use shoal::daemon::{Daemon, DaemonError, DaemonOptions};
use shoal::mesh::download::Phase;
use shoal::mesh::{self, Multiaddr, PeerId, Progress};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Mesh commands.
#[derive(Subcommand, Debug)]
pub enum MeshCmd {
    /// Run the node: content store, mesh, HTTP API.
    Serve(ServeArgs),
    /// Fetch an artifact (id or trusted name) into the running node's store.
    Pull {
        /// Artifact id (hex) or trusted release name.
        artifact: String,
        /// Admin API of the running node.
        #[arg(long, default_value = "127.0.0.1:7070", env = "SHOAL_API")]
        api: String,
        /// Start the download and return without waiting.
        #[arg(long)]
        no_wait: bool,
        /// Seconds to wait for a peer that holds the artifact (while the
        /// node has no peers, or none of them has it yet) before failing.
        #[arg(long, default_value_t = 60, value_name = "SECS")]
        timeout: u64,
    },
    /// List connected and banned peers of the running node.
    Peers {
        /// Admin API of the running node.
        #[arg(long, default_value = "127.0.0.1:7070", env = "SHOAL_API")]
        api: String,
    },
    /// Show the running node's status.
    Status {
        /// Admin API of the running node.
        #[arg(long, default_value = "127.0.0.1:7070", env = "SHOAL_API")]
        api: String,
    },
    /// Pre-shared keys for private meshes.
    #[command(subcommand)]
    Psk(PskCmd),
}

/// `shoal psk ...`.
#[derive(Subcommand, Debug)]
pub enum PskCmd {
    /// Write a new random key in swarm.key format (to stdout, or to --out, mode 0600).
    New {
        /// Output file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// `shoal serve` options; unset ones come from the config file (`[mesh]`, `[api]`).
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Mesh listen address (repeatable), e.g. /ip4/0.0.0.0/tcp/7071.
    #[arg(long)]
    listen: Vec<Multiaddr>,
    /// Admin/HTTP API address.
    #[arg(long)]
    api: Option<SocketAddr>,
    /// Static peer (repeatable), e.g. /ip4/10.0.0.2/tcp/7071.
    #[arg(long)]
    peer: Vec<Multiaddr>,
    /// Turn LAN discovery (mDNS) off.
    #[arg(long)]
    no_mdns: bool,
    /// Pre-shared key file: only nodes with the same key can connect.
    #[arg(long)]
    psk_file: Option<PathBuf>,
    /// Never contact anything but the mesh (no origin fetches).
    #[arg(long)]
    offline: bool,
    /// Secure channels offered to peers, most preferred first (overrides
    /// mesh.security), e.g. `tls,noise` or `noise`.
    #[arg(long, value_delimiter = ',', value_name = "CHANNELS")]
    security: Vec<shoal::mesh::secure::SecureChannel>,
    /// Extra CA certificates (PEM) trusted for https:// origins, besides the
    /// system bundle (overrides mesh.origin_ca_file).
    #[arg(long, value_name = "FILE")]
    origin_ca_file: Option<PathBuf>,
    /// Only these peer ids may connect (repeatable).
    #[arg(long)]
    allow_peer: Vec<PeerId>,
    /// Test mode: serve chunks with flipped bytes (a lying peer).
    #[arg(long, hide = true)]
    test_corrupt_chunks: bool,
}

/// glibc's malloc, tuned for a daemon that moves chunks all day: every
/// transfer allocates and frees frame buffers of 256 KiB (yamux) and chunk
/// buffers of 1 MiB. With glibc's defaults the first such buffers are
/// mmapped and unmapped, and freed heap tops above 2x the largest buffer
/// seen are handed back to the kernel, so the next buffer faults its pages
/// in again: about 100 000 page faults per GiB transferred, against 17 000
/// with these settings (docs/benchmarks.md). Up to 64 MiB of freed heap is
/// kept per arena; only allocations of 4 MiB and more get their own
/// mapping (the model's weights are file mappings, untouched by this).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: called before any other thread exists; mallopt only sets
    // allocator parameters and reports failure by returning 0.
    unsafe {
        let ok = libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20) == 1;
        if !ok {
            tracing::warn!("mallopt refused the daemon's malloc settings; using glibc defaults");
        }
    }
}

/// Runs a mesh command.
pub fn run(ctx: &Ctx, src: &ConfigSource, cmd: MeshCmd) -> Result<()> {
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    match cmd {
        MeshCmd::Serve(args) => {
            // A daemon must outlive any peer that hangs up: a write to a
            // socket closed by the other side has to fail with EPIPE, not
            // kill the process (main sets SIGPIPE to its default for the
            // short-lived commands, `shoal ls | head`). Set before the
            // runtime starts its threads.
            // SAFETY: only the main thread exists here; SIG_IGN is async-signal-safe.
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            }
            keep_freed_memory();
            // The daemon's runtime size is a setting (`async_threads`).
            let cfg = src.load()?;
            if cfg.async_threads > 0 {
                rt.worker_threads(cfg.async_threads);
            }
            rt.build()?.block_on(serve(ctx, cfg, args))
        }
        MeshCmd::Pull {
            artifact,
            api,
            no_wait,
            timeout,
        } => rt.build()?.block_on(pull(
            ctx,
            &api,
            &artifact,
            no_wait,
            Duration::from_secs(timeout),
        )),
        MeshCmd::Peers { api } => rt.build()?.block_on(peers(ctx, &api)),
        MeshCmd::Status { api } => rt.build()?.block_on(status(ctx, &api)),
        MeshCmd::Psk(PskCmd::New { out }) => psk_new(out),
    }
}

async fn serve(ctx: &Ctx, cfg: shoal::settings::Config, args: ServeArgs) -> Result<()> {
    // Defaults < file < SHOAL_* environment < flags: the config gives the
    // data dir, store, mesh, serving and API settings; serve's own flags
    // adjust the mesh and the API address.
    let mut opts = DaemonOptions::from_config(&cfg, &ctx.data_dir)?;
    let mesh = &mut opts.node.mesh;
    if !args.listen.is_empty() {
        mesh.listen = args.listen;
    }
    mesh.peers.extend(args.peer);
    mesh.mdns &= !args.no_mdns;
    mesh.offline |= args.offline;
    if !args.security.is_empty() {
        mesh.security = args.security;
    }
    mesh.test_corrupt_chunks = args.test_corrupt_chunks;
    if let Some(f) = args.psk_file {
        mesh.psk = Some(mesh::read_psk(&f)?);
    }
    if let Some(f) = args.origin_ca_file {
        shoal::mesh::origin::read_ca_file(&f)
            .with_context(|| format!("--origin-ca-file {}", f.display()))?;
        mesh.origin_ca_file = Some(f);
    }
    mesh.allow_peers.extend(args.allow_peer);
    let api_addr = args.api.unwrap_or(cfg.api.listen);
    let listener = tokio::net::TcpListener::bind(api_addr)
        .await
        .with_context(|| format!("binding the API on {api_addr}"))?;
    let drain = opts.api.drain_timeout;
    // The node, its serving layer and its API; the admin token and the API
    // keys are read (or made) before the API is announced.
    // Signals are caught from here on: one that comes while the node starts
    // (its API may already answer) is acted on once it runs.
    let serving_cell = std::sync::Arc::new(std::sync::OnceLock::new());
    let stop = watch_signals(drain, serving_cell.clone())?;
    let daemon = Daemon::start(opts, listener).await?;
    let _ = serving_cell.set(daemon.serving().clone());
    eprintln!(
        "shoal node {} serving; API on http://{}",
        daemon.node().mesh().peer_id(),
        daemon.addr()
    );
    // Where the CLI beside this daemon finds its admin API (store commands
    // while the daemon holds the store: see cmd/store.rs).
    super::store::write_api_addr(&ctx.data_dir, daemon.addr());
    let stopped = daemon
        .run_until(async move {
            let _ = stop.await;
        })
        .await;
    match stopped {
        Err(e @ DaemonError::DrainTimeout { .. }) => {
            eprintln!("shoal: {e}; exiting with status 1");
            std::process::exit(1);
        }
        other => Ok(other?),
    }
}

/// How long after the drain deadline the signal thread ends the process
/// itself, should the daemon's async workers be too busy to end it.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Watches SIGINT and SIGTERM on a thread of its own (with its own small
/// runtime), so that a signal is seen even if the daemon's async workers
/// are busy. The first signal resolves the returned receiver (the daemon
/// stops accepting and drains, within `drain`: [`Daemon::shutdown`]); on a
/// second signal, or if the daemon has not exited shortly after `drain`,
/// the process exits with status 1, logging the requests still running.
/// `serving` is filled in once the daemon runs (empty when a signal
/// comes during the start).
fn watch_signals(
    drain: Duration,
    serving: std::sync::Arc<std::sync::OnceLock<std::sync::Arc<shoal::serve::Serving>>>,
) -> Result<tokio::sync::oneshot::Receiver<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut term, mut int) = {
        let _in_rt = rt.enter();
        (
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        )
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("shoal-signals".into())
        .spawn(move || {
            rt.block_on(async move {
                let first = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                tracing::info!(signal = first, timeout = ?drain, "shutting down: draining open requests");
                let _ = tx.send(());
                let why = tokio::select! {
                    _ = tokio::time::sleep(drain + DRAIN_GRACE) => "the drain timeout passed",
                    _ = term.recv() => "a second signal came",
                    _ = int.recv() => "a second signal came",
                };
                let running = serving
                    .get()
                    .map(|s| shoal::daemon::still_running(s))
                    .unwrap_or_default();
                tracing::error!(
                    still_running = ?running,
                    timeout = ?drain,
                    "drain timeout: {why} before open requests finished; exiting anyway"
                );
                eprintln!(
                    "shoal: drain timeout: {why} before open requests finished (still running: {}); exiting with status 1",
                    if running.is_empty() {
                        "open HTTP connections".to_owned()
                    } else {
                        running.join(", ")
                    }
                );
                std::process::exit(1);
            });
        })?;
    Ok(rx)
}

fn human(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

fn progress_line(p: &Progress, rate: f64) -> String {
    let pct = if p.total_bytes == 0 {
        0.0
    } else {
        p.have_bytes as f64 * 100.0 / p.total_bytes as f64
    };
    let width = 30usize;
    let filled = ((pct / 100.0) * width as f64) as usize;
    let bar: String = "#".repeat(filled.min(width)) + &"-".repeat(width - filled.min(width));
    let eta = if rate > 0.0 {
        format!(
            "{:.0}s",
            (p.total_bytes.saturating_sub(p.have_bytes)) as f64 / rate
        )
    } else {
        "?".into()
    };
    format!(
        "[{bar}] {pct:5.1}% {} / {}  {}/s  peers {}  eta {eta}",
        human(p.have_bytes as f64),
        human(p.total_bytes as f64),
        human(rate),
        p.peers
    )
}

async fn pull(
    ctx: &Ctx,
    api: &str,
    artifact: &str,
    no_wait: bool,
    timeout: Duration,
) -> Result<()> {
    let c = ctx.admin_client(api);
    let deadline = Instant::now() + timeout;
    let mut said_waiting = false;
    let mut say_waiting = |what: &str| {
        if !said_waiting && !ctx.json {
            eprintln!("waiting for peers ({what}; up to {}s)", timeout.as_secs());
            said_waiting = true;
        }
    };
    // The daemon looks for a manifest holder until the deadline; a name it
    // does not know yet is retried while it has no peer to learn it from.
    let started: PullStarted = loop {
        let req = PullRequest {
            artifact: artifact.to_owned(),
            wait_secs: Some(
                deadline
                    .saturating_duration_since(Instant::now())
                    .as_secs()
                    .max(1),
            ),
        };
        match c.post("/admin/pull", &req).await {
            Ok(s) => break s,
            Err(e) if e.contains(": 404 ") && Instant::now() < deadline => {
                let s: StatusReport = c.get("/admin/status").await.map_err(anyhow::Error::msg)?;
                if s.connected > 0 {
                    bail!(e);
                }
                say_waiting("no peer knows this name yet");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => bail!(e),
        }
    };
    if no_wait {
        if ctx.json {
            ctx.print_json(&started)?;
        } else {
            println!("{}", started.id);
        }
        return Ok(());
    }
    // A long poll: the answer comes when the download ends, or after 200 ms.
    let path = format!("/admin/pull/{}?wait_ms=200", started.id);
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (mut last_bytes, mut last_t) = (started.progress.have_bytes, Instant::now());
    let mut rate = 0.0f64;
    let mut printed = Instant::now() - Duration::from_secs(10);
    let p = loop {
        let p: Progress = c.get(&path).await.map_err(anyhow::Error::msg)?;
        let dt = last_t.elapsed().as_secs_f64();
        if dt >= 0.5 {
            let inst = p.have_bytes.saturating_sub(last_bytes) as f64 / dt;
            rate = if rate == 0.0 {
                inst
            } else {
                0.7 * rate + 0.3 * inst
            };
            last_bytes = p.have_bytes;
            last_t = Instant::now();
        }
        if p.phase.is_final() {
            break p;
        }
        if p.phase == Phase::Finding && p.connected == Some(0) {
            say_waiting("no peer connected");
            continue;
        }
        if !ctx.json && (tty || printed.elapsed() >= Duration::from_secs(5)) {
            let line = progress_line(&p, rate);
            if tty {
                eprint!("\r{line}");
            } else {
                eprintln!("{line}");
            }
            let _ = std::io::stderr().flush();
            printed = Instant::now();
        }
    };
    if tty && !ctx.json {
        eprintln!();
    }
    if ctx.json {
        ctx.print_json(&p)?;
    }
    if p.phase == Phase::Failed {
        bail!(
            "pull of {} failed: {}",
            started.id,
            p.error.unwrap_or_default()
        );
    }
    if !ctx.json {
        let secs = p.elapsed_ms as f64 / 1000.0;
        println!(
            "{}  {}  in {secs:.1}s  (peers {}, origin {}, local {} chunks, {} bad chunks, banned {})",
            started.id,
            human(p.total_bytes as f64),
            human(p.bytes_from_peers as f64),
            human(p.bytes_from_origin as f64),
            p.local_chunks,
            p.bad_chunks,
            p.banned.len()
        );
    }
    Ok(())
}

async fn peers(ctx: &Ctx, api: &str) -> Result<()> {
    let r: PeersReport = ctx
        .admin_client(api)
        .get("/admin/peers")
        .await
        .map_err(anyhow::Error::msg)?;
    if ctx.json {
        return ctx.print_json(&r);
    }
    println!("this node: {}", r.peer_id);
    if r.peers.is_empty() {
        println!("no peers");
    }
    for p in r.peers {
        match p.banned {
            Some(why) => println!("{}  BANNED: {why}", p.peer_id),
            None => println!(
                "{}  {}  {}s  {}",
                p.peer_id, p.addr, p.connected_secs, p.agent
            ),
        }
    }
    Ok(())
}

async fn status(ctx: &Ctx, api: &str) -> Result<()> {
    let s: StatusReport = ctx
        .admin_client(api)
        .get("/admin/status")
        .await
        .map_err(anyhow::Error::msg)?;
    if ctx.json {
        return ctx.print_json(&s);
    }
    println!("node      {}", s.peer_id);
    println!("uptime    {}s", s.uptime_secs);
    println!("listen    {}", s.listen.join(" "));
    println!(
        "mesh      {} peers, mDNS {}, {}",
        s.connected,
        if s.mdns { "on" } else { "off" },
        if s.offline {
            "offline"
        } else {
            "origin allowed"
        }
    );
    println!(
        "served    {} in {} chunks{}",
        human(s.served.bytes as f64),
        s.served.chunks,
        if s.served.corrupted > 0 {
            format!(" ({} CORRUPTED: test mode)", s.served.corrupted)
        } else {
            String::new()
        }
    );
    if let Some(list) = s.artifacts.as_array() {
        println!("artifacts {}", list.len());
        for a in list {
            println!(
                "  {}  {}  {}  {}",
                a["id"].as_str().unwrap_or("?"),
                a["status"].as_str().unwrap_or("?"),
                human(a["size"].as_f64().unwrap_or(0.0)),
                a["names"]
                    .as_array()
                    .map(|n| n
                        .iter()
                        .filter_map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join(","))
                    .unwrap_or_default()
            );
        }
    }
    for d in &s.downloads {
        println!(
            "download  {}  {:?}  {}/{} chunks{}",
            d.id,
            d.phase,
            d.have_chunks,
            d.total_chunks,
            d.error
                .as_ref()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn psk_new(out: Option<PathBuf>) -> Result<()> {
    let key = mesh::new_psk()?;
    match out {
        None => print!("{key}"),
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .with_context(|| format!("creating {} (it must not exist)", path.display()))?;
            f.write_all(key.as_bytes())?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}
