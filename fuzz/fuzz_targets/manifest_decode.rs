#![no_main]
//! Manifest decoding: errors only, and whatever decodes re-encodes to the same bytes.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = shoal::store::Manifest::decode(data) {
        assert_eq!(m.encode(), data);
        let _ = m.chunk_at(m.size / 2);
    }
    let _ = shoal::store::HaveMap::from_bytes(data);
});
