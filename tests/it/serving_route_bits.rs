//! What the serving layer gives the mesh router (issue 19): an engine's
//! load snapshot ([`Engine::load`]) on a real engine, the role chunk of a
//! streamed chat sent with the first token, and who served a request
//! (`X-Shoal-Served-By`, the `served_by` field).

use crate::util::http::eventually;
use shoal::inference::{GenerateConfig, SamplerConfig};
use shoal::metrics::Metrics;
use shoal::serve::{Engine, EngineConfig, EngineLoad, Job, JobEvent};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use tokio::sync::mpsc;

fn submit(
    engine: &Engine,
    prompt: Vec<u32>,
    max_tokens: usize,
) -> mpsc::UnboundedReceiver<JobEvent> {
    let (tx, rx) = mpsc::unbounded_channel();
    let permit = engine.try_admit().expect("a queue slot");
    engine.submit(
        permit,
        Job {
            prompt,
            cfg: GenerateConfig {
                max_tokens,
                sampler: SamplerConfig {
                    temperature: 0.0,
                    ..SamplerConfig::default()
                },
                // Every job runs its whole length.
                stop_at_eos: false,
                ..GenerateConfig::default()
            },
            cancel: Arc::new(AtomicBool::new(false)),
            events: tx,
        },
    );
    rx
}

/// Waits for a job's end; returns the tokens it generated.
async fn finish(mut rx: mpsc::UnboundedReceiver<JobEvent>) -> usize {
    while let Some(ev) = rx.recv().await {
        match ev {
            JobEvent::Done {
                completion_tokens, ..
            } => return completion_tokens,
            JobEvent::Failed(e) => panic!("job failed: {e}"),
            _ => {}
        }
    }
    panic!("job ended without Done");
}

/// The load of a real engine: bounds as configured, nothing running
/// before, two running and one waiting while three jobs share two slots,
/// nothing after, and both rates measured (> 0) once a request ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_load_follows_running_and_waiting_jobs() {
    let Some(m) = crate::util::demo_model_2_threads() else {
        return;
    };
    let e = Engine::start(
        "demo",
        m.clone(),
        None,
        EngineConfig {
            parallel: 2,
            queue_depth: 5,
            kv_budget: 1 << 30,
        },
        Arc::new(Metrics::new()),
    )
    .expect("engine");
    assert_eq!(
        e.load(),
        EngineLoad {
            parallel: 2,
            queue_depth: 5,
            ..EngineLoad::default()
        },
        "an idle engine: its bounds, nothing running, no rate yet"
    );
    let prompt = m.tokenizer().encode(
        "<|im_start|>user\nTell me about the sea.<|im_end|>\n<|im_start|>assistant\n",
        false,
        true,
    );
    let rxs: Vec<_> = (0..3).map(|_| submit(&e, prompt.clone(), 96)).collect();
    // The third job cannot start before one of the first two ends.
    eventually("two running and one waiting", || {
        let l = e.load();
        l.running == 2 && l.waiting == 1
    })
    .await;
    let done = futures::future::join_all(rxs.into_iter().map(finish)).await;
    assert_eq!(done, vec![96, 96, 96]);
    eventually("nothing running or waiting after the jobs", || {
        let l = e.load();
        l.running == 0 && l.waiting == 0
    })
    .await;
    let l = e.load();
    assert!(l.prompt_tps > 0.0, "prompt rate measured: {l:?}");
    assert!(l.decode_tps > 0.0, "decode rate measured: {l:?}");
    // Rates, not garbage: a 135M model on this machine is far below these.
    assert!(
        l.decode_tps < 1.0e5 && l.prompt_tps < 1.0e7,
        "plausible rates: {l:?}"
    );
    eprintln!("engine load after 3 x 96 tokens: {l:?}");
}
