//! Tollgate: a metering gateway for LLM APIs.
//!
//! The modules named after stages of the request path, and the functions a request
//! runs through in order, are listed in ARCHITECTURE.md ("Follow one request").
#![forbid(unsafe_code)]

pub mod account;
pub mod app;
pub mod authenticate;
pub mod body;
pub mod cli;
pub mod config;
pub mod db;
pub mod deploy;
pub mod endpoints;
pub mod error;
pub mod flush;
pub mod forward;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod fuzz;
pub mod hold;
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod layers;
pub mod ledger;
pub mod lifecycle;
pub mod oauth;
pub mod ops;
pub mod parse;
pub mod password;
pub mod preferences;
pub mod rate_limit;
pub mod reconcile;
pub mod reserve;
pub mod route;
pub mod scope;
pub mod server;
pub mod settle;
pub mod sse;
pub mod state;
pub mod stream_back;
pub mod telemetry;
pub mod translate;
pub mod upstream;
pub mod usage;
pub mod worker;
