//! What the polls of one process remember between polls: each CRM
//! account's clock (the latest `Date` it answered, so a window is computed
//! on the server's time before the poll's first request), and an AmoCRM
//! window narrowed in a poll that then ran out of requests (the next poll
//! starts from that narrower window instead of paging the wide one again).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use crate::model::Crm;
use crate::reconcile::funnel::ServerClock;

/// Shared by every poll of a process; cheap to clone.
#[derive(Clone, Default)]
pub struct Polls {
    inner: Arc<Mutex<HashMap<(String, Crm), Memory>>>,
}

#[derive(Clone, Copy, Default)]
struct Memory {
    /// `None` until the account answered this process with a `Date`.
    clock: Option<ServerClock>,
    /// The window after this `window_end` ends no later than this.
    narrowed: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

impl Polls {
    fn with<T>(&self, slug: &str, crm: Crm, f: impl FnOnce(&mut Memory) -> T) -> T {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(inner.entry((slug.to_string(), crm)).or_default())
    }

    /// The account's clock, if it ever answered with a `Date`.
    pub(super) fn clock(&self, slug: &str, crm: Crm) -> Option<ServerClock> {
        self.with(slug, crm, |m| m.clock)
    }

    /// An answer dated `date` arrived now.
    pub(super) fn observe(&self, slug: &str, crm: Crm, date: Option<DateTime<Utc>>) {
        if let Some(date) = date {
            self.with(slug, crm, |m| m.clock.get_or_insert_with(ServerClock::default).observe(date, Utc::now()));
        }
    }

    /// The server's time now: the local clock, corrected when the account answered before.
    pub(super) fn server_time(&self, slug: &str, crm: Crm) -> DateTime<Utc> {
        self.server_time_at(slug, crm, Utc::now())
    }

    /// The server's time when the local clock read `local`, as the latest
    /// answer has it.
    pub(super) fn server_time_at(&self, slug: &str, crm: Crm, local: DateTime<Utc>) -> DateTime<Utc> {
        self.clock(slug, crm).map_or(local, |c| c.now(local))
    }

    /// Where the window after `window_end` was narrowed to, if it was.
    pub(super) fn narrowed(&self, slug: &str, window_end: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.with(slug, Crm::AmoCrm, |m| m.narrowed.filter(|(end, _)| *end == window_end).map(|(_, to)| to))
    }

    pub(super) fn narrow(&self, slug: &str, window_end: DateTime<Utc>, to: DateTime<Utc>) {
        self.with(slug, Crm::AmoCrm, |m| m.narrowed = Some((window_end, to)));
    }
}
