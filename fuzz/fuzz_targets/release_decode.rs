#![no_main]
//! Release decoding and verification: errors only, never a panic.
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = shoal::store::SignedRelease::decode(data) {
        let _ = s.verify();
    }
});
