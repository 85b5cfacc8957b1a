//! An NBD server (fixed newstyle handshake, simple replies, structured replies with block status
//! (`base:allocation`) when the client asks, STARTTLS with client certificates when configured
//! TLS-only) over any [`Backend`].
//!
//! The agent serves protected disks through it (each write journaled before it is acknowledged), and
//! the master target serves replicas read-only. Each connection runs on its own thread with blocking
//! I/O: requests are handled in arrival order, and replies are flushed when no further request is
//! already buffered, so a pipelining client (queue depth 32) gets its replies in batches.
//!
//! ```text
//! client --handshake--> options (GO / INFO / EXPORT_NAME / LIST / ABORT / STRUCTURED_REPLY /
//!                                 LIST_META_CONTEXT / SET_META_CONTEXT) --> transmission
//! transmission: request --> check range and size --> Backend op --> simple reply (+ data for READ),
//!               or with structured replies: READ as one data chunk, BLOCK_STATUS as one extents chunk
//! ```

pub mod local;
pub mod proto;
pub mod server;

pub use crate::disk::Extent;
pub use server::{serve_tcp, serve_unix, Allowed, Exports, NbdTls, TcpAccess};

/// Error of a backend operation, mapped to an NBD error code in the reply.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("no space left for the change journal: {0}")]
    NoSpace(String),
    #[error("export is read-only")]
    ReadOnly,
    #[error("export is shutting down: {0}")]
    Shutdown(String),
}

/// A disk that an NBD export serves.
pub trait Backend: Send + Sync {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool;
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError>;
    /// Writes `data` at `offset`; with `fua` the write is durable when this returns.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError>;
    /// Makes `offset..offset+len` read as zeroes (WRITE_ZEROES).
    fn zero(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError>;
    /// WRITE_ZEROES with NO_HOLE: reads as zeroes and stays allocated. Backends whose zeroing never
    /// punches holes keep the default.
    fn zero_allocated(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError> {
        self.zero(offset, len, fua)
    }
    /// TRIM: the range's contents are no longer needed. Backends here make it read as zeroes, so that a
    /// replica and its source always agree on what a trimmed range holds.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError> {
        self.zero(offset, len, fua)
    }
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), BackendError>;
    /// What `offset..offset+len` (inside the disk) holds: data, or holes that read as zeroes, at most
    /// `max` extents covering a prefix of the range (NBD_CMD_BLOCK_STATUS, `base:allocation`). A
    /// backend that cannot tell says data.
    fn extents(&self, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>, BackendError> {
        let _ = (offset, max);
        Ok(vec![Extent { len, hole: false }])
    }
}
