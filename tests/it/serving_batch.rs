//! Continuous batching never changes an answer: sequences run together in
//! one engine (decode rows and prompt chunks in the same forward passes,
//! greedy and seeded sampling, the KV budget forcing sequences out and
//! back in, prefixes shared with a running sequence) produce exactly the
//! tokens each produces alone; a prompt larger than the budget fails
//! clearly; a cancelled sequence leaves the others running.

use shoal::inference::{
    GenerateConfig, KvCache, KvDtype, Model, SamplerConfig, StopReason, generate,
};
use shoal::metrics::Metrics;
use shoal::serve::{Engine, EngineConfig, Job, JobEvent};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use tokio::sync::mpsc;

fn demo() -> Option<Arc<Model>> {
    crate::util::demo_model_2_threads()
}

const SYSTEM: &str = "You are a patient teacher in a classroom of twenty students. Answer \
    in short sentences, name the key facts, and never invent a date you are not sure of. \
    When a question is unclear, say what you would need to know to answer it.";

fn chat(m: &Model, user: &str) -> Vec<u32> {
    m.tokenizer().encode(
        &format!(
            "<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        ),
        false,
        true,
    )
}

fn questions(m: &Model) -> Vec<Vec<u32>> {
    let mut v: Vec<Vec<u32>> = [
        "Why is the sky blue?",
        "Name three rivers in Europe.",
        "What is 17 times 3?",
        "Who wrote Hamlet?",
        "Explain photosynthesis to a ten year old.",
    ]
    .iter()
    .map(|q| chat(m, q))
    .collect();
    // A long prompt (several prompt chunks) among short ones.
    let long = "Summarise this: ".to_owned()
        + &"The river flows to the sea and the sea rises to the clouds. ".repeat(40);
    v.push(chat(m, &long));
    v
}

fn cfg(temperature: f32, seed: u64, max_tokens: usize) -> GenerateConfig {
    GenerateConfig {
        max_tokens,
        sampler: SamplerConfig {
            temperature,
            top_p: 0.95,
            seed,
            ..SamplerConfig::default()
        },
        ..GenerateConfig::default()
    }
}

/// What a sequence produces alone, with the plain generation loop.
fn solo(m: &Model, prompt: &[u32], c: &GenerateConfig) -> (String, StopReason) {
    let mut cache: KvCache = m.new_cache_with(KvDtype::F16);
    let out = generate(
        m,
        &mut cache,
        prompt,
        c,
        None,
        |_| ControlFlow::Continue(()),
    )
    .expect("generate");
    (out.text, out.stop)
}

struct Run {
    text: String,
    stop: Option<StopReason>,
    cached: usize,
    failed: Option<String>,
}

async fn collect(mut rx: mpsc::UnboundedReceiver<JobEvent>) -> Run {
    let mut r = Run {
        text: String::new(),
        stop: None,
        cached: 0,
        failed: None,
    };
    while let Some(ev) = rx.recv().await {
        match ev {
            JobEvent::Started { cached_tokens, .. } => r.cached = cached_tokens,
            JobEvent::Token(t) => r.text.push_str(&t),
            JobEvent::Done { stop, tail, .. } => {
                r.text.push_str(&tail);
                r.stop = Some(stop);
                break;
            }
            JobEvent::Failed(e) => {
                r.failed = Some(e);
                break;
            }
        }
    }
    r
}

fn submit(
    engine: &Engine,
    prompt: Vec<u32>,
    c: GenerateConfig,
) -> mpsc::UnboundedReceiver<JobEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    let permit = engine.try_admit().expect("a queue slot");
    engine.submit(
        permit,
        Job {
            prompt,
            cfg: c,
            cancel: Arc::new(AtomicBool::new(false)),
            events: tx,
        },
    );
    rx
}

async fn batched(engine: &Engine, jobs: &[(Vec<u32>, GenerateConfig)]) -> Vec<Run> {
    let rxs: Vec<_> = jobs
        .iter()
        .map(|(p, c)| submit(engine, p.clone(), c.clone()))
        .collect();
    futures::future::join_all(rxs.into_iter().map(collect)).await
}

fn engine(m: &Arc<Model>, parallel: usize, kv_budget: u64) -> Arc<Engine> {
    Engine::start(
        "demo",
        m.clone(),
        None,
        EngineConfig {
            parallel,
            queue_depth: 16,
            kv_budget,
        },
        Arc::new(Metrics::new()),
    )
    .expect("engine")
}

/// Greedy and seeded sampled sequences, submitted together (a long prompt
/// among them, so prompt chunks share steps with decode rows), produce the
/// text each produces alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_sequences_equal_solo_runs() {
    let Some(m) = demo() else { return };
    let qs = questions(&m);
    let mut jobs = Vec::new();
    for (i, q) in qs.iter().enumerate() {
        jobs.push((q.clone(), cfg(0.0, 0, 24)));
        jobs.push((q.clone(), cfg(0.7, 100 + i as u64, 24)));
    }
    let e = engine(&m, 16, 1 << 30);
    let runs = batched(&e, &jobs).await;
    for ((p, c), r) in jobs.iter().zip(&runs) {
        assert!(r.failed.is_none(), "failed: {:?}", r.failed);
        let (text, stop) = solo(&m, p, c);
        assert_eq!(
            r.text, text,
            "temperature {}: batched != solo",
            c.sampler.temperature
        );
        assert_eq!(r.stop, Some(stop));
    }
}

/// A KV budget too small for all sequences at once: sequences wait, are
/// put back and recomputed, and every answer is still the solo one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tight_kv_budget_changes_no_answer() {
    let Some(m) = demo() else { return };
    let qs = questions(&m);
    let block = KvCache::block_bytes(m.kv_layout()) as u64;
    let longest = qs.iter().map(Vec::len).max().unwrap_or(0) + 40;
    // Room for the longest sequence and a little more: never all at once.
    let budget = (longest.div_ceil(32) as u64 + 3) * block;
    let jobs: Vec<_> = qs.iter().map(|q| (q.clone(), cfg(0.0, 0, 40))).collect();
    let e = engine(&m, 8, budget);
    let runs = batched(&e, &jobs).await;
    for ((p, c), r) in jobs.iter().zip(&runs) {
        assert!(r.failed.is_none(), "failed: {:?}", r.failed);
        let (text, _) = solo(&m, p, c);
        assert_eq!(
            r.text, text,
            "preempted/waiting sequence changed its answer"
        );
    }
    settled(&e).await;
}

/// A prompt whose keys and values alone exceed the budget fails with a
/// message naming the setting; the engine goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_larger_than_the_budget_fails_clearly() {
    let Some(m) = demo() else { return };
    let block = KvCache::block_bytes(m.kv_layout()) as u64;
    let e = engine(&m, 4, 2 * block);
    let long = chat(&m, &"many words ".repeat(60));
    let r = collect(submit(&e, long, cfg(0.0, 0, 4))).await;
    let msg = r.failed.expect("fails");
    assert!(msg.contains("inference.kv_budget"), "{msg}");
    let short = m.tokenizer().encode("Hi", false, true);
    let r = collect(submit(&e, short, cfg(0.0, 0, 4))).await;
    assert!(r.failed.is_none(), "{:?}", r.failed);
}

/// A sequence started while another with the same long prefix runs shares
/// its blocks (reported as cached prompt tokens) and answers as alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_sequence_shares_its_prefix() {
    let Some(m) = demo() else { return };
    let e = engine(&m, 4, 1 << 30);
    let a = chat(&m, "Name three rivers in Europe.");
    let b = chat(&m, "Name three mountains in Asia.");
    let first = submit(&e, a.clone(), cfg(0.0, 0, 48));
    // Let the first one's prompt be computed before the second arrives.
    let mut first = first;
    let mut head = Vec::new();
    loop {
        let ev = first.recv().await.expect("events");
        let tok = matches!(ev, JobEvent::Token(_));
        head.push(ev);
        if tok {
            break;
        }
    }
    let r2 = collect(submit(&e, b.clone(), cfg(0.0, 0, 16))).await;
    let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    assert!(common >= 32, "prompts share {common} tokens");
    assert!(
        r2.cached >= 32 && r2.cached <= common,
        "cached {} of a {common}-token common prefix",
        r2.cached
    );
    assert_eq!(r2.text, solo(&m, &b, &cfg(0.0, 0, 16)).0);
    let r1 = collect(first).await;
    assert!(r1.failed.is_none());
}

/// Cancelling one running sequence ends it alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_sequence_leaves_the_others_running() {
    let Some(m) = demo() else { return };
    let e = engine(&m, 4, 1 << 30);
    let qs = questions(&m);
    let (tx, rx) = mpsc::unbounded_channel();
    let cancel = Arc::new(AtomicBool::new(false));
    e.submit(
        e.try_admit().expect("slot"),
        Job {
            prompt: qs[0].clone(),
            cfg: cfg(0.0, 0, 200),
            cancel: cancel.clone(),
            events: tx,
        },
    );
    let other = submit(&e, qs[1].clone(), cfg(0.0, 0, 30));
    let mut rx = rx;
    // Cancel once it runs (a job cancelled while waiting just ends).
    while !matches!(rx.recv().await, Some(JobEvent::Token(_)) | None) {}
    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    let r = collect(rx).await;
    assert_eq!(r.stop, Some(StopReason::Cancelled));
    let o = collect(other).await;
    assert_eq!(o.text, solo(&m, &qs[1], &cfg(0.0, 0, 30)).0);
}

/// A sequence the model cannot run (an id outside the vocabulary, no
/// tokens) fails alone: the sequence running beside it is not touched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_sequence_fails_alone() {
    let Some(m) = demo() else { return };
    let e = engine(&m, 4, 1 << 30);
    let qs = questions(&m);
    let good = submit(&e, qs[2].clone(), cfg(0.0, 0, 20));
    let vocab = m.hparams().vocab_size as u32;
    let bad = collect(submit(&e, vec![1, vocab + 7], cfg(0.0, 0, 4))).await;
    let msg = bad.failed.expect("an id outside the vocabulary fails");
    assert!(msg.contains(&(vocab + 7).to_string()), "{msg}");
    let empty = collect(submit(&e, Vec::new(), cfg(0.0, 0, 4))).await;
    assert!(empty.failed.is_some(), "an empty prompt fails");
    let g = collect(good).await;
    assert!(g.failed.is_none(), "{:?}", g.failed);
    assert_eq!(g.text, solo(&m, &qs[2], &cfg(0.0, 0, 20)).0);
    settled(&e).await;
}

/// Waits (up to 10 s) until the engine holds no request: a job's slot is
/// freed just after its last event is sent.
async fn settled(e: &Engine) {
    for _ in 0..1000 {
        if e.pending() == 0 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{} requests still held by the engine", e.pending());
}
