//! The KV cache never changes an answer: logits after restoring a prefix
//! (exported and imported, as the prefix cache does) and prefilling the
//! rest equal, bit for bit, the logits of one cold prefill of the whole
//! prompt, for many split points, both storage formats and a prefix that
//! was computed token by token (as generated tokens are).

use shoal::inference::{
    GenerateConfig, KvCache, KvDtype, Model, SamplerConfig, generate, generate_after,
};
use std::ops::ControlFlow;
use std::sync::Arc;

fn demo() -> Option<Arc<Model>> {
    crate::util::demo_model_2_threads()
}

/// A chat prompt of about a hundred tokens.
fn prompt(m: &Model) -> Vec<u32> {
    m.tokenizer().encode(
        "<|im_start|>system\nYou are a patient history teacher. Answer in one \
         short sentence and name the key date.<|im_end|>\n<|im_start|>user\nWhat \
         is the name of the national anthem of France, who wrote it and in which \
         year was it written?<|im_end|>\n<|im_start|>assistant\n",
        false,
        true,
    )
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// The first index where two logit vectors differ, with both values.
fn first_diff(a: &[f32], b: &[f32]) -> Option<(usize, f32, f32)> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x.to_bits() != y.to_bits())
        .map(|i| (i, a[i], b[i]))
}

#[test]
fn restored_prefix_gives_bit_identical_logits() {
    let Some(m) = demo() else { return };
    let all = prompt(&m);
    let n = all.len();
    assert!(n > 70, "prompt too short: {n} tokens");
    let id = m.id();
    for dtype in [KvDtype::F16, KvDtype::Q8_0] {
        let cold = m
            .forward(&mut m.new_cache_with(dtype), &all)
            .expect("cold prefill");
        for split in [1, 2, 5, 16, 31, 32, 33, 47, 50, 64, n - 2, n - 1] {
            // The prefix computed in one batch, exported, imported.
            let mut c = m.new_cache_with(dtype);
            m.forward(&mut c, &all[..split]).expect("prefix");
            let blob = c.export(0..split, dtype, &id).expect("export");
            let mut restored = m.new_cache_with(dtype);
            restored.import_append(&blob, &id).expect("import");
            let warm = m.forward(&mut restored, &all[split..]).expect("suffix");
            assert!(
                bits(&warm) == bits(&cold),
                "{dtype:?}, split at {split} of {n}: first difference {:?}",
                first_diff(&cold, &warm)
            );
            // The live cache itself (no export) continues identically too.
            let live = m.forward(&mut c, &all[split..]).expect("suffix");
            assert!(
                bits(&live) == bits(&cold),
                "{dtype:?}, live split at {split}: first difference {:?}",
                first_diff(&cold, &live)
            );
        }
        // A prefix computed one token at a time (the way generated tokens
        // enter the cache), restored from blocks of 32 positions.
        let split = 64;
        let mut c = m.new_cache_with(dtype);
        for t in &all[..split] {
            m.forward(&mut c, std::slice::from_ref(t)).expect("step");
        }
        let mut restored = m.new_cache_with(dtype);
        for a in (0..split).step_by(32) {
            let blob = c.export(a..a + 32, dtype, &id).expect("export");
            restored.import_append(&blob, &id).expect("import");
        }
        let warm = m.forward(&mut restored, &all[split..]).expect("suffix");
        assert!(
            bits(&warm) == bits(&cold),
            "{dtype:?}, token-by-token prefix: first difference {:?}",
            first_diff(&cold, &warm)
        );
    }
}

/// Live values already are what an export and import of them give: a
/// round trip changes no bit, so every tier holds the very same KV.
#[test]
fn live_kv_survives_a_round_trip_unchanged() {
    let Some(m) = demo() else { return };
    let all = prompt(&m);
    let id = m.id();
    for dtype in [KvDtype::F16, KvDtype::Q8_0] {
        let mut c = m.new_cache_with(dtype);
        m.forward(&mut c, &all).expect("prefill");
        let blob = c.export(0..c.len(), dtype, &id).expect("export");
        let back = KvCache::import(&blob, m.kv_layout(), &id).expect("import");
        let l = m.kv_layout();
        for pos in 0..c.len() {
            for layer in 0..l.n_layer {
                for kv in 0..2 {
                    for h in 0..l.n_kv_head {
                        let a = c.get(layer, kv, h, pos).expect("live");
                        let b = back.get(layer, kv, h, pos).expect("imported");
                        assert!(
                            bits(a) == bits(b),
                            "{dtype:?}: position {pos} layer {layer} kv {kv} head {h} changed"
                        );
                    }
                }
            }
        }
        // Re-exporting the imported cache gives the same bytes.
        let again = back.export(0..back.len(), dtype, &id).expect("export");
        assert!(
            again == blob,
            "{dtype:?}: a second round trip changed bytes"
        );
    }
}

/// With a repetition penalty, a run continuing a restored prefix samples
/// what a cold run samples when the restored tokens are passed as the
/// history before the prompt ([`generate_after`], as the engine does).
#[test]
fn repetition_penalty_sees_the_restored_prefix() {
    let Some(m) = demo() else { return };
    let all = prompt(&m);
    let cfg = GenerateConfig {
        max_tokens: 24,
        stop_at_eos: false,
        sampler: SamplerConfig {
            repeat_penalty: 1.5,
            repeat_last_n: 200,
            ..SamplerConfig::default()
        },
        ..Default::default()
    };
    fn go(_: &shoal::inference::TokenEvent<'_>) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
    let cold = generate(&m, &mut m.new_cache(), &all, &cfg, None, go).expect("cold");
    for split in [16, 64, all.len() - 1] {
        let mut c = m.new_cache();
        m.forward(&mut c, &all[..split]).expect("prefix");
        let blob = c.export(0..split, KvDtype::F16, &m.id()).expect("export");
        let mut restored = KvCache::import(&blob, m.kv_layout(), &m.id()).expect("import");
        let warm = generate_after(
            &m,
            &mut restored,
            &all[..split],
            &all[split..],
            &cfg,
            None,
            go,
        )
        .expect("warm");
        assert_eq!(warm.tokens, cold.tokens, "split at {split}");
    }
}
