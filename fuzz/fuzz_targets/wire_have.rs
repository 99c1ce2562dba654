//! Fuzzes the mesh wire decoder `decode_have`: it must never panic, and whatever
//! it accepts must survive an encode/decode round trip unchanged.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shoal::mesh::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = wire::decode_have(data) {
        assert_eq!(wire::decode_have(&wire::encode(&m)).ok(), Some(m));
    }
});
