//! Lead delivery: one pass over a tenant's outbox. It starts with one
//! statement (nothing due ends it: an idle tenant costs exactly that), then
//! takes due rows one at a time — a `pending` row is validated, marked
//! `sending` and committed before the CRM is called; a `sending` row is
//! looked up by its key — and writes what `reconcile::delivery` decides. No
//! database connection is held while a CRM answers.

mod amocrm;
mod bitrix24;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use chrono::{DateTime, Utc};

use crate::config::{LeadsConfig, TenantConfig};
use crate::context::Context;
use crate::db::lead_outbox::{self, Seen};
use crate::db::stage_changes;
use crate::db::status::StatusUpdate;
use crate::db::{self, DbError, TenantDb};
use crate::failure::{Cause, FailureKind};
use crate::metrics::AttemptOutcome;
use crate::model::{
    CreatedIds, Crm, CrmState, LeadPlacement, LookupAnswer, OutboxRow, OutboxState, SendAnswer, StageChange,
    entity_type_of,
};
use crate::reconcile::delivery::{self, Transition};
use crate::reconcile::funnel;

/// Rows one daemon pass handles at most; the next pass starts at once.
pub const PASS_LIMIT: usize = 100;

/// What delivery remembers between passes of one process: each tenant's
/// AmoCRM fields (listed hourly), its Bitrix24 CRM mode, and the CRMs
/// delivery is paused for.
#[derive(Clone, Default)]
pub struct Delivery {
    inner: Arc<Mutex<HashMap<(String, Crm), Memory>>>,
}

#[derive(Clone, Default)]
struct Memory {
    amo_fields: Option<(Instant, amocrm::Fields)>,
    bitrix24_mode: Option<i64>,
    /// Delivery to this CRM waits until then; the pause doubles while the
    /// CRM keeps refusing.
    paused_until: Option<Instant>,
    pause: Option<Duration>,
}

impl Delivery {
    fn memory(&self, slug: &str, crm: Crm) -> Memory {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).get(&(slug.to_string(), crm)).cloned().unwrap_or_default()
    }

    fn update(&self, slug: &str, crm: Crm, change: impl FnOnce(&mut Memory)) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        change(inner.entry((slug.to_string(), crm)).or_default());
    }

    /// Holds delivery to `crm` for `at_least`, or — with none — for a pause
    /// doubling from one second.
    fn pause(&self, slug: &str, crm: Crm, at_least: Option<Duration>) {
        self.update(slug, crm, |m| {
            let next = match at_least {
                Some(wait) => wait,
                None => m.pause.map_or(Duration::from_secs(1), |p| (p * 2).min(delivery::MAX_WAIT)),
            };
            m.pause = Some(next);
            m.paused_until = Some(Instant::now() + next);
        });
    }

    fn unpause(&self, slug: &str, crm: Crm) {
        self.update(slug, crm, |m| {
            m.pause = None;
            m.paused_until = None;
        });
    }
}

/// What one pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PassReport {
    pub sent: usize,
    pub looked_up: usize,
    pub delivered: usize,
    pub failed: usize,
    /// Why due rows were left waiting (not connected, a configuration
    /// error, a pause).
    pub waiting: Option<String>,
    /// The pass stopped at its limit with rows still due.
    pub more: bool,
    /// What the pass found in the outbox when it started.
    pub outbox: Option<lead_outbox::Summary>,
}

/// The CRM side of a pass, ready to send.
enum Channel {
    AmoCrm(Box<amocrm::Ready>),
    Bitrix24(Box<bitrix24::Ready>),
}

/// One pass over `tenant`'s outbox, handling at most `limit` rows.
pub async fn pass(
    ctx: &Context,
    delivery: &Delivery,
    tenant: &TenantConfig,
    leads: &LeadsConfig,
    limit: usize,
) -> Result<PassReport, Cause> {
    let crm = leads.crm;
    let db = ctx.pools.get(&tenant.slug, &tenant.database_url)?;
    let mut report = PassReport::default();
    {
        let session = db.session().await?;
        let summary = match lead_outbox::summary(&session).await {
            // Not migrated yet: nothing was ever inserted.
            Err(e) if e.is_missing_schema() => return Ok(report),
            other => other?,
        };
        report.outbox = Some(summary.clone());
        if !summary.due_now {
            return Ok(report);
        }
        if db::status::read_state(&session, crm).await? != Some(CrmState::Connected) {
            report.waiting = Some(format!("{crm} is not connected"));
            return Ok(report);
        }
    }
    if delivery.memory(&tenant.slug, crm).paused_until.is_some_and(|until| until > Instant::now()) {
        report.waiting = Some(format!("delivery to {crm} is paused after a refusal"));
        return Ok(report);
    }
    let channel = match crm {
        Crm::AmoCrm => amocrm::ready(ctx, delivery, tenant, leads, &db).await.map(|r| Channel::AmoCrm(Box::new(r))),
        Crm::Bitrix24 => {
            bitrix24::ready(ctx, delivery, tenant, leads, &db).await.map(|r| Channel::Bitrix24(Box::new(r)))
        }
    };
    let mut channel = match channel {
        Ok(channel) => channel,
        Err(cause) if cause.kind == FailureKind::Config => {
            record_waiting(&db, crm, &cause.message).await?;
            report.waiting = Some(cause.message);
            return Ok(report);
        }
        Err(cause) => return Err(cause),
    };
    while report.sent + report.looked_up < limit {
        let Some(taken) = next_row(&db, &channel, crm).await? else { return Ok(report) };
        let (seen, transition, placement, row) = match taken {
            Taken::Refused => {
                report.failed += 1;
                continue;
            }
            Taken::Send(row, placement) => {
                report.sent += 1;
                let seen = Seen { id: row.id, state: OutboxState::Sending, attempts: row.attempts + 1 };
                let (contact, answer) = match &mut channel {
                    Channel::AmoCrm(ready) => (None, ready.send(ctx, &row, &placement).await),
                    Channel::Bitrix24(ready) => ready.send(ctx, &row, &placement).await,
                };
                if contact.is_some() {
                    outcome_written(|| async { lead_outbox::note(&db.session().await?, seen, contact, None).await })
                        .await?;
                }
                ctx.metrics.delivery_attempt(crm, send_outcome(&answer));
                match &answer {
                    SendAnswer::NotExecuted { .. } => {
                        delivery.pause(&tenant.slug, crm, Some(delivery::doubling(seen.attempts)))
                    }
                    SendAnswer::AccountRefused(_) => delivery.pause(&tenant.slug, crm, None),
                    _ => delivery.unpause(&tenant.slug, crm),
                }
                (seen, delivery::after_send(&answer, seen.attempts, leads.max_attempts), Some(placement), row)
            }
            Taken::Lookup(row) => {
                report.looked_up += 1;
                let seen = Seen { id: row.id, state: OutboxState::Sending, attempts: row.attempts };
                let answer = match &mut channel {
                    Channel::AmoCrm(ready) => ready.find(ctx, &row).await,
                    Channel::Bitrix24(ready) => ready.find(ctx, &row).await,
                };
                ctx.metrics.delivery_attempt(crm, lookup_outcome(&answer));
                (seen, delivery::after_lookup(&answer, seen.attempts, leads.max_attempts), None, row)
            }
        };
        let paused = matches!(transition, Transition::Pending { pause: true, .. });
        let created = match (&transition, tenant.funnel.is_some()) {
            // A lead found by its lookup went where the row still says.
            (Transition::Delivered(_), true) => placement.clone().or_else(|| channel.check(&row).ok()),
            _ => None,
        };
        let settled = outcome_written(|| {
            settle(&db, seen, &transition, placement.as_ref(), &channel, created.as_ref().map(|p| (&row, p)))
        })
        .await?;
        match settled {
            Settled::Delivered(ids, seconds) => {
                report.delivered += 1;
                ctx.metrics.lead_delivered(crm, seconds);
                if let Channel::AmoCrm(ready) = &mut channel {
                    ready.add_comment(ctx, &db, seen, &row, ids).await;
                }
            }
            Settled::Failed => report.failed += 1,
            Settled::Other => {}
        }
        if paused {
            report.waiting = Some(format!("delivery to {crm} is paused after a refusal"));
            return Ok(report);
        }
    }
    report.more = true;
    Ok(report)
}

fn send_outcome(answer: &SendAnswer) -> AttemptOutcome {
    match answer {
        SendAnswer::Created(_) => AttemptOutcome::Delivered,
        SendAnswer::Refused(_) => AttemptOutcome::Refused,
        SendAnswer::Ambiguous(_) => AttemptOutcome::Ambiguous,
        SendAnswer::Unauthorized
        | SendAnswer::Outdated(_)
        | SendAnswer::NotExecuted { .. }
        | SendAnswer::AccountRefused(_) => AttemptOutcome::Failed,
    }
}

fn lookup_outcome(answer: &LookupAnswer) -> AttemptOutcome {
    match answer {
        LookupAnswer::Found(_) => AttemptOutcome::Found,
        // The deal is what was looked for: absent, sent again.
        LookupAnswer::ContactWithoutDeal { .. } | LookupAnswer::Absent => AttemptOutcome::Absent,
        LookupAnswer::Inconclusive(_) => AttemptOutcome::Inconclusive,
    }
}

/// A row taken, in the transaction that took it.
enum Taken {
    /// Refused before any CRM call: failed in that transaction.
    Refused,
    /// Marked `sending`, committed: send it.
    Send(OutboxRow, LeadPlacement),
    /// A `sending` row whose lookup is due, its next look pushed.
    Lookup(OutboxRow),
}

impl Channel {
    /// Where the row goes, or why it never can.
    fn check(&self, row: &OutboxRow) -> Result<LeadPlacement, String> {
        match self {
            Channel::AmoCrm(ready) => ready.check(row),
            Channel::Bitrix24(ready) => ready.check(row),
        }
    }

    /// The funnel's `created` row of a lead sent to `placement` at
    /// `sent_at` that became `entity_id`.
    fn created(
        &self,
        row: &OutboxRow,
        placement: &LeadPlacement,
        entity_id: i64,
        sent_at: DateTime<Utc>,
    ) -> StageChange {
        let ((semantic, flags), responsible) = match self {
            Channel::AmoCrm(ready) => (ready.stage_of(placement), ready.responsible(row)),
            Channel::Bitrix24(ready) => (ready.stage_of(placement), ready.responsible(row)),
        };
        funnel::delivered_change(row.id, entity_id, placement, responsible, sent_at, semantic, flags)
    }
}

async fn next_row(db: &TenantDb, channel: &Channel, crm: Crm) -> Result<Option<Taken>, DbError> {
    loop {
        let mut session = db.session().await?;
        let tx = session.transaction().await?;
        let Some(row) = lead_outbox::take_due(&tx).await? else { return Ok(None) };
        let taken = match row.state {
            OutboxState::Sending if row.crm.is_some_and(|c| c != crm) => {
                // Settled in the CRM written on it, which the file no longer
                // delivers to: left for when it does.
                lead_outbox::postpone(&tx, row.id, delivery::MAX_WAIT).await?;
                tx.commit().await?;
                continue;
            }
            OutboxState::Sending => {
                let wait = delivery::lookup_backoff(row.last_attempt_at, crm, Utc::now());
                lead_outbox::postpone(&tx, row.id, wait).await?;
                Taken::Lookup(row)
            }
            _ => match channel.check(&row) {
                Ok(placement) => {
                    lead_outbox::mark_sending(&tx, row.id, crm, delivery::lookup_after(crm)).await?;
                    Taken::Send(row, placement)
                }
                Err(why) => {
                    let seen = Seen { id: row.id, state: OutboxState::Pending, attempts: row.attempts };
                    lead_outbox::mark_failed(&tx, seen, &why).await?;
                    Taken::Refused
                }
            },
        };
        tx.commit().await?;
        return Ok(Some(taken));
    }
}

/// Writes what a CRM answered, trying again while the database is
/// unreachable: the answer exists only in memory until it is written. Given
/// up after about ten seconds, the row's lookup settles it later. Each write
/// is conditional on the state it saw, so one that committed unseen is not
/// applied twice.
async fn outcome_written<T, F, Fut>(write: F) -> Result<T, DbError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let backoff = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_max_times(6)
        .with_jitter();
    write.retry(backoff).sleep(tokio::time::sleep).when(DbError::is_transient).await
}

enum Settled {
    /// With the seconds from the row's insert.
    Delivered(CreatedIds, f64),
    Failed,
    Other,
}

/// Writes a transition; a row that moved on meanwhile is left alone. A
/// delivery with `created` (the row and where it went) writes the funnel's
/// `created` row in the same transaction.
async fn settle(
    db: &TenantDb,
    seen: Seen,
    transition: &Transition,
    placement: Option<&LeadPlacement>,
    channel: &Channel,
    created: Option<(&OutboxRow, &LeadPlacement)>,
) -> Result<Settled, DbError> {
    let mut session = db.session().await?;
    Ok(match transition {
        Transition::Delivered(ids) => {
            let entity_type = match (placement.or(created.map(|c| c.1)), channel) {
                (Some(placement), _) => entity_type_of(placement),
                (None, Channel::AmoCrm(_)) => "lead",
                (None, Channel::Bitrix24(ready)) => ready.entity_type(),
            };
            let done = match created {
                None => lead_outbox::mark_delivered(&session, seen, entity_type, *ids).await?,
                Some((row, placement)) => {
                    let tx = session.transaction().await?;
                    let done = lead_outbox::mark_delivered(&tx, seen, entity_type, *ids).await?;
                    if let Some(done) = done {
                        let sent_at = done.sent_at.unwrap_or_else(Utc::now);
                        stage_changes::insert(&tx, &[channel.created(row, placement, ids.entity_id, sent_at)]).await?;
                    }
                    tx.commit().await?;
                    done
                }
            };
            match done {
                Some(done) => Settled::Delivered(*ids, done.seconds),
                None => Settled::Other,
            }
        }
        Transition::Pending { delay, counted, error, .. } => {
            lead_outbox::mark_pending(&session, seen, jittered(*delay), *counted, error.as_deref()).await?;
            Settled::Other
        }
        Transition::Failed(message) => match lead_outbox::mark_failed(&session, seen, message).await? {
            true => Settled::Failed,
            false => Settled::Other,
        },
        Transition::AwaitLookup(reason) => {
            lead_outbox::note(&session, seen, None, Some(reason)).await?;
            Settled::Other
        }
        Transition::SendDealAlone { contact_id } => {
            lead_outbox::note(&session, seen, Some(*contact_id), None).await?;
            lead_outbox::mark_pending(&session, seen, Duration::ZERO, true, None).await?;
            Settled::Other
        }
    })
}

/// Why delivery waits on the tenant's configuration, recorded as a mapping
/// error is: the CRM's status row says it (state `error`) and an event,
/// once per message.
async fn record_waiting(db: &TenantDb, crm: Crm, message: &str) -> Result<(), DbError> {
    let session = db.session().await?;
    let rows = db::status::read_all(&session).await?;
    if rows.iter().any(|r| r.crm == crm.as_str() && r.last_error.as_deref() == Some(message)) {
        return Ok(());
    }
    let update = StatusUpdate { error: Some(message), ..StatusUpdate::state(crm, CrmState::Error) };
    db::status::write(&session, &update).await?;
    db::events::insert(&session, Some(crm), "leads_config_error", &serde_json::json!({ "message": message })).await
}

/// A backoff spread by ±25 %, so that rows refused together (a rate
/// limit) do not all come back in the same instant.
fn jittered(delay: Duration) -> Duration {
    let factor = 0.75 + rand::random::<f64>() * 0.5;
    delay.mul_f64(factor).min(delivery::MAX_WAIT)
}

/// Runs passes over one tenant until nothing is due (`crm-connect deliver`).
pub async fn until_done(ctx: &Context, tenant: &TenantConfig, leads: &LeadsConfig) -> Result<PassReport, Cause> {
    let delivery = Delivery::default();
    let mut total = PassReport::default();
    loop {
        let report = pass(ctx, &delivery, tenant, leads, PASS_LIMIT).await?;
        total.sent += report.sent;
        total.looked_up += report.looked_up;
        total.delivered += report.delivered;
        total.failed += report.failed;
        total.waiting = report.waiting.clone().or(total.waiting);
        if !report.more {
            return Ok(total);
        }
    }
}
