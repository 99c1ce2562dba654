//! Prompt "heads": short hashes of a request's leading text, so that a node
//! can tell which peer holds a prompt's prefix warm without a tokenizer
//! (the node that receives a request may not hold the model at all).
//!
//! The text of a request is its messages in order (`role`, NUL, the text of
//! the content, NUL) for chat requests, or its prompt (Ollama: `system`,
//! NUL, `prompt`) for completions. It is cut at each of [`CUTS`] that it
//! reaches; each cut is hashed with the model name
//! (`BLAKE3("shoal-head-v1" ‖ model ‖ NUL ‖ text[..cut])`, first 8 bytes).
//! Two requests sharing a long system prompt share the heads of the cuts
//! inside it, whatever their later messages are. Prompts shorter than the
//! first cut have no heads: too short to be worth routing for.

use serde_json::Value;

/// A head: the first 8 bytes of the cut's hash.
pub type Head = [u8; 8];

/// Where the text is cut, in bytes.
pub const CUTS: [usize; 3] = [512, 2048, 8192];

/// The heads of a request body, longest cut last.
pub fn of_request(path: &str, model: &str, body: &Value) -> Vec<(usize, Head)> {
    let text = request_text(path, body);
    of_text(model, &text)
}

/// The heads of `text` for `model`, one per cut it reaches.
pub fn of_text(model: &str, text: &[u8]) -> Vec<(usize, Head)> {
    CUTS.iter()
        .filter(|&&c| c <= text.len())
        .map(|&c| {
            let mut h = blake3::Hasher::new();
            h.update(b"shoal-head-v1");
            h.update(model.to_ascii_lowercase().as_bytes());
            h.update(&[0]);
            h.update(&text[..c]);
            let mut head = [0u8; 8];
            head.copy_from_slice(&h.finalize().as_bytes()[..8]);
            (c, head)
        })
        .collect()
}

/// The canonical text of a generation request (see the module docs); up to
/// the longest cut.
pub fn request_text(path: &str, body: &Value) -> Vec<u8> {
    let limit = CUTS[CUTS.len() - 1];
    let mut out = Vec::new();
    let push = |s: &str, out: &mut Vec<u8>| {
        if out.len() < limit {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        }
    };
    if let Some(msgs) = body.get("messages").and_then(Value::as_array) {
        for m in msgs {
            push(
                m.get("role").and_then(Value::as_str).unwrap_or(""),
                &mut out,
            );
            push(&content_text(m.get("content")), &mut out);
        }
    } else {
        if path.starts_with("/api/")
            && let Some(s) = body.get("system").and_then(Value::as_str)
        {
            push(s, &mut out);
        }
        match body.get("prompt") {
            Some(Value::String(s)) => push(s, &mut out),
            Some(Value::Array(a)) => match a.first() {
                Some(Value::String(s)) => push(s, &mut out),
                // Token ids: their decimal text stands for them.
                Some(Value::Number(_)) => {
                    let ids: Vec<String> = a.iter().map(|v| v.to_string()).collect();
                    push(&ids.join(","), &mut out);
                }
                _ => {}
            },
            _ => {}
        }
    }
    out.truncate(limit);
    out
}

/// The text of a message's content: a string, or the text parts of an array.
fn content_text(c: Option<&Value>) -> String {
    match c {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// The longest cut of `heads` that `warm` holds (0 if none).
pub fn warm_match(heads: &[(usize, Head)], warm: &[Head]) -> usize {
    heads
        .iter()
        .filter(|(_, h)| warm.contains(h))
        .map(|(c, _)| *c)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(system: &str, user: &str) -> Value {
        json!({"model": "m", "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": user}]})
    }

    #[test]
    fn a_shared_system_prompt_shares_its_heads() {
        let sys = "You are a careful assistant. ".repeat(100); // 2900 bytes
        let a = of_request("/v1/chat/completions", "demo", &chat(&sys, "What is 2+2?"));
        let b = of_request(
            "/v1/chat/completions",
            "demo",
            &chat(&sys, "Name a colour."),
        );
        assert_eq!(
            a.len(),
            2,
            "cuts at 512 and 2048 are inside the system prompt"
        );
        assert_eq!(a, b);
        // The Ollama chat route renders the same text.
        assert_eq!(a, of_request("/api/chat", "demo", &chat(&sys, "x")));
        // Another model, another system prompt: other heads.
        assert_ne!(
            a,
            of_request("/v1/chat/completions", "other", &chat(&sys, "x"))
        );
        let other = "You are a terse assistant. ".repeat(100);
        let c = of_request("/v1/chat/completions", "demo", &chat(&other, "x"));
        assert_eq!(
            warm_match(&c, &a.iter().map(|h| h.1).collect::<Vec<_>>()),
            0
        );
        assert_eq!(
            warm_match(&b, &a.iter().map(|h| h.1).collect::<Vec<_>>()),
            2048
        );
    }

    #[test]
    fn short_prompts_have_no_heads_and_odd_bodies_do_not_panic() {
        assert!(of_request("/v1/chat/completions", "m", &chat("hi", "there")).is_empty());
        for body in [
            json!(null),
            json!({"messages": "nope"}),
            json!({"messages": [1, {"role": 3}, {"content": [{"type": "image"}]}]}),
            json!({"prompt": [1, 2, 3]}),
            json!({"prompt": {"x": 1}}),
        ] {
            let _ = of_request("/v1/completions", "m", &body);
            let _ = of_request("/api/generate", "m", &body);
        }
        let long = "a".repeat(9000);
        let t = request_text("/v1/completions", &json!({ "prompt": long }));
        assert_eq!(t.len(), 8192);
        assert_eq!(of_text("m", &t).len(), 3);
        let g = of_request(
            "/api/generate",
            "m",
            &json!({"system": "s".repeat(600), "prompt": "p"}),
        );
        assert_eq!(g.len(), 1);
    }
}
