//! Any bytes as a process server's cache file, with their checksum made valid so that the rkyv
//! validation and the batch checks are what is exercised.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sr_common::types::Seq;

fuzz_target!(|data: &[u8]| {
    let mut bytes = data.to_vec();
    bytes.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
    let path = std::path::Path::new("fuzz.batch");
    if let Ok(process_server::cache::Cached::Plain(b)) = process_server::cache::decode(&bytes, Seq(1), Seq(4), path) {
        b.check().expect("a decoded batch passes its checks");
    }
    let _ = process_server::cache::decode(data, Seq(1), Seq(4), path);
});
