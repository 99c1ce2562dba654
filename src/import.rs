//! Importing models people already have: GGUF files in a directory tree,
//! Hugging Face cache folders and Ollama's blob store.
//!
//! [`scan`] walks a path and finds, without reading model bytes:
//!
//! - Hugging Face cache repositories, `models--{org}--{name}/snapshots/{rev}/**/*.gguf`
//!   (symlinks into `blobs/`, resolved); the revision `refs/main` points at
//!   wins a name shared by several revisions;
//! - Ollama stores, a directory with `manifests/` and `blobs/`: each manifest
//!   `manifests/{registry}/{namespace}/{model}/{tag}` (JSON) names its model layer
//!   (media type `application/vnd.ollama.image.model`) as `blobs/sha256-{hex}`;
//! - any other `*.gguf` file (symlinks to files are followed, to directories not).
//!
//! [`import`] adds each one with [`Store::add_file`] without copying twice
//! where the filesystem allows: Hugging Face and Ollama blobs, which their
//! tools never modify in place, are hard-linked into the store (same
//! filesystem); plain files, which people may edit, are reflinked (shared
//! blocks, copy-on-write) where the filesystem can, else copied. Then it names it with a release signed by this node's key
//! ([`Store::publish`]). Names are derived from the source and sanitized to
//! `[a-z0-9._-]` with one `:tag`: `models--bartowski--SmolLM2-135M-Instruct-GGUF`
//! with file `SmolLM2-135M-Instruct-Q4_K_M.gguf` gives
//! `smollm2-135m-instruct:q4_k_m`; Ollama's `library/llama3.2:3b` gives
//! `llama3.2:3b`; a file `TinyStories.Q8_0.gguf` gives `tinystories:q8_0`.

use crate::store::{AddOptions, ArtifactId, ArtifactKind, Store, StoreError, release};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

/// Media type of the model layer in an Ollama manifest.
pub const OLLAMA_MODEL_MEDIA_TYPE: &str = "application/vnd.ollama.image.model";

/// Errors from scanning or importing.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// A filesystem operation failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// An Ollama manifest that does not parse or names no model layer.
    #[error("Ollama manifest {path}: {message}")]
    OllamaManifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// Nothing importable was found.
    #[error("no GGUF models found under {0}")]
    NothingFound(PathBuf),
    /// The store refused a file or a name.
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> ImportError + 'a {
    move |source| ImportError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// Where a candidate was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// A plain `.gguf` file.
    File,
    /// A Hugging Face cache repository.
    HuggingFace,
    /// An Ollama model store.
    Ollama,
}

/// A model found by [`scan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Candidate {
    /// The file holding the bytes (symlinks resolved).
    pub path: PathBuf,
    /// Where it was found, for people: the snapshot path or `model:tag`.
    pub origin: String,
    /// The release name it will get.
    pub name: String,
    /// The layout it came from.
    pub layout: Layout,
    /// Size in bytes.
    pub size: u64,
}

/// Options for [`import`].
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Pin imported artifacts (never evicted).
    pub pin: bool,
    /// Do not name the artifacts (no releases, no key needed).
    pub no_names: bool,
}

/// What happened to one candidate.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Imported {
    /// The candidate.
    #[serde(flatten)]
    pub candidate: Candidate,
    /// Its artifact id, when added.
    pub id: Option<ArtifactId>,
    /// Whether the store already held it.
    pub already_present: bool,
    /// Why it failed, if it did (the import goes on with the others).
    pub error: Option<String>,
}

/// Makes a release-name part: lower case, `[a-z0-9._-]`, no leading or trailing
/// punctuation, runs of `-` collapsed; never empty.
pub fn sanitize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars().flat_map(char::to_lowercase) {
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c) {
            c
        } else {
            '-'
        };
        if c == '-' && out.ends_with('-') {
            continue;
        }
        out.push(c);
    }
    let out = out.trim_matches(|c| "._-".contains(c)).to_owned();
    if out.is_empty() { "model".into() } else { out }
}

/// Builds `name:tag` from raw parts, sanitized and cut to the store's limit.
pub fn release_name(name: &str, tag: &str) -> String {
    let (mut n, t) = (sanitize(name), sanitize(tag));
    let t: String = t.chars().take(40).collect();
    let room = release::MAX_NAME.saturating_sub(t.len() + 1);
    n.truncate(room);
    let n = n.trim_end_matches(|c| "._-".contains(c));
    format!("{}:{t}", if n.is_empty() { "model" } else { n })
}

/// Quantization-looking last word of a file stem (`Q4_K_M`, `q8_0`, `f16`, `IQ3_XS`, `bf16`).
fn quant_suffix(stem: &str) -> Option<(&str, &str)> {
    let i = stem.rfind(['.', '-'])?;
    let (base, q) = (&stem[..i], &stem[i + 1..]);
    let ql = q.to_ascii_lowercase();
    let looks = ql.starts_with('q') && ql[1..].starts_with(|c: char| c.is_ascii_digit())
        || ql.starts_with("iq") && ql[2..].starts_with(|c: char| c.is_ascii_digit())
        || ["f16", "f32", "bf16", "fp16"].contains(&ql.as_str());
    (looks && !base.is_empty()).then_some((base, q))
}

/// Name for a plain GGUF file: `stem:quant`, or `stem:latest`.
pub fn name_for_file(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    match quant_suffix(&stem) {
        Some((base, q)) => release_name(base, q),
        None => release_name(&stem, "latest"),
    }
}

/// Name for a file of Hugging Face repository `repo` (without the org).
pub fn name_for_hf(repo: &str, file: &Path) -> String {
    let repo = repo
        .strip_suffix("-GGUF")
        .or_else(|| repo.strip_suffix("-gguf"))
        .or_else(|| repo.strip_suffix("_GGUF"))
        .unwrap_or(repo);
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    // The file's stem usually repeats the repository's name: the rest is the tag.
    let tag = if stem.len() > repo.len() && stem.to_lowercase().starts_with(&repo.to_lowercase()) {
        stem[repo.len()..]
            .trim_start_matches(['.', '-', '_'])
            .to_owned()
    } else if let Some((_, q)) = quant_suffix(&stem) {
        q.to_owned()
    } else {
        stem.clone()
    };
    release_name(repo, if tag.is_empty() { "latest" } else { &tag })
}

/// Name for an Ollama model: `library/llama3.2` + `3b` → `llama3.2:3b`;
/// other namespaces are kept: `bob/tiny` + `latest` → `bob-tiny:latest`.
pub fn name_for_ollama(namespace: &str, model: &str, tag: &str) -> String {
    if namespace == "library" {
        release_name(model, tag)
    } else {
        release_name(&format!("{namespace}-{model}"), tag)
    }
}

fn is_gguf_name(p: &Path) -> bool {
    p.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn file_size(p: &Path) -> Result<u64, ImportError> {
    Ok(fs::metadata(p).map_err(io_err("stat", p))?.len())
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<fs::DirEntry>, ImportError> {
    let mut v: Vec<fs::DirEntry> = fs::read_dir(dir)
        .map_err(io_err("list", dir))?
        .collect::<Result<_, _>>()
        .map_err(io_err("list", dir))?;
    v.sort_by_key(|e| e.file_name());
    Ok(v)
}

/// Finds every importable model under `root` (a file or a directory).
pub fn scan(root: &Path) -> Result<Vec<Candidate>, ImportError> {
    let mut out = Vec::new();
    let meta = fs::metadata(root).map_err(io_err("stat", root))?;
    if meta.is_file() {
        let path = fs::canonicalize(root).map_err(io_err("resolve", root))?;
        out.push(Candidate {
            name: name_for_file(root),
            origin: root.display().to_string(),
            layout: Layout::File,
            size: meta.len(),
            path,
        });
    } else {
        walk(root, &mut out)?;
    }
    // The same bytes reached twice (a symlink and its target, two snapshots):
    // keep the last, which carries the preferred name.
    let mut seen = HashSet::new();
    let mut dedup: Vec<Candidate> = out
        .into_iter()
        .rev()
        .filter(|c| seen.insert((c.path.clone(), c.name.clone())))
        .collect();
    dedup.reverse();
    Ok(dedup)
}

fn walk(dir: &Path, out: &mut Vec<Candidate>) -> Result<(), ImportError> {
    if dir.join("manifests").is_dir() && dir.join("blobs").is_dir() {
        return scan_ollama(dir, out);
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    if let Some(n) = name.as_deref().and_then(|n| n.strip_prefix("models--"))
        && dir.join("snapshots").is_dir()
    {
        return scan_hf(dir, n, out);
    }
    for e in read_dir_sorted(dir)? {
        let p = e.path();
        let ft = e.file_type().map_err(io_err("stat", &p))?;
        if ft.is_dir() {
            walk(&p, out)?;
        } else if is_gguf_name(&p) {
            // Regular files and symlinks to files (not to directories: no loops).
            let Ok(meta) = fs::metadata(&p) else {
                tracing::warn!(path = %p.display(), "skipping a dangling link");
                continue;
            };
            if !meta.is_file() {
                continue;
            }
            out.push(Candidate {
                path: fs::canonicalize(&p).map_err(io_err("resolve", &p))?,
                origin: p.display().to_string(),
                name: name_for_file(&p),
                layout: Layout::File,
                size: meta.len(),
            });
        }
    }
    Ok(())
}

/// `models--{org}--{name}`: every GGUF in every snapshot, `refs/main` last.
fn scan_hf(repo_dir: &Path, org_repo: &str, out: &mut Vec<Candidate>) -> Result<(), ImportError> {
    let repo = org_repo
        .split_once("--")
        .map(|(_, r)| r)
        .unwrap_or(org_repo);
    let main_rev = fs::read_to_string(repo_dir.join("refs/main"))
        .ok()
        .map(|s| s.trim().to_owned());
    let mut snaps = read_dir_sorted(&repo_dir.join("snapshots"))?;
    snaps.sort_by_key(|e| Some(e.file_name().to_string_lossy().into_owned()) == main_rev);
    for snap in snaps {
        let mut files = Vec::new();
        collect(&snap.path(), is_gguf_name, &mut files)?;
        for f in files {
            let Ok(meta) = fs::metadata(&f) else {
                tracing::warn!(path = %f.display(), "skipping a dangling link (blob not downloaded)");
                continue;
            };
            out.push(Candidate {
                path: fs::canonicalize(&f).map_err(io_err("resolve", &f))?,
                origin: f.display().to_string(),
                name: name_for_hf(repo, &f),
                layout: Layout::HuggingFace,
                size: meta.len(),
            });
        }
    }
    Ok(())
}

/// Files (or links) under `dir`, recursively, whose path passes `keep`.
fn collect(dir: &Path, keep: fn(&Path) -> bool, out: &mut Vec<PathBuf>) -> Result<(), ImportError> {
    for e in read_dir_sorted(dir)? {
        let p = e.path();
        if e.file_type().map_err(io_err("stat", &p))?.is_dir() {
            collect(&p, keep, out)?;
        } else if keep(&p) {
            out.push(p);
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct OllamaManifest {
    #[serde(default)]
    layers: Vec<OllamaLayer>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct OllamaLayer {
    media_type: String,
    digest: String,
}

/// An Ollama store: `manifests/{registry}/{namespace}/{model}/{tag}`.
fn scan_ollama(root: &Path, out: &mut Vec<Candidate>) -> Result<(), ImportError> {
    let mut manifests = Vec::new();
    collect(&root.join("manifests"), |_| true, &mut manifests)?;
    for m in manifests {
        let rel = m.strip_prefix(root.join("manifests")).unwrap_or(&m);
        let parts: Vec<String> = rel
            .iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect();
        let (namespace, model, tag) = match parts.as_slice() {
            [.., ns, model, tag] => (ns.as_str(), model.as_str(), tag.as_str()),
            [model, tag] => ("library", model.as_str(), tag.as_str()),
            _ => continue,
        };
        let bad = |message: String| ImportError::OllamaManifest {
            path: m.clone(),
            message,
        };
        let text = fs::read_to_string(&m).map_err(io_err("read", &m))?;
        let parsed: OllamaManifest = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let Some(layer) = parsed
            .layers
            .iter()
            .find(|l| l.media_type == OLLAMA_MODEL_MEDIA_TYPE)
        else {
            tracing::info!(manifest = %m.display(), "no model layer (adapter or projector only); skipped");
            continue;
        };
        let hex = layer
            .digest
            .strip_prefix("sha256:")
            .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .ok_or_else(|| {
                bad(format!(
                    "model layer digest {:?} is not sha256",
                    layer.digest
                ))
            })?;
        let blob = root.join("blobs").join(format!("sha256-{hex}"));
        if !blob.is_file() {
            tracing::warn!(blob = %blob.display(), "model blob missing; skipped");
            continue;
        }
        out.push(Candidate {
            size: file_size(&blob)?,
            path: fs::canonicalize(&blob).map_err(io_err("resolve", &blob))?,
            origin: format!("ollama {namespace}/{model}:{tag}"),
            name: name_for_ollama(namespace, model, tag),
            layout: Layout::Ollama,
        });
    }
    Ok(())
}

/// Scans `root` and adds every model found to the store, naming each with a
/// signed release (a publisher key is made if this node has none). A file
/// that fails (not really GGUF, quota) is reported and the others go on;
/// finding nothing at all is an error.
pub fn import(
    store: &Store,
    root: &Path,
    opts: &ImportOptions,
) -> Result<Vec<Imported>, ImportError> {
    let found = scan(root)?;
    if found.is_empty() {
        return Err(ImportError::NothingFound(root.to_owned()));
    }
    if !opts.no_names {
        store.keygen(false)?;
    }
    let mut out = Vec::with_capacity(found.len());
    for c in found {
        let mut r = Imported {
            candidate: c,
            id: None,
            already_present: false,
            error: None,
        };
        match add_one(store, &r.candidate, opts) {
            Ok((id, present)) => {
                r.id = Some(id);
                r.already_present = present;
            }
            Err(e) => {
                tracing::warn!(path = %r.candidate.path.display(), "import failed: {e}");
                r.error = Some(e.to_string());
            }
        }
        out.push(r);
    }
    Ok(out)
}

fn add_one(
    store: &Store,
    c: &Candidate,
    opts: &ImportOptions,
) -> Result<(ArtifactId, bool), ImportError> {
    let add = AddOptions {
        kind: Some(ArtifactKind::Gguf),
        pin: opts.pin,
        reflink: true,
        // Hugging Face and Ollama blobs are immutable: share the inode.
        hardlink: c.layout != Layout::File,
    };
    let before = store.list()?.len();
    let id = store.add_file(&c.path, &add).map_err(StoreError::from)?;
    let present = store.list()?.len() == before;
    if !opts.no_names {
        let current = store
            .release(&c.name)?
            .and_then(|s| s.verify().ok())
            .map(|r| r.id);
        if current != Some(id) {
            store.publish(&id, &c.name, None)?;
        }
    }
    Ok((id, present))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(
            sanitize("SmolLM2 135M (Instruct)!"),
            "smollm2-135m-instruct"
        );
        assert_eq!(sanitize("__"), "model");
        assert_eq!(
            name_for_file(Path::new("/x/SmolLM2-135M-Instruct.Q4_1.gguf")),
            "smollm2-135m-instruct:q4_1"
        );
        assert_eq!(
            name_for_file(Path::new("tinyllama-1.1b-chat-v1.0.Q8_0.gguf")),
            "tinyllama-1.1b-chat-v1.0:q8_0"
        );
        assert_eq!(name_for_file(Path::new("phi-2-f16.gguf")), "phi-2:f16");
        assert_eq!(name_for_file(Path::new("My Model.gguf")), "my-model:latest");
        assert_eq!(
            name_for_hf(
                "SmolLM2-135M-Instruct-GGUF",
                Path::new("SmolLM2-135M-Instruct-Q4_K_M.gguf")
            ),
            "smollm2-135m-instruct:q4_k_m"
        );
        assert_eq!(
            name_for_hf(
                "Qwen2.5-0.5B-Instruct-GGUF",
                Path::new("qwen2.5-0.5b-instruct-q8_0.gguf")
            ),
            "qwen2.5-0.5b-instruct:q8_0"
        );
        assert_eq!(
            name_for_hf("tiny-GGUF", Path::new("other-IQ3_XS.gguf")),
            "tiny:iq3_xs"
        );
        assert_eq!(name_for_ollama("library", "llama3.2", "3b"), "llama3.2:3b");
        assert_eq!(name_for_ollama("bob", "Tiny", "latest"), "bob-tiny:latest");
        let long = "x".repeat(300);
        let n = release_name(&long, "q4_0");
        assert!(n.len() <= release::MAX_NAME && n.ends_with(":q4_0"));
        for n in [
            name_for_file(Path::new("ÄÖ.gguf")),
            release_name("..", ".."),
            name_for_ollama("library", "A:B", "C/D"),
        ] {
            assert!(release::check_name(&n).is_ok(), "{n}");
        }
    }
}
