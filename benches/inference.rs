//! Inference benchmark on the demo model: load time, tokenizer load time,
//! prompt processing (pp) and generation (tg) tokens/s, RSS.
//!
//! `cargo bench --bench inference -- [--threads N] [--pp N] [--tg N] [--model PATH]`
//! Prints one JSON object per thread count; `scripts/bench-inference.sh`
//! runs it next to llama.cpp and prints the ratios.

use shoal::inference::{Model, ModelConfig};
use std::time::Instant;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// CPU time of this process in ms (contention-independent, unlike wall time).
fn cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 * 1e-6
}

#[path = "../tests/it/util/demo.rs"]
#[allow(dead_code)]
mod demo;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut threads: Vec<usize> = vec![1, 2];
    let (mut pp, mut tg) = (512usize, 128usize);
    let mut model = std::env::var("SHOAL_TEST_MODEL").ok();
    let mut reps = 3;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--threads" => {
                threads = args
                    .next()
                    .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
                    .unwrap_or(threads)
            }
            "--pp" => pp = args.next().and_then(|v| v.parse().ok()).unwrap_or(pp),
            "--tg" => tg = args.next().and_then(|v| v.parse().ok()).unwrap_or(tg),
            "--reps" => reps = args.next().and_then(|v| v.parse().ok()).unwrap_or(reps),
            "--model" => model = args.next(),
            _ => {}
        }
    }
    let path = model.unwrap_or_else(|| demo::expected_demo_model().display().to_string());
    let rss0 = rss_kib();
    for &t in &threads {
        let t0 = Instant::now();
        let c0 = cpu_ms();
        let m = match Model::load_with(
            &path,
            &ModelConfig {
                threads: t,
                ..Default::default()
            },
        ) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("load {path}: {e}");
                std::process::exit(1);
            }
        };
        let load_ms = t0.elapsed().as_secs_f64() * 1e3;
        let load_cpu_ms = cpu_ms() - c0;
        // Tokenizer build alone (not the shared instance), CPU time.
        let tok_cpu_ms = std::fs::read(&path)
            .ok()
            .and_then(|b| shoal::gguf::Gguf::parse(&b).ok())
            .map(|g| {
                let c = cpu_ms();
                let _t = shoal::inference::Tokenizer::from_gguf(&g);
                cpu_ms() - c
            })
            .unwrap_or(f64::NAN);
        let rss_load = rss_kib();
        let vocab = m.hparams().vocab_size as u32;
        // Deterministic pseudo-random prompt tokens (as llama-bench does).
        let prompt: Vec<u32> = (0..pp as u32).map(|i| (i * 7919 + 13) % vocab).collect();
        let mut best_pp = f64::MAX;
        let mut best_tg = f64::MAX;
        for _ in 0..reps {
            let mut c = m.new_cache();
            let t1 = Instant::now();
            let _ = m.forward(&mut c, &prompt);
            best_pp = best_pp.min(t1.elapsed().as_secs_f64());
            let mut c = m.new_cache();
            let _ = m.forward(&mut c, &prompt[..1]);
            let t2 = Instant::now();
            let mut tok = 1u32;
            for _ in 0..tg {
                let l = m.forward(&mut c, &[tok]).unwrap_or_default();
                tok = l
                    .iter()
                    .enumerate()
                    .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b })
                    .0 as u32;
            }
            best_tg = best_tg.min(t2.elapsed().as_secs_f64());
        }
        println!(
            "{{\"impl\":\"shoal\",\"threads\":{t},\"pp\":{pp},\"pp_tps\":{:.1},\"tg\":{tg},\"tg_tps\":{:.1},\"load_ms\":{load_ms:.1},\"load_cpu_ms\":{load_cpu_ms:.1},\"tokenizer_build_cpu_ms\":{tok_cpu_ms:.2},\"tokenizer_load_ms\":{:.2},\"rss_before_kib\":{rss0},\"rss_after_load_kib\":{rss_load},\"rss_end_kib\":{},\"file_bytes\":{},\"isa\":\"{}\"}}",
            pp as f64 / best_pp,
            tg as f64 / best_tg,
            m.tokenizer_load_time().as_secs_f64() * 1e3,
            rss_kib(),
            m.file_len(),
            m.isa().name(),
        );
    }
}
