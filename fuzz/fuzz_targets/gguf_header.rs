#![no_main]
//! The GGUF parser must return an error, never panic or over-allocate, on any input.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(g) = shoal::gguf::Gguf::parse(data) {
        // Whatever parses must describe ranges inside the input.
        for t in &g.tensors {
            let r = g.tensor_range(t);
            assert!(r.end <= data.len() as u64);
        }
        let _ = shoal::store::chunker::gguf_spans(&g, data.len() as u64);
    }
});
