//! The integration tests: one binary, one module per area.

mod amocrm;
mod example;
mod migrations;
mod pools;
mod sandbox_amocrm;
mod support;
mod support_selftest;
mod sync;
mod validate;
