//! The closed set of things the daemon's loop reacts to, whatever their
//! source (a timer, a cron job, a finished task, a file watch, a signal, a
//! clock of the loop itself). Only the vocabulary: what each one does is
//! the loop's business, not this file's.

use super::job::Outcome;
use super::lease;
use crate::failure::Cause;
use crate::funnel::PollReport;
use crate::leads::PassReport;

pub(crate) enum Event {
    /// A stage-resync cron expression fired (for every tenant using it).
    Cron(String),
    /// A tenant's token is due for refresh.
    TokenDue(String),
    /// A tenant's failed work may be tried again.
    Retry(String),
    /// A tenant's work (its job number) finished.
    Done(String, u64, Outcome),
    /// A tenant's lease is due for renewal, or (not held) for another try.
    LeaseDue(String),
    /// The answer of an attempt to take or renew a tenant's lease.
    Lease(String, lease::Answer),
    /// This process's own view of a tenant's lease may have ended.
    LeaseExpired(String),
    /// A pair was exchanged and stored for a tenant outside its work (the
    /// OAuth callback): its token timer is re-armed.
    Exchanged(String),
    /// A tenant's outbox is due for a delivery pass (its poll, or a wake).
    LeadsDue(String),
    /// A tenant's delivery pass ended.
    Delivered(String, Result<PassReport, Cause>),
    /// A tenant's funnel streams are due for a poll.
    FunnelDue(String),
    /// A tenant's funnel poll ended.
    FunnelPolled(String, Result<PollReport, Cause>),
    /// The watch saw the configuration directory change; `rewatch` when the
    /// directory itself was created or removed, so its watch is set up again.
    FilesChanged { rewatch: bool },
    /// The periodic rescan, for what file events miss.
    RescanDue,
    /// SIGHUP: every tenant is read and reconciled again.
    Reload,
    /// The first pass took too long: the service counts as started anyway.
    FirstPassOverdue,
    /// The loop is alive: `/healthz` and the systemd watchdog hear of it.
    Heartbeat,
}
