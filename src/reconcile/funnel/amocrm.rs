//! AmoCRM's funnel rules: closed time windows over `lead_status_changed`
//! events (where a stream starts, the next window, narrowing one that runs
//! past 20 pages) and what one event becomes as a row. A window ends a
//! minute in the past and reaches 5 minutes back before the last one's
//! end, so an event visible within about 6 minutes of its `created_at` is
//! caught, and its result set cannot change while it is paged, whatever
//! order the server lists it in.

use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};

use super::{Found, before, start_of, whole_seconds};
use crate::model::{AmoStatusEvent, ChangeKind, Crm, EntityType, EventWindow, Semantics, StageChange, StageFlags};
use crate::reconcile::{AMOCRM_LOST, AMOCRM_WON};

/// How far a window reaches back before the last one's end: events that
/// show up late are caught by the next window.
pub const OVERLAP: Duration = Duration::from_secs(5 * 60);
/// How far behind the server's time a window ends: closed and in the past.
pub const SETTLE: Duration = Duration::from_secs(60);
/// The longest window: a back-fill walks forward a day at a time.
pub const MAX_WINDOW: Duration = Duration::from_secs(86_400);
/// Events per page (`limit`).
pub const PAGE_SIZE: u32 = 100;
/// Pages of a window before it is narrowed.
pub const MAX_PAGES: u32 = 20;
/// Pages of a window that cannot be narrowed (its part after the last end
/// is one second) before it is given up as a list that never ends.
pub const MAX_UNNARROWED_PAGES: u32 = 1000;

/// Where a stream starts on its first enable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Start {
    pub window_end: DateTime<Utc>,
    pub complete_to: DateTime<Utc>,
}

/// Without `since`: no history, from a minute ago (complete up to now).
/// With it: from that day's start, a window of at most a day at a time.
pub fn start(server_time: DateTime<Utc>, since: Option<NaiveDate>) -> Start {
    match since {
        Some(day) => Start { window_end: start_of(day), complete_to: start_of(day) },
        None => {
            Start { window_end: whole_seconds(before(server_time, SETTLE)), complete_to: whole_seconds(server_time) }
        }
    }
}

/// The window after one that ended at `window_end`; `None` while that end
/// is less than a second behind the settled past (nothing new to read).
pub fn next_window(window_end: DateTime<Utc>, server_time: DateTime<Utc>) -> Option<EventWindow> {
    let settled = whole_seconds(before(server_time, SETTLE));
    let from = before(window_end, OVERLAP);
    let longest = window_end.checked_add_signed(chrono::Duration::from_std(MAX_WINDOW).ok()?)?;
    let to = whole_seconds(settled.min(longest));
    (to > window_end).then_some(EventWindow { from: whole_seconds(from), to })
}

/// What to do after a page of a window was read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageStep {
    /// Read this page next.
    Page(u32),
    /// The window is read whole: commit its rows and move the cursor to its end.
    Done,
    /// Too many pages: drop what was read and read this narrower window from page 1.
    Narrow(EventWindow),
    /// A one-second part that never ends: an error, the cursor stays.
    TooMany,
}

/// After page `page` (from 1) of `window`, whose part after `window_end`
/// is new: more pages while `_links.next` says so (never by counting
/// items), narrowed past [`MAX_PAGES`] until that part is one second,
/// which is paged to its end.
pub fn after_page(window: EventWindow, window_end: DateTime<Utc>, page: u32, has_next: bool) -> PageStep {
    if !has_next {
        return PageStep::Done;
    }
    if page < MAX_PAGES {
        return PageStep::Page(page + 1);
    }
    match halve(window, window_end) {
        Some(narrower) => PageStep::Narrow(narrower),
        None if page >= MAX_UNNARROWED_PAGES => PageStep::TooMany,
        None => PageStep::Page(page + 1),
    }
}

/// The window with its part after `window_end` halved (whole seconds);
/// `None` when that part is a second or less.
fn halve(window: EventWindow, window_end: DateTime<Utc>) -> Option<EventWindow> {
    let part = window.to.signed_duration_since(window_end).num_seconds();
    (part > 1).then(|| EventWindow { from: window.from, to: window_end + chrono::Duration::seconds(part / 2) })
}

/// What a status means: won and lost have these ids in every pipeline,
/// whatever they are called; every other status is a step of the process.
pub fn semantic(status_id: i64) -> Semantics {
    match status_id {
        AMOCRM_WON => Semantics::Success,
        AMOCRM_LOST => Semantics::Failure,
        _ => Semantics::Process,
    }
}

/// The (pipeline, status) an event moved its lead to: the stage whose flags
/// the row copies.
pub fn stage_key(event: &AmoStatusEvent) -> (i64, i64) {
    (event.after.pipeline_id, event.after.status_id)
}

/// An event as a row: `flags` of its new stage (`None`: unknown there),
/// the lead's responsible user and outbox row from `found`.
pub fn change(event: &AmoStatusEvent, flags: Option<StageFlags>, found: &Found) -> StageChange {
    let (before, after) = (event.before, event.after);
    StageChange {
        crm: Crm::AmoCrm,
        source_event_id: event.id.clone(),
        entity_type: EntityType::Lead,
        entity_id: event.lead_id,
        pipeline_from: Some(before.pipeline_id.to_string()),
        stage_from: Some(before.status_id.to_string()),
        pipeline_to: Some(after.pipeline_id.to_string()),
        stage_to: after.status_id.to_string(),
        change_kind: if before.pipeline_id == after.pipeline_id { ChangeKind::Moved } else { ChangeKind::Pipeline },
        semantic: Some(semantic(after.status_id)),
        flags,
        changed_at: event.created_at,
        changed_by_user_id: Some(event.created_by),
        responsible_user_id: found.responsible.get(&event.lead_id).copied(),
        outbox_id: found.outbox.get(&event.lead_id).copied(),
    }
}

/// A window's events in the order their rows are inserted: by time, and
/// within one second each lead's events chained by their statuses (the one
/// that left a status after the one that entered it), since `created_at`
/// has whole seconds and a robot moves a lead twice within one. Events read
/// twice (by id) are kept once.
pub fn in_order(events: Vec<AmoStatusEvent>) -> Vec<AmoStatusEvent> {
    let mut seen = std::collections::HashSet::new();
    let mut events: Vec<AmoStatusEvent> = events.into_iter().filter(|e| seen.insert(e.id.clone())).collect();
    events.sort_by(|a, b| (a.created_at, a.lead_id, &a.id).cmp(&(b.created_at, b.lead_id, &b.id)));
    let mut ordered = Vec::with_capacity(events.len());
    let mut rest = events.into_iter().peekable();
    while let Some(first) = rest.next() {
        let mut group = vec![first];
        while let Some(next) = rest.next_if(|e| (e.created_at, e.lead_id) == (group[0].created_at, group[0].lead_id)) {
            group.push(next);
        }
        while !group.is_empty() {
            // The event nobody else in the group led into; the first by id
            // when the group runs in a circle.
            let start = group
                .iter()
                .position(|e| !group.iter().any(|other| other.id != e.id && other.after == e.before))
                .unwrap_or(0);
            ordered.push(group.remove(start));
        }
    }
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::LeadStatus;

    /// Seconds after a fixed instant.
    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_780_000_000 + secs, 0).unwrap()
    }

    const MIN: i64 = 60;
    const DAY: i64 = 86_400;

    #[test]
    fn where_a_stream_starts() {
        let now = t(1000) + chrono::Duration::milliseconds(700);
        assert_eq!(start(now, None), Start { window_end: t(1000 - MIN), complete_to: t(1000) });
        let since = NaiveDate::from_ymd_opt(2026, 3, 1).unwrap();
        let midnight: DateTime<Utc> = "2026-03-01T00:00:00Z".parse().unwrap();
        assert_eq!(start(now, Some(since)), Start { window_end: midnight, complete_to: midnight });
    }

    #[test]
    fn windows() {
        let check = |window_end: i64, server_time: i64, expected: Option<(i64, i64)>| {
            let window = next_window(t(window_end), t(server_time));
            assert_eq!(
                window,
                expected.map(|(from, to)| EventWindow { from: t(from), to: t(to) }),
                "{window_end} at {server_time}"
            );
        };
        // Caught up: from 5 min before the last end to a minute ago.
        check(0, 10 * MIN, Some((-5 * MIN, 9 * MIN)));
        check(0, MIN + 1, Some((-5 * MIN, 1)));
        // Nothing new yet: skipped.
        check(0, MIN, None);
        check(0, 30, None);
        check(10 * MIN, 5 * MIN, None);
        // Behind: a day at a time.
        check(0, 3 * DAY, Some((-5 * MIN, DAY)));
        check(0, DAY + MIN, Some((-5 * MIN, DAY)));
        check(0, DAY + MIN + 1, Some((-5 * MIN, DAY)));
        check(0, DAY + MIN - 1, Some((-5 * MIN, DAY - 1)));
        // Fractions of the server's second are dropped.
        let window = next_window(t(0), t(10 * MIN) + chrono::Duration::milliseconds(999)).unwrap();
        assert_eq!(window.to, t(9 * MIN));
        // Times at the end of the calendar do not overflow.
        assert_eq!(next_window(DateTime::<Utc>::MAX_UTC, DateTime::<Utc>::MAX_UTC), None);
        let min = DateTime::<Utc>::MIN_UTC;
        assert_eq!(next_window(min, min), None);
        assert_eq!(start(min, None).complete_to, whole_seconds(min));
    }

    #[test]
    fn paging() {
        let window = EventWindow { from: t(-5 * MIN), to: t(DAY) };
        let check = |window: EventWindow, page: u32, has_next: bool, expected: PageStep| {
            assert_eq!(after_page(window, t(0), page, has_next), expected, "{window:?} page {page} next {has_next}");
        };
        let narrowed = |to: i64| PageStep::Narrow(EventWindow { from: t(-5 * MIN), to: t(to) });
        check(window, 1, false, PageStep::Done);
        check(window, 1, true, PageStep::Page(2));
        check(window, 19, true, PageStep::Page(20));
        check(window, 20, false, PageStep::Done);
        // Past 20 pages: the part after the last end is halved (the overlap stays).
        check(window, 20, true, narrowed(DAY / 2));
        check(EventWindow { to: t(3), ..window }, 20, true, narrowed(1));
        check(EventWindow { to: t(2), ..window }, 20, true, narrowed(1));
        // One second cannot be halved: paged to its end, within reason.
        let second = EventWindow { from: t(-5 * MIN), to: t(1) };
        check(second, 20, true, PageStep::Page(21));
        check(second, 999, true, PageStep::Page(1000));
        check(second, 1000, true, PageStep::TooMany);
        check(second, 1000, false, PageStep::Done);
    }

    #[test]
    fn events_come_in_time_order_chained_within_a_second() {
        let event = |id: &str, lead_id, at, before: i64, after: i64| AmoStatusEvent {
            id: id.into(),
            lead_id,
            created_by: 0,
            created_at: t(at),
            before: LeadStatus { pipeline_id: 1, status_id: before },
            after: LeadStatus { pipeline_id: 1, status_id: after },
        };
        let check = |events: Vec<AmoStatusEvent>, expected: &[&str]| {
            let ids: Vec<String> = in_order(events.clone()).into_iter().map(|e| e.id).collect();
            assert_eq!(ids, expected, "{events:?}");
        };
        // Time first, whatever the ids say.
        check(vec![event("a", 1, 5, 10, 11), event("b", 1, 3, 12, 10)], &["b", "a"]);
        // One second, one lead: 10 → 11 → 12 → 13, listed in any order.
        let moves = [event("z", 1, 5, 10, 11), event("a", 1, 5, 12, 13), event("m", 1, 5, 11, 12)];
        check(moves.to_vec(), &["z", "m", "a"]);
        check(vec![moves[2].clone(), moves[1].clone(), moves[0].clone()], &["z", "m", "a"]);
        // Other leads in that second keep their own chains; a repeat is dropped.
        let other = event("b", 2, 5, 20, 21);
        check(
            vec![moves[1].clone(), other.clone(), moves[0].clone(), moves[2].clone(), other.clone()],
            &["z", "m", "a", "b"],
        );
        // There and back within a second: a circle, taken by id.
        check(vec![event("y", 1, 5, 11, 10), event("x", 1, 5, 10, 11)], &["x", "y"]);
    }

    #[test]
    fn events_as_rows() {
        let status = |pipeline_id, status_id| LeadStatus { pipeline_id, status_id };
        let event = |before: LeadStatus, after: LeadStatus| AmoStatusEvent {
            id: "01pz58t6p04ymgsgfbmfyfy1mf".into(),
            lead_id: 501,
            created_by: 0,
            created_at: t(42),
            before,
            after,
        };
        let found = Found { responsible: [(501, 7)].into(), outbox: [(501, 12), (502, 13)].into() };
        let flags = Some(StageFlags { qualified: true, success: false, fail: false });
        let row = change(&event(status(10, 100), status(10, 101)), flags, &found);
        assert_eq!(
            row,
            StageChange {
                crm: Crm::AmoCrm,
                source_event_id: "01pz58t6p04ymgsgfbmfyfy1mf".into(),
                entity_type: EntityType::Lead,
                entity_id: 501,
                pipeline_from: Some("10".into()),
                stage_from: Some("100".into()),
                pipeline_to: Some("10".into()),
                stage_to: "101".into(),
                change_kind: ChangeKind::Moved,
                semantic: Some(Semantics::Process),
                flags,
                changed_at: t(42),
                changed_by_user_id: Some(0),
                responsible_user_id: Some(7),
                outbox_id: Some(12),
            }
        );
        let check = |before, after, kind, semantic| {
            let row = change(&event(before, after), None, &Found::default());
            assert_eq!((row.change_kind, row.semantic), (kind, Some(semantic)), "{before:?} → {after:?}");
            assert_eq!((row.flags, row.responsible_user_id, row.outbox_id), (None, None, None));
        };
        check(status(10, 100), status(10, 142), ChangeKind::Moved, Semantics::Success);
        check(status(10, 100), status(10, 143), ChangeKind::Moved, Semantics::Failure);
        check(status(10, 142), status(20, 200), ChangeKind::Pipeline, Semantics::Process);
        check(status(10, 100), status(20, 143), ChangeKind::Pipeline, Semantics::Failure);
        assert_eq!(stage_key(&event(status(10, 100), status(20, 143))), (20, 143));
    }
}
