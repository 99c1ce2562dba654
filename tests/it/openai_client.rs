//! The official Python `openai` package, unchanged, against a real node on
//! 127.0.0.1 (store + mesh on loopback, mDNS off): chat non-streamed and
//! streamed, completions, models.list, usage with cached_tokens on a
//! follow-up, and errors mapped to the right exceptions; on the demo model
//! and on Gemma 3 270M Q4_K_M.
//!
//! Needs `python3 -m pip install openai` (`.ci/run` installs it). Outside
//! CI a missing package skips the test loudly; with `CI=true` it fails.

use crate::util::demo_model_path;
use shoal::serve::ServeConfig;
use shoal::store::AddOptions;

/// The client script: every check is an assertion; prints `ALL OK` at the end.
const SCRIPT: &str = r#"
import json, sys
import openai
from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
# A model without a chat template (ChatML stands in) may answer with nothing
# but the end marker: an empty reply that stopped is then a right answer.
may_be_empty = len(sys.argv) > 3
client = OpenAI(base_url=base, api_key="sk-local", max_retries=0, timeout=120)

# Chat, non-streamed.
msgs = [{"role": "user", "content": "Name one colour."}]
r = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0)
text = r.choices[0].message.content
assert isinstance(text, str) and (text or (may_be_empty and r.choices[0].finish_reason == "stop")), r
assert r.choices[0].message.role == "assistant", r
assert r.choices[0].finish_reason in ("stop", "length"), r
assert r.object == "chat.completion", r
assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 8, r.usage
print("chat:", json.dumps(text))

# Chat, streamed, with the usage chunk: the same greedy text.
parts, usage, finish = [], None, None
stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=8, temperature=0,
                                        stream=True, stream_options={"include_usage": True})
for chunk in stream:
    assert chunk.object == "chat.completion.chunk", chunk
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert "".join(parts) == text, (parts, text)
assert finish in ("stop", "length"), finish
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage
print("stream: ok")

# Completions.
c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=5, temperature=0)
assert c.object == "text_completion", c
assert isinstance(c.choices[0].text, str) and c.choices[0].text, c
assert c.usage.prompt_tokens > 0, c.usage
print("completion:", json.dumps(c.choices[0].text))

# models.list: the model just used is there.
ids = [m.id for m in client.models.list()]
assert model in ids, ids
print("models: ok")

# A follow-up sharing a long prefix reports cached tokens.
doc = " ".join(f"item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(60))
first = client.chat.completions.create(model=model, max_tokens=4, temperature=0,
    messages=[{"role": "system", "content": doc}, {"role": "user", "content": "How many boxes?"}])
follow = client.chat.completions.create(model=model, max_tokens=4, temperature=0,
    messages=[{"role": "system", "content": doc}, {"role": "user", "content": "Which colours?"}])
cached = follow.usage.prompt_tokens_details.cached_tokens
assert cached is not None and cached >= first.usage.prompt_tokens // 2, (cached, first.usage)
print("cached_tokens:", cached, "of", follow.usage.prompt_tokens)

# Errors map to the client's exceptions.
try:
    client.chat.completions.create(model="no-such-model", messages=msgs, max_tokens=4)
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.status_code == 404, e
try:
    client.chat.completions.create(model=model, messages=msgs, max_tokens=0)
    raise AssertionError("max_tokens 0 accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400, e
try:
    client.completions.create(model=model, prompt="x", max_tokens=10**9)
    raise AssertionError("huge max_tokens accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400, e
print("errors: ok")
print("ALL OK")
"#;

/// True if `python3` can import `openai`; otherwise skips loudly, or fails under `CI=true`.
fn openai_available() -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "the Python openai package is missing (python3 -m pip install openai)"
        );
        eprintln!(
            "SKIPPING openai_client: the Python `openai` package is missing \
             (python3 -m pip install openai)"
        );
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_works_unchanged() {
    if !openai_available() {
        return;
    }
    let Some(model_path) = demo_model_path() else {
        return;
    };
    run_client(model_path, false).await;
}

/// The same client script against Gemma 3 270M Q4_K_M (SentencePiece
/// vocabulary, K-quants, sliding-window layers, no chat template in the file:
/// ChatML, as llama-server renders it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_openai_client_works_on_gemma3() {
    if !openai_available() {
        return;
    }
    let Some(model_path) = crate::util::gemma3_model_path() else {
        return;
    };
    run_client(model_path, true).await;
}

async fn run_client(model_path: std::path::PathBuf, may_be_empty: bool) {
    let dir = tempfile::tempdir().expect("tmp");
    let cfg = ServeConfig {
        response_cache_budget: 0,
        ..ServeConfig::with_data_dir(dir.path())
    };
    let (node, addr) = crate::util::serving::start_node(dir.path(), Vec::new(), cfg).await;
    let store = node.store().clone();
    let id =
        tokio::task::spawn_blocking(move || store.add_file(&model_path, &AddOptions::default()))
            .await
            .expect("join")
            .expect("add model")
            .to_hex();
    let base = format!("http://{addr}/v1");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args(["-c", SCRIPT, &base, &id])
            .args(may_be_empty.then_some("may-be-empty"))
            // Nothing may leave loopback: no proxy for the local node.
            .env("NO_PROXY", "127.0.0.1")
            .env_remove("OPENAI_BASE_URL")
            .output()
    })
    .await
    .expect("join")
    .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}");
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "the openai client failed:\n{stdout}\n{stderr}"
    );
    node.shutdown().await;
}
