//! Code shared by every service of the replication pipeline.
//!
//! ```text
//!  agent --(wire::Batch, QUIC)--> process server --(seal(compress(Batch)))--> master target
//! ```
//!
//! - [`types`]: newtypes for the numbers that flow through the pipeline.
//! - [`wire`]: rkyv messages and length-prefixed framing; every received frame is validated.
//! - [`compress`] and [`seal`]: what the process server does to a batch before it leaves the site.
//! - [`tls`] and [`quic`]: the deployment's certificates, mutual TLS with role checks, QUIC endpoints.
//! - [`config`]: TOML files with environment overrides and errors that name the key.
//! - [`telemetry`]: logs, Prometheus metrics and the `/metrics` + `/healthz` endpoint.
//! - [`https`] and [`http`]: the APIs' HTTPS server and the one client that calls them.
//! - [`crashsafe`]: the one path by which small metadata files are made durable.

pub mod backoff;
pub mod ca;
pub mod compress;
pub mod config;
pub mod contract;
pub mod control;
pub mod crashsafe;
pub mod disk;
pub mod errcode;
pub mod hook;
pub mod http;
pub mod https;
pub mod merkle;
pub mod nbd;
pub mod quic;
pub mod rate_cc;
pub mod ratelimit;
pub mod register;
pub mod retry;
pub mod seal;
pub mod service;
pub mod split;
pub mod state;
pub mod stream;
pub mod telemetry;
pub mod tls;
pub mod types;
pub mod wire;
