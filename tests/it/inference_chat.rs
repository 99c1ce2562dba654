//! Chat templates rendered byte for byte as llama.cpp's llama-server renders
//! them (`POST /apply-template`, `--jinja`): `tests/fixtures/chat/<name>.json`,
//! made by `scripts/fixtures/make-chat-fixtures.sh` from the official
//! templates in llama.cpp's `models/templates/` and the demo model's own
//! (see docs/INFERENCE.md, "Parity fixtures"). Each case records the
//! messages, the time of the render (for `date_string` / `strftime_now`)
//! and the prompt, or the error the server answered with.

use shoal::inference::{ChatMessage, ChatTemplate};
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat")
}

fn s(v: &serde_json::Value) -> &str {
    v.as_str().expect("string")
}

/// Renders every case of one fixture; returns the number compared.
/// Cases ending with an assistant message are prefills: llama-server
/// continues that message ([`ChatTemplate::render_continuation_at`]).
fn check(name: &str) -> usize {
    let p = dir().join(format!("{name}.json"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let j: serde_json::Value = serde_json::from_str(&text).expect("json");
    let t = ChatTemplate::new(s(&j["template"]), s(&j["bos_token"]), s(&j["eos_token"]))
        .unwrap_or_else(|e| panic!("{name}: compile: {e}"));
    // llama-server continues a final assistant message with an empty
    // reasoning block first for templates with one (its template analysis
    // finds the markers); shoal does not, so those prefills are left out.
    let reasoning = s(&j["template"]).contains("<think>");
    let mut failures = Vec::new();
    let mut compared = 0;
    let cases = j["cases"].as_array().expect("cases");
    for c in cases {
        let case = s(&c["name"]);
        let msgs: Vec<ChatMessage> = c["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| ChatMessage::new(s(&m["role"]), s(&m["content"])))
            .collect();
        let now = c["now"].as_i64().expect("now");
        // llama-server continues a conversation that ends with an
        // assistant message (prefill) instead of opening a new turn.
        let prefill = msgs.last().is_some_and(|m| m.role == "assistant");
        if prefill && reasoning {
            eprintln!("{name}/{case}: prefill with a reasoning block, not compared");
            continue;
        }
        compared += 1;
        let ours = if prefill {
            t.render_continuation_at(&msgs, now)
        } else {
            t.render_at(&msgs, true, now)
        };
        match (c.get("prompt"), ours) {
            (Some(want), Ok(got)) if got == s(want) => {}
            (Some(want), Ok(got)) => failures.push(format!(
                "{name}/{case}: rendered text differs\n  llama-server: {:?}\n  shoal:        {got:?}",
                s(want)
            )),
            (Some(_), Err(e)) => failures.push(format!("{name}/{case}: shoal fails: {e}")),
            (None, Ok(got)) => failures.push(format!(
                "{name}/{case}: llama-server refuses ({}), shoal renders {got:?}",
                c["error"]
            )),
            (None, Err(_)) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("{name}: {compared} cases identical to llama-server");
    compared
}

#[test]
fn chat_llama_3_2() {
    check("llama-3.2");
}

#[test]
fn chat_llama_3_1() {
    check("llama-3.1");
}

#[test]
fn chat_qwen2_5() {
    check("qwen2.5");
}

#[test]
fn chat_qwen3() {
    check("qwen3");
}

#[test]
fn chat_phi_3_5() {
    check("phi-3.5");
}

#[test]
fn chat_gemma_2() {
    check("gemma-2");
}

#[test]
fn chat_deepseek_r1_distill_qwen() {
    check("deepseek-r1-distill-qwen");
}

#[test]
fn chat_deepseek_r1_distill_llama() {
    check("deepseek-r1-distill-llama");
}

#[test]
fn chat_smollm2() {
    check("smollm2");
}

/// What llama-server renders for a model without `tokenizer.chat_template`
/// (Gemma 3 270M's case): its built-in ChatML, which shoal's fallback
/// (`shoal::serve::CHATML`) must render identically.
#[test]
fn chat_fallback_is_llama_servers_chatml() {
    check("fallback-chatml");
    let p = dir().join("fallback-chatml.json");
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).expect("read")).expect("json");
    let t = ChatTemplate::new(shoal::serve::CHATML, "", "").expect("compile");
    for c in j["cases"].as_array().expect("cases") {
        let Some(want) = c.get("prompt") else {
            continue;
        };
        let msgs: Vec<ChatMessage> = c["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| ChatMessage::new(s(&m["role"]), s(&m["content"])))
            .collect();
        if msgs.last().is_some_and(|m| m.role == "assistant") {
            continue;
        }
        let got = t.render(&msgs, true).expect("render");
        assert_eq!(got, s(want), "{}", s(&c["name"]));
    }
}

/// A model without a template is chatted with through ChatML (as llama-server
/// does); when its vocabulary has no `<|im_end|>` token (Gemma 3), that text
/// becomes a stop sequence, so the reply ends there instead of running on.
#[test]
fn chatml_fallback_stops_at_im_end_as_text() {
    use shoal::inference::{GenerateConfig, Model, generate};
    if let Some(p) = crate::util::demo_model_path() {
        let m = Model::load(&p).expect("load demo");
        assert_eq!(
            shoal::serve::chatml_stop(&m),
            None,
            "SmolLM2 has a template"
        );
    }
    let Some(p) = crate::util::gemma3_model_path() else {
        return;
    };
    let m = Model::load(&p).expect("load gemma");
    assert!(m.chat_template().is_none());
    let stop = shoal::serve::chatml_stop(&m).expect("gemma 3 270m needs the stop");
    assert_eq!(stop, "<|im_end|>");
    let tpl = ChatTemplate::new(shoal::serve::CHATML, "<bos>", "<eos>").expect("chatml");
    let text = tpl
        .render(
            &[ChatMessage::new("user", "What is the capital of France?")],
            true,
        )
        .expect("render");
    let ids = m.tokenizer().encode(&text, true, true);
    let mut cache = m.new_cache();
    let cfg = GenerateConfig {
        max_tokens: 48,
        stop: vec![stop.to_owned()],
        ..Default::default()
    };
    let out = generate(&m, &mut cache, &ids, &cfg, None, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .expect("generate");
    // Greedy, this model writes the marker as text after a short answer.
    assert_eq!(
        out.stop,
        shoal::inference::StopReason::StopSequence,
        "{:?}",
        out.text
    );
    assert!(!out.text.contains("<|im_end|>"), "{:?}", out.text);
}
