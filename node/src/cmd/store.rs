//! Content-store subcommands: add, ls, show, verify, fsck, pin, unpin, rm, gc, keygen, trust, publish.

use super::{Ctx, human_bytes};
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::Value;
use serde_json::json;
use shoal::api::store_cmd;
use shoal::store::{ArtifactStatus, Store, release};
use std::path::PathBuf;

/// Content-store commands (they open the store directly; while `shoal serve`
/// holds it, `add`, `ls`, `show`, `verify`, `pin`, `unpin`, `rm` and `gc`
/// (and `import`) go through its admin API).
#[derive(Subcommand, Debug)]
pub enum StoreCmd {
    /// Add a file (GGUF weights, tokenizer, anything) to the store; prints its id.
    Add {
        /// The file.
        file: PathBuf,
        /// Bind a name to it with a release signed by this node's key (made if missing).
        #[arg(long)]
        name: Option<String>,
        /// Pin it: never evicted.
        #[arg(long)]
        pin: bool,
        /// Share the file's blocks instead of copying, where the filesystem can (reflink).
        #[arg(long)]
        reflink: bool,
    },
    /// List artifacts.
    Ls,
    /// Show an artifact's manifest.
    Show {
        /// Id (or unique prefix) or name.
        artifact: String,
    },
    /// Re-hash artifacts; non-zero exit naming the bad chunk on corruption
    /// (the artifact is marked corrupt and not served), or the files in
    /// lost+found/.
    Verify {
        /// Id or name; all artifacts when omitted.
        artifact: Option<String>,
        /// Do what `shoal fsck` does (check and rebuild the metadata, then
        /// verify everything).
        #[arg(long, conflicts_with = "artifact")]
        repair: bool,
    },
    /// Check the store, rebuild damaged metadata from the files (objects/,
    /// keys/, releases/; the damaged copy is moved aside, never deleted) and
    /// re-verify every artifact. Non-zero exit when anything could not be
    /// accounted for (moved to lost+found/) or is corrupt.
    Fsck,
    /// Pin an artifact (never evicted).
    Pin {
        /// Id or name.
        artifact: String,
    },
    /// Unpin an artifact.
    Unpin {
        /// Id or name.
        artifact: String,
    },
    /// Remove an artifact.
    Rm {
        /// Id or name.
        artifact: String,
    },
    /// Collect stale partial downloads and evict down to the quota.
    Gc,
    /// Generate this node's release-signing key (trusted by this node); prints the public key.
    Keygen {
        /// Replace an existing key.
        #[arg(long)]
        force: bool,
    },
    /// Manage the trust store of release publishers.
    #[command(subcommand)]
    Trust(TrustCmd),
    /// Sign a release binding NAME to an artifact id with this node's key.
    Publish {
        /// Id of the artifact.
        artifact: String,
        /// Name, e.g. `smollm2-135m-instruct:q4_1`.
        #[arg(long)]
        name: String,
        /// Origin URL (http:// or https://) peers may fetch missing chunks
        /// from; its manifest goes next to it as `<URL>.manifest`.
        #[arg(long)]
        origin: Option<String>,
    },
    /// Test aid: fills the store with FILE's chunks the way a download does
    /// (partial artifact, chunk by chunk in a scattered order, flushed in
    /// batches), printing progress; used by crash tests.
    #[command(hide = true)]
    DebugFill {
        /// Source of the chunks.
        file: PathBuf,
        /// Pause after each chunk (milliseconds).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Flush every N chunks.
        #[arg(long, default_value_t = 4)]
        flush_every: u32,
    },
}

/// Trust-store commands.
#[derive(Subcommand, Debug)]
pub enum TrustCmd {
    /// Trust a publisher key (64 hex digits).
    Add {
        /// Public key.
        key: String,
        /// A label for people.
        #[arg(long, default_value = "")]
        label: String,
    },
    /// List trusted keys.
    Ls,
    /// Stop trusting a key.
    Rm {
        /// Public key.
        key: String,
    },
}

/// Runs a store command. While a daemon holds the store (its lock), `ls`,
/// `show`, `verify`, `pin`, `unpin`, `rm`, `gc` and `add` go through its
/// admin API ([`shoal::api::store_cmd`]) with the same output and exit code.
pub fn run(ctx: &Ctx, cmd: StoreCmd) -> Result<()> {
    if let StoreCmd::Fsck | StoreCmd::Verify { repair: true, .. } = cmd {
        return fsck(ctx);
    }
    let store = match ctx.store() {
        Ok(s) => s,
        Err(e) if held_by_daemon(&e) && through_daemon(&cmd) => {
            let d = Daemon::connect(ctx, e)?;
            return common(ctx, &Backend::Daemon(d), cmd);
        }
        Err(e) => return Err(e),
    };
    match cmd {
        StoreCmd::Keygen { force } => {
            let existed = store.publisher_key()?.is_some();
            let pk = store.keygen(force)?;
            if existed && !force {
                eprintln!("a key exists already (use --force to replace it)");
            }
            println!("{}", hex::encode(pk));
        }
        StoreCmd::Trust(t) => trust(ctx, &store, t)?,
        StoreCmd::Publish {
            artifact,
            name,
            origin,
        } => {
            if let Some(u) = &origin {
                shoal::mesh::origin::HttpUrl::parse(u).context("--origin")?;
            }
            let id = store.resolve(&artifact)?;
            let s = store.publish(&id, &name, origin)?;
            let r = s.verify()?;
            if ctx.json {
                return ctx.print_json(&json!({"name": r.name, "id": r.id.to_hex(), "seq": r.seq, "publisher": s.publisher_hex(), "release": hex::encode(s.encode())}));
            }
            println!(
                "{} -> {} (seq {}, signed by {})",
                r.name,
                r.id,
                r.seq,
                s.publisher_hex()
            );
        }
        StoreCmd::DebugFill {
            file,
            delay_ms,
            flush_every,
        } => debug_fill(&store, &file, delay_ms, flush_every)?,
        StoreCmd::Fsck => bail!("fsck runs before the store is opened"),
        other => common(ctx, &Backend::Local(store), other)?,
    }
    Ok(())
}

/// Whether `cmd` can run through a daemon's admin API.
fn through_daemon(cmd: &StoreCmd) -> bool {
    matches!(
        cmd,
        StoreCmd::Add { .. }
            | StoreCmd::Ls
            | StoreCmd::Show { .. }
            | StoreCmd::Verify { .. }
            | StoreCmd::Pin { .. }
            | StoreCmd::Unpin { .. }
            | StoreCmd::Rm { .. }
            | StoreCmd::Gc
    )
}

/// Whether opening the store failed because another process (a daemon)
/// holds its lock.
pub fn held_by_daemon(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<shoal::store::OpenError>(),
        Some(shoal::store::OpenError::Locked(_))
    )
}

/// Name of the file in the data dir where `shoal serve` writes its API
/// address (`host:port`) for the CLI beside it.
pub const API_ADDR_FILE: &str = "api.addr";

/// Writes [`API_ADDR_FILE`] (a loopback address when the API listens on
/// every address); a failure is only logged.
pub fn write_api_addr(data_dir: &std::path::Path, mut addr: std::net::SocketAddr) {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let p = data_dir.join(API_ADDR_FILE);
    if let Err(e) = std::fs::write(&p, format!("{addr}\n")) {
        tracing::warn!(path = %p.display(), error = %e, "cannot write the API address for the CLI");
    }
}

/// The admin API of the daemon that holds the store.
struct Daemon {
    api: shoal::api::client::AdminClient,
    addr: String,
    rt: tokio::runtime::Runtime,
}

impl Daemon {
    /// Finds the daemon's API (`<data_dir>/api.addr`, else `api.listen`);
    /// `locked` is the error of opening the store, kept for the message.
    fn connect(ctx: &Ctx, locked: anyhow::Error) -> Result<Daemon> {
        let from_file = std::fs::read_to_string(ctx.data_dir.join(API_ADDR_FILE))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty());
        let addr = match (from_file, ctx.api_listen) {
            (Some(a), _) => a,
            (None, Some(mut a)) => {
                if a.ip().is_unspecified() {
                    a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                a.to_string()
            }
            (None, None) => return Err(locked),
        };
        let api = ctx.admin_client(&addr);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Daemon { api, addr, rt })
    }

    fn call<T: serde::de::DeserializeOwned>(&self, path: &str, body: Option<Value>) -> Result<T> {
        // Hashing a large file (add, verify) takes a while; the rest is quick.
        let secs = match path {
            "/admin/store/add" | "/admin/store/verify" | "/admin/store/import" => 3600,
            _ => 60,
        };
        let api = self
            .api
            .clone()
            .with_timeout(std::time::Duration::from_secs(secs));
        let r = self.rt.block_on(async {
            match body {
                Some(b) => api.post(path, &b).await,
                None => api.get(path).await,
            }
        });
        r.map_err(|e| {
            anyhow::anyhow!(
                "{e}\n(the store is held by the running daemon; this command went through its admin API at {})",
                self.addr
            )
        })
    }
}

/// `shoal import` through the admin API of the daemon that holds the store
/// (`locked`: the error of opening it).
pub fn import_via_daemon(
    ctx: &Ctx,
    locked: anyhow::Error,
    path: &std::path::Path,
    pin: bool,
    no_names: bool,
) -> Result<Vec<shoal::import::Imported>> {
    let d = Daemon::connect(ctx, locked)?;
    // The daemon's working directory is not ours.
    let path = path
        .canonicalize()
        .with_context(|| format!("{}", path.display()))?;
    let req = store_cmd::ImportRequest {
        path,
        pin,
        no_names,
    };
    Ok(serde_json::from_value(d.call(
        "/admin/store/import",
        Some(serde_json::to_value(&req)?),
    )?)?)
}

/// Where a store command runs.
enum Backend {
    /// On the store opened by this process.
    Local(Store),
    /// Through the admin API of the daemon that holds it.
    Daemon(Daemon),
}

impl Backend {
    fn ls(&self) -> Result<Vec<shoal::store::ArtifactInfo>> {
        match self {
            Backend::Local(s) => Ok(s.list()?),
            Backend::Daemon(d) => Ok(serde_json::from_value(d.call("/admin/store/ls", None)?)?),
        }
    }

    fn show(&self, artifact: &str) -> Result<Value> {
        match self {
            Backend::Local(s) => Ok(store_cmd::show(s, artifact)?),
            Backend::Daemon(d) => d.call("/admin/store/show", Some(json!({"artifact": artifact}))),
        }
    }

    fn verify(&self, ctx: &Ctx, artifact: Option<&str>) -> Result<store_cmd::VerifyAnswer> {
        match self {
            Backend::Local(s) => Ok(store_cmd::verify(
                s,
                artifact,
                Some(&ctx.data_dir.join("kv")),
            )?),
            Backend::Daemon(d) => {
                d.call("/admin/store/verify", Some(json!({"artifact": artifact})))
            }
        }
    }

    fn pin(&self, artifact: &str, pinned: bool) -> Result<Value> {
        match self {
            Backend::Local(s) => Ok(store_cmd::set_pinned(s, artifact, pinned)?),
            Backend::Daemon(d) => d.call(
                "/admin/store/pin",
                Some(json!({"artifact": artifact, "pinned": pinned})),
            ),
        }
    }

    fn rm(&self, artifact: &str) -> Result<Value> {
        match self {
            Backend::Local(s) => Ok(store_cmd::rm(s, artifact)?),
            Backend::Daemon(d) => d.call("/admin/store/rm", Some(json!({"artifact": artifact}))),
        }
    }

    fn gc(&self) -> Result<shoal::store::GcReport> {
        match self {
            Backend::Local(s) => Ok(s.gc()?),
            Backend::Daemon(d) => Ok(serde_json::from_value(
                d.call("/admin/store/gc", Some(json!({})))?,
            )?),
        }
    }

    fn add(&self, req: &store_cmd::AddRequest) -> Result<Value> {
        match self {
            Backend::Local(s) => {
                Ok(store_cmd::add(s, req)
                    .with_context(|| format!("adding {}", req.path.display()))?)
            }
            Backend::Daemon(d) => d.call("/admin/store/add", Some(serde_json::to_value(req)?)),
        }
    }
}

/// The commands that run on a store or through the daemon holding it.
fn common(ctx: &Ctx, b: &Backend, cmd: StoreCmd) -> Result<()> {
    match cmd {
        StoreCmd::Add {
            file,
            name,
            pin,
            reflink,
        } => {
            if !file.exists() {
                bail!("{}: no such file", file.display());
            }
            // The daemon's working directory is not ours.
            let path = file
                .canonicalize()
                .with_context(|| format!("{}", file.display()))?;
            let v = b.add(&store_cmd::AddRequest {
                path,
                name,
                pin,
                reflink,
            })?;
            if ctx.json {
                ctx.print_json(&v)?;
            } else {
                println!("{}", v["id"].as_str().unwrap_or_default());
            }
        }
        StoreCmd::Ls => ls(ctx, b.ls()?)?,
        StoreCmd::Show { artifact } => show(ctx, b.show(&artifact)?)?,
        StoreCmd::Verify { artifact, .. } => {
            let r = b.verify(ctx, artifact.as_deref())?;
            for n in &r.notes {
                eprintln!("{n}");
            }
            if ctx.json {
                ctx.print_json(&r.reports)?;
            } else {
                for l in &r.ok {
                    println!("{l}");
                }
            }
            if !r.bad.is_empty() {
                bail!("verification failed:\n{}", r.bad.join("\n"));
            }
        }
        StoreCmd::Pin { artifact } => set_pin(b, &artifact, true)?,
        StoreCmd::Unpin { artifact } => set_pin(b, &artifact, false)?,
        StoreCmd::Rm { artifact } => {
            let v = b.rm(&artifact)?;
            println!(
                "removed {} ({})",
                v["id"].as_str().unwrap_or_default(),
                human_bytes(v["freed"].as_u64().unwrap_or(0))
            );
        }
        StoreCmd::Gc => {
            let r = b.gc()?;
            if ctx.json {
                return ctx.print_json(&r);
            }
            println!(
                "evicted {} artifact(s), removed {} stale partial(s), freed {}",
                r.evicted.len(),
                r.partials_removed.len(),
                human_bytes(r.bytes_freed)
            );
        }
        other => bail!("{other:?} does not run through the daemon"),
    }
    Ok(())
}

/// `shoal store ls`.
fn ls(ctx: &Ctx, list: Vec<shoal::store::ArtifactInfo>) -> Result<()> {
    if ctx.json {
        return ctx.print_json(&list);
    }
    println!(
        "{:<14} {:<9} {:<7} {:>10} {:>6}  NAMES",
        "ID", "KIND", "STATUS", "SIZE", "PINNED"
    );
    for a in list {
        let status = match a.status {
            ArtifactStatus::Active if a.corrupt.is_some() => "CORRUPT".to_string(),
            ArtifactStatus::Active => "active".to_string(),
            ArtifactStatus::Partial => {
                format!("{}%", a.present_bytes * 100 / a.size.max(1))
            }
        };
        println!(
            "{:<14} {:<9} {:<7} {:>10} {:>6}  {}",
            a.id.short(),
            a.kind.name(),
            status,
            human_bytes(a.size),
            if a.pinned { "yes" } else { "" },
            a.names.join(",")
        );
    }
    Ok(())
}

/// `shoal store show`, from [`store_cmd::show`]'s answer.
fn show(ctx: &Ctx, v: Value) -> Result<()> {
    if ctx.json {
        return ctx.print_json(&v);
    }
    let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    let len = |k: &str| v[k].as_array().map_or(0, Vec::len);
    println!("id:       {}", s("id"));
    println!("kind:     {}", s("kind"));
    println!("status:   {}", s("status").to_lowercase());
    println!("size:     {} ({})", n("size"), human_bytes(n("size")));
    println!("blake3:   {}", s("blake3"));
    println!("format:   {}", v["format"]);
    println!("tensors:  {}", len("tensors"));
    println!("chunks:   {}", len("chunks"));
    for (i, c) in v["chunks"].as_array().into_iter().flatten().enumerate() {
        println!(
            "  {i:>5} {:>12} {:>8} {}",
            c["offset"].as_u64().unwrap_or(0),
            c["len"].as_u64().unwrap_or(0),
            c["blake3"].as_str().unwrap_or_default()
        );
    }
    Ok(())
}

/// `shoal store trust ...`.
fn trust(ctx: &Ctx, store: &Store, t: TrustCmd) -> Result<()> {
    match t {
        TrustCmd::Add { key, label } => {
            let k = release::parse_public_key(&key)?;
            store.trust_add(k, &label)?;
            println!("trusted {}", hex::encode(k));
        }
        TrustCmd::Ls => {
            let l = store.trust_list()?;
            if ctx.json {
                let v: Vec<_> = l
                    .iter()
                    .map(|(k, lab)| json!({"key": hex::encode(k), "label": lab}))
                    .collect();
                return ctx.print_json(&v);
            }
            for (k, lab) in l {
                println!("{} {lab}", hex::encode(k));
            }
        }
        TrustCmd::Rm { key } => {
            let k = release::parse_public_key(&key)?;
            if !store.trust_remove(&k)? {
                bail!("key {key} was not trusted");
            }
            println!("removed {key}");
        }
    }
    Ok(())
}

/// `shoal fsck`.
fn fsck(ctx: &Ctx) -> Result<()> {
    if let Some(e) = &ctx.config_error {
        bail!("configuration: {e}");
    }
    let (store, reports) = Store::fsck(&ctx.data_dir, ctx.store_opts.clone())
        .with_context(|| format!("checking the store in {}", ctx.data_dir.display()))?;
    let rec = store.recovery_report();
    let lost = store.lost_and_found()?;
    let corrupt: Vec<_> = reports.iter().filter(|r| !r.ok()).collect();
    if ctx.json {
        ctx.print_json(&json!({
            "recovery": rec,
            "lost_and_found": lost,
            "verified": reports,
            "artifacts": store.list()?.len(),
        }))?;
    } else {
        if let Some(p) = &rec.meta_moved_to {
            println!(
                "damaged metadata moved aside to {} (not deleted); rebuilt from the files",
                p.display()
            );
        }
        for id in &rec.reregistered {
            println!("recovered {id} (its bytes match its id; active, unpinned)");
        }
        for id in &rec.partials_recovered {
            println!("recovered partial download {id}");
        }
        for n in &rec.names_restored {
            println!("restored name {n}");
        }
        if rec.keys_restored > 0 {
            println!("restored {} trusted key(s)", rec.keys_restored);
        }
        for id in &rec.forgotten {
            println!("forgot {id} (its file was gone)");
        }
        for l in &rec.lost {
            println!(
                "moved {} to {}: {}",
                l.from.display(),
                l.to.display(),
                l.why
            );
        }
        for r in &reports {
            if r.ok() {
                println!("{}: ok ({} chunks)", r.id, r.checked);
            }
        }
    }
    let mut bad: Vec<String> = corrupt
        .iter()
        .map(|r| {
            format!(
                "{}: corrupt (bad chunks {:?}); marked, not served until its bad chunks are fetched again from peers",
                r.id,
                r.bad_chunks.iter().map(|(i, _)| *i).collect::<Vec<_>>()
            )
        })
        .collect();
    for p in &lost {
        bad.push(format!(
            "{}: could not be accounted for (kept in lost+found/, not deleted)",
            p.display()
        ));
    }
    if !bad.is_empty() {
        bail!("fsck found problems:\n{}", bad.join("\n"));
    }
    Ok(())
}

fn debug_fill(
    store: &Store,
    file: &std::path::Path,
    delay_ms: u64,
    flush_every: u32,
) -> Result<()> {
    use std::io::Write;
    let data = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let m = shoal::store::build_manifest(file, &data, None)?;
    let id = m.id();
    let have = store.begin(&m)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "id {id}")?;
    writeln!(out, "present {}", have.count())?;
    out.flush()?;
    let n = m.chunk_count();
    // A scattered order (stride coprime with n), like a swarm's rarest-first.
    let stride = (1..n.max(2)).rev().find(|s| gcd(*s, n) == 1).unwrap_or(1);
    let mut since_flush = 0;
    for k in 0..n {
        let i = (k * stride) % n.max(1);
        if have.get(i) {
            continue;
        }
        let c = m.chunks[i as usize];
        store.put_chunk(
            &id,
            i,
            &data[c.offset as usize..(c.offset + u64::from(c.len)) as usize],
        )?;
        writeln!(out, "wrote {i}")?;
        since_flush += 1;
        if since_flush >= flush_every {
            store.flush(&id)?;
            writeln!(
                out,
                "flushed {}",
                store.have_map(&id)?.map(|h| h.count()).unwrap_or(0)
            )?;
            since_flush = 0;
        }
        out.flush()?;
        if delay_ms > 0 {
            std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        }
    }
    store.finish(&id)?;
    writeln!(out, "done {id}")?;
    Ok(())
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

fn set_pin(b: &Backend, artifact: &str, pinned: bool) -> Result<()> {
    let v = b.pin(artifact, pinned)?;
    println!(
        "{} {}",
        if pinned { "pinned" } else { "unpinned" },
        v["id"].as_str().unwrap_or_default()
    );
    Ok(())
}
