//! Synthetic inputs: pseudo-random bytes and floats, and small GGUF files
//! (a store-test "model" of opaque tensors, a tiny random llama).

use shoal::gguf::writer::{TensorSpec, write};
use shoal::gguf::{GgmlType, Value};

/// A deterministic pseudo-random byte stream.
pub fn bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A synthetic GGUF "model" with tensors of the given byte sizes (I8), contents from `seed`.
pub fn gguf_model(sizes: &[usize], seed: u64) -> Vec<u8> {
    let tensors: Vec<TensorSpec> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| TensorSpec {
            name: format!("blk.{i}.weight"),
            dims: vec![n as u64],
            ty: GgmlType::I8,
            data: bytes(seed + i as u64, n),
        })
        .collect();
    write(
        &[
            ("general.architecture", Value::String("llama".into())),
            ("general.name", Value::String("synthetic".into())),
        ],
        &tensors,
    )
}

/// Deterministic pseudo-random floats in [-scale, scale).
pub fn rand_vec(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Encodes `rows x cols` floats as a GGUF tensor of type `ty` (via candle's quantizers).
pub fn encode(ty: GgmlType, data: &[f32], cols: usize) -> Vec<u8> {
    use candle_core::quantized::{GgmlDType, QTensor};
    let rows = data.len() / cols;
    match ty {
        // Same size as f16; used to build files with an unsupported type.
        GgmlType::BF16 => encode(GgmlType::F16, data, cols),
        GgmlType::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => data
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => {
            let dt = match ty {
                GgmlType::Q4_0 => GgmlDType::Q4_0,
                GgmlType::Q4_1 => GgmlDType::Q4_1,
                GgmlType::Q5_0 => GgmlDType::Q5_0,
                GgmlType::Q5_1 => GgmlDType::Q5_1,
                GgmlType::Q8_0 => GgmlDType::Q8_0,
                GgmlType::Q2_K => GgmlDType::Q2K,
                GgmlType::Q3_K => GgmlDType::Q3K,
                GgmlType::Q4_K => GgmlDType::Q4K,
                GgmlType::Q5_K => GgmlDType::Q5K,
                GgmlType::Q6_K => GgmlDType::Q6K,
                other => panic!("no encoder for {other:?}"),
            };
            let t = candle_core::Tensor::from_slice(data, (rows, cols), &candle_core::Device::Cpu)
                .expect("tensor");
            QTensor::quantize(&t, dt)
                .expect("quantize")
                .data()
                .expect("data")
                .into_owned()
        }
    }
}

/// A tiny random llama GGUF: width 256, 2 layers, 4 heads (2 kv heads),
/// byte-level vocabulary of 256 + 4 tokens, matrices of type `ty`.
pub fn tiny_llama(ty: GgmlType, arch: &str) -> Vec<u8> {
    let (d, ff, vocab, layers) = (256usize, 512usize, 260usize, 2usize);
    // gpt2 byte alphabet, then a few merged tokens and two specials.
    let mut tokens: Vec<String> = (0..=255u8)
        .map(|b| {
            let printable = matches!(b, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff);
            if printable {
                char::from(b).to_string()
            } else {
                let n = (0..b)
                    .filter(|&x| !matches!(x, b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff))
                    .count() as u32;
                char::from_u32(256 + n).expect("char").to_string()
            }
        })
        .collect();
    tokens.extend(["he".into(), "ll".into(), "<s>".into(), "</s>".into()]);
    let mut types = vec![Value::I32(1); 258];
    types.extend([Value::I32(3), Value::I32(3)]);
    let s = |v: &str| Value::String(v.to_owned());
    let meta: Vec<(&str, Value)> = vec![
        ("general.architecture", s(arch)),
        ("llama.block_count", Value::U32(layers as u32)),
        ("llama.context_length", Value::U32(256)),
        ("llama.embedding_length", Value::U32(d as u32)),
        ("llama.feed_forward_length", Value::U32(ff as u32)),
        ("llama.attention.head_count", Value::U32(4)),
        ("llama.attention.head_count_kv", Value::U32(2)),
        ("llama.rope.freq_base", Value::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5)),
        ("tokenizer.ggml.model", s("gpt2")),
        ("tokenizer.ggml.pre", s("smollm")),
        (
            "tokenizer.ggml.tokens",
            Value::Array(tokens.iter().map(|t| s(t)).collect()),
        ),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        (
            "tokenizer.ggml.merges",
            Value::Array(vec![s("h e"), s("l l")]),
        ),
        ("tokenizer.ggml.bos_token_id", Value::U32(258)),
        ("tokenizer.ggml.eos_token_id", Value::U32(259)),
    ];
    let mut seed = 1;
    let mut mat = |name: String, rows: usize, cols: usize, ty: GgmlType| {
        seed += 1;
        let data = rand_vec(rows * cols, seed, 0.5 / (cols as f32).sqrt() * 3.0);
        TensorSpec {
            name,
            dims: vec![cols as u64, rows as u64],
            ty,
            data: encode(ty, &data, cols),
        }
    };
    let norm = |name: String| TensorSpec {
        name,
        dims: vec![d as u64],
        ty: GgmlType::F32,
        data: (0..d)
            .flat_map(|i| (1.0 + (i % 7) as f32 / 10.0).to_le_bytes())
            .collect(),
    };
    let mut t = vec![mat("token_embd.weight".into(), vocab, d, ty)];
    for l in 0..layers {
        t.push(norm(format!("blk.{l}.attn_norm.weight")));
        t.push(mat(format!("blk.{l}.attn_q.weight"), d, d, ty));
        t.push(mat(format!("blk.{l}.attn_k.weight"), 128, d, ty));
        t.push(mat(format!("blk.{l}.attn_v.weight"), 128, d, ty));
        t.push(mat(format!("blk.{l}.attn_output.weight"), d, d, ty));
        t.push(norm(format!("blk.{l}.ffn_norm.weight")));
        t.push(mat(format!("blk.{l}.ffn_gate.weight"), ff, d, ty));
        t.push(mat(format!("blk.{l}.ffn_up.weight"), ff, d, ty));
        t.push(mat(format!("blk.{l}.ffn_down.weight"), d, ff, ty));
    }
    t.push(norm("output_norm.weight".into()));
    t.push(mat("output.weight".into(), vocab, d, ty));
    write(&meta, &t)
}
