//! Domain types shared by configuration, the CRM clients and the database:
//! which CRM and its connection state, the AmoCRM account, the Bitrix24
//! webhook and entity, the stages of both, lead delivery and funnel
//! history. No I/O here. Each type is re-exported here, so callers name
//! `model::X` whatever file it lives in.

mod amocrm;
mod bitrix24;
mod crm;
mod failure_kind;
mod funnel;
mod jwt;
mod lead;
mod stage;
mod stored;

use std::net::IpAddr;

pub use amocrm::{AmoAccount, AmoDomain, Credentials, MissingCredentials, Tokens};
pub use bitrix24::{B24Stage, EntityType, Semantics, Webhook, WebhookError, category_of_stage};
pub use crm::{Crm, CrmState};
pub use failure_kind::FailureKind;
pub use funnel::{
    AmoStatusEvent, B24StageRecord, ChangeKind, Cursor, EventWindow, LeadStatus, Position, StageAt, StageChange,
    StoredChange, Stream, outbox_source_id,
};
pub use jwt::{jwt_expiry, jwt_issued_at, latest_time};
pub use lead::{CreatedIds, LeadPlacement, LookupAnswer, OutboxRow, OutboxState, SendAnswer, entity_type_of};
pub use stage::{AmoStage, StageFlags};
pub use stored::{ColumnValue, ConfigColumn, CurrentColumns, StoredAccount, StoredStage, StoredTokens};

/// Loopback hosts, the only ones allowed plain http (the sandboxes in tests).
pub fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}
