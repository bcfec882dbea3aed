//! Funnel history in the terms its rules decide on: a row of
//! `crm_stage_changes`, the change streams and their cursors, and what the
//! CRMs report (an AmoCRM `lead_status_changed` event, a Bitrix24
//! stage-history record). No I/O here.

use std::fmt;

use chrono::{DateTime, Utc};

use super::{Crm, EntityType, Semantics, StageFlags};

/// `crm_stage_changes.change_kind`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// The entity's first stage (`stage_from` NULL).
    Created,
    /// Another stage of the same pipeline.
    Moved,
    /// A stage of another pipeline.
    Pipeline,
}

impl ChangeKind {
    pub const ALL: [ChangeKind; 3] = [ChangeKind::Created, ChangeKind::Moved, ChangeKind::Pipeline];

    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Created => "created",
            ChangeKind::Moved => "moved",
            ChangeKind::Pipeline => "pipeline",
        }
    }

    pub fn parse(s: &str) -> Option<ChangeKind> {
        ChangeKind::ALL.into_iter().find(|kind| kind.as_str() == s)
    }
}

/// One row of `crm_stage_changes` as the daemon inserts it (`id` and
/// `ingested_at` are the database's). The ids are the CRM's, as text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageChange {
    pub crm: Crm,
    /// AmoCRM event id; Bitrix24 `lead:<ID>` / `deal:<ID>`; `outbox:<id>`.
    pub source_event_id: String,
    pub entity_type: EntityType,
    pub entity_id: i64,
    pub pipeline_from: Option<String>,
    pub stage_from: Option<String>,
    /// `None` for Bitrix24 leads, which have no pipelines.
    pub pipeline_to: Option<String>,
    pub stage_to: String,
    pub change_kind: ChangeKind,
    /// `semantic`: the stage's meaning as the CRM reported it.
    pub semantic: Option<Semantics>,
    /// The `is_*_stage` columns, copied from the stage table at ingestion;
    /// `None` (three NULLs) when the stage was not known there.
    pub flags: Option<StageFlags>,
    pub changed_at: DateTime<Utc>,
    /// AmoCRM `created_by` (0 = a robot or the system); Bitrix24 tells nobody.
    pub changed_by_user_id: Option<i64>,
    pub responsible_user_id: Option<i64>,
    pub outbox_id: Option<i64>,
}

impl StageChange {
    /// Where the entity went: what the next change of it moved from.
    pub fn stage_at(&self) -> StageAt {
        StageAt { pipeline: self.pipeline_to.clone(), stage: self.stage_to.clone() }
    }
}

/// A row as stored: every column.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredChange {
    pub id: i64,
    pub change: StageChange,
    pub ingested_at: DateTime<Utc>,
}

/// A stage of an entity: its pipeline (none for Bitrix24 leads) and stage,
/// the CRM's ids as text.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StageAt {
    pub pipeline: Option<String>,
    pub stage: String,
}

/// `source_event_id` of the `created` row a delivery writes for outbox row `id`.
pub fn outbox_source_id(id: i64) -> String {
    format!("outbox:{id}")
}

/// A change stream of a CRM: what `crm_connect_cursors` keeps a cursor for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stream {
    /// AmoCRM's `lead_status_changed` events, read in closed time windows.
    AmoLeadStatusChanged,
    /// Bitrix24's stage history of leads or deals, read by ID.
    Bitrix24(EntityType),
}

impl Stream {
    pub const ALL: [Stream; 3] =
        [Stream::AmoLeadStatusChanged, Stream::Bitrix24(EntityType::Lead), Stream::Bitrix24(EntityType::Deal)];

    pub fn crm(self) -> Crm {
        match self {
            Stream::AmoLeadStatusChanged => Crm::AmoCrm,
            Stream::Bitrix24(_) => Crm::Bitrix24,
        }
    }

    /// `crm_connect_cursors.stream`.
    pub fn name(self) -> &'static str {
        match self {
            Stream::AmoLeadStatusChanged => "lead_status_changed",
            Stream::Bitrix24(entity) => entity.as_str(),
        }
    }

    pub fn parse(crm: &str, stream: &str) -> Option<Stream> {
        Stream::ALL.into_iter().find(|s| s.crm().as_str() == crm && s.name() == stream)
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.crm(), self.name())
    }
}

/// Where a stream was read up to; the position names its stream, so an
/// AmoCRM window end can never land on a Bitrix24 cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// AmoCRM: every window up to here was read whole.
    WindowEnd(DateTime<Utc>),
    /// Bitrix24: the highest settled stage-history ID of the entity.
    LastId(EntityType, i64),
}

impl Position {
    pub fn stream(self) -> Stream {
        match self {
            Position::WindowEnd(_) => Stream::AmoLeadStatusChanged,
            Position::LastId(entity, _) => Stream::Bitrix24(entity),
        }
    }
}

/// One row of `crm_connect_cursors`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub position: Position,
    /// Every change before it is ingested.
    pub complete_to: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

/// A closed time window of AmoCRM events, whole seconds, both ends
/// included (`filter[created_at][from|to]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventWindow {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

/// An AmoCRM lead status, as an event's `value_before` / `value_after` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeadStatus {
    pub pipeline_id: i64,
    pub status_id: i64,
}

/// One AmoCRM `lead_status_changed` event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AmoStatusEvent {
    /// A string such as `01pz58t6p04ymgsgfbmfyfy1mf`.
    pub id: String,
    pub lead_id: i64,
    /// 0 = a robot or the system.
    pub created_by: i64,
    pub created_at: DateTime<Utc>,
    pub before: LeadStatus,
    pub after: LeadStatus,
}

/// One Bitrix24 stage-history record of a lead or a deal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct B24StageRecord {
    pub id: i64,
    /// 1 created, 2 to an intermediate stage, 3 to a final stage, 5 to
    /// another pipeline.
    pub type_id: i64,
    pub owner_id: i64,
    pub created_time: DateTime<Utc>,
    /// Deals: `CATEGORY_ID`; leads: `None`.
    pub category_id: Option<i64>,
    /// Deals: `STAGE_ID`; leads: `STATUS_ID`.
    pub stage_id: String,
    /// `STAGE_SEMANTIC_ID` / `STATUS_SEMANTIC_ID`: P, S, F.
    pub semantic: Option<Semantics>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_read_back_exactly_as_written() {
        for kind in ChangeKind::ALL {
            assert_eq!(ChangeKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(ChangeKind::parse("Created"), None);
        for stream in Stream::ALL {
            assert_eq!(Stream::parse(stream.crm().as_str(), stream.name()), Some(stream), "{stream}");
        }
        assert_eq!(Stream::parse("amocrm", "lead"), None);
        assert_eq!(Stream::parse("bitrix24", "lead_status_changed"), None);
        assert_eq!(Stream::Bitrix24(EntityType::Deal).to_string(), "bitrix24 deal");
        assert_eq!(Position::LastId(EntityType::Lead, 5).stream(), Stream::Bitrix24(EntityType::Lead));
        assert_eq!(outbox_source_id(42), "outbox:42");
    }
}
