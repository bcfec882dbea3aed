//! The integration tests: one binary, one module per area.

mod example;
mod migrations;
mod pools;
mod support;
mod support_selftest;
mod sync;
mod validate;
