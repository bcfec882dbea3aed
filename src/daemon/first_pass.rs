//! The first reconcile pass: which tenants it still waits for, and its end
//! — READY=1 to systemd and the embedding caller's hook, each once. Only
//! the bookkeeping: nothing here starts work, reads files or keeps time
//! (the loop's own deadline ends an overdue pass).

use std::collections::HashSet;

use tokio::sync::oneshot;

use super::systemd;

pub(crate) struct FirstPass {
    /// Tenants loaded while the pass was on whose first work is not done.
    waiting: HashSet<String>,
    hook: Option<oneshot::Sender<()>>,
    on: bool,
}

impl FirstPass {
    pub(crate) fn new(hook: Option<oneshot::Sender<()>>) -> FirstPass {
        FirstPass { waiting: HashSet::new(), hook, on: true }
    }

    pub(crate) fn is_on(&self) -> bool {
        self.on
    }

    pub(crate) fn left(&self) -> usize {
        self.waiting.len()
    }

    /// A tenant new to the daemon. One loaded after the end is not waited
    /// for: READY has been said and stays said.
    pub(crate) fn add(&mut self, slug: &str) {
        if self.on {
            self.waiting.insert(slug.to_string());
        }
    }

    /// The tenant's first work is done, or another daemon runs it: the pass
    /// ends when it was the last one waited for.
    pub(crate) fn done_with(&mut self, slug: &str, tenants: usize) {
        if self.waiting.remove(slug) {
            self.end_if_none_left(tenants);
        }
    }

    /// A removed tenant is no longer waited for. The pass does not end
    /// here: the reload that removed it ends it once every file is read,
    /// so that a tenant added by the same reload is waited for too.
    pub(crate) fn forget(&mut self, slug: &str) {
        self.waiting.remove(slug);
    }

    pub(crate) fn end_if_none_left(&mut self, tenants: usize) {
        if self.waiting.is_empty() {
            self.end(tenants);
        }
    }

    /// Also the overdue pass's end: slow tenants go on connecting, the
    /// service counts as started.
    pub(crate) fn end(&mut self, tenants: usize) {
        if !std::mem::replace(&mut self.on, false) {
            return;
        }
        if let Some(hook) = self.hook.take() {
            let _ = hook.send(());
        }
        systemd::ready();
        tracing::info!(tenants, "first reconcile pass done");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass() -> (FirstPass, oneshot::Receiver<()>) {
        let (hook, told) = oneshot::channel();
        (FirstPass::new(Some(hook)), told)
    }

    #[test]
    fn the_pass_ends_once_the_last_tenant_it_waits_for_is_done() {
        let (mut pass, mut told) = pass();
        pass.add("a");
        pass.add("b");
        pass.done_with("a", 2);
        assert!(pass.is_on());
        assert!(told.try_recv().is_err());
        pass.done_with("b", 2);
        assert!(!pass.is_on());
        assert_eq!(told.try_recv(), Ok(()));
    }

    #[test]
    fn a_removed_tenant_ends_the_pass_only_once_the_reload_is_over() {
        let (mut pass, mut told) = pass();
        pass.add("a");
        pass.forget("a");
        assert!(pass.is_on(), "the same reload may add another tenant");
        pass.add("b");
        pass.end_if_none_left(1);
        assert!(pass.is_on());
        pass.done_with("b", 1);
        assert_eq!(told.try_recv(), Ok(()));
    }

    #[test]
    fn without_tenants_the_pass_ends_at_the_first_reload() {
        let (mut pass, mut told) = pass();
        pass.end_if_none_left(0);
        assert!(!pass.is_on());
        assert_eq!(told.try_recv(), Ok(()));
    }

    #[test]
    fn an_overdue_pass_ends_once_and_waits_for_nothing_loaded_later() {
        let (mut pass, mut told) = pass();
        pass.add("slow");
        pass.end(1);
        assert_eq!(told.try_recv(), Ok(()));
        pass.add("late");
        assert_eq!(pass.left(), 1, "only the tenant loaded before the end");
        pass.done_with("slow", 2);
        pass.done_with("unknown", 2);
        assert_eq!(pass.left(), 0);
        assert!(!pass.is_on());
    }
}
