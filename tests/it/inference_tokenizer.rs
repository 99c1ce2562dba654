//! Tokenizer parity: our GGUF BPE against an independent `tokenizers`
//! pipeline built from the same vocabulary and merges (Hugging Face's
//! SmolLM2 setup: digits split one by one, then byte-level gpt2 regex, no
//! prefix space), and against ids recorded from llama.cpp
//! (`tests/fixtures/tokenizer_smollm2.json`, written by
//! `scripts/bench-inference.sh --fixtures` with llama-cpp-python).

use crate::util::demo_model_path;
use shoal::gguf::{Gguf, Value};
use shoal::inference::Tokenizer;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

const TEXTS: &[&str] = &[
    "Hello, world! How are you today?",
    "The year 2024 had 366 days; π ≈ 3.14159.",
    "Größere Übungen für Äpfel — naïve café, déjà vu.",
    "Привет, как дела? Всё хорошо.",
    "你好，世界！今天天气很好。",
    "日本語のテキストとカタカナ、ひらがな。",
    "مرحبا بالعالم",
    "नमस्ते दुनिया, यह एक परीक्षण है।",
    "Emoji: 🦀🔥👍🏽 and ZWJ 👨‍👩‍👧",
    "fn main() {\n    println!(\"{}\", 1 + 2);\n}\n",
    "  leading spaces,\ttabs\t\tand   trailing   ",
    "line one\n\n\nline two\r\nline three",
    "it's we're they've I'm you'll he'd DON'T",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "email@example.com https://example.org/path?q=1&r=2#frag",
    "",
    " ",
    "\n",
];

fn hf_tokenizer(g: &Gguf) -> tokenizers::Tokenizer {
    let strs = |k: &str| -> Vec<String> {
        g.get(k)
            .and_then(Value::as_array)
            .expect(k)
            .iter()
            .map(|v| v.as_str().expect("string").to_owned())
            .collect()
    };
    let tokens = strs("tokenizer.ggml.tokens");
    let types: Vec<i64> = g
        .get("tokenizer.ggml.token_type")
        .and_then(Value::as_array)
        .expect("types")
        .iter()
        .map(|v| v.as_i64().expect("int"))
        .collect();
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let merges = strs("tokenizer.ggml.merges")
        .into_iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').expect("merge");
            (a.to_owned(), b.to_owned())
        })
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .expect("bpe");
    let mut t = tokenizers::Tokenizer::new(bpe);
    let pre = Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
    ]);
    t.with_pre_tokenizer(Some(pre));
    t.with_decoder(Some(ByteLevel::default()));
    let specials: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, ty)| matches!(ty, 3 | 4))
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect();
    t.add_special_tokens(specials).expect("specials");
    t
}

#[test]
fn matches_independent_tokenizers_pipeline() {
    let Some(path) = demo_model_path() else {
        return;
    };
    let bytes = std::fs::read(&path).expect("read");
    let g = Gguf::parse(&bytes).expect("parse");
    let ours = Tokenizer::from_gguf(&g).expect("ours");
    let hf = hf_tokenizer(&g);
    for text in TEXTS {
        let want = hf
            .encode(*text, false)
            .expect("hf encode")
            .get_ids()
            .to_vec();
        let got = ours.encode(text, true, false);
        assert_eq!(got, want, "token ids differ for {text:?}");
        assert_eq!(ours.decode(&got, true), *text, "round trip of {text:?}");
    }
}

#[test]
fn matches_llama_cpp_fixture() {
    let Some(path) = demo_model_path() else {
        return;
    };
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer_smollm2.json");
    let cases: Vec<(String, Vec<u32>)> =
        serde_json::from_str(&std::fs::read_to_string(fixture).expect("fixture")).expect("json");
    assert!(cases.len() >= 5);
    let bytes = std::fs::read(&path).expect("read");
    let g = Gguf::parse(&bytes).expect("parse");
    let ours = Tokenizer::from_gguf(&g).expect("ours");
    for (text, want) in cases {
        assert_eq!(
            ours.encode(&text, true, true),
            want,
            "ids differ for {text:?}"
        );
    }
}

#[test]
fn special_tokens_can_be_plain_text() {
    let Some(path) = demo_model_path() else {
        return;
    };
    let bytes = std::fs::read(&path).expect("read");
    let g = Gguf::parse(&bytes).expect("parse");
    let t = Tokenizer::from_gguf(&g).expect("ours");
    let with = t.encode("<|im_end|>", true, false);
    assert_eq!(with, vec![2]);
    let without = t.encode("<|im_end|>", false, false);
    assert!(without.len() > 1, "{without:?}");
    assert!(t.is_end(2));
}

/// `$SHOAL_VOCAB_DIR`, else `~/.cache/shoal/vocab` (`scripts/fetch-vocabs.sh`);
/// `None` (skip, loudly) when absent, a failure under `CI=true`.
fn vocab_dir() -> Option<std::path::PathBuf> {
    let dir = std::env::var_os("SHOAL_VOCAB_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(std::path::PathBuf::from)
                .unwrap_or_default();
            std::env::var_os("XDG_CACHE_HOME")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| home.join(".cache"))
                .join("shoal/vocab")
        });
    if dir.join("ggml-vocab-llama-spm.gguf.inp").is_file() {
        return Some(dir);
    }
    let msg = format!(
        "llama.cpp vocab test vectors missing in {} (run scripts/fetch-vocabs.sh or set SHOAL_VOCAB_DIR)",
        dir.display()
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}");
    }
    eprintln!("SKIPPING: {msg}");
    None
}

/// llama.cpp's `tests/test-tokenizer-0.cpp` input format: texts separated by
/// `\n__ggml_vocab_test__\n`, one line of ids per text.
fn read_vectors(inp: &std::path::Path) -> Vec<(String, Vec<u32>)> {
    let raw = std::fs::read_to_string(inp).expect("read .inp");
    let out = std::fs::read_to_string(inp.with_extension("out")).expect("read .out");
    let mut texts: Vec<&str> = raw.split("\n__ggml_vocab_test__\n").collect();
    // As test-tokenizer-0: a trailing separator opens no further case.
    if texts.len() > 1 && texts.last() == Some(&"") {
        texts.pop();
    }
    let ids: Vec<Vec<u32>> = out
        .lines()
        .map(|l| {
            l.split_whitespace()
                .map(|t| t.parse().expect("id"))
                .collect()
        })
        .collect();
    assert_eq!(texts.len(), ids.len(), "{}", inp.display());
    texts.into_iter().map(str::to_owned).zip(ids).collect()
}

/// Vocabularies whose llama.cpp vectors must all pass (ids and round trip).
const MUST_PASS: &[&str] = &[
    "llama-spm",
    "phi-3",
    "gemma-4",
    "llama-bpe",
    "qwen2",
    "qwen35",
    "gpt-2",
    "deepseek-llm",
    "deepseek-coder",
    "starcoder",
    "refact",
    "command-r",
    "mpt",
];

#[test]
fn llama_cpp_vocab_vectors() {
    let Some(dir) = vocab_dir() else {
        return;
    };
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .expect("vocab dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "inp"))
        .collect();
    inputs.sort();
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for inp in inputs {
        let gguf = inp.with_extension("");
        let name = gguf
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("ggml-vocab-"))
            .and_then(|n| n.strip_suffix(".gguf"))
            .expect("name")
            .to_owned();
        let tok = match Tokenizer::load(&gguf) {
            Ok(t) => t,
            Err(e) => {
                report.push(format!("{name}: unsupported ({e})"));
                if MUST_PASS.contains(&name.as_str()) {
                    failures.push(format!("{name}: {e}"));
                }
                continue;
            }
        };
        let cases = read_vectors(&inp);
        let (mut ok, mut rt) = (0, 0);
        for (text, want) in &cases {
            let got = tok.encode(text, false, false);
            if &got == want {
                ok += 1;
            } else if failures.len() < 40 {
                failures.push(format!("{name}: {text:?}: got {got:?}, want {want:?}"));
            }
            if tok.decode(&got, true) == *text {
                rt += 1;
            } else if failures.len() < 40 && MUST_PASS.contains(&name.as_str()) {
                failures.push(format!(
                    "{name}: round trip of {text:?} gave {:?}",
                    tok.decode(&got, true)
                ));
            }
        }
        report.push(format!(
            "{name}: {ok}/{} ids, {rt}/{} round trips",
            cases.len(),
            cases.len()
        ));
    }
    eprintln!("llama.cpp vocab vectors:\n  {}", report.join("\n  "));
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn gemma3_path() -> Option<std::path::PathBuf> {
    crate::util::gemma3_model_path()
}

#[derive(serde::Deserialize)]
struct GemmaCase {
    text: String,
    parse_special: bool,
    ids: Vec<u32>,
}

#[derive(serde::Deserialize)]
struct GemmaFixture {
    cases: Vec<GemmaCase>,
}

#[test]
fn gemma3_matches_llama_tokenize() {
    let Some(path) = gemma3_path() else {
        return;
    };
    let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer/gemma3.json");
    let f: GemmaFixture =
        serde_json::from_str(&std::fs::read_to_string(fixture).expect("fixture")).expect("json");
    assert!(f.cases.len() >= 40);
    let t = Tokenizer::load(&path).expect("gemma 3 tokenizer");
    assert_eq!(t.vocab_size(), 262_144);
    let mut bad = Vec::new();
    for c in &f.cases {
        let got = t.encode(&c.text, c.parse_special, true);
        if got != c.ids {
            bad.push(format!(
                "{:?} (special {}): got {got:?}, want {:?}",
                c.text, c.parse_special, c.ids
            ));
        }
        if !c.parse_special {
            assert_eq!(t.decode(&got, false), c.text, "round trip");
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    // Generation stops at <end_of_turn> (and <eos>).
    let eot = t.token_id("<end_of_turn>").expect("<end_of_turn>");
    assert!(t.is_end(eot));
    assert!(t.is_end(t.eos().expect("eos")));
    assert!(!t.is_end(t.token_id("<start_of_turn>").expect("<start_of_turn>")));
}

#[test]
fn llama3_stops_at_eot_id() {
    let Some(dir) = vocab_dir() else {
        return;
    };
    let t = Tokenizer::load(dir.join("ggml-vocab-llama-bpe.gguf")).expect("llama-bpe");
    let eot = t.token_id("<|eot_id|>").expect("<|eot_id|>");
    assert!(t.is_end(eot));
    assert!(t.is_end(t.token_id("<|end_of_text|>").expect("eos")));
    assert!(!t.is_end(t.token_id("<|start_header_id|>").expect("start")));
    assert!(t.add_bos(), "llama-bpe adds BOS by default, as llama.cpp");
    assert_eq!(
        t.encode("<|eot_id|>", true, false),
        vec![eot],
        "specials parse"
    );
}

#[test]
fn unsupported_pre_tokenizer_is_named() {
    let Some(path) = demo_model_path() else {
        return;
    };
    let bytes = std::fs::read(&path).expect("read");
    let mut g = Gguf::parse(&bytes).expect("parse");
    g.metadata.insert(
        "tokenizer.ggml.pre".into(),
        Value::String("no-such-pre".into()),
    );
    let e = Tokenizer::from_gguf(&g).expect_err("must refuse");
    assert!(e.to_string().contains("no-such-pre"), "{e}");
    g.metadata.remove("tokenizer.ggml.pre");
    let e = Tokenizer::from_gguf(&g).expect_err("must refuse");
    assert!(e.to_string().contains("tokenizer.ggml.pre"), "{e}");
}

/// Load-time probe (`cargo test --release --test it tokenizer_load_time --
/// --ignored --nocapture`): header parse and tokenizer build, demo model and
/// Gemma 3, best of 5.
#[test]
#[ignore = "timing probe"]
fn tokenizer_load_time() {
    let mut files = Vec::new();
    files.extend(demo_model_path());
    files.extend(gemma3_path());
    for p in files {
        let bytes = std::fs::read(&p).expect("read");
        let (mut parse, mut build) = (f64::MAX, f64::MAX);
        for _ in 0..5 {
            let t0 = std::time::Instant::now();
            let (g, _) = Gguf::parse_header(&bytes, bytes.len() as u64).expect("parse");
            let t1 = std::time::Instant::now();
            let t = Tokenizer::from_gguf(&g).expect("tokenizer");
            let t2 = std::time::Instant::now();
            parse = parse.min((t1 - t0).as_secs_f64() * 1e3);
            build = build.min((t2 - t1).as_secs_f64() * 1e3);
            assert!(t.vocab_size() > 0);
        }
        eprintln!(
            "{}: header parse {parse:.1} ms, tokenizer build {build:.1} ms",
            p.display()
        );
    }
}
