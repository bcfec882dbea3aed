//! What every CRM sandbox shares besides its API: injected faults (canned
//! answers, delays, late answers, dropped connections before or after the
//! work is done, cut, huge and trickling bodies) and the log of every
//! request it received, which tests can inspect or await.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::lock;

/// The page nginx-fronted CRMs answer a 429 with.
pub const TOO_MANY_REQUESTS_PAGE: &str = "<html><body><h1>429 Too Many Requests</h1></body></html>";

const FORBIDDEN_PAGE: &str = "<html><head><title>403 Forbidden</title></head>\
<body><h1>Доступ запрещён</h1></body></html>";

/// A well-formed JSON document; a `TruncatedBody` answer sends its first half.
const TRUNCATED_SOURCE: &str = r#"{"_page":1,"_links":{"self":{"href":"/"}},"_embedded":{"items":[{"id":1,"name":"first"},{"id":2,"name":"second"}]}}"#;

/// One abnormal answer a sandbox gives instead of its normal one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// A canned answer; an empty `content_type` sends no `Content-Type` header.
    Status { status: u16, content_type: &'static str, body: String },
    /// Waits, then answers normally. The request changes the CRM's state
    /// only once the wait is over, and not at all if the client is gone by
    /// then (its connection closed, the server drops the unfinished answer).
    Delay(Duration),
    /// Answers normally at once — the CRM's state changes (a token is
    /// rotated, say) — but the answer leaves only after this long: an answer
    /// lost with a client that gave up or died meanwhile.
    LateAnswer(Duration),
    /// Closes the connection without any HTTP response.
    DropConnection,
    /// Lets the request through the rate limit to the CRM, which does its
    /// work (a lead is created and stored), then closes the connection
    /// without any HTTP response: the outcome a client cannot know.
    DropAfterExecuting,
    /// A 200 whose JSON body stops halfway (with a matching `Content-Length`,
    /// so only the JSON parse fails).
    TruncatedBody,
    /// A 200 `application/json` answer of this many bytes, sent chunked
    /// without a `Content-Length`, so a client learns its size only by
    /// reading it.
    HugeBody(usize),
    /// The normal answer, but from the status line to the last body byte it
    /// leaves a few bytes at a time, `chunk_every` apart, on a connection
    /// that closes after it (a server stalling mid-answer).
    SlowDrip { chunk_every: Duration },
}

impl Fault {
    /// A 503 with an empty body, as a load balancer gives when the CRM is down.
    pub fn server_error() -> Fault {
        Fault::Status { status: 503, content_type: "", body: String::new() }
    }

    /// A 403 HTML page, as a CRM's firewall gives.
    pub fn html_forbidden() -> Fault {
        Fault::Status { status: 403, content_type: "text/html; charset=UTF-8", body: FORBIDDEN_PAGE.to_owned() }
    }

    /// A 429 HTML page, the same one the sandbox's own rate limit sends.
    pub fn too_many_requests() -> Fault {
        Fault::Status { status: 429, content_type: "text/html", body: TOO_MANY_REQUESTS_PAGE.to_owned() }
    }

    /// The bytes a `TruncatedBody` answer carries.
    pub(crate) fn truncated_body() -> &'static str {
        &TRUNCATED_SOURCE[..TRUNCATED_SOURCE.len() / 2]
    }

    /// The `len` bytes a `HugeBody` answer carries: the start of a JSON
    /// object whose one string value fills the rest.
    pub(crate) fn huge_body(len: usize) -> Vec<u8> {
        let mut body = br#"{"padding":""#.to_vec();
        body.resize(len.max(body.len()), b'x');
        body.truncate(len);
        body
    }
}

/// Which requests an injected fault waits for.
#[derive(Debug)]
enum Target {
    /// Any method, a path starting with this ("" matches all).
    Prefix(String),
    /// This method (any case) on exactly this path.
    Exact { method: String, path: String },
}

impl Target {
    fn matches(&self, method: &str, path: &str) -> bool {
        match self {
            Target::Prefix(prefix) => path.starts_with(prefix.as_str()),
            Target::Exact { method: wanted, path: exact } => wanted.eq_ignore_ascii_case(method) && path == exact,
        }
    }
}

/// Faults waiting for the requests they will spoil, in injection order.
#[derive(Debug, Default)]
pub struct Faults {
    queue: Mutex<VecDeque<(Target, Fault)>>,
}

impl Faults {
    /// The next `times` requests whose path starts with `path_prefix` get
    /// `fault` (queued in order; "" matches all).
    pub fn inject(&self, path_prefix: &str, fault: Fault, times: usize) {
        let target = || Target::Prefix(path_prefix.to_owned());
        lock(&self.queue).extend(std::iter::repeat_with(|| (target(), fault.clone())).take(times));
    }

    /// The next `times` requests of HTTP `method` to exactly `path` get
    /// `fault`: one endpoint among others under the same prefix (a create
    /// but not the list on the same path, `/leads/complex` but not
    /// `/leads`). Queued in order with the faults of `inject`.
    pub fn inject_for(&self, method: &str, path: &str, fault: Fault, times: usize) {
        let target = || Target::Exact { method: method.to_owned(), path: path.to_owned() };
        lock(&self.queue).extend(std::iter::repeat_with(|| (target(), fault.clone())).take(times));
    }

    /// Forgets every fault not yet delivered.
    pub fn clear(&self) {
        lock(&self.queue).clear();
    }

    /// Faults not yet delivered.
    pub fn pending(&self) -> usize {
        lock(&self.queue).len()
    }

    /// Removes and returns the earliest fault meant for `method` on `path`.
    pub(crate) fn take(&self, method: &str, path: &str) -> Option<Fault> {
        let mut queue = lock(&self.queue);
        let index = queue.iter().position(|(target, _)| target.matches(method, path))?;
        queue.remove(index).map(|(_, fault)| fault)
    }
}

/// One request as the sandbox received it, and what it answered.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// The answered status; 0 for a dropped connection.
    pub status: u16,
    pub at: Instant,
}

impl RecordedRequest {
    /// The first header called `name`, in any case.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(key, _)| *key == name).map(|(_, value)| value.as_str())
    }

    /// The body as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_str(&self.body).ok()
    }

    /// A top-level field of a JSON object body or of a form-encoded body;
    /// JSON numbers and booleans come back as their text.
    pub fn form_or_json_field(&self, name: &str) -> Option<String> {
        if let Some(serde_json::Value::Object(object)) = self.json() {
            return match object.get(name)? {
                serde_json::Value::String(text) => Some(text.clone()),
                serde_json::Value::Number(number) => Some(number.to_string()),
                serde_json::Value::Bool(flag) => Some(flag.to_string()),
                _ => None,
            };
        }
        url::form_urlencoded::parse(self.body.as_bytes()).find(|(key, _)| key == name).map(|(_, value)| value.into())
    }

    /// A query-string parameter.
    pub fn query_param(&self, name: &str) -> Option<String> {
        let query = self.query.as_deref()?;
        url::form_urlencoded::parse(query.as_bytes()).find(|(key, _)| key == name).map(|(_, value)| value.into())
    }
}

/// Every request a sandbox received, faulted or not, in answer order.
#[derive(Debug)]
pub struct RequestLog {
    // A watch channel rather than a mutex so waiters wake on each new entry.
    entries: watch::Sender<Vec<RecordedRequest>>,
}

impl Default for RequestLog {
    fn default() -> Self {
        RequestLog { entries: watch::Sender::new(Vec::new()) }
    }
}

impl RequestLog {
    /// A copy of the log so far.
    pub fn records(&self) -> Vec<RecordedRequest> {
        self.entries.borrow().clone()
    }

    /// Waits until `predicate` holds for the log, or `timeout` passes;
    /// returns whether it held.
    pub async fn wait_for_requests(&self, predicate: impl Fn(&[RecordedRequest]) -> bool, timeout: Duration) -> bool {
        let mut receiver = self.entries.subscribe();
        let waited = tokio::time::timeout(timeout, receiver.wait_for(|entries| predicate(entries))).await;
        matches!(waited, Ok(Ok(_)))
    }

    pub(crate) fn record(&self, request: RecordedRequest) {
        self.entries.send_modify(|entries| entries.push(request));
    }
}
