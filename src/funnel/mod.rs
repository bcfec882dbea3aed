//! Funnel history: one poll of each change stream of a tenant, executing
//! the plans of `reconcile::funnel` — AmoCRM's closed event windows
//! (`amocrm`), Bitrix24's stage-history streams (`bitrix24`). Rows and the
//! cursor they move commit in one transaction; no database connection is
//! held while a CRM answers; a poll may be capped in CRM requests, and a
//! backlog then continues in the next one.

mod amocrm;
mod bitrix24;
mod memory;

use chrono::{DateTime, Utc};

pub use memory::Polls;

use crate::config::{FunnelConfig, TenantConfig};
use crate::context::Context;
use crate::db::{TenantDb, cursors};
use crate::failure::Cause;
use crate::model::{Crm, Cursor, Stream};

/// CRM requests a daemon poll makes at most, to each CRM; the rest of a
/// backlog waits for the next poll.
pub const POLL_REQUESTS: usize = 50;

/// What one poll (or a run until caught up) did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PollReport {
    /// Rows inserted into `crm_stage_changes`.
    pub ingested: u64,
    /// Each stream of the tenant, with its cursor as stored after the poll.
    pub streams: Vec<StreamReport>,
    /// CRM requests made (stage syncs included).
    pub requests: usize,
    /// Stage syncs run because a change named a stage not in the table.
    pub stage_syncs: usize,
    /// The request cap was reached with more to read: poll again soon.
    pub more: bool,
}

/// One stream after a poll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamReport {
    pub stream: Stream,
    /// Rows of this stream inserted by the poll.
    pub ingested: u64,
    /// Every change before it is ingested (the stored cursor's); `None`
    /// while the stream has no cursor.
    pub complete_to: Option<DateTime<Utc>>,
    /// The poll created the stream's cursor (its first enable).
    pub started: bool,
}

/// CRM requests a poll may still make, per CRM.
#[derive(Clone, Copy, Debug)]
struct Budget {
    max: Option<usize>,
    used: usize,
}

impl Budget {
    fn new(max: Option<usize>) -> Budget {
        Budget { max, used: 0 }
    }

    /// `n` more requests fit.
    fn affords(&self, n: usize) -> bool {
        self.max.is_none_or(|max| self.used.saturating_add(n) <= max)
    }

    fn spend(&mut self, n: usize) {
        self.used = self.used.saturating_add(n);
    }
}

/// What one CRM's part of a poll starts from: the tenant's database, its
/// cursors as read at the poll's start, and the requests it may make.
struct Start<'a> {
    db: &'a TenantDb,
    cursors: &'a [Cursor],
    budget: Budget,
}

/// What one CRM's part of a poll did.
#[derive(Debug, Default)]
struct Progress {
    ingested: Vec<(Stream, u64)>,
    /// The cursors as the poll's own writes found them stored, the latest
    /// of each stream.
    cursors: Vec<Cursor>,
    started: Vec<Stream>,
    requests: usize,
    stage_syncs: usize,
    more: bool,
}

impl Progress {
    fn stored(&mut self, cursor: Cursor) {
        self.cursors.retain(|c| c.position.stream() != cursor.position.stream());
        self.cursors.push(cursor);
    }

    /// What `of` reads from `cursor` (its stream's position), the cursor
    /// noted as stored.
    fn noted<T>(&mut self, cursor: Cursor, of: impl FnOnce(&Cursor) -> Option<T>) -> Option<T> {
        let position = of(&cursor);
        self.stored(cursor);
        position
    }

    fn ingested(&mut self, stream: Stream, rows: u64) {
        match self.ingested.iter_mut().find(|(s, _)| *s == stream) {
            Some((_, n)) => *n += rows,
            None => self.ingested.push((stream, rows)),
        }
    }
}

/// One poll of every stream of `tenant`: AmoCRM's `lead_status_changed`
/// with `[amocrm]`, one stream per `[funnel].entities` with `[bitrix24]`.
/// With `max_requests`, each CRM is asked at most that often (a daemon poll:
/// [`POLL_REQUESTS`]) and [`PollReport::more`] says a backlog is left;
/// without, the poll reads until it is caught up. A CRM that fails does not
/// keep the other from its poll; the first failure is the poll's error
/// (what the other ingested stays committed).
pub async fn poll(
    ctx: &Context,
    polls: &Polls,
    tenant: &TenantConfig,
    funnel: &FunnelConfig,
    max_requests: Option<usize>,
) -> Result<PollReport, Cause> {
    let db = ctx.pools.get(&tenant.slug, &tenant.database_url)?;
    let streams = tenant.funnel_streams();
    let stored = match cursors::read_all(&db.session().await?).await {
        // Not migrated yet: nothing can be stored, the next poll will tell.
        Err(e) if e.is_missing_schema() => return Ok(PollReport::default()),
        other => other?,
    };
    let mut report = PollReport::default();
    let mut failure = None;
    let mut progress = Vec::new();
    if let Some(amo) = &tenant.amocrm {
        let start = Start { db: &db, cursors: &stored, budget: Budget::new(max_requests) };
        let run = amocrm::poll(ctx, polls, tenant, amo, funnel, start).await;
        match run {
            Ok(done) => progress.push(done),
            Err(cause) => failure = failure.or(Some(named(Crm::AmoCrm, cause))),
        }
    }
    if let Some(b24) = &tenant.bitrix24 {
        let start = Start { db: &db, cursors: &stored, budget: Budget::new(max_requests) };
        let run = bitrix24::poll(ctx, polls, tenant, b24, funnel, start).await;
        match run {
            Ok(done) => progress.push(done),
            Err(cause) => failure = failure.or(Some(named(Crm::Bitrix24, cause))),
        }
    }
    if let Some(cause) = failure {
        return Err(cause);
    }
    for done in &progress {
        report.requests += done.requests;
        report.stage_syncs += done.stage_syncs;
        report.more |= done.more;
    }
    report.streams = stream_reports(&streams, &stored, &progress);
    report.ingested = report.streams.iter().map(|s| s.ingested).sum();
    Ok(report)
}

/// The streams with their cursors as last seen stored: by the poll's
/// writes, else as read at its start.
fn stream_reports(streams: &[Stream], stored: &[Cursor], progress: &[Progress]) -> Vec<StreamReport> {
    streams
        .iter()
        .map(|&stream| {
            let written = progress.iter().flat_map(|p| &p.cursors).find(|c| c.position.stream() == stream);
            let cursor = written.or_else(|| cursor_of(stored, stream));
            StreamReport {
                stream,
                ingested: progress.iter().flat_map(|p| &p.ingested).filter(|(s, _)| *s == stream).map(|(_, n)| n).sum(),
                complete_to: cursor.and_then(|c| c.complete_to),
                started: progress.iter().any(|p| p.started.contains(&stream)),
            }
        })
        .collect()
}

fn cursor_of(cursors: &[Cursor], stream: Stream) -> Option<&Cursor> {
    cursors.iter().find(|c| c.position.stream() == stream)
}

/// A failure's message says which CRM's poll it ended.
fn named(crm: Crm, cause: Cause) -> Cause {
    Cause { message: format!("{crm} funnel: {}", cause.message), ..cause }
}

/// Polls `tenant` until every stream is caught up (`crm-connect funnel`):
/// no request cap; what each poll did, summed.
pub async fn until_caught_up(ctx: &Context, tenant: &TenantConfig, funnel: &FunnelConfig) -> Result<PollReport, Cause> {
    let polls = Polls::default();
    let mut total = PollReport::default();
    loop {
        let report = poll(ctx, &polls, tenant, funnel, None).await?;
        total.ingested += report.ingested;
        total.requests += report.requests;
        total.stage_syncs += report.stage_syncs;
        total.streams = report
            .streams
            .into_iter()
            .map(|s| {
                let before = total.streams.iter().find(|t| t.stream == s.stream);
                StreamReport {
                    ingested: s.ingested + before.map_or(0, |b| b.ingested),
                    started: s.started || before.is_some_and(|b| b.started),
                    ..s
                }
            })
            .collect();
        if !report.more {
            return Ok(total);
        }
    }
}

/// Runs a stage sync of `crm` because a change named a stage the table
/// lacks: at most one per CRM per poll. Its failure is recorded by the sync
/// itself; the changes then get NULL flags.
async fn sync_stages(ctx: &Context, tenant: &TenantConfig, db: &TenantDb, crm: Crm) {
    let outcome = match crm {
        Crm::AmoCrm => match &tenant.amocrm {
            Some(amo) => crate::apply::amocrm::resync(ctx, tenant, amo, db).await,
            None => return,
        },
        Crm::Bitrix24 => match &tenant.bitrix24 {
            Some(b24) => crate::apply::bitrix24::resync(ctx, tenant, b24, db).await,
            None => return,
        },
    };
    match outcome {
        Ok(_) => tracing::info!(tenant = %tenant.slug, crm = crm.as_str(), "stages synced for an unknown funnel stage"),
        Err(failure) => tracing::warn!(
            tenant = %tenant.slug, crm = crm.as_str(), error = %failure.message,
            "the stage sync for an unknown funnel stage failed: its changes get no flags"
        ),
    }
}

/// Requests of a stage sync: AmoCRM one, Bitrix24 two (categories, then a batch).
fn sync_requests(crm: Crm) -> usize {
    match crm {
        Crm::AmoCrm => 1,
        Crm::Bitrix24 => 2,
    }
}
