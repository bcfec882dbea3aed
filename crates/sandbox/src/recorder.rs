//! What a test sees of any sandbox besides its API: the faults it will
//! inject, the log of what it received (read, awaited, or checked against
//! an expected scenario) and its rate-limit violations. Both sandboxes
//! dereference to their `Recorder`, so this is written once.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use super::Front;
use super::faults::{Faults, RecordedRequest};

/// A sandbox's faults, request log and rate limit, as tests reach them.
pub struct Recorder {
    front: Arc<Front>,
}

impl Recorder {
    pub(crate) fn new(front: Arc<Front>) -> Recorder {
        Recorder { front }
    }

    pub fn faults(&self) -> &Faults {
        &self.front.faults
    }

    /// Every request so far, faulted or not, in answer order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.front.log.records()
    }

    /// Waits until `predicate` holds for the request log, or `timeout`
    /// passes; returns whether it held.
    pub async fn wait_for_requests(&self, predicate: impl Fn(&[RecordedRequest]) -> bool, timeout: Duration) -> bool {
        self.front.log.wait_for_requests(predicate, timeout).await
    }

    /// Requests refused by the rate limit.
    pub fn violations(&self) -> usize {
        self.front.violations()
    }

    /// Asserts that the log holds exactly `expected`, each `"METHOD /path"`
    /// (no query), in order; panics with a line-by-line diff otherwise.
    pub fn expect_requests<S: AsRef<str>>(&self, expected: impl IntoIterator<Item = S>) {
        self.expect_requests_from(0, expected);
    }

    /// The same for the requests after the first `start`, for a scenario
    /// that begins once a setup is done.
    pub fn expect_requests_from<S: AsRef<str>>(&self, start: usize, expected: impl IntoIterator<Item = S>) {
        let received: Vec<String> =
            self.requests().iter().skip(start).map(|r| format!("{} {}", r.method, r.path)).collect();
        let expected: Vec<String> = expected.into_iter().map(|e| e.as_ref().to_owned()).collect();
        if let Some(diff) = request_diff(&expected, &received) {
            panic!("the sandbox received other requests than expected (after the first {start}):\n{diff}");
        }
    }
}

/// `None` when both sequences are equal; otherwise one line per position:
/// `  ` for a match, `- ` for what was expected and `+ ` for what came.
pub fn request_diff(expected: &[String], received: &[String]) -> Option<String> {
    if expected == received {
        return None;
    }
    let mut diff = String::new();
    for i in 0..expected.len().max(received.len()) {
        match (expected.get(i), received.get(i)) {
            (Some(e), Some(r)) if e == r => _ = writeln!(diff, "  {:>2}  {e}", i + 1),
            (e, r) => {
                let missing = "(nothing)".to_owned();
                _ = writeln!(diff, "- {:>2}  {}", i + 1, e.unwrap_or(&missing));
                _ = writeln!(diff, "+ {:>2}  {}", i + 1, r.unwrap_or(&missing));
            }
        }
    }
    Some(diff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn equal_sequences_have_no_diff_and_others_mark_each_differing_position() {
        let a = lines(&["POST /oauth2/access_token", "GET /api/v4/account"]);
        assert_eq!(request_diff(&a, &a), None);
        let b = lines(&["POST /oauth2/access_token", "GET /api/v4/leads/pipelines", "GET /api/v4/account"]);
        let diff = request_diff(&a, &b).unwrap();
        assert_eq!(
            diff,
            "   1  POST /oauth2/access_token\n\
             -  2  GET /api/v4/account\n\
             +  2  GET /api/v4/leads/pipelines\n\
             -  3  (nothing)\n\
             +  3  GET /api/v4/account\n"
        );
    }
}
