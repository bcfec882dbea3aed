//! Bitrix24's streams, one per `[funnel].entities`: rounds of one `batch`
//! with a `crm.stagehistory.list` per stream not at its end — and, while a
//! stream's pages come back full, twice as many pages chained to it by
//! `$result` references (up to a whole batch) — then the
//! look-backs and responsible users of the new records in shared batches of
//! up to 50 commands, then the rows and every stream's cursor (moved over
//! settled records only) in one transaction per round. No connection is
//! held while the portal answers.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::{Budget, Polls, Progress, Start, cursor_of, sync_requests, sync_stages};
use crate::config::{Bitrix24Config, FunnelConfig, TenantConfig};
use crate::context::Context;
use crate::crm::bitrix24::{B24Client, BATCH_LIMIT, HistoryAnswer, HistoryQuery, ITEMS_PER_COMMAND};
use crate::db::{TenantDb, bitrix24_stages, cursors, lead_outbox, stage_changes};
use crate::failure::{Cause, FailureKind};
use crate::model::{B24StageRecord, Crm, Cursor, EntityType, Position, StageAt, StageChange, StageFlags, Stream};
use crate::reconcile::funnel::bitrix24::{self as plan, FromStage, StreamRead};
use crate::reconcile::funnel::{Found, start_of};

/// The code of a portal that refuses a filter on `CREATED_TIME`.
const REFUSED_FILTER: &str = "INVALID_ARG_VALUE";

/// One poll of the tenant's Bitrix24 streams: rounds until every stream
/// is at its end, or until the budget cannot pay for the next round.
pub(super) async fn poll(
    ctx: &Context,
    polls: &Polls,
    tenant: &TenantConfig,
    b24: &Bitrix24Config,
    funnel: &FunnelConfig,
    start: Start<'_>,
) -> Result<Progress, Cause> {
    let Start { db, cursors: stored, budget } = start;
    let api = B24Client::new(&ctx.http, &b24.webhook).with_retry(ctx.retry);
    let mut run = Run { ctx, polls, tenant, db, api, budget, synced: false, progress: Progress::default() };
    let mut reads = Vec::new();
    for &entity in &funnel.entities {
        let last_id = match cursor_of(stored, Stream::Bitrix24(entity)).and_then(last_id_of) {
            Some(id) => Some(id),
            None => run.start(entity, funnel).await?,
        };
        match last_id {
            Some(id) => reads.push((entity, StreamRead::start(id))),
            None => run.progress.more = true,
        }
    }
    // A portal that refused to find where `since` starts is read from its
    // first record; what precedes that day is read, never stored.
    let stored_from = funnel.since.map(start_of);
    loop {
        let active: Vec<(EntityType, i64, usize)> =
            reads.iter().filter_map(|(entity, read)| read.next_from.map(|from| (*entity, from, read.pages))).collect();
        if active.is_empty() {
            break;
        }
        let sync = if run.synced { 0 } else { sync_requests(Crm::Bitrix24) };
        if !run.budget.affords(2 + sync) || !run.round(&active, &mut reads, stored_from).await? {
            run.progress.more = true;
            break;
        }
    }
    run.progress.requests = run.budget.used;
    Ok(run.progress)
}

fn last_id_of(cursor: &Cursor) -> Option<i64> {
    match cursor.position {
        Position::LastId(_, id) => Some(id),
        Position::WindowEnd(_) => None,
    }
}

/// The stream's cursor as stored now, noted in `progress`.
async fn stored_last_id(db: &TenantDb, entity: EntityType, progress: &mut Progress) -> Result<Option<i64>, Cause> {
    let cursor = cursors::read(&db.session().await?, Stream::Bitrix24(entity)).await?;
    Ok(cursor.and_then(|cursor| progress.noted(cursor, last_id_of)))
}

/// A stream's records from its chained pages, in ID order, up to the
/// first short page (its end: later pages ran on an empty reference) or
/// the first page unread or not following the one before (read again next
/// round); and whether it reached its end.
fn chained_pages(entity: EntityType, pages: &[HistoryAnswer]) -> Result<(Vec<B24StageRecord>, bool), Cause> {
    let mut records: Vec<B24StageRecord> = Vec::new();
    for (k, page) in pages.iter().enumerate() {
        let page = match page {
            HistoryAnswer::Records(page) => page,
            HistoryAnswer::Unread if k > 0 => return Ok((records, false)),
            other => {
                let message = format!("a {} stream read answered {other:?}", entity.as_str());
                return Err(Cause::new(FailureKind::Crm, message));
            }
        };
        let last = records.last().map(|r| r.id);
        if k > 0 && page.first().is_some_and(|first| last.is_some_and(|last| first.id <= last)) {
            return Ok((records, false));
        }
        records.extend(page.iter().cloned());
        if page.len() < ITEMS_PER_COMMAND {
            return Ok((records, true));
        }
    }
    Ok((records, false))
}

/// One stream's new records of a round, with their from-stages.
struct Fresh {
    entity: EntityType,
    records: Vec<(B24StageRecord, FromStage)>,
}

/// What the look-backs and responsible users of a round found.
#[derive(Default)]
struct Looked {
    /// By entity and record ID: where the entity stood before that record.
    previous: HashMap<(EntityType, i64), Option<StageAt>>,
    responsible: HashMap<EntityType, HashMap<i64, i64>>,
}

struct Run<'a> {
    ctx: &'a Context,
    polls: &'a Polls,
    tenant: &'a TenantConfig,
    db: &'a TenantDb,
    api: B24Client<'a>,
    budget: Budget,
    /// A stage sync ran in this poll (at most one).
    synced: bool,
    progress: Progress,
}

impl Run<'_> {
    /// The stream's first enable: after the highest ID now (no history), or
    /// with `since` the highest before that day. Another process that
    /// started it first wins. `None`: no budget left to start it.
    async fn start(&mut self, entity: EntityType, funnel: &FunnelConfig) -> Result<Option<i64>, Cause> {
        if !self.budget.affords(1) {
            return Ok(None);
        }
        self.budget.spend(1);
        let before = funnel.since.map(start_of);
        let (highest, date) = match self.api.highest_record_id(entity, before).await {
            Ok(found) => found,
            Err(e) if before.is_some() && e.api_code().is_some_and(|c| c.eq_ignore_ascii_case(REFUSED_FILTER)) => {
                tracing::warn!(
                    tenant = %self.tenant.slug, crm = "bitrix24", entity = entity.as_str(), error = %e,
                    "the portal refuses to filter stage history by time: read from its first record"
                );
                (None, None)
            }
            Err(e) => return Err(e.into()),
        };
        self.polls.observe(&self.tenant.slug, Crm::Bitrix24, date);
        let server_time = self.polls.server_time(&self.tenant.slug, Crm::Bitrix24);
        let (last_id, complete_to) = plan::start(highest, server_time, funnel.since);
        {
            let mut session = self.db.session().await?;
            let tx = session.transaction().await?;
            let created = cursors::start(&tx, Position::LastId(entity, last_id), complete_to).await?;
            tx.commit().await?;
            if created {
                self.progress.started.push(Stream::Bitrix24(entity));
                tracing::info!(tenant = %self.tenant.slug, crm = "bitrix24", entity = entity.as_str(), last_id, "funnel stream started");
            }
        }
        let stored = stored_last_id(self.db, entity, &mut self.progress).await?;
        stored
            .map(Some)
            .ok_or_else(|| Cause::new(FailureKind::Database, "the funnel cursor was started but is not there"))
    }

    /// One round: the streams' reads, what their new records need, the
    /// rows and cursors committed. `false` when the budget could not pay
    /// for what the records need (nothing of the round is kept).
    async fn round(
        &mut self,
        active: &[(EntityType, i64, usize)],
        reads: &mut [(EntityType, StreamRead)],
        stored_from: Option<DateTime<Utc>>,
    ) -> Result<bool, Cause> {
        self.budget.spend(1);
        // Each stream's pages chained in one batch, sharing its 50 commands.
        let share = (BATCH_LIMIT / active.len().max(1)).max(1);
        let mut queries = Vec::new();
        let mut chains = Vec::new();
        for &(entity, after_id, pages) in active {
            let first = queries.len();
            queries.push(HistoryQuery::After { entity, after_id });
            for page in 1..pages.clamp(1, share) {
                queries.push(HistoryQuery::Continue { entity, after: first + page - 1 });
            }
            chains.push((entity, first..queries.len()));
        }
        let batch = self.api.stage_history(&queries).await?;
        self.polls.observe(&self.tenant.slug, Crm::Bitrix24, batch.server_date);
        let server_time = self.polls.server_time(&self.tenant.slug, Crm::Bitrix24);
        let mut answers = Vec::new();
        let mut ends = Vec::new();
        for (entity, range) in chains {
            let (records, at_end) = chained_pages(entity, &batch.answers[range])?;
            answers.push((entity, records));
            ends.push((entity, at_end));
        }
        let fresh = self.fresh(&answers, stored_from).await?;
        let Some(looked) = self.look(&fresh).await? else { return Ok(false) };
        let mut rows = Vec::new();
        for part in &fresh {
            rows.push((part.entity, self.rows(part, &looked).await?));
        }
        let advanced: Vec<(EntityType, StreamRead)> = reads
            .iter()
            .map(|&(entity, read)| match answers.iter().find(|(e, _)| *e == entity) {
                Some((_, records)) => {
                    let at_end = ends.iter().any(|&(e, end)| e == entity && end);
                    (entity, read.after_pages(records, at_end, server_time))
                }
                None => (entity, read),
            })
            .collect();
        let moved = advanced.iter().filter(|(entity, _)| answers.iter().any(|(e, _)| e == entity));
        if rows.iter().all(|(_, rows)| rows.is_empty()) {
            let session = self.db.session().await?;
            for (entity, read) in moved {
                let position = Position::LastId(*entity, read.last_id);
                if let Some(cursor) = cursors::advance_alone(&session, position, read.complete_to).await? {
                    self.progress.stored(cursor);
                }
            }
        } else {
            let mut session = self.db.session().await?;
            let tx = session.transaction().await?;
            let mut inserted = Vec::new();
            for (entity, rows) in &rows {
                inserted.push((Stream::Bitrix24(*entity), stage_changes::insert(&tx, rows).await?));
            }
            for (entity, read) in moved {
                cursors::advance(&tx, Position::LastId(*entity, read.last_id), read.complete_to).await?;
            }
            tx.commit().await?;
            for (stream, n) in inserted {
                self.progress.ingested(stream, n);
            }
            for cursor in cursors::read_all(&session).await? {
                if cursor.position.stream().crm() == Crm::Bitrix24 {
                    self.progress.stored(cursor);
                }
            }
        }
        reads.copy_from_slice(&advanced);
        Ok(true)
    }

    /// The records not stored yet, chained to where their entities stood:
    /// the answer, the table, or a look-back still to make. A creation
    /// record of an entity its delivery created is left out.
    async fn fresh(
        &self,
        answers: &[(EntityType, Vec<B24StageRecord>)],
        stored_from: Option<DateTime<Utc>>,
    ) -> Result<Vec<Fresh>, Cause> {
        let session = self.db.session().await?;
        let mut fresh = Vec::new();
        for (entity, records) in answers {
            let entity = *entity;
            let owners: Vec<i64> = records.iter().map(|r| r.owner_id).collect::<HashSet<_>>().into_iter().collect();
            let latest = stage_changes::latest_of(&session, Crm::Bitrix24, entity, &owners).await?;
            let latest: HashMap<i64, StageAt> =
                latest.into_iter().map(|(id, row)| (id, row.change.stage_at())).collect();
            let delivered = stage_changes::created_by_delivery(&session, Crm::Bitrix24, entity, &owners).await?;
            let sources: Vec<String> = records.iter().map(|r| plan::source_id(entity, r.id)).collect();
            let stored = stage_changes::stored_sources(&session, Crm::Bitrix24, &sources).await?;
            let chained = plan::chain(entity, records, &latest, &delivered);
            let records = chained
                .records
                .into_iter()
                .filter(|(r, _)| !stored.contains(&plan::source_id(entity, r.id)))
                .filter(|(r, _)| stored_from.is_none_or(|from| r.created_time >= from))
                .collect();
            fresh.push(Fresh { entity, records });
        }
        Ok(fresh)
    }

    /// The look-backs and responsible users of the new records, in batches
    /// of up to 50 commands; `None` when the budget cannot pay for them.
    async fn look(&mut self, fresh: &[Fresh]) -> Result<Option<Looked>, Cause> {
        let mut queries = Vec::new();
        for part in fresh {
            for (record, from) in &part.records {
                if *from == FromStage::LookBack {
                    queries.push(HistoryQuery::Before {
                        entity: part.entity,
                        owner_id: record.owner_id,
                        before_id: record.id,
                    });
                }
            }
            let owners: Vec<i64> =
                part.records.iter().map(|(r, _)| r.owner_id).collect::<HashSet<_>>().into_iter().collect();
            for ids in owners.chunks(ITEMS_PER_COMMAND) {
                queries.push(HistoryQuery::Responsible { entity: part.entity, ids: ids.to_vec() });
            }
        }
        let batches: Vec<&[HistoryQuery]> = queries.chunks(BATCH_LIMIT).collect();
        let sync = if self.synced { 0 } else { sync_requests(Crm::Bitrix24) };
        if !self.budget.affords(batches.len() + sync) {
            return Ok(None);
        }
        let mut looked = Looked::default();
        for batch in batches {
            self.budget.spend(1);
            let answer = self.api.stage_history(batch).await?;
            self.polls.observe(&self.tenant.slug, Crm::Bitrix24, answer.server_date);
            for (query, answer) in batch.iter().zip(answer.answers) {
                match (query, answer) {
                    (HistoryQuery::Before { entity, before_id, .. }, HistoryAnswer::Previous(previous)) => {
                        let at = previous.map(|p| plan::stage_at(*entity, &p));
                        looked.previous.insert((*entity, *before_id), at);
                    }
                    (HistoryQuery::Responsible { entity, .. }, HistoryAnswer::Responsible(users)) => {
                        looked.responsible.entry(*entity).or_default().extend(users);
                    }
                    (query, answer) => {
                        return Err(Cause::new(FailureKind::Crm, format!("{query:?} answered {answer:?}")));
                    }
                }
            }
        }
        Ok(Some(looked))
    }

    /// One stream's new records as rows: flags from the stage table (after
    /// one stage sync a poll when a stage is missing), the outbox row of
    /// each entity delivered from the outbox.
    async fn rows(&mut self, part: &Fresh, looked: &Looked) -> Result<Vec<StageChange>, Cause> {
        let entity = part.entity;
        let keys: Vec<(i32, String)> = part
            .records
            .iter()
            .filter_map(|(r, _)| plan::stage_key(entity, r))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let flags = self.flags(entity, &keys).await?;
        let owners: Vec<i64> =
            part.records.iter().map(|(r, _)| r.owner_id).collect::<HashSet<_>>().into_iter().collect();
        let outbox = lead_outbox::rows_of_entities(&self.db.session().await?, Crm::Bitrix24, entity, &owners).await?;
        let found = Found { responsible: looked.responsible.get(&entity).cloned().unwrap_or_default(), outbox };
        Ok(part
            .records
            .iter()
            .map(|(record, from)| {
                let from = match from {
                    FromStage::Creation => None,
                    FromStage::Known(at) => Some(at.clone()),
                    FromStage::LookBack => looked.previous.get(&(entity, record.id)).cloned().flatten(),
                };
                let flags = plan::stage_key(entity, record).and_then(|key| flags.get(&key).copied());
                plan::change(entity, record, from.as_ref(), flags, &found)
            })
            .collect())
    }

    async fn flags(
        &mut self,
        entity: EntityType,
        keys: &[(i32, String)],
    ) -> Result<HashMap<(i32, String), StageFlags>, Cause> {
        let flags = bitrix24_stages::flags_of(&self.db.session().await?, entity, keys).await?;
        if self.synced || keys.iter().all(|k| flags.contains_key(k)) {
            return Ok(flags);
        }
        self.synced = true;
        self.budget.spend(sync_requests(Crm::Bitrix24));
        self.progress.stage_syncs += 1;
        sync_stages(self.ctx, self.tenant, self.db, Crm::Bitrix24).await;
        Ok(bitrix24_stages::flags_of(&self.db.session().await?, entity, keys).await?)
    }
}
