//! The web portal: a page and its script, embedded in this binary, that sign in with an API token
//! and call the same REST API as srctl, so the API's roles are the portal's (a reader sees
//! everything and acts on nothing). Nothing is fetched from elsewhere: the charting library
//! (uPlot) is embedded too (`config-server/portal/vendor`, checked by `scripts/portal-vendor.sh`).
//!
//! ```text
//! browser --GET /portal/...--> embedded assets (no credential: they hold no data)
//!         --fetch /v1/... with Authorization: Bearer <token>--> the REST API
//! ```
//! The token stays in the tab's session storage and is sent as a header, never as a cookie, so no
//! other site can make the browser act with it. The pages allow scripts and styles from this
//! server only, and the script builds the page from text nodes, never from HTML strings.

use crate::auth::{caller, require, Caller};
use crate::error::{ApiError, R};
use crate::model::*;
use crate::overview::{ItemSample, Overview};
use crate::store::Docs;
use crate::Cs;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

/// (path under /portal/, content type, bytes).
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("", "text/html; charset=utf-8", include_bytes!("../portal/index.html")),
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../portal/app.js")),
    ("app.css", "text/css; charset=utf-8", include_bytes!("../portal/app.css")),
    ("favicon.svg", "image/svg+xml", include_bytes!("../portal/favicon.svg")),
    (
        "vendor/uPlot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../portal/vendor/uPlot.iife.min.js"),
    ),
    ("vendor/uPlot.min.css", "text/css; charset=utf-8", include_bytes!("../portal/vendor/uPlot.min.css")),
    // uPlot's MIT license travels with the copy of it this binary serves.
    ("vendor/uPlot.LICENSE", "text/plain; charset=utf-8", include_bytes!("../portal/vendor/uPlot.LICENSE")),
];

/// Only this server's own scripts, styles and API; no framing, no referrer.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                       connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub async fn root() -> Redirect {
    Redirect::to("/portal/")
}

pub async fn index() -> Response {
    asset_response("")
}

pub async fn asset(Path(path): Path<String>) -> Response {
    asset_response(&path)
}

fn asset_response(path: &str) -> Response {
    let Some((_, kind, bytes)) = ASSETS.iter().find(|(p, _, _)| *p == path) else {
        return (StatusCode::NOT_FOUND, "no such page in the portal").into_response();
    };
    let mut r = (StatusCode::OK, *bytes).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    // Revalidated each time, so an upgraded server's portal is the one shown.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}

/// Answers of the API are never cached (some carry secrets, all change): added to every answer that
/// does not say otherwise.
pub async fn no_store(mut r: Response) -> Response {
    r.headers_mut().entry(header::CACHE_CONTROL).or_insert(HeaderValue::from_static("no-store"));
    r
}

/// Who the token is: the portal shows actions only to those who may take them.
pub async fn whoami(State(cs): State<Arc<Cs>>, h: HeaderMap) -> R<Value> {
    match caller(cs.store(), &h)? {
        Caller::Operator { name, role } => Ok(Json(json!({ "name": name, "role": role }))),
        Caller::Component { name, .. } => {
            Err(ApiError::new(StatusCode::FORBIDDEN, &format!("component {name} may not call operator endpoints")))
        }
    }
}

/// Everything the overview page shows, in one answer.
pub async fn overview(State(cs): State<Arc<Cs>>, h: HeaderMap) -> R<Overview> {
    require(cs.store(), &h, ApiRole::Reader)?;
    let store = cs.store();
    let items: Vec<Item> = store.list(ITEMS)?;
    let policies: Vec<Policy> = store.list(POLICIES)?;
    let comps: Vec<Component> = store.list(COMPONENTS)?;
    let running: Vec<Job> = store.list::<Job>(JOBS)?.into_iter().filter(|j| j.ended.is_none()).collect();
    let t = now();
    let fleet = crate::metrics::Fleet::of(&items, &policies, &comps, t, cs.cfg.component_timeout_secs);
    let mut placed = std::collections::BTreeMap::<String, u64>::new();
    for name in items.iter().flat_map(|i| [&i.process_server, &i.master_target]).flatten() {
        *placed.entry(name.clone()).or_default() += 1;
    }
    let history = cs.history.lock().expect("history lock poisoned").fleet();
    Ok(Json(Overview::of(t, &fleet, &items, &comps, &placed, &running, history)))
}

/// An item's RPO over the last hour.
pub async fn item_history(State(cs): State<Arc<Cs>>, h: HeaderMap, Path(id): Path<u64>) -> R<Vec<ItemSample>> {
    require(cs.store(), &h, ApiRole::Reader)?;
    crate::recovery::load_item(&cs, id)?;
    Ok(Json(cs.history.lock().expect("history lock poisoned").item(id)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn assets_carry_their_type_and_the_locks_and_unknown_paths_are_404() {
        for (path, kind, _) in ASSETS {
            let r = asset_response(path);
            assert_eq!(r.status(), StatusCode::OK, "{path}");
            let h = r.headers();
            assert_eq!(h[header::CONTENT_TYPE], *kind, "{path}");
            assert_eq!(h[header::CONTENT_SECURITY_POLICY], CSP, "{path}");
            assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
            assert_eq!(h[header::X_FRAME_OPTIONS], "DENY");
            assert_eq!(h[header::REFERRER_POLICY], "no-referrer");
        }
        for bad in ["../Cargo.toml", "vendor/../../src/lib.rs", "app.js/", "index.html", "APP.JS"] {
            assert_eq!(asset_response(bad).status(), StatusCode::NOT_FOUND, "{bad}");
        }
        assert!(CSP.contains("script-src 'self';") && !CSP.contains("unsafe"), "{CSP}");
    }

    #[tokio::test]
    async fn api_answers_are_not_stored_unless_they_say_otherwise() {
        let r = no_store((StatusCode::OK, "{}").into_response()).await;
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
        let r = no_store(asset_response("app.js")).await;
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-cache");
    }
}
