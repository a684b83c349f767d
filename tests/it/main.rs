//! The black-box integration tests, one binary: the real `tollgate` binary on port 0
//! against real PostgreSQL and Redis, driven through [`harness`]. One module per area;
//! a test is named `area::test`, e.g. `cargo test --test it request_path::`.
//!
//! One binary, not one per file: each test binary links the whole crate, and linking
//! nine of them cost more than compiling the tests.
// A failed unwrap, expect or panic is a failed test, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod harness;

mod account;
mod durability;
mod ledger;
mod lifecycle;
mod lifecycle_model;
mod oauth;
mod prices;
mod providers;
mod rate_limit;
mod request_path;
mod resilience;
mod schema_and_cli;
mod subscriptions;
