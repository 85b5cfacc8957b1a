//! NBD connection handling: negotiation, then the transmission loop.

use super::proto::*;
use super::{Backend, BackendError};
use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::{Arc, RwLock};

/// The exports a server offers, by name. Shared by all connections.
#[derive(Default)]
pub struct Exports {
    map: RwLock<BTreeMap<String, Arc<dyn Backend>>>,
}

impl Exports {
    pub fn new() -> Arc<Exports> {
        Arc::new(Exports::default())
    }
    pub fn insert(&self, name: &str, backend: Arc<dyn Backend>) {
        self.map.write().expect("exports lock poisoned").insert(name.to_string(), backend);
    }
    pub fn remove(&self, name: &str) {
        self.map.write().expect("exports lock poisoned").remove(name);
    }
    fn get(&self, name: &str) -> Option<Arc<dyn Backend>> {
        self.map.read().expect("exports lock poisoned").get(name).cloned()
    }
    fn names(&self) -> Vec<String> {
        self.map.read().expect("exports lock poisoned").keys().cloned().collect()
    }
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
}

type Result<T> = std::result::Result<T, ConnError>;

/// Accepts TCP clients on a background thread, one thread per connection.
pub fn serve_tcp(listener: std::net::TcpListener, exports: Arc<Exports>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("nbd-accept-tcp".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                        spawn_conn(s, peer, exports.clone());
                    }
                    Err(e) => tracing::warn!(error = %e, "NBD accept failed"),
                }
            }
        })
        .expect("spawning the NBD accept thread")
}

/// Accepts Unix-socket clients on a background thread, one thread per connection.
pub fn serve_unix(listener: std::os::unix::net::UnixListener, exports: Arc<Exports>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("nbd-accept-unix".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => spawn_conn(s, "unix".into(), exports.clone()),
                    Err(e) => tracing::warn!(error = %e, "NBD accept failed"),
                }
            }
        })
        .expect("spawning the NBD accept thread")
}

trait Stream: Read + Write + Send + 'static {
    fn split(&self) -> std::io::Result<Self>
    where
        Self: Sized;
}
impl Stream for std::net::TcpStream {
    fn split(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
}
impl Stream for std::os::unix::net::UnixStream {
    fn split(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
}

fn spawn_conn<S: Stream>(s: S, peer: String, exports: Arc<Exports>) {
    let spawned = std::thread::Builder::new().name("nbd-conn".into()).spawn(move || {
        let w = match s.split() {
            Ok(w) => w,
            Err(e) => return tracing::warn!(error = %e, "NBD connection setup failed"),
        };
        let mut r = BufReader::with_capacity(512 * 1024, s);
        let mut w = BufWriter::with_capacity(512 * 1024, w);
        metrics::gauge!("sr_nbd_connections").increment(1.0);
        match handle(&mut r, &mut w, &exports) {
            Ok(()) => tracing::debug!(peer, "NBD client disconnected"),
            Err(e) => tracing::warn!(peer, error = %e, "NBD connection closed"),
        }
        let _ = w.flush();
        metrics::gauge!("sr_nbd_connections").decrement(1.0);
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start a thread for an NBD connection");
    }
}

fn read_u32(r: &mut impl Read) -> Result<u32> {
    let mut b = [0; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}
fn read_u64(r: &mut impl Read) -> Result<u64> {
    let mut b = [0; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn opt_reply(w: &mut impl Write, opt: u32, kind: u32, data: &[u8]) -> Result<()> {
    w.write_all(&OPT_REPLY_MAGIC.to_be_bytes())?;
    w.write_all(&opt.to_be_bytes())?;
    w.write_all(&kind.to_be_bytes())?;
    w.write_all(&(data.len() as u32).to_be_bytes())?;
    w.write_all(data)?;
    w.flush()?;
    Ok(())
}

fn transmission_flags(b: &dyn Backend) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
    if b.read_only() {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    f
}

/// Serves one client on an already-connected byte stream until it disconnects or misbehaves. The
/// accept loops call this; so do the fuzz targets, with in-memory streams.
pub fn serve_connection<R: Read, W: Write>(r: R, w: W, exports: &Exports) -> std::result::Result<(), String> {
    let mut r = BufReader::new(r);
    let mut w = BufWriter::new(w);
    let res = handle(&mut r, &mut w, exports);
    let _ = w.flush();
    res.map_err(|e| e.to_string())
}

fn handle<R: Read, W: Write>(r: &mut BufReader<R>, w: &mut W, exports: &Exports) -> Result<()> {
    w.write_all(&NBDMAGIC.to_be_bytes())?;
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    w.flush()?;
    let client_flags = read_u32(r)?;
    if client_flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0 {
        return Err(ConnError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & CLIENT_FLAG_NO_ZEROES != 0;
    let backend = loop {
        if read_u64(r)? != IHAVEOPT {
            return Err(ConnError::Protocol("option without the IHAVEOPT magic".into()));
        }
        let opt = read_u32(r)?;
        let len = read_u32(r)?;
        if len > MAX_OPTION {
            return Err(ConnError::Protocol(format!("option {opt} of {len} bytes exceeds {MAX_OPTION}")));
        }
        let mut data = vec![0; len as usize];
        r.read_exact(&mut data)?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                // This option has no error reply: an unknown name closes the connection.
                let Some(b) = exports.get(&name) else {
                    return Err(ConnError::Protocol(format!("EXPORT_NAME for unknown export {name:?}")));
                };
                w.write_all(&b.size().to_be_bytes())?;
                w.write_all(&transmission_flags(b.as_ref()).to_be_bytes())?;
                if !no_zeroes {
                    w.write_all(&[0u8; 124])?;
                }
                w.flush()?;
                break b;
            }
            OPT_ABORT => {
                let _ = opt_reply(w, opt, REP_ACK, &[]);
                return Ok(());
            }
            OPT_LIST => {
                if len != 0 {
                    opt_reply(w, opt, REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                for name in exports.names() {
                    let mut d = (name.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(name.as_bytes());
                    opt_reply(w, opt, REP_SERVER, &d)?;
                }
                opt_reply(w, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Some(name) = parse_info_request(&data) else {
                    opt_reply(w, opt, REP_ERR_INVALID, b"malformed INFO/GO request")?;
                    continue;
                };
                let Some(b) = exports.get(&name) else {
                    opt_reply(w, opt, REP_ERR_UNKNOWN, format!("no export named {name:?}").as_bytes())?;
                    continue;
                };
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&b.size().to_be_bytes());
                info.extend_from_slice(&transmission_flags(b.as_ref()).to_be_bytes());
                opt_reply(w, opt, REP_INFO, &info)?;
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                bs.extend_from_slice(&1u32.to_be_bytes());
                bs.extend_from_slice(&4096u32.to_be_bytes());
                bs.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                opt_reply(w, opt, REP_INFO, &bs)?;
                opt_reply(w, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    break b;
                }
            }
            _ => opt_reply(w, opt, REP_ERR_UNSUP, b"option not supported")?,
        }
    };
    transmission(r, w, backend.as_ref())
}

/// INFO/GO data: u32 name length, name, u16 count, count x u16 info types.
fn parse_info_request(d: &[u8]) -> Option<String> {
    let n = u32::from_be_bytes(d.get(0..4)?.try_into().ok()?) as usize;
    let name = d.get(4..4usize.checked_add(n)?)?;
    let count = u16::from_be_bytes(d.get(4 + n..6 + n)?.try_into().ok()?) as usize;
    if d.len() != 6 + n + 2 * count {
        return None;
    }
    String::from_utf8(name.to_vec()).ok()
}

fn reply<W: Write>(w: &mut W, err: u32, cookie: u64, data: Option<&[u8]>) -> Result<()> {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&err.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    w.write_all(&h)?;
    if let Some(d) = data {
        w.write_all(d)?;
    }
    if err != 0 {
        metrics::counter!("sr_nbd_errors_total").increment(1);
    }
    Ok(())
}

fn errno(e: &BackendError) -> u32 {
    match e {
        BackendError::Io(_) => EIO,
        BackendError::NoSpace(_) => ENOSPC,
        BackendError::ReadOnly => EPERM,
        BackendError::Shutdown(_) => ESHUTDOWN,
    }
}

/// Request counters, resolved once per connection rather than looked up on every request.
struct Counters {
    read: metrics::Counter,
    write: metrics::Counter,
    flush: metrics::Counter,
    trim: metrics::Counter,
    write_zeroes: metrics::Counter,
    read_bytes: metrics::Counter,
    write_bytes: metrics::Counter,
}

impl Counters {
    fn new() -> Counters {
        let req = |cmd: &'static str| metrics::counter!("sr_nbd_requests_total", "cmd" => cmd);
        Counters {
            read: req("read"),
            write: req("write"),
            flush: req("flush"),
            trim: req("trim"),
            write_zeroes: req("write_zeroes"),
            read_bytes: metrics::counter!("sr_nbd_read_bytes_total"),
            write_bytes: metrics::counter!("sr_nbd_write_bytes_total"),
        }
    }
}

/// Whether a WRITE, TRIM or WRITE_ZEROES may go to the backend: the NBD error to answer if not,
/// `Ok(false)` when there is nothing to do (zero length), `Ok(true)` to proceed.
fn may_change(bad_flags: bool, read_only: bool, in_range: bool, len: u32) -> std::result::Result<bool, u32> {
    if bad_flags {
        Err(EINVAL)
    } else if read_only {
        Err(EPERM)
    } else if !in_range {
        Err(ENOSPC)
    } else {
        Ok(len > 0)
    }
}

fn transmission<R: Read, W: Write>(r: &mut BufReader<R>, w: &mut W, b: &dyn Backend) -> Result<()> {
    let size = b.size();
    let counters = Counters::new();
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let mut h = [0u8; 28];
        match r.read_exact(&mut h) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let magic = u32::from_be_bytes(h[0..4].try_into().expect("4 bytes"));
        if magic != REQUEST_MAGIC {
            return Err(ConnError::Protocol(format!("bad request magic {magic:#x}")));
        }
        let flags = u16::from_be_bytes(h[4..6].try_into().expect("2 bytes"));
        let cmd = u16::from_be_bytes(h[6..8].try_into().expect("2 bytes"));
        let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8 bytes"));
        let offset = u64::from_be_bytes(h[16..24].try_into().expect("8 bytes"));
        let len = u32::from_be_bytes(h[24..28].try_into().expect("4 bytes"));
        let in_range = offset.checked_add(len as u64).is_some_and(|end| end <= size);
        let fua = flags & CMD_FLAG_FUA != 0;
        let bad_flags = flags & !KNOWN_CMD_FLAGS != 0;
        match cmd {
            CMD_READ => {
                counters.read.increment(1);
                if len > MAX_REQUEST || !in_range || bad_flags {
                    reply(w, EINVAL, cookie, None)?;
                } else {
                    buf.resize(len as usize, 0);
                    match b.read(offset, &mut buf) {
                        Ok(()) => {
                            counters.read_bytes.increment(len as u64);
                            reply(w, 0, cookie, Some(&buf))?
                        }
                        Err(e) => {
                            tracing::warn!(offset, len, error = %e, "NBD read failed");
                            reply(w, errno(&e), cookie, None)?
                        }
                    }
                }
            }
            CMD_WRITE => {
                counters.write.increment(1);
                if len > MAX_REQUEST {
                    // The payload cannot be skipped safely: refuse and close.
                    reply(w, EINVAL, cookie, None)?;
                    w.flush()?;
                    return Err(ConnError::Protocol(format!("write of {len} bytes exceeds {MAX_REQUEST}")));
                }
                buf.resize(len as usize, 0);
                r.read_exact(&mut buf)?;
                let res = may_change(bad_flags, b.read_only(), in_range, len).and_then(|go| {
                    if !go {
                        return Ok(());
                    }
                    b.write(offset, &buf, fua).map_err(|e| {
                        tracing::warn!(offset, len, error = %e, "NBD write failed");
                        errno(&e)
                    })
                });
                if res.is_ok() {
                    counters.write_bytes.increment(len as u64);
                }
                reply(w, res.err().unwrap_or(0), cookie, None)?;
            }
            CMD_FLUSH => {
                counters.flush.increment(1);
                let err = match b.flush() {
                    Ok(()) => 0,
                    Err(e) => {
                        tracing::warn!(error = %e, "NBD flush failed");
                        errno(&e)
                    }
                };
                reply(w, err, cookie, None)?;
            }
            CMD_TRIM | CMD_WRITE_ZEROES => {
                if cmd == CMD_TRIM { &counters.trim } else { &counters.write_zeroes }.increment(1);
                let res = may_change(bad_flags, b.read_only(), in_range, len).and_then(|go| {
                    if !go {
                        return Ok(());
                    }
                    let r =
                        if cmd == CMD_TRIM { b.trim(offset, len as u64, fua) } else { b.zero(offset, len as u64, fua) };
                    r.map_err(|e| {
                        tracing::warn!(offset, len, error = %e, "NBD zero failed");
                        errno(&e)
                    })
                });
                reply(w, res.err().unwrap_or(0), cookie, None)?;
            }
            CMD_CACHE => reply(w, if in_range { 0 } else { EINVAL }, cookie, None)?,
            CMD_DISC => {
                w.flush()?;
                return Ok(());
            }
            _ => reply(w, EINVAL, cookie, None)?,
        }
        if r.buffer().is_empty() {
            w.flush()?;
        }
    }
}
