//! The token pairs this process obtained, from the CRM's answer until their
//! commit, and the token requests in flight. A pair is registered here
//! *before* it is written and leaves only once it is committed (or proven to
//! belong to nobody any more); every exit of every command and of the
//! daemon waits for the requests in flight and writes what is registered.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};

use crate::db::TenantDb;
use crate::model::Tokens;
use crate::model::{StoredAccount, StoredTokens};
use crate::secret::Secret;

/// A pair obtained from the CRM, with what it may be written over.
#[derive(Clone, Debug)]
pub(crate) struct Registered {
    pub(crate) tokens: Tokens,
    /// Set for an exchanged pair: the code it came from counts as sent.
    pub(crate) code_sha256: Option<String>,
    /// The account the pair was obtained for, as the row named it then.
    pub(crate) account: StoredAccount,
    /// The row's tokens when the request was sent: the pair replaces them
    /// and is written only while the row still holds them (or nothing).
    pub(crate) replaces: (Option<Secret>, Option<Secret>),
    /// The database it was obtained for.
    pub(crate) db: TenantDb,
}

impl Registered {
    /// A pair obtained while the row held `stored`: it belongs to that
    /// account and replaces those tokens.
    pub(crate) fn replacing(stored: &StoredTokens, tokens: Tokens, code_sha256: Option<String>, db: &TenantDb) -> Self {
        Registered {
            tokens,
            code_sha256,
            account: stored.account.clone(),
            replaces: (stored.access.clone(), stored.refresh.clone()),
            db: db.clone(),
        }
    }
}

struct Inner {
    pairs: Mutex<HashMap<String, Registered>>,
    in_flight: watch::Sender<usize>,
    closed: AtomicBool,
    /// Tenants whose "margin ≥ lifetime" note was logged.
    noted: Mutex<HashSet<String>>,
    /// Told the slug of every pair exchanged outside the tenant's work (the
    /// OAuth callback): the daemon re-arms the tenant's token timer.
    exchanged: Mutex<Option<mpsc::UnboundedSender<String>>>,
}

#[derive(Clone)]
pub struct Vault {
    inner: Arc<Inner>,
}

impl Default for Vault {
    fn default() -> Self {
        Vault {
            inner: Arc::new(Inner {
                pairs: Mutex::default(),
                in_flight: watch::Sender::new(0),
                closed: AtomicBool::new(false),
                noted: Mutex::default(),
                exchanged: Mutex::default(),
            }),
        }
    }
}

/// A token request in flight; the count drops with it.
pub(crate) struct InFlight(Vault);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight().send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Vault {
    fn in_flight(&self) -> &watch::Sender<usize> {
        &self.inner.in_flight
    }

    fn pairs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Registered>> {
        self.inner.pairs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A token request may start; `None` once the process is shutting down.
    pub(crate) fn begin(&self) -> Option<InFlight> {
        if self.inner.closed.load(Ordering::SeqCst) {
            return None;
        }
        self.in_flight().send_modify(|n| *n += 1);
        Some(InFlight(self.clone()))
    }

    /// No token request starts from now on (shutdown, end of a command).
    pub fn close(&self) {
        self.inner.closed.store(true, Ordering::SeqCst);
    }

    /// Resolves once no token request is in flight.
    pub async fn idle(&self) {
        let mut count = self.in_flight().subscribe();
        let _ = count.wait_for(|n| *n == 0).await;
    }

    pub fn in_flight_count(&self) -> usize {
        *self.in_flight().borrow()
    }

    pub(crate) fn register(&self, slug: &str, pair: Registered) {
        self.pairs().insert(slug.to_string(), pair);
    }

    /// Forgets `slug`'s pair if it is still `tokens` (committed or dropped).
    pub(crate) fn unregister(&self, slug: &str, tokens: &Tokens) {
        let mut pairs = self.pairs();
        if pairs.get(slug).is_some_and(|p| &p.tokens == tokens) {
            pairs.remove(slug);
        }
    }

    pub(crate) fn get(&self, slug: &str) -> Option<Registered> {
        self.pairs().get(slug).cloned()
    }

    /// A pair waits to be written for `slug`.
    pub fn contains(&self, slug: &str) -> bool {
        self.pairs().contains_key(slug)
    }

    /// The code with this hash was exchanged for a pair still registered.
    pub(crate) fn holds_code(&self, slug: &str, code_sha256: &str) -> bool {
        self.pairs().get(slug).is_some_and(|p| p.code_sha256.as_deref() == Some(code_sha256))
    }

    /// The tenants with a registered pair.
    pub fn slugs(&self) -> Vec<String> {
        self.pairs().keys().cloned().collect()
    }

    /// True the first time it is asked for `slug`.
    pub(crate) fn first_note(&self, slug: &str) -> bool {
        self.inner.noted.lock().unwrap_or_else(|p| p.into_inner()).insert(slug.to_string())
    }

    /// The receiver learns the slug of every pair exchanged outside the
    /// tenant's own work.
    pub fn subscribe_exchanges(&self) -> mpsc::UnboundedReceiver<String> {
        let (sender, receiver) = mpsc::unbounded_channel();
        *self.inner.exchanged.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
        receiver
    }

    /// A pair was exchanged for `slug` outside its work.
    pub(crate) fn exchanged(&self, slug: &str) {
        if let Some(sender) = self.inner.exchanged.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = sender.send(slug.to_string());
        }
    }
}
