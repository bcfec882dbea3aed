//! The integration tests: one binary, one module per area.

mod amocrm;
mod bitrix24;
mod daemon;
mod demo;
mod dry_run;
mod example;
mod faults;
mod funnel;
mod funnel_tables;
mod layering;
mod leads;
mod migrations;
mod pools;
mod robustness;
mod scale;
mod server;
mod stage_lists;
mod support;
mod support_selftest;
mod sync;
mod token_pairs;
mod systemd;
mod tls;
mod validate;
