//! Funnel history's rules, as plans: the server's time, AmoCRM's closed
//! time windows and their paging (`amocrm`), Bitrix24's ID cursor with its
//! settle lag and the from-stage of each record (`bitrix24`), and what a
//! CRM's report becomes as a `crm_stage_changes` row. Pure: the executor
//! reads the CRM and the database, and writes what these functions decide.

pub mod amocrm;
pub mod bitrix24;

use std::collections::HashMap;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};

use crate::model::{ChangeKind, Crm, EntityType, LeadPlacement, Semantics, StageChange, StageFlags, outbox_source_id};

/// What ingestion looked up about the entities of a batch of changes, by
/// the CRM's entity id; an entity not in a map gets NULL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Found {
    /// The entity's responsible user now (read for new rows).
    pub responsible: HashMap<i64, i64>,
    /// The outbox row it was delivered from.
    pub outbox: HashMap<i64, i64>,
}

/// A CRM's clock as this process sees it: the local clock corrected by the
/// `Date` header of the account's latest answer. The header has whole
/// seconds and is stamped before the answer travels, so the estimate runs
/// up to a second or so behind the server: windows and settle lags then
/// end a little earlier, never later.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServerClock {
    /// Server minus local clock at the latest answer.
    offset: Option<chrono::Duration>,
}

impl ServerClock {
    /// An answer dated `date` arrived when the local clock read `received`.
    pub fn observe(&mut self, date: DateTime<Utc>, received: DateTime<Utc>) {
        self.offset = Some(date.signed_duration_since(received));
    }

    /// The server's time when the local clock reads `local`; the local
    /// clock itself before any answer was dated.
    pub fn now(&self, local: DateTime<Utc>) -> DateTime<Utc> {
        self.offset.and_then(|offset| local.checked_add_signed(offset)).unwrap_or(local)
    }
}

/// The `created` row a delivery writes in its `delivered` transaction
/// (`outbox:<id>`): the stage and responsible user it sent, at its send
/// (`last_attempt_at`); nobody is named as having made the change.
/// `semantic` and `flags` are those of the stage sent to, when known (for
/// AmoCRM, [`amocrm::semantic`] of the status).
pub fn delivered_change(
    outbox_id: i64,
    entity_id: i64,
    placement: &LeadPlacement,
    responsible_user_id: Option<i64>,
    sent_at: DateTime<Utc>,
    semantic: Option<Semantics>,
    flags: Option<StageFlags>,
) -> StageChange {
    let (crm, entity_type, pipeline_to, stage_to) = match placement {
        LeadPlacement::AmoCrm { pipeline_id, status_id } => {
            (Crm::AmoCrm, EntityType::Lead, Some(pipeline_id.to_string()), status_id.to_string())
        }
        LeadPlacement::Bitrix24Lead { status_id } => (Crm::Bitrix24, EntityType::Lead, None, status_id.clone()),
        LeadPlacement::Bitrix24Deal { category_id, stage_id } => {
            (Crm::Bitrix24, EntityType::Deal, Some(category_id.to_string()), stage_id.clone())
        }
    };
    StageChange {
        crm,
        source_event_id: outbox_source_id(outbox_id),
        entity_type,
        entity_id,
        pipeline_from: None,
        stage_from: None,
        pipeline_to,
        stage_to,
        change_kind: ChangeKind::Created,
        semantic,
        flags,
        changed_at: sent_at,
        changed_by_user_id: None,
        responsible_user_id,
        outbox_id: Some(outbox_id),
    }
}

/// 00:00 UTC of `since`: where a back-fill starts.
pub fn start_of(since: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&since.and_time(chrono::NaiveTime::MIN))
}

/// `t` minus `d`, at the earliest time there is rather than overflowing
/// (a server's `Date` can say anything).
fn before(t: DateTime<Utc>, d: std::time::Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d).ok().and_then(|d| t.checked_sub_signed(d)).unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// `t` without its fraction of a second: AmoCRM filters and Bitrix24
/// record times count whole seconds.
fn whole_seconds(t: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::from_timestamp(t.timestamp(), 0).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_780_000_000, 0).unwrap() + chrono::Duration::milliseconds(secs)
    }

    #[test]
    fn server_time_is_the_local_clock_corrected_by_the_latest_answer() {
        let mut clock = ServerClock::default();
        assert_eq!(clock.now(t(5_000)), t(5_000), "no answer yet: the local clock");
        // The server is 90 s ahead.
        clock.observe(t(100_000), t(10_000));
        assert_eq!(clock.now(t(12_500)), t(102_500));
        // A later answer replaces the correction: now 30 s behind.
        clock.observe(t(-10_000), t(20_000));
        assert_eq!(clock.now(t(21_000)), t(-9_000));
        // Nothing overflows, whatever a header said.
        clock.observe(DateTime::<Utc>::MAX_UTC, DateTime::<Utc>::MIN_UTC);
        assert_eq!(clock.now(t(0)), t(0));
    }

    #[test]
    fn a_delivery_writes_the_created_row_of_the_stage_it_sent_to() {
        let flags = Some(StageFlags { qualified: false, success: false, fail: false });
        let amo = LeadPlacement::AmoCrm { pipeline_id: 3, status_id: 31 };
        let row = delivered_change(12, 501, &amo, Some(7), t(0), Some(Semantics::Process), flags);
        assert_eq!(
            row,
            StageChange {
                crm: Crm::AmoCrm,
                source_event_id: "outbox:12".into(),
                entity_type: EntityType::Lead,
                entity_id: 501,
                pipeline_from: None,
                stage_from: None,
                pipeline_to: Some("3".into()),
                stage_to: "31".into(),
                change_kind: ChangeKind::Created,
                semantic: Some(Semantics::Process),
                flags,
                changed_at: t(0),
                changed_by_user_id: None,
                responsible_user_id: Some(7),
                outbox_id: Some(12),
            }
        );
        let check = |placement: LeadPlacement, expected: (Crm, &str, Option<&str>, &str)| {
            let row = delivered_change(1, 2, &placement, None, t(0), None, None);
            let got = (row.crm, row.entity_type.as_str(), row.pipeline_to.as_deref(), row.stage_to.as_str());
            assert_eq!(got, expected, "{placement:?}");
        };
        check(LeadPlacement::Bitrix24Lead { status_id: "NEW".into() }, (Crm::Bitrix24, "lead", None, "NEW"));
        check(
            LeadPlacement::Bitrix24Deal { category_id: 0, stage_id: "NEW".into() },
            (Crm::Bitrix24, "deal", Some("0"), "NEW"),
        );
    }

    #[test]
    fn a_back_fill_starts_at_midnight_utc_and_times_drop_their_fractions() {
        let since = NaiveDate::from_ymd_opt(2026, 1, 1).unwrap();
        assert_eq!(start_of(since).to_rfc3339(), "2026-01-01T00:00:00+00:00");
        assert_eq!(whole_seconds(t(1_999)), t(1_000));
        assert_eq!(before(t(5_000), std::time::Duration::from_secs(2)), t(3_000));
        assert_eq!(before(DateTime::<Utc>::MIN_UTC, std::time::Duration::from_secs(2)), DateTime::<Utc>::MIN_UTC);
    }
}
