//! Any bytes as a frame body from a peer: decoding must return a message or an error, never panic,
//! and a decoded batch's own checks must not panic either.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sr_common::wire::{decode, Message};

fuzz_target!(|data: &[u8]| {
    if let Ok(Message::Batch(b)) = decode(data) {
        let _ = b.check();
        let _ = b.payload_bytes();
    }
});
