//! The tenant databases: pools and the per-server connection budget
//! (`pool`), sessions and transactions (`session`), the migrations, and one
//! module per table holding every SQL statement on it. Nothing outside this
//! module writes SQL or sees a `tokio_postgres::Error`: every failure leaves
//! as a [`DbError`].

mod error;
mod maintenance;
mod migrate;
mod pool;
mod session;
mod socket;
pub(crate) mod tls;

pub mod amocrm_stages;
pub mod bitrix24_stages;
pub mod config_row;
pub mod cursors;
pub mod events;
pub mod lead_outbox;
pub mod lease;
pub mod oauth_states;
pub mod schedule;
pub mod stage_changes;
pub mod status;

pub use error::DbError;
pub use maintenance::ensure_database;
pub use migrate::migrate;
pub use pool::{PoolSettings, Pools, ServerUse, TenantDb};
pub use session::{Conn, Session, Tx};
