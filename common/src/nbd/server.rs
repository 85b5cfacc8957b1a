//! NBD connection handling: negotiation (with STARTTLS when the server requires TLS), then the
//! transmission loop.

use super::proto::*;
use super::{Backend, BackendError};
use crate::tls::Peer;
use std::collections::BTreeMap;
use std::io::{BufReader, BufWriter, Read, Write};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Who may open an export (checked against the client certificate's name under TLS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// Any client the server admits (under TLS: any certificate of the admitted roles).
    Anyone,
    /// Only clients whose certificates carry one of these names.
    Clients(Vec<String>),
}

impl Allowed {
    fn admits(&self, peer: Option<&Peer>) -> bool {
        match self {
            Allowed::Anyone => true,
            Allowed::Clients(names) => peer.is_some_and(|p| names.contains(&p.name)),
        }
    }
}

struct Export {
    backend: Arc<dyn Backend>,
    allowed: Allowed,
    /// Connections open on it now.
    open: Arc<std::sync::atomic::AtomicUsize>,
}

/// The exports a server offers, by name. Shared by all connections.
#[derive(Default)]
pub struct Exports {
    map: RwLock<BTreeMap<String, Export>>,
}

/// Most connections open at once on one export.
pub const MAX_CONNECTIONS_PER_EXPORT: usize = 32;
/// Most connections a server handles at once (negotiating or transmitting).
pub const MAX_CONNECTIONS: usize = 256;
/// Negotiation (TLS included) must be over within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

enum Lookup {
    Found(Arc<dyn Backend>),
    Missing,
    Denied,
}

enum Opened {
    Open(Arc<dyn Backend>, Slot),
    Missing,
    Denied,
    Busy,
}

/// A connection's place on an export; dropping it frees the place.
struct Slot(Option<Arc<std::sync::atomic::AtomicUsize>>);

impl Slot {
    /// No place taken (an INFO answer).
    fn none() -> Slot {
        Slot(None)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(c) = &self.0 {
            c.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

impl Exports {
    pub fn new() -> Arc<Exports> {
        Arc::new(Exports::default())
    }
    /// Offers `backend` as `name` to any client the server admits.
    pub fn insert(&self, name: &str, backend: Arc<dyn Backend>) {
        self.insert_for(name, backend, Allowed::Anyone)
    }
    /// Offers `backend` as `name` to the clients `allowed` names.
    pub fn insert_for(&self, name: &str, backend: Arc<dyn Backend>, allowed: Allowed) {
        let e = Export { backend, allowed, open: Default::default() };
        self.map.write().expect("exports lock poisoned").insert(name.to_string(), e);
    }
    pub fn remove(&self, name: &str) {
        self.map.write().expect("exports lock poisoned").remove(name);
    }
    /// The export `name` if `peer` may open it (INFO: no place is taken).
    fn find(&self, name: &str, peer: Option<&Peer>) -> Lookup {
        let map = self.map.read().expect("exports lock poisoned");
        let Some(e) = map.get(name) else { return Lookup::Missing };
        if !e.allowed.admits(peer) {
            return Lookup::Denied;
        }
        Lookup::Found(e.backend.clone())
    }
    /// Takes a place on the export for a connection that will transmit.
    fn open(&self, name: &str, peer: Option<&Peer>) -> Opened {
        let map = self.map.read().expect("exports lock poisoned");
        let Some(e) = map.get(name) else { return Opened::Missing };
        if !e.allowed.admits(peer) {
            return Opened::Denied;
        }
        let before = e.open.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        // The slot gives the place back when dropped, also when it is refused here.
        let slot = Slot(Some(e.open.clone()));
        if before >= MAX_CONNECTIONS_PER_EXPORT {
            return Opened::Busy;
        }
        Opened::Open(e.backend.clone(), slot)
    }
    fn names(&self, peer: Option<&Peer>) -> Vec<String> {
        let map = self.map.read().expect("exports lock poisoned");
        map.iter().filter(|(_, e)| e.allowed.admits(peer)).map(|(n, _)| n.clone()).collect()
    }
}

/// TLS for an NBD server: a client must start TLS (NBD_OPT_STARTTLS) before anything else and
/// present a certificate of the deployment CA, not revoked, of one of `roles`.
pub struct NbdTls {
    pub id: Arc<crate::tls::Identity>,
    pub roles: Vec<crate::wire::Role>,
}

#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("TLS: {0}")]
    Tls(String),
}

type Result<T> = std::result::Result<T, ConnError>;

/// Who may connect to a TCP NBD server.
pub enum TcpAccess {
    /// TLS only, with a client certificate (see [`NbdTls`]).
    Tls(Arc<NbdTls>),
    /// Loopback clients whose socket belongs to one of these users (the agent: the protected
    /// machine's own disk, like a block device only its users may open).
    LocalUsers(Vec<u32>),
}

/// Accepts TCP clients on a background thread, one thread per connection, as `access` allows.
pub fn serve_tcp(
    listener: std::net::TcpListener,
    exports: Arc<Exports>,
    access: TcpAccess,
) -> std::thread::JoinHandle<()> {
    let (tls, users) = match access {
        TcpAccess::Tls(t) => (Some(t), None),
        TcpAccess::LocalUsers(u) => (None, Some(u)),
    };
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("nbd-accept-tcp".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                        if let Some(users) = &users {
                            let owner = match (s.peer_addr(), s.local_addr()) {
                                (Ok(p), Ok(l)) if p.ip().is_loopback() => super::local::peer_uid(p, l),
                                _ => None,
                            };
                            if !owner.is_some_and(|u| users.contains(&u)) {
                                tracing::warn!(peer, ?owner, "NBD connection refused: not a permitted local user");
                                continue;
                            }
                        }
                        spawn_conn(s, peer, exports.clone(), tls.clone(), open.clone());
                    }
                    Err(e) => tracing::warn!(error = %e, "NBD accept failed"),
                }
            }
        })
        .expect("spawning the NBD accept thread")
}

/// Accepts Unix-socket clients on a background thread, one thread per connection (the socket file's
/// permissions say who may connect).
pub fn serve_unix(listener: std::os::unix::net::UnixListener, exports: Arc<Exports>) -> std::thread::JoinHandle<()> {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::Builder::new()
        .name("nbd-accept-unix".into())
        .spawn(move || {
            for stream in listener.incoming() {
                match stream {
                    Ok(s) => spawn_conn(s, "unix".into(), exports.clone(), None, open.clone()),
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
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()>;
}
impl Stream for std::net::TcpStream {
    fn split(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}
impl Stream for std::os::unix::net::UnixStream {
    fn split(&self) -> std::io::Result<Self> {
        self.try_clone()
    }
    fn set_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }
}

fn spawn_conn<S: Stream>(
    s: S,
    peer: String,
    exports: Arc<Exports>,
    tls: Option<Arc<NbdTls>>,
    open: Arc<std::sync::atomic::AtomicUsize>,
) {
    if open.fetch_add(1, std::sync::atomic::Ordering::AcqRel) >= MAX_CONNECTIONS {
        open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
        tracing::warn!(peer, "NBD connection refused: {MAX_CONNECTIONS} connections are open");
        return;
    }
    let open_on_failure = open.clone();
    let spawned = std::thread::Builder::new().name("nbd-conn".into()).spawn(move || {
        metrics::gauge!("sr_nbd_connections").increment(1.0);
        match run_conn(s, &exports, tls.as_deref()) {
            Ok(()) => tracing::debug!(peer, "NBD client disconnected"),
            Err(e) => tracing::warn!(peer, error = %e, "NBD connection closed"),
        }
        metrics::gauge!("sr_nbd_connections").decrement(1.0);
        open.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start a thread for an NBD connection");
        open_on_failure.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// One connection: greeting and options in clear; with TLS, the handshake after STARTTLS and the
/// options again over it; then transmission. Negotiation must end within [`HANDSHAKE_TIMEOUT`].
fn run_conn<S: Stream>(s: S, exports: &Exports, tls: Option<&NbdTls>) -> Result<()> {
    s.set_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let mut r = BufReader::with_capacity(512 * 1024, s.split()?);
    let mut w = BufWriter::with_capacity(512 * 1024, s);
    let no_zeroes = greet(&mut r, &mut w)?;
    let mut ctx = Negotiation::new(no_zeroes, tls.is_some());
    let (backend, slot, session) = match negotiate(&mut r, &mut w, exports, &mut ctx)? {
        Negotiated::Go(b, slot, session) => (b, slot, session),
        Negotiated::Done => return Ok(()),
        Negotiated::StartTls => {
            let tls = tls.expect("STARTTLS is accepted only when TLS is configured");
            if !r.buffer().is_empty() {
                return Err(ConnError::Protocol("data sent after STARTTLS before the TLS handshake".into()));
            }
            w.flush()?;
            let sock = r.into_inner();
            drop(w);
            return serve_tls(sock, exports, tls, ctx);
        }
    };
    w.get_ref().set_timeout(None)?;
    r.get_ref().set_timeout(None)?;
    let _slot = slot;
    let res = transmission(&mut r, &mut w, backend.as_ref(), session, &mut || true);
    let _ = w.flush();
    res
}

fn serve_tls<S: Stream>(sock: S, exports: &Exports, tls: &NbdTls, mut ctx: Negotiation) -> Result<()> {
    // The revocation list the handshake checks against (or an older one): a change after this point is
    // checked again before the first request.
    let checked_at = tls.id.crl_generation();
    let cfg = crate::tls::nbd_server_config(&tls.id).map_err(|e| ConnError::Tls(format!("{e:#}")))?;
    let conn = rustls::ServerConnection::new(cfg).map_err(|e| ConnError::Tls(e.to_string()))?;
    let mut stream = rustls::StreamOwned::new(conn, sock);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock).map_err(|e| ConnError::Tls(format!("handshake: {e}")))?;
    }
    let cert = stream.conn.peer_certificates().and_then(|c| c.first()).map(|c| c.clone().into_owned());
    let peer = cert.as_ref().and_then(Peer::of);
    match &peer {
        Some(p) if tls.roles.contains(&p.role) => {}
        Some(p) => {
            return Err(ConnError::Tls(format!("{} is a {}: not admitted to these exports", p.name, p.role.name())))
        }
        None => return Err(ConnError::Tls("the client certificate names no role".into())),
    }
    // Options agreed before TLS do not carry over (only STARTTLS was answered anyway); the deadline does.
    ctx = Negotiation { peer, tls_required: false, started: ctx.started, ..Negotiation::new(ctx.no_zeroes, false) };
    let shared = std::rc::Rc::new(std::cell::RefCell::new(stream));
    let mut r = BufReader::with_capacity(512 * 1024, Half(shared.clone()));
    let mut w = BufWriter::with_capacity(512 * 1024, Half(shared.clone()));
    let (backend, slot, session) = match negotiate(&mut r, &mut w, exports, &mut ctx)? {
        Negotiated::Go(b, slot, session) => (b, slot, session),
        Negotiated::Done => return Ok(()),
        Negotiated::StartTls => unreachable!("STARTTLS is refused once TLS is on"),
    };
    shared.borrow().sock.set_timeout(None)?;
    let _slot = slot;
    // A certificate revoked while its connection is open loses the connection at its next request.
    let cert = cert.expect("a peer was found above");
    let mut seen = checked_at;
    let mut trusted = || {
        let now = tls.id.crl_generation();
        if now == seen {
            return true;
        }
        seen = now;
        crate::tls::client_still_valid(&tls.id, &cert)
    };
    let res = transmission(&mut r, &mut w, backend.as_ref(), session, &mut trusted);
    let _ = w.flush();
    shared.borrow_mut().conn.send_close_notify();
    let _ = w.flush();
    res
}

/// One side of a TLS stream shared by the reader and the writer of a connection's thread.
struct Half<S: Read + Write>(std::rc::Rc<std::cell::RefCell<rustls::StreamOwned<rustls::ServerConnection, S>>>);

impl<S: Read + Write> Read for Half<S> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

impl<S: Read + Write> Write for Half<S> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.borrow_mut().flush()
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

fn transmission_flags(b: &dyn Backend, structured: bool) -> u16 {
    let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
    if structured {
        // A READ is always answered in one chunk.
        f |= TFLAG_SEND_DF;
    }
    if b.read_only() {
        f |= TFLAG_READ_ONLY;
    } else {
        f |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    f
}

/// Serves one client on an already-connected byte stream until it disconnects or misbehaves, with
/// no TLS. The fuzz targets call this with in-memory streams.
pub fn serve_connection<R: Read, W: Write>(r: R, w: W, exports: &Exports) -> std::result::Result<(), String> {
    let mut r = BufReader::new(r);
    let mut w = BufWriter::new(w);
    let res = (|| {
        let no_zeroes = greet(&mut r, &mut w)?;
        let mut ctx = Negotiation::new(no_zeroes, false);
        match negotiate(&mut r, &mut w, exports, &mut ctx)? {
            Negotiated::Go(b, _slot, session) => transmission(&mut r, &mut w, b.as_ref(), session, &mut || true),
            Negotiated::Done | Negotiated::StartTls => Ok(()),
        }
    })();
    let _ = w.flush();
    res.map_err(|e| e.to_string())
}

/// The server's greeting and the client's flags; returns whether the client asked for no zeroes.
fn greet<R: Read, W: Write>(r: &mut BufReader<R>, w: &mut W) -> Result<bool> {
    w.write_all(&NBDMAGIC.to_be_bytes())?;
    w.write_all(&IHAVEOPT.to_be_bytes())?;
    w.write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())?;
    w.flush()?;
    let client_flags = read_u32(r)?;
    if client_flags & !(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES) != 0 {
        return Err(ConnError::Protocol(format!("unknown client flags {client_flags:#x}")));
    }
    Ok(client_flags & CLIENT_FLAG_NO_ZEROES != 0)
}

struct Negotiation {
    /// When the connection began: negotiation must end within [`HANDSHAKE_TIMEOUT`] of it.
    started: std::time::Instant,
    no_zeroes: bool,
    /// TLS is required and not started yet: only STARTTLS and ABORT are answered.
    tls_required: bool,
    /// The client's certificate, once TLS is on.
    peer: Option<Peer>,
    /// The client asked for structured replies (NBD_OPT_STRUCTURED_REPLY).
    structured: bool,
    /// The export the last SET_META_CONTEXT named, and whether it selected `base:allocation`.
    meta: Option<(String, bool)>,
}

impl Negotiation {
    fn new(no_zeroes: bool, tls_required: bool) -> Negotiation {
        Negotiation {
            started: std::time::Instant::now(),
            no_zeroes,
            tls_required,
            peer: None,
            structured: false,
            meta: None,
        }
    }

    /// What transmission on export `name` may use.
    fn session(&self, name: &str) -> Session {
        let allocation = self.structured && self.meta.as_ref().is_some_and(|(n, on)| *on && n == name);
        Session { structured: self.structured, allocation }
    }
}

/// What a connection agreed on for transmission.
#[derive(Debug, Clone, Copy, Default)]
struct Session {
    /// READ answers with a structured reply.
    structured: bool,
    /// BLOCK_STATUS answers for `base:allocation`.
    allocation: bool,
}

enum Negotiated {
    Go(Arc<dyn Backend>, Slot, Session),
    StartTls,
    Done,
}

fn negotiate<R: Read, W: Write>(
    r: &mut BufReader<R>,
    w: &mut W,
    exports: &Exports,
    ctx: &mut Negotiation,
) -> Result<Negotiated> {
    loop {
        if read_u64(r)? != IHAVEOPT {
            return Err(ConnError::Protocol("option without the IHAVEOPT magic".into()));
        }
        let opt = read_u32(r)?;
        let len = read_u32(r)?;
        if len > MAX_OPTION {
            return Err(ConnError::Protocol(format!("option {opt} of {len} bytes exceeds {MAX_OPTION}")));
        }
        let mut data = Vec::new();
        (&mut *r).take(len as u64).read_to_end(&mut data)?;
        if data.len() != len as usize {
            return Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        if ctx.started.elapsed() > HANDSHAKE_TIMEOUT {
            return Err(ConnError::Protocol(format!("negotiation took longer than {HANDSHAKE_TIMEOUT:?}")));
        }
        if ctx.tls_required && !matches!(opt, OPT_STARTTLS | OPT_ABORT) {
            // Answered once, then the connection is closed: a client without TLS holds no place.
            if opt != OPT_EXPORT_NAME {
                opt_reply(w, opt, REP_ERR_TLS_REQD, b"this server requires TLS: start it with NBD_OPT_STARTTLS")?;
            }
            return Err(ConnError::Protocol(format!("option {opt} before STARTTLS on a TLS-only server")));
        }
        let peer = ctx.peer.as_ref();
        match opt {
            OPT_STARTTLS => {
                if !ctx.tls_required {
                    let why: &[u8] = if ctx.peer.is_some() { b"TLS is already on" } else { b"this server has no TLS" };
                    opt_reply(w, opt, REP_ERR_INVALID, why)?;
                    continue;
                }
                if len != 0 {
                    opt_reply(w, opt, REP_ERR_INVALID, b"STARTTLS takes no data")?;
                    continue;
                }
                opt_reply(w, opt, REP_ACK, &[])?;
                return Ok(Negotiated::StartTls);
            }
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                // This option has no error reply: an unknown or refused name closes the connection.
                let Opened::Open(b, slot) = exports.open(&name, peer) else {
                    return Err(ConnError::Protocol(format!("EXPORT_NAME for unknown export {name:?}")));
                };
                w.write_all(&b.size().to_be_bytes())?;
                w.write_all(&transmission_flags(b.as_ref(), ctx.structured).to_be_bytes())?;
                if !ctx.no_zeroes {
                    w.write_all(&[0u8; 124])?;
                }
                w.flush()?;
                return Ok(Negotiated::Go(b, slot, ctx.session(&name)));
            }
            OPT_ABORT => {
                let _ = opt_reply(w, opt, REP_ACK, &[]);
                return Ok(Negotiated::Done);
            }
            OPT_LIST => {
                if len != 0 {
                    opt_reply(w, opt, REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                for name in exports.names(peer) {
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
                let found = if opt == OPT_GO {
                    exports.open(&name, peer)
                } else {
                    match exports.find(&name, peer) {
                        Lookup::Found(b) => Opened::Open(b, Slot::none()),
                        Lookup::Missing => Opened::Missing,
                        Lookup::Denied => Opened::Denied,
                    }
                };
                let (b, slot) = match found {
                    Opened::Open(b, slot) => (b, slot),
                    Opened::Missing => {
                        opt_reply(w, opt, REP_ERR_UNKNOWN, format!("no export named {name:?}").as_bytes())?;
                        continue;
                    }
                    Opened::Denied => {
                        opt_reply(w, opt, REP_ERR_POLICY, denied(peer, &name).as_bytes())?;
                        continue;
                    }
                    Opened::Busy => {
                        let msg =
                            format!("export {name:?} has {MAX_CONNECTIONS_PER_EXPORT} connections open; retry later");
                        opt_reply(w, opt, REP_ERR_POLICY, msg.as_bytes())?;
                        continue;
                    }
                };
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&b.size().to_be_bytes());
                info.extend_from_slice(&transmission_flags(b.as_ref(), ctx.structured).to_be_bytes());
                opt_reply(w, opt, REP_INFO, &info)?;
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                bs.extend_from_slice(&1u32.to_be_bytes());
                bs.extend_from_slice(&4096u32.to_be_bytes());
                bs.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                opt_reply(w, opt, REP_INFO, &bs)?;
                opt_reply(w, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Negotiated::Go(b, slot, ctx.session(&name)));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if len != 0 {
                    opt_reply(w, opt, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")?;
                    continue;
                }
                ctx.structured = true;
                opt_reply(w, opt, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = opt == OPT_SET_META_CONTEXT;
                if set {
                    // A SET replaces what was set before, also when it fails.
                    ctx.meta = None;
                }
                if set && !ctx.structured {
                    opt_reply(w, opt, REP_ERR_INVALID, b"SET_META_CONTEXT needs structured replies first")?;
                    continue;
                }
                let Some((name, queries)) = parse_meta_request(&data) else {
                    opt_reply(w, opt, REP_ERR_INVALID, b"malformed META_CONTEXT request")?;
                    continue;
                };
                match exports.find(&name, peer) {
                    Lookup::Found(_) => {}
                    Lookup::Missing => {
                        opt_reply(w, opt, REP_ERR_UNKNOWN, format!("no export named {name:?}").as_bytes())?;
                        continue;
                    }
                    Lookup::Denied => {
                        opt_reply(w, opt, REP_ERR_POLICY, denied(peer, &name).as_bytes())?;
                        continue;
                    }
                }
                let chosen = meta_selects(&queries, set);
                if set {
                    ctx.meta = Some((name, chosen));
                }
                if chosen {
                    // A listed context has no id yet (0); a set one has the id BLOCK_STATUS names.
                    let id = if set { META_BASE_ALLOCATION_ID } else { 0 };
                    let mut d = id.to_be_bytes().to_vec();
                    d.extend_from_slice(META_BASE_ALLOCATION.as_bytes());
                    opt_reply(w, opt, REP_META_CONTEXT, &d)?;
                }
                opt_reply(w, opt, REP_ACK, &[])?;
            }
            _ => opt_reply(w, opt, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
}

/// Why `peer` is refused export `name`.
fn denied(peer: Option<&Peer>, name: &str) -> String {
    let who = peer.map_or("this client", |p| p.name.as_str());
    format!("{who} may not open export {name:?}")
}

/// META_CONTEXT data: u32 name length, export name, u32 count, count x (u32 length, query).
fn parse_meta_request(d: &[u8]) -> Option<(String, Vec<String>)> {
    let u32_at = |at: usize| -> Option<usize> {
        Some(u32::from_be_bytes(d.get(at..at.checked_add(4)?)?.try_into().ok()?) as usize)
    };
    let n = u32_at(0)?;
    let name = String::from_utf8(d.get(4..4usize.checked_add(n)?)?.to_vec()).ok()?;
    let mut at = 4 + n;
    let count = u32_at(at)?;
    at += 4;
    let mut queries = Vec::new();
    for _ in 0..count {
        let l = u32_at(at)?;
        at += 4;
        queries.push(String::from_utf8(d.get(at..at.checked_add(l)?)?.to_vec()).ok()?);
        at += l;
    }
    (at == d.len()).then_some((name, queries))
}

/// Whether META_CONTEXT `queries` select `base:allocation`: named, or the whole `base:` namespace;
/// LIST with no query lists every context, SET with none selects none.
fn meta_selects(queries: &[String], set: bool) -> bool {
    if queries.is_empty() {
        return !set;
    }
    queries.iter().any(|q| q == META_BASE_ALLOCATION || (!set && q == "base:"))
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

/// A structured reply chunk's header (the last chunk of its request: the only one sent here).
fn chunk_header<W: Write>(w: &mut W, kind: u16, cookie: u64, len: u32) -> Result<()> {
    let mut h = [0u8; 20];
    h[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
    h[6..8].copy_from_slice(&kind.to_be_bytes());
    h[8..16].copy_from_slice(&cookie.to_be_bytes());
    h[16..20].copy_from_slice(&len.to_be_bytes());
    w.write_all(&h)?;
    Ok(())
}

/// A READ's answer: simple, or with structured replies one data chunk (or an error chunk).
fn read_reply<W: Write>(w: &mut W, s: Session, err: u32, cookie: u64, offset: u64, data: &[u8]) -> Result<()> {
    if !s.structured {
        return reply(w, err, cookie, (err == 0).then_some(data));
    }
    if err != 0 {
        metrics::counter!("sr_nbd_errors_total").increment(1);
        chunk_header(w, REPLY_TYPE_ERROR, cookie, 6)?;
        w.write_all(&err.to_be_bytes())?;
        w.write_all(&0u16.to_be_bytes())?;
        return Ok(());
    }
    if data.is_empty() {
        // A data chunk carries at least one byte.
        return chunk_header(w, REPLY_TYPE_NONE, cookie, 0);
    }
    chunk_header(w, REPLY_TYPE_OFFSET_DATA, cookie, 8 + data.len() as u32)?;
    w.write_all(&offset.to_be_bytes())?;
    w.write_all(data)?;
    Ok(())
}

/// BLOCK_STATUS descriptors for `extents`: (length, flags) pairs, a hole reading as zeroes.
fn block_status_payload(extents: &[crate::disk::Extent]) -> Vec<u8> {
    let mut d = META_BASE_ALLOCATION_ID.to_be_bytes().to_vec();
    for e in extents {
        // Each extent lies inside one request, whose length is a u32.
        d.extend_from_slice(&(e.len as u32).to_be_bytes());
        let flags = if e.hole { STATE_HOLE | STATE_ZERO } else { 0 };
        d.extend_from_slice(&flags.to_be_bytes());
    }
    d
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
    block_status: metrics::Counter,
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
            block_status: req("block_status"),
            read_bytes: metrics::counter!("sr_nbd_read_bytes_total"),
            write_bytes: metrics::counter!("sr_nbd_write_bytes_total"),
        }
    }
}

/// Whether a request's flags are ones its command takes: FUA on changes, NO_HOLE on WRITE_ZEROES, DF
/// on READ with structured replies, REQ_ONE on BLOCK_STATUS.
fn flags_fit(cmd: u16, flags: u16, structured: bool) -> bool {
    let allowed = match cmd {
        CMD_WRITE | CMD_TRIM => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_READ if structured => CMD_FLAG_DF,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => 0,
    };
    flags & !allowed == 0
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

/// Serves requests until the client leaves; `trusted` is asked before each one whether the client
/// may still be served (its certificate not revoked since).
fn transmission<R: Read, W: Write>(
    r: &mut BufReader<R>,
    w: &mut W,
    b: &dyn Backend,
    session: Session,
    trusted: &mut dyn FnMut() -> bool,
) -> Result<()> {
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
        if !trusted() {
            w.flush()?;
            return Err(ConnError::Tls("the client's certificate was revoked; connection closed".into()));
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
        let bad_flags = !flags_fit(cmd, flags, session.structured);
        match cmd {
            CMD_READ => {
                counters.read.increment(1);
                if len > MAX_REQUEST || !in_range || bad_flags {
                    read_reply(w, session, EINVAL, cookie, offset, &[])?;
                } else {
                    buf.resize(len as usize, 0);
                    match b.read(offset, &mut buf) {
                        Ok(()) => {
                            counters.read_bytes.increment(len as u64);
                            read_reply(w, session, 0, cookie, offset, &buf)?
                        }
                        Err(e) => {
                            tracing::warn!(offset, len, error = %e, "NBD read failed");
                            read_reply(w, session, errno(&e), cookie, offset, &[])?
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
                // The buffer grows with the bytes that arrive, not with the length the client declared.
                buf.clear();
                (&mut *r).take(len as u64).read_to_end(&mut buf)?;
                if buf.len() != len as usize {
                    return Err(ConnError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
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
                    let r = if cmd == CMD_TRIM {
                        b.trim(offset, len as u64, fua)
                    } else if flags & CMD_FLAG_NO_HOLE != 0 {
                        b.zero_allocated(offset, len as u64, fua)
                    } else {
                        b.zero(offset, len as u64, fua)
                    };
                    r.map_err(|e| {
                        tracing::warn!(offset, len, error = %e, "NBD zero failed");
                        errno(&e)
                    })
                });
                reply(w, res.err().unwrap_or(0), cookie, None)?;
            }
            CMD_CACHE => reply(w, if in_range { 0 } else { EINVAL }, cookie, None)?,
            CMD_BLOCK_STATUS => {
                counters.block_status.increment(1);
                if !session.allocation || !in_range || len == 0 || bad_flags {
                    // No context was agreed on (or a bad range): the spec's EINVAL.
                    reply(w, EINVAL, cookie, None)?;
                } else {
                    let max = if flags & CMD_FLAG_REQ_ONE != 0 { 1 } else { MAX_EXTENTS };
                    match b.extents(offset, len as u64, max) {
                        Ok(ext)
                            if !ext.is_empty()
                                && ext.iter().all(|e| e.len > 0)
                                && ext.iter().take(max).map(|e| e.len).sum::<u64>() <= len as u64 =>
                        {
                            let d = block_status_payload(&ext[..ext.len().min(max)]);
                            chunk_header(w, REPLY_TYPE_BLOCK_STATUS, cookie, d.len() as u32)?;
                            w.write_all(&d)?;
                        }
                        Ok(_) => reply(w, EIO, cookie, None)?,
                        Err(e) => {
                            tracing::warn!(offset, len, error = %e, "NBD block status failed");
                            reply(w, errno(&e), cookie, None)?
                        }
                    }
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn meta_context_requests_parse_exactly_or_not_at_all() {
        let d = meta("disk0", &["base:allocation", "qemu:dirty-bitmap:x"]);
        assert_eq!(
            parse_meta_request(&d),
            Some(("disk0".to_string(), vec!["base:allocation".to_string(), "qemu:dirty-bitmap:x".to_string()]))
        );
        // Every cut, one byte too many, a count larger than the queries, lengths past the end.
        for cut in 0..d.len() {
            assert_eq!(parse_meta_request(&d[..cut]), None, "cut at {cut}");
        }
        let mut long = d.clone();
        long.push(0);
        assert_eq!(parse_meta_request(&long), None);
        let mut more = meta("disk0", &["base:allocation"]);
        more[9..13].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(parse_meta_request(&more), None);
        assert_eq!(parse_meta_request(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]), None);
        assert_eq!(parse_meta_request(&meta("", &[])), Some((String::new(), vec![])));
    }

    #[test]
    fn base_allocation_is_selected_by_name_and_listed_by_namespace() {
        let q = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for set in [false, true] {
            assert!(meta_selects(&q(&["base:allocation"]), set));
            assert!(meta_selects(&q(&["other:x", "base:allocation"]), set));
            assert!(!meta_selects(&q(&["qemu:dirty-bitmap:x"]), set));
            assert!(!meta_selects(&q(&["base:allocation2"]), set));
        }
        assert!(meta_selects(&q(&[]), false), "LIST with no query lists every context");
        assert!(!meta_selects(&q(&[]), true), "SET with no query selects none");
        assert!(meta_selects(&q(&["base:"]), false));
        assert!(!meta_selects(&q(&["base:"]), true));
    }

    #[test]
    fn block_status_uses_a_context_only_on_the_export_it_was_set_for_with_structured_replies() {
        let mut n = Negotiation::new(false, false);
        assert!(!n.session("disk0").allocation);
        n.meta = Some(("disk0".into(), true));
        assert!(!n.session("disk0").allocation, "no structured replies");
        n.structured = true;
        assert!(n.session("disk0").allocation);
        assert!(!n.session("disk1").allocation, "set for another export");
        n.meta = Some(("disk0".into(), false));
        assert!(!n.session("disk0").allocation, "set without base:allocation");
        assert!(n.session("disk0").structured);
    }

    #[test]
    fn block_status_descriptors_say_hole_and_zero_for_holes() {
        use crate::disk::Extent;
        let d = block_status_payload(&[Extent { len: 4096, hole: true }, Extent { len: 8192, hole: false }]);
        let words: Vec<u32> = d.chunks(4).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect();
        assert_eq!(words, vec![META_BASE_ALLOCATION_ID, 4096, STATE_HOLE | STATE_ZERO, 8192, 0]);
    }
}
