//! Any bytes as a decrypted batch payload: decompression is bounded and validated.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = sr_common::compress::decompress(data) {
        let _ = b.check();
    }
});
