//! QUIC endpoints with mutual TLS, and the role check every accepted connection goes through.

use crate::tls::{client_config, peer_has_role, role_name, server_config, Identity};
use crate::wire::Role;
use anyhow::{bail, Context};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Bytes a connection buffers for sending (sent and not yet acknowledged by the peer's QUIC, or not
/// yet sent), by default.
pub const SEND_WINDOW: u64 = 32 << 20;

fn transport(send_window: u64) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(Duration::from_secs(1)));
    t.max_idle_timeout(Some(Duration::from_secs(8).try_into().expect("8 s is a valid idle timeout")));
    // Batches are several MiB: windows large enough to keep a loopback or LAN link busy.
    t.stream_receive_window((16u32 << 20).into());
    t.receive_window((32u32 << 20).into());
    t.send_window(send_window);
    // A window from the measured delivery rate and round trip, not from losses: across a WAN that
    // drops 1% of packets a loss-based controller (Cubic, New Reno) falls to a few Mbit/s (see
    // rate_cc.rs; bench/wan.sh measures it beside TCP).
    t.congestion_controller_factory(Arc::new(crate::rate_cc::RateConfig::default()));
    // Search past Ethernet's 1500 bytes: data-centre links often carry jumbo frames (and loopback
    // carries 64 KiB). Fewer, larger datagrams cost the kernel far less per byte; discovery stops at
    // what the path really carries.
    let mut mtu = quinn::MtuDiscoveryConfig::default();
    mtu.upper_bound(JUMBO_PAYLOAD);
    t.mtu_discovery_config(Some(mtu));
    Arc::new(t)
}

const JUMBO_PAYLOAD: u16 = 8952;

fn endpoint_config() -> quinn::EndpointConfig {
    let mut c = quinn::EndpointConfig::default();
    c.max_udp_payload_size(JUMBO_PAYLOAD + 20).expect("payload size in range");
    c
}

/// A UDP socket on `addr`; an IPv6 wildcard takes IPv4 too (dual stack), whatever the host's
/// `bindv6only` default says.
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

fn bind(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> anyhow::Result<quinn::Endpoint> {
    let socket = udp_socket(addr).with_context(|| format!("binding UDP {addr}"))?;
    quinn::Endpoint::new(endpoint_config(), server, socket, Arc::new(quinn::TokioRuntime))
        .with_context(|| format!("starting a QUIC endpoint on {addr}"))
}

/// QUIC server configuration: client certificates from the deployment CA, checked against its CRL.
pub fn server_cfg(id: &Identity) -> anyhow::Result<quinn::ServerConfig> {
    let crypto = QuicServerConfig::try_from(server_config(id)?).context("QUIC server TLS config")?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(SEND_WINDOW));
    Ok(cfg)
}

/// QUIC client configuration presenting our certificate, checking servers against the CRL.
pub fn client_cfg(id: &Identity) -> anyhow::Result<quinn::ClientConfig> {
    client_cfg_with(id, SEND_WINDOW)
}

/// [`client_cfg`] buffering at most `send_window` bytes per connection for sending.
pub fn client_cfg_with(id: &Identity, send_window: u64) -> anyhow::Result<quinn::ClientConfig> {
    let crypto = QuicClientConfig::try_from(client_config(id)?).context("QUIC client TLS config")?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport(send_window));
    Ok(cfg)
}

/// A listening endpoint that requires client certificates from the deployment CA.
pub fn server(id: &Identity, addr: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    bind(addr, Some(server_cfg(id)?))
}

/// A client endpoint presenting our certificate, bound to every address of both families (the
/// kernel picks the source address of each route), or of IPv4 alone where the host has no IPv6.
pub fn client(id: &Identity) -> anyhow::Result<quinn::Endpoint> {
    let any6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0));
    let any4 = SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0));
    let mut ep = self::bind(any6, None).or_else(|_| self::bind(any4, None))?;
    ep.set_default_client_config(client_cfg(id)?);
    Ok(ep)
}

/// Makes new handshakes on a `server` endpoint use `id`'s current revocation list, and closes `open`
/// connections so that their peers reconnect and are checked again. (Clients check it on every
/// [`connect_checked`].)
pub fn apply_crl(
    id: &Identity,
    server: Option<&quinn::Endpoint>,
    open: &std::sync::Mutex<Vec<quinn::Connection>>,
) -> anyhow::Result<()> {
    if let Some(s) = server {
        s.set_server_config(Some(server_cfg(id)?));
    }
    for conn in open.lock().expect("connections lock poisoned").drain(..) {
        conn.close(2u32.into(), b"revocation list changed; reconnect");
    }
    Ok(())
}

/// Remembers an accepted connection (for [`apply_crl`]), forgetting closed ones.
pub fn track(open: &std::sync::Mutex<Vec<quinn::Connection>>, conn: &quinn::Connection) {
    let mut g = open.lock().expect("connections lock poisoned");
    g.retain(|c| c.close_reason().is_none());
    g.push(conn.clone());
}

/// Connects to `addr` and checks that the server holds a certificate for `role`.
pub async fn connect(ep: &quinn::Endpoint, addr: SocketAddr, role: Role) -> anyhow::Result<quinn::Connection> {
    let conn = ep
        .connect(addr, &role_name(role))
        .with_context(|| format!("connecting to {} at {addr}", role.name()))?
        .await
        .with_context(|| format!("handshake with {} at {addr}", role.name()))?;
    Ok(conn)
}

/// [`connect`] with a client configuration built now from `id`, so the server's certificate is checked
/// against the current revocation list; the connection buffers at most `send_window` bytes for sending.
pub async fn connect_checked(
    ep: &quinn::Endpoint,
    id: &Identity,
    addr: SocketAddr,
    role: Role,
    send_window: u64,
) -> anyhow::Result<quinn::Connection> {
    let conn = ep
        .connect_with(client_cfg_with(id, send_window)?, addr, &role_name(role))
        .with_context(|| format!("connecting to {} at {addr}", role.name()))?
        .await
        .with_context(|| format!("handshake with {} at {addr}", role.name()))?;
    Ok(conn)
}

/// Connects to the peer of role `peer` at `addr` (its certificate checked), opens a stream and
/// exchanges Hello as `me`, named `node`: the start of every session a component opens. The connection
/// buffers at most `send_window` bytes for sending ([`SEND_WINDOW`] unless the caller must keep less).
pub async fn open_session(
    ep: &quinn::Endpoint,
    id: &Identity,
    addr: SocketAddr,
    peer: Role,
    me: Role,
    node: &str,
    send_window: u64,
) -> anyhow::Result<(quinn::SendStream, quinn::RecvStream)> {
    let conn = connect_checked(ep, id, addr, peer, send_window).await?;
    let (mut send, mut recv) =
        conn.open_bi().await.with_context(|| format!("opening a stream to the {}", peer.name()))?;
    let hello =
        crate::wire::Message::Hello { version: crate::wire::PROTOCOL_VERSION, role: me, node: node.to_string() };
    crate::wire::write_msg(&mut send, &hello).await?;
    crate::wire::check_hello(crate::wire::expect_msg(&mut recv).await?, peer)?;
    Ok((send, recv))
}

/// The accepting side of [`open_session`]: reads the peer's Hello (it must be `peer`) and answers as
/// `me`, named `node`. Returns the peer's node name.
pub async fn answer_session(
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
    peer: Role,
    me: Role,
    node: &str,
) -> anyhow::Result<String> {
    let theirs = crate::wire::check_hello(crate::wire::expect_msg(recv).await?, peer)?;
    let hello =
        crate::wire::Message::Hello { version: crate::wire::PROTOCOL_VERSION, role: me, node: node.to_string() };
    crate::wire::write_msg(send, &hello).await?;
    Ok(theirs)
}

/// Checks that an accepted connection's client certificate names `role`.
pub fn require_peer_role(conn: &quinn::Connection, role: Role) -> anyhow::Result<()> {
    let Some(id) = conn.peer_identity() else { bail!("peer {} presented no certificate", conn.remote_address()) };
    let Ok(chain) = id.downcast::<Vec<CertificateDer<'static>>>() else {
        bail!("peer {} identity is not an X.509 chain", conn.remote_address())
    };
    match chain.first() {
        Some(cert) if peer_has_role(cert, role) => Ok(()),
        _ => bail!("peer {} is not a {}: its certificate does not name that role", conn.remote_address(), role.name()),
    }
}

/// Who the (chain-verified) client certificate of an accepted connection belongs to.
pub fn peer_of(conn: &quinn::Connection) -> Option<crate::tls::Peer> {
    let chain = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    crate::tls::Peer::of(chain.first()?)
}

/// One stream's session, boxed so servers of different services share [`serve`].
pub type Session<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send + 'a>>;

/// Accepts connections on `listener` until `shutdown`. A peer must hold a certificate for `role`
/// (else its connection is closed with the reason); accepted connections are passed to `track`; each
/// bidirectional stream runs `session` with the peer its certificate names, whose error is logged and sent to the peer as an `Error`
/// message before the stream is finished.
pub async fn serve<T, H>(
    listener: &quinn::Endpoint,
    role: Role,
    shutdown: &tokio_util::sync::CancellationToken,
    track: T,
    session: H,
) where
    T: Fn(&quinn::Connection) + Send + Sync + 'static,
    H: for<'a> Fn(&'a mut quinn::SendStream, quinn::RecvStream, Arc<crate::tls::Peer>) -> Session<'a>
        + Send
        + Sync
        + 'static,
{
    let handlers = Arc::new((track, session));
    loop {
        let incoming = tokio::select! {
            i = listener.accept() => i,
            _ = shutdown.cancelled() => return,
        };
        let Some(incoming) = incoming else { return };
        let handlers = handlers.clone();
        tokio::spawn(async move {
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => return tracing::warn!(error = %e, "{} handshake failed", role.name()),
            };
            let peer = conn.remote_address();
            if let Err(e) = require_peer_role(&conn, role) {
                tracing::warn!(%peer, error = %e, "refusing connection");
                conn.close(
                    crate::wire::CLOSE_WRONG_ROLE.into(),
                    format!("certificate does not name the {} role", role.name()).as_bytes(),
                );
                return;
            }
            let Some(who) = peer_of(&conn) else {
                tracing::warn!(%peer, "refusing connection: its certificate names no component");
                conn.close(crate::wire::CLOSE_WRONG_ROLE.into(), b"certificate names no component");
                return;
            };
            let who = Arc::new(who);
            (handlers.0)(&conn);
            loop {
                let (mut send, recv) = match conn.accept_bi().await {
                    Ok(s) => s,
                    Err(e) => return tracing::debug!(%peer, error = %e, "{} connection ended", role.name()),
                };
                let (handlers, who) = (handlers.clone(), who.clone());
                tokio::spawn(async move {
                    if let Err(e) = (handlers.1)(&mut send, recv, who).await {
                        tracing::warn!(%peer, error = format!("{e:#}"), "stream from the {} refused", role.name());
                        let code = crate::wire::code_of(&e);
                        let msg = crate::wire::Message::Error { code, message: format!("{e:#}") };
                        let _ = crate::wire::write_msg(&mut send, &msg).await;
                        let _ = send.finish();
                    }
                });
            }
        });
    }
}
