//! Fuzzes the KV mesh wire decoders (`kvcache::remote::wire`): they must never
//! panic, and whatever they accept must survive an encode/decode round trip.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shoal::kvcache::remote::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = wire::decode_request(data) {
        assert_eq!(wire::decode_request(&wire::encode_request(&r)).ok(), Some(r));
    }
    let _ = wire::request_len(data);
    let asked = data.first().map_or(0, |&b| usize::from(b));
    if let Ok(m) = wire::decode_have(data.get(1..).unwrap_or_default(), asked) {
        assert!(m <= asked);
        assert_eq!(wire::decode_have(&wire::encode_have(m), asked), Ok(m));
    }
});
