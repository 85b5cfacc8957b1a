//! The HTTPS server every service's API runs on: TLS 1.3 from the deployment CA (see
//! [`crate::tls::https_server_config`]), HTTP/1.1, a verified client certificate handed to the
//! handlers as the [`PEER_HEADER`], and limits on what a caller can hold: a handshake must finish
//! within [`HANDSHAKE_TIMEOUT`], and at most [`MAX_CONNECTIONS`] connections are served at once.
//!
//! [`Guard`] says who may call the API routes: a component's API (agent, process server, master
//! target) takes only the configuration server's certificate; the configuration server decides per
//! route (operator tokens, component certificates). `/healthz` and `/metrics` are open and read-only.

use crate::tls::{https_server_config, Identity, Peer, PEER_HEADER};
use crate::wire::Role;
use anyhow::Context;
use axum::http::{HeaderValue, Request, StatusCode};
use axum::response::IntoResponse;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
pub const MAX_CONNECTIONS: usize = 512;
/// A request's headers must arrive within this time, and then its body within this time.
pub const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request body taken (the APIs take small JSON documents).
pub const MAX_BODY: usize = 2 << 20;

/// Who may call a service's API routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Only a client certificate of this role (from the deployment CA, not revoked).
    Role(Role),
    /// The handlers check the caller themselves (from [`PEER_HEADER`] or a token).
    Handlers,
}

/// Whether a request for `path` with verified caller `peer` passes `guard`: `Err` is the refusal.
pub fn admit(guard: Guard, path: &str, peer: Option<&Peer>) -> Result<(), (StatusCode, String)> {
    if matches!(path, "/healthz" | "/metrics") {
        return Ok(());
    }
    match (guard, peer) {
        (Guard::Handlers, _) => Ok(()),
        (Guard::Role(want), Some(p)) if p.role == want => Ok(()),
        (Guard::Role(want), Some(p)) => Err((
            StatusCode::FORBIDDEN,
            format!("{} is a {}; this API takes only the {}'s certificate", p.name, p.role.name(), want.name()),
        )),
        (Guard::Role(want), None) => Err((
            StatusCode::UNAUTHORIZED,
            format!("this API needs a client certificate of the {} from the deployment CA", want.name()),
        )),
    }
}

/// Serves `app` over HTTPS on `addr` until `shutdown`; returns the bound address.
pub async fn serve(
    addr: SocketAddr,
    id: Arc<Identity>,
    app: axum::Router,
    guard: Guard,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    https_server_config(&id).context("the HTTPS server's certificate")?;
    let listener =
        tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding HTTPS endpoint on {addr}"))?;
    let local = listener.local_addr()?;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                _ = shutdown.cancelled() => return,
            };
            let (tcp, remote) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of descriptors: wait a little rather than spin.
                        tracing::warn!(error = %e, "accepting an HTTPS connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => return,
            };
            let cfg = match https_server_config(&id) {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "HTTPS configuration");
                    continue;
                }
            };
            let (app, shutdown) = (app.clone(), shutdown.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%remote, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%remote, "TLS handshake timed out");
                        return;
                    }
                };
                let peer = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).and_then(Peer::of);
                let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (app, peer) = (app.clone(), peer.clone());
                    async move { Ok::<_, std::convert::Infallible>(handle(app, guard, peer, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(REQUEST_READ_TIMEOUT)
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(%remote, error = %e, "HTTPS connection ended");
                        }
                    }
                    _ = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
        }
    });
    Ok(local)
}

async fn handle(
    app: axum::Router,
    guard: Guard,
    peer: Option<Peer>,
    req: Request<hyper::body::Incoming>,
) -> axum::response::Response {
    use tower::ServiceExt;
    let mut req = req.map(axum::body::Body::new);
    // Only the TLS layer says who the caller is.
    req.headers_mut().remove(PEER_HEADER);
    if let Err(refusal) = admit(guard, req.uri().path(), peer.as_ref()) {
        let (status, message) = refusal;
        return (status, axum::Json(serde_json::json!({ "error": message }))).into_response();
    }
    if let Some(v) = peer.as_ref().and_then(|p| HeaderValue::from_str(&p.header_value()).ok()) {
        req.headers_mut().insert(PEER_HEADER, v);
    }
    // The whole body, within a deadline and a size: a slow or endless body holds no connection long.
    let (parts, body) = req.into_parts();
    let collected = tokio::time::timeout(
        REQUEST_READ_TIMEOUT,
        http_body_util::BodyExt::collect(http_body_util::Limited::new(body, MAX_BODY)),
    )
    .await;
    let bytes = match collected {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(e)) => {
            let msg = format!("reading the request body: {e} (at most {MAX_BODY} bytes)");
            return (StatusCode::PAYLOAD_TOO_LARGE, axum::Json(serde_json::json!({ "error": msg }))).into_response();
        }
        Err(_) => {
            let msg = format!("the request body did not arrive within {REQUEST_READ_TIMEOUT:?}");
            return (StatusCode::REQUEST_TIMEOUT, axum::Json(serde_json::json!({ "error": msg }))).into_response();
        }
    };
    let req = Request::from_parts(parts, axum::body::Body::from(bytes));
    match app.oneshot(req).await {
        Ok(r) => r,
        Err(never) => match never {},
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(role: Role) -> Peer {
        Peer { role, name: "x".into(), serial: 1 }
    }

    #[test]
    fn component_apis_take_only_the_guarded_role_and_health_stays_open() {
        let g = Guard::Role(Role::ConfigServer);
        assert!(admit(g, "/v1/export", Some(&peer(Role::ConfigServer))).is_ok());
        assert_eq!(admit(g, "/v1/export", Some(&peer(Role::Agent))).unwrap_err().0, StatusCode::FORBIDDEN);
        assert_eq!(admit(g, "/v1/export", None).unwrap_err().0, StatusCode::UNAUTHORIZED);
        assert!(admit(g, "/healthz", None).is_ok());
        assert!(admit(g, "/metrics", None).is_ok());
        assert!(admit(g, "/metrics/../v1/export", None).is_err());
        assert!(admit(Guard::Handlers, "/v1/items", None).is_ok());
    }

    #[test]
    fn the_peer_header_round_trips() {
        let p = Peer { role: Role::MasterTarget, name: "mt-1".into(), serial: 1003 };
        assert_eq!(Peer::from_header_value(&p.header_value()), Some(p));
        assert_eq!(Peer::from_header_value("admin x 1"), None);
        assert_eq!(Peer::from_header_value("agent x"), None);
    }
}
