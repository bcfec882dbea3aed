//! AmoCRM's stream, `lead_status_changed`: closed time windows after the
//! cursor's `window_end`, each paged until no `_links.next` (or 204) and
//! narrowed past 20 pages, then its new events written as rows with the
//! cursor moved to the window's end, in one transaction. Every call goes
//! through the token service (a 401 refreshes once); no connection is held
//! while AmoCRM answers.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::{Budget, Polls, Progress, Start, cursor_of, sync_requests, sync_stages};
use crate::config::{AmoCrmConfig, FunnelConfig, TenantConfig};
use crate::context::Context;
use crate::crm::amocrm::AmoClient;
use crate::crm::amocrm_events::{EventsPage, LEADS_LIMIT};
use crate::db::{TenantDb, amocrm_stages, cursors, lead_outbox, stage_changes};
use crate::failure::{Cause, FailureKind};
use crate::model::{AmoStatusEvent, Crm, Cursor, EntityType, EventWindow, Position, StageFlags, Stream, Tokens};
use crate::reconcile::funnel::{Found, amocrm as plan};
use crate::tokens::Owner;

const STREAM: Stream = Stream::AmoLeadStatusChanged;
/// Windows a poll drops because the server's clock was behind the estimate.
const MAX_AHEAD: u32 = 3;
/// How far two estimates of a server's clock differ by `Date`'s whole
/// seconds and the answers' travel alone.
const DATE_JITTER: chrono::TimeDelta = chrono::TimeDelta::seconds(2);

/// One poll of the stream: windows until caught up, or until the budget
/// cannot pay for the next page and what its window may still need.
pub(super) async fn poll(
    ctx: &Context,
    polls: &Polls,
    tenant: &TenantConfig,
    amo: &AmoCrmConfig,
    funnel: &FunnelConfig,
    start: Start<'_>,
) -> Result<Progress, Cause> {
    let Start { db, cursors: stored, budget } = start;
    let owner = Owner::of(tenant, amo, db);
    let access = ctx.tokens().refresh_if_due(owner, None).await?;
    let api = AmoClient::new(&ctx.http, &amo.account).with_retry(ctx.retry);
    let mut run = Run {
        ctx,
        polls,
        tenant,
        owner,
        api,
        access,
        budget,
        started: Utc::now(),
        horizon: None,
        synced: false,
        progress: Progress::default(),
    };
    let mut window_end = match cursor_of(stored, STREAM).and_then(window_end_of) {
        Some(end) => end,
        None => run.start(funnel).await?,
    };
    let mut ahead = 0;
    loop {
        let Some(window) = run.next_window(window_end).await? else { break };
        match run.read(window, window_end).await? {
            // Another process may have moved it further meanwhile.
            Read::Whole(window, events) => window_end = run.commit(window, events).await?.unwrap_or(window_end),
            // The clock is corrected by now; a server whose `Date` keeps
            // falling behind is left for the next poll.
            Read::Ahead if ahead < MAX_AHEAD => {
                ahead += 1;
                run.horizon = None;
            }
            Read::Ahead => break,
            Read::OutOfBudget => {
                run.progress.more = true;
                break;
            }
        }
    }
    run.progress.requests = run.budget.used;
    Ok(run.progress)
}

fn window_end_of(cursor: &Cursor) -> Option<DateTime<Utc>> {
    match cursor.position {
        Position::WindowEnd(end) => Some(end),
        Position::LastId(..) => None,
    }
}

/// The stream's cursor as stored now, noted in `progress`.
async fn stored_window_end(db: &TenantDb, progress: &mut Progress) -> Result<Option<DateTime<Utc>>, Cause> {
    let cursor = cursors::read(&db.session().await?, STREAM).await?;
    Ok(cursor.and_then(|cursor| progress.noted(cursor, window_end_of)))
}

/// What reading a window came to.
enum Read {
    /// Every page of this window (narrowed, maybe), in the order read.
    Whole(EventWindow, Vec<AmoStatusEvent>),
    /// The server's clock says the window is not yet in the settled past
    /// (the estimate was ahead): nothing of it is kept.
    Ahead,
    OutOfBudget,
}

struct Run<'a> {
    ctx: &'a Context,
    polls: &'a Polls,
    tenant: &'a TenantConfig,
    owner: Owner<'a>,
    api: AmoClient<'a>,
    access: Tokens,
    budget: Budget,
    /// When the poll began, on the local clock.
    started: DateTime<Utc>,
    /// The server's time when the poll began: windows end there, so that a
    /// poll whose own work takes past a second does not chase the clock
    /// with one more window (an idle poll is one request). Moved only when
    /// an answer corrects the clock by more than a `Date`'s jitter.
    horizon: Option<DateTime<Utc>>,
    /// A stage sync ran in this poll (at most one).
    synced: bool,
    progress: Progress,
}

impl Run<'_> {
    fn slug(&self) -> &str {
        &self.tenant.slug
    }

    /// A page of `window`'s events, the token refreshed once on a 401, the
    /// account's clock taken from the answer.
    async fn page(&mut self, window: EventWindow, page: u32) -> Result<EventsPage, Cause> {
        self.budget.spend(1);
        let api = &self.api;
        let tokens = self.ctx.tokens();
        let answer =
            tokens
                .with_fresh_access(self.owner, &mut self.access, |t| async move {
                    api.status_events(&t, window, page).await
                })
                .await?;
        self.polls.observe(self.slug(), Crm::AmoCrm, answer.server_date);
        Ok(answer)
    }

    /// The server's time, asking the account once when this process never
    /// heard from it (an events page of one second, read for its `Date`).
    async fn server_time(&mut self) -> Result<DateTime<Utc>, Cause> {
        if self.polls.clock(self.slug(), Crm::AmoCrm).is_none() {
            let local = DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap_or_else(Utc::now);
            let second = EventWindow { from: local, to: local };
            self.page(second, 1).await?;
        }
        Ok(self.polls.server_time(self.slug(), Crm::AmoCrm))
    }

    /// The stream's first enable: from a minute ago without `since` (no
    /// history), from that day with it. Another process that started it
    /// first wins; its cursor is used.
    async fn start(&mut self, funnel: &FunnelConfig) -> Result<DateTime<Utc>, Cause> {
        let server_time = match funnel.since {
            Some(_) => Utc::now(),
            None => self.server_time().await?,
        };
        let start = plan::start(server_time, funnel.since);
        let db = self.owner.db;
        {
            let mut session = db.session().await?;
            let tx = session.transaction().await?;
            let created = cursors::start(&tx, Position::WindowEnd(start.window_end), start.complete_to).await?;
            tx.commit().await?;
            if created {
                self.progress.started.push(STREAM);
                tracing::info!(tenant = %self.tenant.slug, crm = "amocrm", window_end = %start.window_end, "funnel stream started");
            }
        }
        stored_window_end(db, &mut self.progress)
            .await?
            .ok_or_else(|| Cause::new(FailureKind::Database, "the funnel cursor was started but is not there"))
    }

    /// The next window on the server's time; narrowed as an earlier poll
    /// left it. When this process never heard from the account and the
    /// local clock sees nothing to read, the account is asked for its time.
    async fn next_window(&mut self, window_end: DateTime<Utc>) -> Result<Option<EventWindow>, Cause> {
        let mut window = plan::next_window(window_end, self.horizon());
        if window.is_none() && self.polls.clock(self.slug(), Crm::AmoCrm).is_none() {
            if !self.budget.affords(1) {
                self.progress.more = true;
                return Ok(None);
            }
            self.server_time().await?;
            window = plan::next_window(window_end, self.horizon());
        }
        Ok(window.map(|w| match self.polls.narrowed(self.slug(), window_end) {
            Some(to) if to < w.to => EventWindow { to, ..w },
            _ => w,
        }))
    }

    /// The poll's horizon on the clock as the latest answer corrected it.
    fn horizon(&mut self) -> DateTime<Utc> {
        let corrected = self.polls.server_time_at(&self.tenant.slug, Crm::AmoCrm, self.started);
        let horizon = match self.horizon {
            Some(horizon) if corrected <= horizon + DATE_JITTER => horizon,
            _ => corrected,
        };
        *self.horizon.insert(horizon)
    }

    /// Every page of `window` (from 1, narrowed past 20 pages), or why not.
    /// A page is asked for only while the budget also covers the
    /// responsible-user reads of every event it may bring, and a stage sync.
    async fn read(&mut self, window: EventWindow, window_end: DateTime<Utc>) -> Result<Read, Cause> {
        let mut window = window;
        let mut page = 1;
        let mut events: Vec<AmoStatusEvent> = Vec::new();
        loop {
            let after_page = events.len() + plan::PAGE_SIZE as usize;
            let sync = if self.synced { 0 } else { sync_requests(Crm::AmoCrm) };
            if !self.budget.affords(1 + after_page.div_ceil(LEADS_LIMIT) + sync) {
                return Ok(Read::OutOfBudget);
            }
            let answer = self.page(window, page).await?;
            if let Some(date) = answer.server_date
                && plan::next_window(window_end, date).is_none_or(|settled| window.to > settled.to)
            {
                tracing::debug!(tenant = %self.tenant.slug, "the window was not settled on the server's clock");
                return Ok(Read::Ahead);
            }
            events.extend(answer.events);
            match plan::after_page(window, window_end, page, answer.has_next) {
                plan::PageStep::Page(next) => page = next,
                plan::PageStep::Done => return Ok(Read::Whole(window, events)),
                plan::PageStep::Narrow(narrower) => {
                    tracing::info!(tenant = %self.tenant.slug, to = %narrower.to, "funnel window narrowed past its page limit");
                    self.polls.narrow(self.slug(), window_end, narrower.to);
                    (window, page) = (narrower, 1);
                    events.clear();
                }
                plan::PageStep::TooMany => {
                    return Err(Cause::new(
                        FailureKind::Crm,
                        format!(
                            "the events of one second ({}) run past {} pages: the list never ends",
                            window.to,
                            plan::MAX_UNNARROWED_PAGES
                        ),
                    ));
                }
            }
        }
    }

    /// The window's new events as rows, and the cursor at its end, in one
    /// transaction; the cursor's window end as stored after it.
    async fn commit(
        &mut self,
        window: EventWindow,
        events: Vec<AmoStatusEvent>,
    ) -> Result<Option<DateTime<Utc>>, Cause> {
        let db = self.owner.db;
        // Ids follow time: a reader sees each lead's changes in order.
        let mut events = plan::in_order(events);
        let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
        let stored = stage_changes::stored_sources(&db.session().await?, Crm::AmoCrm, &ids).await?;
        events.retain(|e| !stored.contains(&e.id));
        if events.is_empty() {
            let position = Position::WindowEnd(window.to);
            let cursor = cursors::advance_alone(&db.session().await?, position, Some(window.to)).await?;
            return Ok(cursor.and_then(|cursor| self.progress.noted(cursor, window_end_of)));
        }
        let keys: Vec<(i64, i64)> = events.iter().map(plan::stage_key).collect::<HashSet<_>>().into_iter().collect();
        let flags = self.flags(&keys).await?;
        let leads: Vec<i64> = events.iter().map(|e| e.lead_id).collect::<HashSet<_>>().into_iter().collect();
        let responsible = self.responsible(&leads).await?;
        let outbox = lead_outbox::rows_of_entities(&db.session().await?, Crm::AmoCrm, EntityType::Lead, &leads).await?;
        let found = Found { responsible, outbox };
        let rows: Vec<_> =
            events.iter().map(|e| plan::change(e, flags.get(&plan::stage_key(e)).copied(), &found)).collect();
        let mut session = db.session().await?;
        let tx = session.transaction().await?;
        let inserted = stage_changes::insert(&tx, &rows).await?;
        cursors::advance(&tx, Position::WindowEnd(window.to), Some(window.to)).await?;
        tx.commit().await?;
        self.progress.ingested(STREAM, inserted);
        stored_window_end(db, &mut self.progress).await
    }

    /// The flags of these stages from the table; one stage sync first when
    /// one is missing (once a poll), NULL for what is still missing after.
    async fn flags(&mut self, keys: &[(i64, i64)]) -> Result<HashMap<(i64, i64), StageFlags>, Cause> {
        let db = self.owner.db;
        let flags = amocrm_stages::flags_of(&db.session().await?, keys).await?;
        if self.synced || keys.iter().all(|k| flags.contains_key(k)) {
            return Ok(flags);
        }
        self.synced = true;
        self.budget.spend(sync_requests(Crm::AmoCrm));
        self.progress.stage_syncs += 1;
        sync_stages(self.ctx, self.tenant, db, Crm::AmoCrm).await;
        Ok(amocrm_stages::flags_of(&db.session().await?, keys).await?)
    }

    /// The current responsible user of each lead, [`LEADS_LIMIT`] a request.
    async fn responsible(&mut self, leads: &[i64]) -> Result<HashMap<i64, i64>, Cause> {
        let mut users = HashMap::new();
        for chunk in leads.chunks(LEADS_LIMIT) {
            self.budget.spend(1);
            let api = &self.api;
            let tokens = self.ctx.tokens();
            let (read, date) =
                tokens
                    .with_fresh_access(self.owner, &mut self.access, |t| async move {
                        api.responsible_users(&t, chunk).await
                    })
                    .await?;
            self.polls.observe(self.slug(), Crm::AmoCrm, date);
            users.extend(read);
        }
        Ok(users)
    }
}
