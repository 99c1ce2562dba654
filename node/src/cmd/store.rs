//! Content-store subcommands: add, ls, show, verify, fsck, pin, unpin, rm, gc, keygen, trust, publish.

use super::{Ctx, human_bytes};
use anyhow::{Context, Result, bail};
use clap::Subcommand;
use serde_json::json;
use shoal::store::{AddOptions, ArtifactStatus, Store, release};
use std::path::PathBuf;

/// Content-store commands (they open the store directly; stop `shoal serve` first
/// or use its API).
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

/// Runs a store command.
pub fn run(ctx: &Ctx, cmd: StoreCmd) -> Result<()> {
    if let StoreCmd::Fsck | StoreCmd::Verify { repair: true, .. } = cmd {
        return fsck(ctx);
    }
    let store = ctx.store()?;
    match cmd {
        StoreCmd::Add {
            file,
            name,
            pin,
            reflink,
        } => add(ctx, &store, &file, name, pin, reflink)?,
        StoreCmd::Ls => ls(ctx, &store)?,
        StoreCmd::Show { artifact } => show(ctx, &store, &artifact)?,
        StoreCmd::Verify { artifact, .. } => verify(ctx, &store, artifact)?,
        StoreCmd::Pin { artifact } => set_pin(&store, &artifact, true)?,
        StoreCmd::Unpin { artifact } => set_pin(&store, &artifact, false)?,
        StoreCmd::Rm { artifact } => {
            let id = store.resolve(&artifact)?;
            let freed = store.remove(&id)?;
            println!("removed {id} ({})", human_bytes(freed));
        }
        StoreCmd::Gc => {
            let r = store.gc()?;
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
    }
    Ok(())
}

/// `shoal store add`.
fn add(
    ctx: &Ctx,
    store: &Store,
    file: &std::path::Path,
    name: Option<String>,
    pin: bool,
    reflink: bool,
) -> Result<()> {
    if !file.exists() {
        bail!("{}: no such file", file.display());
    }
    let id = store
        .add_file(
            file,
            &AddOptions {
                pin,
                reflink,
                ..Default::default()
            },
        )
        .with_context(|| format!("adding {}", file.display()))?;
    let release = match name {
        Some(n) => {
            store.keygen(false)?;
            Some(store.publish(&id, &n, None)?.verify()?)
        }
        None => None,
    };
    if ctx.json {
        ctx.print_json(&json!({"id": id.to_hex(), "name": release.as_ref().map(|r| &r.name), "seq": release.as_ref().map(|r| r.seq)}))?;
    } else {
        println!("{id}");
    }
    Ok(())
}

/// `shoal store ls`.
fn ls(ctx: &Ctx, store: &Store) -> Result<()> {
    let list = store.list()?;
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

/// `shoal store show`.
fn show(ctx: &Ctx, store: &Store, artifact: &str) -> Result<()> {
    let id = store.resolve(artifact)?;
    let m = store
        .manifest(&id)?
        .with_context(|| format!("unknown artifact {artifact}"))?;
    let status = store.status(&id)?;
    if ctx.json {
        return ctx.print_json(&json!({
            "id": id.to_hex(),
            "format": m.format,
            "kind": m.kind.name(),
            "status": status,
            "size": m.size,
            "blake3": m.blake3_hex(),
            "chunks": m.chunks.iter().map(|c| json!({"offset": c.offset, "len": c.len, "blake3": c.hash.to_hex()})).collect::<Vec<_>>(),
            "tensors": m.tensors.iter().map(|t| json!({"name": t.name, "ggml_type": t.ggml_type, "dims": t.dims, "offset": t.offset, "size": t.size, "first_chunk": t.first_chunk, "chunk_count": t.chunk_count})).collect::<Vec<_>>(),
        }));
    }
    println!("id:       {id}");
    println!("kind:     {}", m.kind.name());
    println!(
        "status:   {}",
        status
            .map(|s| format!("{s:?}").to_lowercase())
            .unwrap_or_default()
    );
    println!("size:     {} ({})", m.size, human_bytes(m.size));
    println!("blake3:   {}", m.blake3_hex());
    println!("format:   {}", m.format);
    println!("tensors:  {}", m.tensors.len());
    println!("chunks:   {}", m.chunks.len());
    for (i, c) in m.chunks.iter().enumerate() {
        println!("  {i:>5} {:>12} {:>8} {}", c.offset, c.len, c.hash);
    }
    Ok(())
}

/// `shoal store verify` (without `--repair`, which is fsck).
fn verify(ctx: &Ctx, store: &Store, artifact: Option<String>) -> Result<()> {
    let ids = match artifact {
        Some(a) => vec![store.resolve(&a)?],
        None => store.list()?.into_iter().map(|a| a.id).collect(),
    };
    let mut bad = Vec::new();
    let mut reports = Vec::new();
    for id in ids {
        let r = store.verify(&id)?;
        if !r.ok() {
            // KV blocks computed from these bytes must not outlive them
            // (the daemon drops them too when it learns of the mark).
            let kv_dir = ctx.data_dir.join("kv");
            match shoal::kvcache::purge_model_on_disk(&kv_dir, id.as_bytes()) {
                Ok(0) => {}
                Ok(n) => eprintln!("{id}: dropped {n} KV cache blocks computed from it"),
                Err(e) => eprintln!("{id}: could not drop its KV cache blocks: {e}"),
            }
            for (i, off) in &r.bad_chunks {
                bad.push(format!("{id}: chunk {i} at offset {off} is corrupt"));
            }
            if r.file_ok == Some(false) && r.bad_chunks.is_empty() {
                bad.push(format!("{id}: whole-file BLAKE3 does not match"));
            }
        } else if !ctx.json {
            println!("{id}: ok ({} chunks)", r.checked);
        }
        reports.push(r);
    }
    for p in store.lost_and_found()? {
        bad.push(format!(
            "{}: bytes the store could not account for (moved there, not deleted; see `shoal fsck`)",
            p.display()
        ));
    }
    if ctx.json {
        ctx.print_json(&reports)?;
    }
    if !bad.is_empty() {
        bail!("verification failed:\n{}", bad.join("\n"));
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

fn set_pin(store: &Store, artifact: &str, pinned: bool) -> Result<()> {
    let id = store.resolve(artifact)?;
    store.set_pinned(&id, pinned)?;
    println!("{} {id}", if pinned { "pinned" } else { "unpinned" });
    Ok(())
}
