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
