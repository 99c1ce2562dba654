//! Keeps `docs/ARCHITECTURE.md` true: the module graph drawn there must be
//! the graph the code's imports make, and it must have no circle.
//!
//! The document holds the graph as a fenced block after the line
//! `<!-- module-graph -->`, one module a line: `serve -> inference, kvcache`
//! (a module importing nothing is written `gguf ->`). An edge is any
//! `crate::name` in a non-comment line of a file under `src/name/` or
//! `src/name.rs` that names another top-level module.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Graph = BTreeMap<String, BTreeSet<String>>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Top-level modules, from `src/lib.rs`'s `pub mod` / `mod` lines.
fn modules() -> BTreeSet<String> {
    let lib = std::fs::read_to_string(root().join("src/lib.rs")).expect("read src/lib.rs");
    lib.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with("#[cfg(test)]"))
        .filter_map(|l| {
            l.strip_prefix("pub mod ")
                .or_else(|| l.strip_prefix("mod "))
                .and_then(|r| r.strip_suffix(';'))
        })
        .filter(|m| *m != "architecture")
        .map(str::to_owned)
        .collect()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `crate::x` names in a line of code (comments stripped).
fn crate_refs(line: &str) -> Vec<String> {
    let code = match line.find("//") {
        Some(i) => &line[..i],
        None => line,
    };
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        // `shoal_crate::` or `$crate::` are not ours.
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        out.push(name);
    }
    out
}

/// The graph the code's imports make.
fn actual() -> Graph {
    let mods = modules();
    let mut g = Graph::new();
    for m in &mods {
        let mut files = Vec::new();
        let single = root().join("src").join(format!("{m}.rs"));
        if single.exists() {
            files.push(single);
        }
        rust_files(&root().join("src").join(m), &mut files);
        let edges = g.entry(m.clone()).or_default();
        for f in files {
            let text = std::fs::read_to_string(&f).expect("read a source file");
            for line in text.lines() {
                for r in crate_refs(line) {
                    if r != *m && mods.contains(&r) {
                        edges.insert(r);
                    }
                }
            }
        }
    }
    g
}

/// The graph `docs/ARCHITECTURE.md` draws.
fn documented() -> Graph {
    let doc = std::fs::read_to_string(root().join("docs/ARCHITECTURE.md"))
        .expect("read docs/ARCHITECTURE.md");
    let after = doc
        .split_once("<!-- module-graph -->")
        .expect("ARCHITECTURE.md has a <!-- module-graph --> marker")
        .1;
    let block = after
        .split("```")
        .nth(1)
        .expect("a fenced block follows the marker");
    let mut g = Graph::new();
    for line in block.lines().skip(1) {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (from, to) = line
            .split_once("->")
            .unwrap_or_else(|| panic!("graph line without '->': {line:?}"));
        let edges = g.entry(from.trim().to_owned()).or_default();
        for t in to.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            edges.insert(t.to_owned());
        }
    }
    g
}

fn render(g: &Graph) -> String {
    g.iter()
        .map(|(m, e)| {
            let to: Vec<&str> = e.iter().map(String::as_str).collect();
            format!("{m} -> {}\n", to.join(", "))
        })
        .collect()
}

/// A circle in `g`, if there is one (depth-first search).
fn cycle(g: &Graph) -> Option<Vec<String>> {
    fn visit(
        g: &Graph,
        n: &str,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| p == n) {
            let mut c = path[i..].to_vec();
            c.push(n.to_owned());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        path.push(n.to_owned());
        for e in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(g, e, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(n.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        if let Some(c) = visit(g, n, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

#[test]
fn architecture_doc_matches_the_imports() {
    let actual = actual();
    let doc = documented();
    assert_eq!(
        render(&doc),
        render(&actual),
        "docs/ARCHITECTURE.md's module graph (left) differs from the imports (right)"
    );
}

#[test]
fn no_import_circle() {
    let g = actual();
    assert_eq!(cycle(&g), None, "import circle among the library's modules");
}

#[test]
fn the_checker_sees_edges_and_circles() {
    assert_eq!(
        crate_refs("use crate::store::Store; // crate::mesh"),
        ["store"]
    );
    assert_eq!(
        crate_refs("$crate::x and shoal_crate::y"),
        Vec::<String>::new()
    );
    let mut g = Graph::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    g.entry("c".into()).or_default();
    assert_eq!(cycle(&g), None);
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        cycle(&g),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}

/// `text` with comments, strings and char literals blanked out (newlines
/// kept), so braces can be counted.
fn code_only(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let blank = |out: &mut Vec<u8>, s: &[u8]| {
        out.extend(s.iter().map(|&c| if c == b'\n' { b'\n' } else { b' ' }));
    };
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        let end = if rest.starts_with(b"//") {
            rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len())
        } else if rest.starts_with(b"/*") {
            rest.windows(2)
                .position(|w| w == b"*/")
                .map_or(rest.len(), |p| p + 2)
        } else if rest[0] == b'r'
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
            && rest[1..].iter().take_while(|&&c| c == b'#').count() + 1 < rest.len()
            && rest[1 + rest[1..].iter().take_while(|&&c| c == b'#').count()] == b'"'
        {
            let hashes = rest[1..].iter().take_while(|&&c| c == b'#').count();
            let mut close = vec![b'"'];
            close.extend(std::iter::repeat_n(b'#', hashes));
            let body = 2 + hashes;
            rest[body..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(rest.len(), |p| body + p + close.len())
        } else if rest[0] == b'"' {
            let mut j = 1;
            while j < rest.len() && rest[j] != b'"' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            (j + 1).min(rest.len())
        } else if rest[0] == b'\'' {
            // A char literal ('x', '\n', '\u{..}'), else a lifetime.
            if rest.get(1) == Some(&b'\\') {
                rest[2..]
                    .iter()
                    .position(|&c| c == b'\'')
                    .map_or(1, |p| p + 3)
            } else {
                let ch = std::str::from_utf8(&rest[1..rest.len().min(6)])
                    .ok()
                    .or_else(|| std::str::from_utf8(&rest[1..rest.len().min(5)]).ok())
                    .or_else(|| std::str::from_utf8(&rest[1..rest.len().min(4)]).ok())
                    .or_else(|| std::str::from_utf8(&rest[1..rest.len().min(3)]).ok())
                    .and_then(|s| s.chars().next())
                    .map_or(1, char::len_utf8);
                if rest.get(1 + ch) == Some(&b'\'') {
                    ch + 2
                } else {
                    1
                }
            }
        } else {
            out.push(rest[0]);
            i += 1;
            continue;
        };
        blank(&mut out, &rest[..end]);
        i += end;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Functions over `limit` lines outside test modules, with no `long:`
/// comment in the three lines above them: `(file, line, name, lines)`.
fn long_functions(limit: usize) -> Vec<(String, usize, String, usize)> {
    let mut files = Vec::new();
    for dir in ["src", "node/src", "testnet/src"] {
        rust_files(&root().join(dir), &mut files);
    }
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read a source file");
        let raw: Vec<&str> = text.lines().collect();
        let code = code_only(&text);
        let lines: Vec<&str> = code.lines().collect();
        let mut i = 0;
        while i < lines.len() {
            let t = lines[i].trim_start();
            if t.starts_with("#[cfg(test)]")
                && lines
                    .get(i + 1)
                    .is_some_and(|l| l.trim_start().starts_with("mod "))
            {
                break;
            }
            let name = t
                .split_once("fn ")
                .filter(|(before, _)| {
                    before.split_whitespace().all(|w| {
                        matches!(w, "pub" | "const" | "async" | "unsafe" | "extern" | "\"C\"")
                            || w.starts_with("pub(")
                    })
                })
                .map(|(_, after)| {
                    after
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect::<String>()
                })
                .filter(|n| !n.is_empty());
            let Some(name) = name else {
                i += 1;
                continue;
            };
            let (mut depth, mut started, mut j) = (0i64, false, i);
            'scan: while j < lines.len() {
                for c in lines[j].chars() {
                    match c {
                        ';' if !started => break 'scan,
                        '{' => {
                            depth += 1;
                            started = true;
                        }
                        '}' => depth -= 1,
                        _ => {}
                    }
                    if started && depth == 0 {
                        break 'scan;
                    }
                }
                j += 1;
            }
            if !started {
                i += 1;
                continue;
            }
            let len = j - i + 1;
            let reason = raw[i.saturating_sub(3)..i]
                .iter()
                .any(|l| l.contains("long:"));
            if len > limit && !reason {
                let rel = f.strip_prefix(root()).unwrap_or(&f).display().to_string();
                out.push((rel, i + 1, name, len));
            }
            i = j + 1;
        }
    }
    out.sort();
    out
}

#[test]
fn long_functions_say_why() {
    let long = long_functions(120);
    assert!(
        long.is_empty(),
        "functions over 120 lines with no `// long: <reason>` comment above them: {long:#?}"
    );
}

#[test]
fn the_length_check_sees_through_strings_and_comments() {
    let code = code_only("let s = \"{\"; // }\nlet c = '{'; let l: &'a str = r#\"}\"#;");
    assert!(!code.contains('{') && !code.contains('}'), "{code}");
    assert_eq!(code.lines().count(), 2);
}
