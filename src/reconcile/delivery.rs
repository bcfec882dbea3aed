//! The lead delivery rules, as plans: whether an outbox row can ever be
//! delivered, and what the row becomes after a send or a lookup — the
//! outcome table of the contract, one copy. Pure: the executor in `leads`
//! takes rows, calls the CRM and writes what these functions decide.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::model::{CreatedIds, Crm, LookupAnswer, OutboxRow, SendAnswer};

/// How long after a send its lead can be trusted to show up in a search.
pub fn settle_time(crm: Crm) -> Duration {
    match crm {
        Crm::AmoCrm => Duration::from_secs(120),
        Crm::Bitrix24 => Duration::from_secs(30),
    }
}

/// The earliest lookup of a send: the create's own 30 s timeout plus the
/// settle time. A row in `sending` is never sent again before a lookup
/// made this late proved its lead absent.
pub fn lookup_after(crm: Crm) -> Duration {
    Duration::from_secs(30) + settle_time(crm)
}

/// The longest any wait in delivery grows to.
pub const MAX_WAIT: Duration = Duration::from_secs(300);

/// What a row becomes.
#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    Delivered(CreatedIds),
    /// Back to `pending`, due after `delay`; an attempt not `counted` is
    /// taken back. `pause` holds delivery to the CRM as long.
    Pending {
        delay: Duration,
        counted: bool,
        error: Option<String>,
        pause: bool,
    },
    Failed(String),
    /// Stays `sending`: its lookup decides (already scheduled).
    AwaitLookup(String),
    /// Bitrix24: the contact exists; the deal alone is sent with it, now.
    SendDealAlone {
        contact_id: i64,
    },
}

/// Why a row can never be delivered, checked before any CRM call; the
/// stage and user are resolved elsewhere. `key_field` is the AmoCRM field
/// that carries the delivery key: `extra` must not fill it.
pub fn refuse(row: &OutboxRow, crm: Crm, key_field: Option<i64>) -> Option<String> {
    if row.name().is_none() {
        return Some("the lead has no title and no contact (contact_name, phone or email)".into());
    }
    let Some(extra) = row.extra.as_object() else {
        return Some("`extra` must be a JSON object of custom fields".into());
    };
    let reserved: &[&str] = match crm {
        Crm::AmoCrm => &[],
        Crm::Bitrix24 => &["ORIGINATOR_ID", "ORIGIN_ID"],
    };
    let is_key_field = |k: &str| key_field.is_some_and(|id| k.trim() == id.to_string());
    if let Some(key) = extra.keys().find(|k| reserved.iter().any(|r| r.eq_ignore_ascii_case(k)) || is_key_field(k)) {
        return Some(format!("`extra` must not set {key}: crm-connect writes it to find the lead again"));
    }
    match row.price {
        Some(price) if price.is_nan() => Some("`price` is not a number".into()),
        Some(price) if price < 0.0 => Some("`price` must not be negative".into()),
        _ => None,
    }
}

/// A wait that doubles from one second with each attempt, up to [`MAX_WAIT`].
pub fn doubling(attempt: i32) -> Duration {
    let exponent = u32::try_from(attempt.saturating_sub(1)).unwrap_or(0).min(16);
    Duration::from_secs(1u64 << exponent).min(MAX_WAIT)
}

/// What a row becomes after the CRM answered its send. `attempts` counts
/// this send.
pub fn after_send(answer: &SendAnswer, attempts: i32, max_attempts: u32) -> Transition {
    let exhausted = i64::from(attempts) >= i64::from(max_attempts);
    match answer {
        SendAnswer::Created(ids) => Transition::Delivered(*ids),
        SendAnswer::Unauthorized => {
            Transition::Pending { delay: Duration::ZERO, counted: false, error: None, pause: false }
        }
        SendAnswer::Outdated(reason) => {
            Transition::Pending { delay: Duration::ZERO, counted: false, error: Some(reason.clone()), pause: false }
        }
        SendAnswer::NotExecuted { reason, .. } if exhausted => {
            Transition::Failed(format!("gave up after {attempts} attempts: {reason}"))
        }
        SendAnswer::NotExecuted { reason, .. } => {
            Transition::Pending { delay: doubling(attempts), counted: true, error: Some(reason.clone()), pause: true }
        }
        SendAnswer::AccountRefused(reason) => {
            Transition::Pending { delay: Duration::ZERO, counted: false, error: Some(reason.clone()), pause: true }
        }
        SendAnswer::Refused(message) => Transition::Failed(message.clone()),
        SendAnswer::Ambiguous(reason) => Transition::AwaitLookup(reason.clone()),
    }
}

/// What a `sending` row becomes after the lookup of its key. `attempts`
/// counts the sends so far.
pub fn after_lookup(answer: &LookupAnswer, attempts: i32, max_attempts: u32) -> Transition {
    match answer {
        LookupAnswer::Found(ids) => Transition::Delivered(*ids),
        LookupAnswer::ContactWithoutDeal { contact_id } => Transition::SendDealAlone { contact_id: *contact_id },
        LookupAnswer::Absent if i64::from(attempts) >= i64::from(max_attempts) => {
            Transition::Failed(format!("gave up after {attempts} attempts: the CRM has no lead with this key"))
        }
        // Proved absent: sent again at once.
        LookupAnswer::Absent => Transition::Pending {
            delay: Duration::ZERO,
            counted: true,
            error: Some("not found after an unanswered send; sent again".into()),
            pause: false,
        },
        LookupAnswer::Inconclusive(reason) => Transition::AwaitLookup(reason.clone()),
    }
}

/// How far a lookup pushes its row's next look: one second, doubling with
/// the time already spent looking, up to [`MAX_WAIT`].
pub fn lookup_backoff(last_send: Option<DateTime<Utc>>, crm: Crm, now: DateTime<Utc>) -> Duration {
    let first_lookup = last_send.map(|at| at + chrono::Duration::from_std(lookup_after(crm)).unwrap_or_default());
    let looking = first_lookup.and_then(|at| (now - at).to_std().ok()).unwrap_or_default();
    looking.clamp(Duration::from_secs(1), MAX_WAIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDS: CreatedIds = CreatedIds { entity_id: 7, contact_id: Some(8) };

    fn pending(delay: u64, counted: bool, error: Option<&str>, pause: bool) -> Transition {
        Transition::Pending { delay: Duration::from_secs(delay), counted, error: error.map(String::from), pause }
    }

    #[test]
    fn sends() {
        let check = |answer: SendAnswer, attempts: i32, expected: Transition| {
            assert_eq!(after_send(&answer, attempts, 3), expected, "{answer:?} at {attempts}");
        };
        let not_executed = || SendAnswer::NotExecuted { reason: "429".into(), not_before: None };
        check(SendAnswer::Created(IDS), 1, Transition::Delivered(IDS));
        check(SendAnswer::Unauthorized, 1, pending(0, false, None, false));
        check(SendAnswer::Outdated("field".into()), 3, pending(0, false, Some("field"), false));
        check(not_executed(), 1, pending(1, true, Some("429"), true));
        check(not_executed(), 2, pending(2, true, Some("429"), true));
        check(not_executed(), 3, Transition::Failed("gave up after 3 attempts: 429".into()));
        check(SendAnswer::AccountRefused("402".into()), 3, pending(0, false, Some("402"), true));
        check(SendAnswer::Refused("bad phone".into()), 1, Transition::Failed("bad phone".into()));
        check(SendAnswer::Ambiguous("timed out".into()), 3, Transition::AwaitLookup("timed out".into()));
    }

    #[test]
    fn lookups() {
        let check = |answer: LookupAnswer, attempts: i32, expected: Transition| {
            assert_eq!(after_lookup(&answer, attempts, 3), expected, "{answer:?} at {attempts}");
        };
        check(LookupAnswer::Found(IDS), 3, Transition::Delivered(IDS));
        check(LookupAnswer::ContactWithoutDeal { contact_id: 8 }, 1, Transition::SendDealAlone { contact_id: 8 });
        check(LookupAnswer::Absent, 1, pending(0, true, Some("not found after an unanswered send; sent again"), false));
        check(
            LookupAnswer::Absent,
            3,
            Transition::Failed("gave up after 3 attempts: the CRM has no lead with this key".into()),
        );
        check(LookupAnswer::Inconclusive("204".into()), 1, Transition::AwaitLookup("204".into()));
    }

    #[test]
    fn rows_that_can_never_be_delivered() {
        let row = |f: fn(&mut OutboxRow)| {
            let mut row =
                OutboxRow { title: Some("Order".into()), extra: serde_json::json!({}), ..OutboxRow::default() };
            f(&mut row);
            row
        };
        let check = |row: OutboxRow, crm: Crm, expected: Option<&str>| {
            assert_eq!(refuse(&row, crm, Some(55)).as_deref(), expected, "{row:?}");
        };
        check(row(|_| {}), Crm::AmoCrm, None);
        check(
            row(|r| r.title = None),
            Crm::AmoCrm,
            Some("the lead has no title and no contact (contact_name, phone or email)"),
        );
        check(
            row(|r| r.title = Some("  ".into())),
            Crm::Bitrix24,
            Some("the lead has no title and no contact (contact_name, phone or email)"),
        );
        check(
            row(|r| {
                r.title = None;
                r.phone = Some("+7 900".into())
            }),
            Crm::AmoCrm,
            None,
        );
        check(
            row(|r| r.extra = serde_json::json!([1])),
            Crm::AmoCrm,
            Some("`extra` must be a JSON object of custom fields"),
        );
        check(
            row(|r| r.extra = serde_json::json!({"origin_id": "x"})),
            Crm::Bitrix24,
            Some("`extra` must not set origin_id: crm-connect writes it to find the lead again"),
        );
        check(row(|r| r.extra = serde_json::json!({"ORIGIN_ID": "x"})), Crm::AmoCrm, None);
        check(
            row(|r| r.extra = serde_json::json!({"55": "x"})),
            Crm::AmoCrm,
            Some("`extra` must not set 55: crm-connect writes it to find the lead again"),
        );
        check(row(|r| r.price = Some(f64::NAN)), Crm::AmoCrm, Some("`price` is not a number"));
        check(row(|r| r.price = Some(-1.0)), Crm::Bitrix24, Some("`price` must not be negative"));
    }

    #[test]
    fn waits_double_and_stop_at_five_minutes() {
        assert_eq!([1, 2, 3, 9, 10, 1000].map(|a| doubling(a).as_secs()), [1, 2, 4, 256, 300, 300]);
        let sent = DateTime::from_timestamp(1_700_000_000, 0).unwrap();
        let first = sent + chrono::Duration::seconds(150);
        let at = |secs: i64| lookup_backoff(Some(sent), Crm::AmoCrm, first + chrono::Duration::seconds(secs)).as_secs();
        assert_eq!([0, 1, 2, 4, 8, 1000].map(at), [1, 1, 2, 4, 8, 300]);
    }
}
