//! `--concurrency`, shared by two kinds of work. Reconciles, token refreshes,
//! stage syncs and funnel polls come in bursts (a quarter-hour resync of
//! every tenant) and may take all permits but a reserve; lead delivery
//! passes and lease checks, which someone is waiting on, may take any. So a
//! woken delivery pass never queues behind a burst, and the total stays
//! within `--concurrency`.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Clone)]
pub(super) struct Permits {
    all: Arc<Semaphore>,
    /// Held, with one of `all`, by each piece of bulk work.
    bulk: Arc<Semaphore>,
}

/// What a piece of work holds while it runs (the semaphores are never
/// closed, so it holds its permits).
pub(super) struct Held {
    _all: Option<OwnedSemaphorePermit>,
    _bulk: Option<OwnedSemaphorePermit>,
}

impl Permits {
    /// A quarter of `concurrency` (at least one) is kept from bulk work;
    /// with a concurrency of one, everything shares it.
    pub(super) fn new(concurrency: usize) -> Permits {
        let concurrency = concurrency.max(1);
        let reserve = if concurrency > 1 { (concurrency / 4).max(1) } else { 0 };
        Permits { all: Arc::new(Semaphore::new(concurrency)), bulk: Arc::new(Semaphore::new(concurrency - reserve)) }
    }

    /// For reconciles, refreshes, stage syncs and funnel polls.
    pub(super) async fn bulk(self) -> Held {
        let bulk = self.bulk.acquire_owned().await.ok();
        Held { _all: self.all.acquire_owned().await.ok(), _bulk: bulk }
    }

    /// For delivery passes and lease checks.
    pub(super) async fn prompt(self) -> Held {
        Held { _all: self.all.acquire_owned().await.ok(), _bulk: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bulk_work_leaves_a_quarter_to_prompt_work_and_the_total_stays_within_concurrency() {
        let permits = Permits::new(8);
        let mut held = Vec::new();
        for _ in 0..6 {
            held.push(permits.clone().bulk().await);
        }
        let seventh = tokio::time::timeout(std::time::Duration::from_millis(50), permits.clone().bulk()).await;
        assert!(seventh.is_err(), "six of eight are bulk's");
        held.push(permits.clone().prompt().await);
        held.push(permits.clone().prompt().await);
        let ninth = tokio::time::timeout(std::time::Duration::from_millis(50), permits.clone().prompt()).await;
        assert!(ninth.is_err(), "eight in all");
        held.truncate(5);
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), permits.clone().bulk()).await.is_ok());
    }

    #[tokio::test]
    async fn a_concurrency_of_one_is_shared_by_both() {
        let permits = Permits::new(1);
        let bulk = permits.clone().bulk().await;
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), permits.clone().prompt()).await.is_err());
        drop(bulk);
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), permits.clone().prompt()).await.is_ok());
    }
}
