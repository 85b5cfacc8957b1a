//! Any bytes as a master target's undo segment: opening refuses, cuts a torn tail or rolls back, and
//! reading the oldest point never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use master_target::undo::Undo;
use sr_common::disk::DiskFile;
use sr_common::types::Seq;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("sr-fuzz-undo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("undo")).expect("temp dir");
    std::fs::write(dir.join("undo").join(format!("{:020}.undo", 1)), data).expect("segment");
    let disk = DiskFile::open_or_create(&dir.join("replica.img"), 1 << 20).expect("replica");
    let applied = Seq(data.first().copied().unwrap_or(0) as u64);
    let _ = Undo::open(&dir.join("undo"), 64 << 20, 3600, applied, &disk);
});
