//! Any bytes as the agent's journal segment: opening cuts a damaged tail or refuses, and what opens
//! reads back in order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mobility_agent::journal::{read_from, Journal};
use sr_common::types::Seq;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("sr-fuzz-journal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join(format!("{:020}.seg", 1)), data).expect("segment");
    if let Ok(j) = Journal::open(&dir) {
        let _ = read_from(&j.segments(), Seq(1), |_| true);
    }
});
