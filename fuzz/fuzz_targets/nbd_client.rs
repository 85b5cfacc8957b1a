//! Any bytes from an NBD client, against a read-only in-memory export and a writable one: the server
//! answers or hangs up, never panics, and never touches bytes outside the export.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sr_common::nbd::{Backend, BackendError, Exports};
use std::sync::{Arc, Mutex};

struct Mem(Mutex<Vec<u8>>, bool);

impl Backend for Mem {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_only(&self) -> bool {
        self.1
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let d = self.0.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8], _: bool) -> Result<(), BackendError> {
        let mut d = self.0.lock().unwrap();
        d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn zero(&self, offset: u64, len: u64, _: bool) -> Result<(), BackendError> {
        let mut d = self.0.lock().unwrap();
        d[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }
    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let exports = Exports::new();
    exports.insert("rw", Arc::new(Mem(Mutex::new(vec![0; 64 << 10]), false)));
    exports.insert("ro", Arc::new(Mem(Mutex::new(vec![1; 4096]), true)));
    let _ = sr_common::nbd::server::serve_connection(data, std::io::sink(), &exports);
});
