//! The Bitrix24 portal sandbox: inbound webhooks, deal pipelines and their
//! stages, lead statuses, `batch` (with `$result[…]` references), the
//! leaky-bucket and per-method time limits, a renamed portal, a webhook
//! user without read rights and lists that break off, answered the way a
//! cloud portal answers them, every answer dated by the sandbox clock.
//! Leads, deals and contacts are in `leads`, their stage history in
//! `history`, the newer `crm.item.list` in `items`.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use chrono::{DateTime, FixedOffset};
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value, json};

use super::faults::{Fault, RecordedRequest};
use super::recorder::Recorder;
use super::{Bound, Clock, Front, Gate, Handler, Limit, Server, lock, respond};

mod history;
mod items;
mod leads;

pub use history::{B24HistoryRecord, HistoryEntity, HistoryReservation, StageChange};
pub use leads::{B24Contact, B24Deal, B24Lead};

/// What Bitrix24 labels every REST answer with, errors included.
const JSON: &str = "application/json; charset=utf-8";
/// Rows per page of every list method.
const PAGE_SIZE: usize = 50;
/// Bitrix24 refuses larger batches.
const MAX_BATCH: usize = 50;
/// The span over which a method's `operating` time adds up.
const OPERATING_WINDOW_SECS: f64 = 600.0;
/// Cloud portals answer in Moscow time.
const PORTAL_UTC_OFFSET_SECS: i32 = 3 * 3600;
/// Looks like a fast call; the figures are not measured.
const DURATION_SECS: f64 = 0.0021;
const PROCESSING_SECS: f64 = 0.0015;
/// Every pipeline reports this creation date.
const CATEGORY_CREATED: &str = "2024-02-01T10:00:00+03:00";
/// PHP ignores form keys nested deeper than this (`max_input_nesting_level`).
const MAX_NESTING: usize = 64;
const DEALS_ENTITY_TYPE_ID: i64 = 2;

const QUERY_LIMIT_BODY: &str = r#"{"error":"QUERY_LIMIT_EXCEEDED","error_description":"Too many requests"}"#;
const REDIRECT_PAGE: &str = "<html><head><title>302 Found</title></head><body><h1>Found</h1></body></html>";

/// The portal and webhook the sandbox plays.
#[derive(Clone, Debug)]
pub struct B24SandboxConfig {
    pub user_id: i32,
    pub code: String,
    /// The scopes granted to the webhook.
    pub scopes: Vec<String>,
    /// Requests the leaky bucket holds; 0 turns it off.
    pub bucket_capacity: u32,
    /// Requests the bucket lets out per second (real time).
    pub drain_per_sec: f64,
    /// What each method call adds to that method's `operating` time.
    pub operating_cost: Duration,
    /// A method whose `operating` time within ten minutes reaches this is
    /// blocked until the ten minutes are over; zero turns the budget off.
    pub operating_budget: Duration,
    /// How long every answered request waits before its answer goes out
    /// (a network round trip, say); zero answers at once.
    pub latency: Duration,
    /// Rows per page of every list method: 50, as on every portal; smaller
    /// makes a few rows span pages. 0 counts as 1.
    pub page_size: usize,
}

impl Default for B24SandboxConfig {
    fn default() -> Self {
        B24SandboxConfig {
            user_id: 1,
            code: "sandboxwebhookcode1".to_owned(),
            scopes: ["crm", "task", "user"].map(str::to_owned).to_vec(),
            bucket_capacity: 50,
            drain_per_sec: 2.0,
            operating_cost: Duration::from_millis(50),
            operating_budget: Duration::from_secs(480),
            latency: Duration::ZERO,
            page_size: PAGE_SIZE,
        }
    }
}

/// A deal stage or lead status. `semantics` is "S" (success), "F" (failure
/// or apology) or `None` (in progress); `extra_semantics` is "process",
/// "success", "failure" or "apology".
#[derive(Clone, Debug, PartialEq)]
pub struct B24Stage {
    pub status_id: String,
    pub name: String,
    pub sort: i32,
    pub semantics: Option<String>,
    pub extra_semantics: String,
    pub color: String,
}

/// A deal pipeline ("direction"). Category 0 is the default pipeline: its
/// stage ids have no prefix, the others' are `C{id}:…`.
#[derive(Clone, Debug, PartialEq)]
pub struct B24Category {
    pub id: i32,
    pub name: String,
    pub sort: i32,
    pub stages: Vec<B24Stage>,
}

/// Where a `batch` answer says when the method of a command that met
/// `OPERATION_TIME_LIMIT` is free again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BlockedCommandTime {
    /// In the command's own `result_time` entry.
    #[default]
    Own,
    /// Only in the batch's outer `time.operating_reset_at`: the command has
    /// no `result_time` entry, as real portals answer (`result_time: []`
    /// for a batch of one blocked command).
    Outer,
}

/// A 503 `QUERY_LIMIT_EXCEEDED`, the answer of a full leaky bucket.
pub fn query_limit_exceeded() -> Fault {
    Fault::Status { status: 503, content_type: "application/json", body: QUERY_LIMIT_BODY.to_owned() }
}

/// A running Bitrix24 emulator on two loopback ports, the portal's address
/// and the address it moves to when renamed; dropping it shuts both down.
pub struct B24Sandbox {
    shared: Arc<Shared>,
    /// Shared by both addresses: one log, one set of faults, one bucket.
    recorder: Recorder,
    renamed: Arc<AtomicBool>,
    new_base_url: String,
    _old: Server,
    _new: Server,
}

/// Faults, the request log and the leaky bucket: see [`Recorder`].
impl Deref for B24Sandbox {
    type Target = Recorder;

    fn deref(&self) -> &Recorder {
        &self.recorder
    }
}

impl B24Sandbox {
    /// Binds two free ports on 127.0.0.1 and starts serving on both.
    pub async fn start(config: B24SandboxConfig) -> io::Result<B24Sandbox> {
        let old = Bound::loopback().await?;
        let new = Bound::loopback().await?;
        let limit = Limit::LeakyBucket { capacity: config.bucket_capacity, drain_per_sec: config.drain_per_sec };
        let clock = Arc::new(Clock::default());
        let front = Front::limited(limit, bucket_full).with_latency(config.latency).with_clock(Arc::clone(&clock));
        let front = Arc::new(front);
        let shared = Arc::new(Shared {
            base_url: old.base_url().to_owned(),
            config: config.clone(),
            state: Mutex::new(State::new(config.scopes, config.page_size, clock)),
        });
        let answering = Arc::clone(&shared);
        let handler: Arc<Handler> = Arc::new(move |request: &RecordedRequest| answering.route(request));
        let renamed = Arc::new(AtomicBool::new(false));
        let new_base_url = new.base_url().to_owned();
        // The gate holds only the flag and the address, not `Shared`, so
        // the servers keep nothing alive that owns them.
        let moved = Arc::clone(&renamed);
        let target = new_base_url.clone();
        let gate: Arc<Gate> =
            Arc::new(move |request: &RecordedRequest| moved.load(Ordering::SeqCst).then(|| redirect(&target, request)));
        let old_server = old.serve_gated(Arc::clone(&front), Some(gate), Arc::clone(&handler));
        let recorder = Recorder::new(Arc::clone(&front));
        let new_server = new.serve(front, handler);
        Ok(B24Sandbox { shared, recorder, renamed, new_base_url, _old: old_server, _new: new_server })
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// `http://127.0.0.1:PORT/rest/{user_id}/{code}/`, ready for a method name.
    pub fn webhook_url(&self) -> String {
        format!("{}/rest/{}/{}/", self.shared.base_url, self.shared.config.user_id, self.shared.config.code)
    }

    /// The address the portal moves to on `rename_portal` (already serving
    /// before it), without a trailing slash.
    pub fn new_base_url(&self) -> String {
        self.new_base_url.clone()
    }

    /// From now on every request to `base_url` is a 302 to the same path
    /// and query under `new_base_url`.
    pub fn rename_portal(&self) {
        self.renamed.store(true, Ordering::SeqCst);
    }

    /// The configuration the sandbox started with; `set_scopes` does not
    /// change it.
    pub fn config(&self) -> &B24SandboxConfig {
        &self.shared.config
    }

    pub fn set_scopes(&self, scopes: Vec<String>) {
        lock(&self.shared.state).scopes = scopes;
    }

    /// Replaces the pipelines. As in Bitrix24 the default pipeline cannot be
    /// deleted: without a category 0 the default one is kept. A repeated id
    /// keeps its first occurrence.
    pub fn set_categories(&self, categories: Vec<B24Category>) {
        lock(&self.shared.state).categories = served_categories(categories);
    }

    /// "Общее" (0), "Продажи" (1), "Partners' deals" (2) and "Повторные" (3).
    pub fn default_categories() -> Vec<B24Category> {
        vec![
            B24Category {
                id: 0,
                name: "Общее".to_owned(),
                sort: 100,
                stages: stages(&[
                    ("NEW", "Новая", "process"),
                    ("PREPARATION", "Подготовка документов", "process"),
                    ("PREPAYMENT_INVOICE", "Счёт на предоплату", "process"),
                    ("EXECUTING", "В работе", "process"),
                    ("FINAL_INVOICE", "Финальный счёт", "process"),
                    ("WON", "Сделка успешна", "success"),
                    ("LOSE", "Сделка провалена", "failure"),
                    ("APOLOGY", "Анализ причины провала", "apology"),
                ]),
            },
            B24Category {
                id: 1,
                name: "Продажи".to_owned(),
                sort: 200,
                stages: stages(&[
                    ("C1:NEW", "Новая", "process"),
                    ("C1:PREPARATION", "Квалификация", "process"),
                    ("C1:EXECUTING", "В работе", "process"),
                    ("C1:WON", "Успех", "success"),
                    ("C1:LOSE", "Провал", "failure"),
                ]),
            },
            B24Category {
                id: 2,
                name: "Partners' deals".to_owned(),
                sort: 300,
                stages: stages(&[
                    ("C2:NEW", "New", "process"),
                    ("C2:UC_LAFJPE", "Customer's \"yes\" 🎉", "process"),
                    ("C2:WON", "Won", "success"),
                    ("C2:LOSE", "Lost", "failure"),
                    ("C2:APOLOGY", "Apology", "apology"),
                ]),
            },
            B24Category {
                id: 3,
                name: "Повторные".to_owned(),
                sort: 400,
                stages: stages(&[
                    ("C3:NEW", "Новая", "process"),
                    ("C3:1", "Повторный звонок", "process"),
                    ("C3:WON", "Сделка успешна", "success"),
                    ("C3:LOSE", "Сделка провалена", "failure"),
                ]),
            },
        ]
    }

    pub fn set_lead_statuses(&self, stages: Vec<B24Stage>) {
        lock(&self.shared.state).lead_statuses = stages;
    }

    /// NEW, IN_PROCESS, PROCESSED, CONVERTED (success) and JUNK (failure).
    pub fn default_lead_statuses() -> Vec<B24Stage> {
        stages(&[
            ("NEW", "Не обработан", "process"),
            ("IN_PROCESS", "В работе", "process"),
            ("PROCESSED", "Обработан", "process"),
            ("CONVERTED", "Качественный лид", "success"),
            ("JUNK", "Некачественный лид", "failure"),
        ])
    }

    /// `method` (any case, `.json` suffix or not) answers
    /// `OPERATION_TIME_LIMIT` until the sandbox clock has moved `for_` on.
    pub fn block_method(&self, method: &str, for_: Duration) {
        let mut state = lock(&self.shared.state);
        let until = state.now() + for_.as_secs_f64();
        state.blocked.insert(method_name(method), until);
    }

    /// Where a `batch` answer puts the reset time of a blocked command.
    pub fn set_blocked_command_time(&self, shape: BlockedCommandTime) {
        lock(&self.shared.state).blocked_command_time = shape;
    }

    /// From now on `methods` (any case, `.json` suffix or not) answer
    /// `ACCESS_DENIED` "Access denied." with HTTP 400, alone or as a
    /// command's `result_error` in a `batch` (a 200): a portal's answer to
    /// a webhook that has the `crm` scope but whose user lacks the CRM
    /// permission to read (the method pages document 400; the 403
    /// `ACCESS_DENIED` of the error-code list is REST missing from the
    /// plan). An empty list lifts it.
    pub fn deny_access(&self, methods: &[&str]) {
        lock(&self.shared.state).denied = methods.iter().map(|method| method_name(method)).collect();
    }

    /// While on, every list page after the first comes back empty, without
    /// `next`, while `total` still counts every row: a list cut short where
    /// the first page promised more.
    pub fn break_off_lists(&self, on: bool) {
        lock(&self.shared.state).lists_break_off = on;
    }

    /// Moves the sandbox clock, which `time`, `operating_reset_at`,
    /// blocked methods, the times of new records and the `Date` header of
    /// every answer follow; the leaky bucket keeps to real time.
    pub fn advance_clock(&self, by: Duration) {
        lock(&self.shared.state).clock.advance(by);
    }

    /// The sandbox clock in whole unix seconds.
    pub fn now_unix(&self) -> i64 {
        lock(&self.shared.state).now().floor() as i64
    }
}

/// Stages sorted 10, 20, 30… with the colors a new portal gives them, from
/// (status id, name, `EXTRA.SEMANTICS`: process, success, failure, apology).
pub fn stages(rows: &[(&str, &str, &str)]) -> Vec<B24Stage> {
    const PROCESS_COLORS: [&str; 5] = ["#39A8EF", "#2FC6F6", "#55D0E0", "#47E4C2", "#FFA900"];
    let mut process = PROCESS_COLORS.iter().cycle();
    rows.iter()
        .zip((10..).step_by(10))
        .map(|(&(status_id, name, extra), sort)| {
            let (semantics, color) = match extra {
                "success" => (Some("S"), "#7BD500"),
                "failure" | "apology" => (Some("F"), "#FF5752"),
                _ => (None, process.next().copied().unwrap_or("#39A8EF")),
            };
            B24Stage {
                status_id: status_id.to_owned(),
                name: name.to_owned(),
                sort,
                semantics: semantics.map(str::to_owned),
                extra_semantics: extra.to_owned(),
                color: color.to_owned(),
            }
        })
        .collect()
}

/// Category 0 guaranteed, ids unique, in the order Bitrix24 lists them.
fn served_categories(categories: Vec<B24Category>) -> Vec<B24Category> {
    let mut served: Vec<B24Category> = Vec::new();
    for category in categories {
        if !served.iter().any(|known| known.id == category.id) {
            served.push(category);
        }
    }
    if !served.iter().any(|category| category.id == 0) {
        served.extend(B24Sandbox::default_categories().into_iter().filter(|category| category.id == 0));
    }
    served.sort_by_key(|category| (category.sort, category.id));
    served
}

/// A method's `operating` seconds since its window opened (sandbox clock).
#[derive(Clone, Copy, Debug)]
struct Operating {
    window_start: f64,
    total: f64,
}

impl Operating {
    fn reset_at(&self) -> f64 {
        self.window_start + OPERATING_WINDOW_SECS
    }
}

struct State {
    clock: Arc<Clock>,
    scopes: Vec<String>,
    categories: Vec<B24Category>,
    lead_statuses: Vec<B24Stage>,
    /// Leads, deals and contacts, and the portal's CRM mode.
    crm: leads::Store,
    /// Every lead's and deal's stage history.
    history: history::Store,
    /// Method name → its current window.
    operating: HashMap<String, Operating>,
    /// Method name → when (sandbox unix seconds) its forced block ends.
    blocked: HashMap<String, f64>,
    blocked_command_time: BlockedCommandTime,
    /// Methods that answer `ACCESS_DENIED`.
    denied: Vec<String>,
    lists_break_off: bool,
    page_size: usize,
}

impl State {
    fn new(scopes: Vec<String>, page_size: usize, clock: Arc<Clock>) -> State {
        State {
            clock,
            scopes,
            categories: served_categories(B24Sandbox::default_categories()),
            lead_statuses: B24Sandbox::default_lead_statuses(),
            crm: leads::Store::new(),
            history: history::Store::default(),
            operating: HashMap::new(),
            blocked: HashMap::new(),
            blocked_command_time: BlockedCommandTime::default(),
            denied: Vec::new(),
            lists_break_off: false,
            page_size: page_size.max(1),
        }
    }

    /// The sandbox clock in unix seconds.
    fn now(&self) -> f64 {
        self.clock.since_epoch().as_secs_f64()
    }

    /// `method`'s window, reopened if ten minutes have passed.
    fn operating(&mut self, method: &str, now: f64) -> &mut Operating {
        let window = self.operating.entry(method.to_owned()).or_insert(Operating { window_start: now, total: 0.0 });
        if now >= window.reset_at() {
            *window = Operating { window_start: now, total: 0.0 };
        }
        window
    }

    fn category(&self, id: i64) -> Option<&B24Category> {
        self.categories.iter().find(|category| i64::from(category.id) == id)
    }
}

/// A method's answer before it is wrapped with `time`.
struct Success {
    result: Value,
    total: Option<usize>,
    next: Option<usize>,
}

impl Success {
    fn single(result: Value) -> Success {
        Success { result, total: None, next: None }
    }
}

/// A refused call: HTTP status, error code (often empty for a method's own
/// errors), description, and the `time` block where Bitrix24 sends one.
struct Failure {
    status: u16,
    error: String,
    description: String,
    time: Option<Value>,
}

impl Failure {
    fn new(status: u16, error: &str, description: &str) -> Failure {
        Failure { status, error: error.to_owned(), description: description.to_owned(), time: None }
    }

    fn invalid_credentials() -> Failure {
        Failure::new(401, "INVALID_CREDENTIALS", "Invalid request credentials")
    }

    fn method_not_found() -> Failure {
        Failure::new(404, "ERROR_METHOD_NOT_FOUND", "Method not found!")
    }

    fn error_json(&self) -> Value {
        json!({ "error": self.error, "error_description": self.description })
    }

    fn response(&self) -> Response {
        let mut body = self.error_json();
        if let Some(time) = &self.time {
            body["time"] = time.clone();
        }
        respond(self.status, JSON, body.to_string())
    }
}

type Outcome = Result<Success, Failure>;

/// A batch command's method name and parameters.
type Command = (String, Map<String, Value>);

/// What the server tasks and the test-facing handle share.
struct Shared {
    base_url: String,
    config: B24SandboxConfig,
    state: Mutex<State>,
}

impl Shared {
    fn route(&self, request: &RecordedRequest) -> Response {
        let Some(rest) = request.path.strip_prefix("/rest/") else {
            return respond(404, "", Body::empty());
        };
        let mut segments = rest.splitn(3, '/');
        let (Some(user_id), Some(code), Some(method)) = (segments.next(), segments.next(), segments.next()) else {
            return Failure::invalid_credentials().response();
        };
        if user_id != self.config.user_id.to_string() || code != self.config.code {
            return Failure::invalid_credentials().response();
        }
        let params = match request_params(request) {
            Ok(params) => params,
            Err(failure) => return failure.response(),
        };
        let method = method_name(method);
        let mut state = lock(&self.state);
        let now = state.now();
        if method == "batch" {
            return self.batch(&mut state, &params, &sent_command_order(request), now);
        }
        let (outcome, time) = self.call(&mut state, &method, &params, now);
        match outcome {
            Ok(success) => {
                let mut body = format!("{{\"result\":{}", success.result);
                if let Some(next) = success.next {
                    body.push_str(&format!(",\"next\":{next}"));
                }
                if let Some(total) = success.total {
                    body.push_str(&format!(",\"total\":{total}"));
                }
                body.push_str(&format!(",\"time\":{time}}}"));
                respond(200, JSON, body)
            }
            Err(failure) => failure.response(),
        }
    }

    /// One method call with its `time` block: the method must exist, be in
    /// scope and have operating time left; then it runs and its cost is
    /// added.
    fn call(&self, state: &mut State, method: &str, params: &Map<String, Value>, now: f64) -> (Outcome, Value) {
        if !is_known(method) {
            return (Err(Failure::method_not_found()), time_block(now, 0.0, now + OPERATING_WINDOW_SECS));
        }
        let window = *state.operating(method, now);
        let mut time = time_block(now, window.total, window.reset_at());
        if method.starts_with("crm.") && !state.scopes.iter().any(|scope| scope == "crm") {
            let failure = Failure::new(
                401,
                "insufficient_scope",
                "The request requires higher privileges than provided by the webhook token",
            );
            return (Err(failure), time);
        }
        if state.denied.iter().any(|denied| denied == method) {
            return (Err(Failure::new(400, "ACCESS_DENIED", "Access denied.")), time);
        }
        if let Some(failure) = state.crm.take_refusal(method) {
            return (Err(failure), time);
        }
        if let Some(reset_at) = self.blocked_until(state, method, now, window) {
            time = time_block(now, window.total, reset_at);
            let mut failure =
                Failure::new(429, "OPERATION_TIME_LIMIT", "Method is blocked due to operation time limit.");
            failure.time = Some(time.clone());
            return (Err(failure), time);
        }
        let outcome = run(state, method, params, &self.config);
        let window = state.operating(method, now);
        window.total += self.config.operating_cost.as_secs_f64();
        let window = *window;
        (outcome, time_block(now, window.total, window.reset_at()))
    }

    /// When `method` is unblocked, if it is blocked now: by `block_method`
    /// or by having used up its operating budget for the window.
    fn blocked_until(&self, state: &mut State, method: &str, now: f64, window: Operating) -> Option<f64> {
        let forced = state.blocked.get(method).copied();
        let forced = match forced {
            Some(until) if now < until => Some(until),
            Some(_) => {
                state.blocked.remove(method);
                None
            }
            None => None,
        };
        let budget = self.config.operating_budget.as_secs_f64();
        let exhausted = (budget > 0.0 && window.total >= budget).then(|| window.reset_at());
        match (forced, exhausted) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Up to 50 commands run in the order sent under one request; the
    /// answer is a 200 whatever the commands did, with PHP's `[]` for empty
    /// maps.
    fn batch(&self, state: &mut State, params: &Map<String, Value>, order: &[String], now: f64) -> Response {
        let halt = params.get("halt").is_some_and(truthy);
        let mut commands: Vec<(String, Value)> = match params.get("cmd") {
            Some(Value::Object(commands)) => {
                commands.iter().map(|(key, command)| (key.clone(), command.clone())).collect()
            }
            Some(Value::Array(commands)) => {
                commands.iter().enumerate().map(|(index, command)| (index.to_string(), command.clone())).collect()
            }
            _ => Vec::new(),
        };
        commands.sort_by_key(|(key, _)| order.iter().position(|sent| sent == key).unwrap_or(usize::MAX));
        if commands.len() > MAX_BATCH {
            return Failure::new(400, "ERROR_BATCH_LENGTH_EXCEEDED", "Max batch length exceeded").response();
        }
        let parsed: Vec<(String, Option<Command>)> =
            commands.into_iter().map(|(key, command)| (key, parse_command(&command))).collect();
        if parsed.iter().any(|(_, command)| command.as_ref().is_some_and(|(method, _)| method == "batch")) {
            return Failure::new(405, "ERROR_BATCH_METHOD_NOT_ALLOWED", "Method is not allowed for batch usage")
                .response();
        }
        let (mut results, mut errors, mut totals, mut nexts, mut times) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut outer_reset: Option<f64> = None;
        for (key, command) in parsed {
            let (outcome, time) = match command {
                Some((method, mut params)) => {
                    leads::resolve_references(&mut params, &results, &totals, &nexts);
                    self.call(state, &method, &params, now)
                }
                None => (Err(Failure::method_not_found()), time_block(now, 0.0, now + OPERATING_WINDOW_SECS)),
            };
            let blocked = outcome.as_ref().err().is_some_and(|failure| failure.error == "OPERATION_TIME_LIMIT");
            if blocked && state.blocked_command_time == BlockedCommandTime::Outer {
                if let Some(reset) = time.get("operating_reset_at").and_then(Value::as_f64) {
                    outer_reset = Some(outer_reset.map_or(reset, |known| known.max(reset)));
                }
            } else {
                times.push((key.clone(), time));
            }
            match outcome {
                Ok(success) => {
                    results.push((key.clone(), success.result));
                    if let Some(total) = success.total {
                        totals.push((key.clone(), json!(total)));
                    }
                    if let Some(next) = success.next {
                        nexts.push((key, json!(next)));
                    }
                }
                Err(failure) => {
                    errors.push((key, failure.error_json()));
                    if halt {
                        break;
                    }
                }
            }
        }
        let body = format!(
            "{{\"result\":{{\"result\":{},\"result_error\":{},\"result_total\":{},\"result_next\":{},\"result_time\":{}}},\"time\":{}}}",
            php_array(&results),
            php_array(&errors),
            php_array(&totals),
            php_array(&nexts),
            php_array(&times),
            time_block(now, 0.0, outer_reset.unwrap_or(now + OPERATING_WINDOW_SECS)),
        );
        respond(200, JSON, body)
    }
}

/// The methods the sandbox implements, `batch` aside.
fn is_known(method: &str) -> bool {
    matches!(
        method,
        "scope"
            | "profile"
            | "server.time"
            | "crm.category.list"
            | "crm.dealcategory.list"
            | "crm.dealcategory.default.get"
            | "crm.dealcategory.stage.list"
            | "crm.status.list"
    ) || leads::is_known(method)
        || history::is_known(method)
        || items::is_known(method)
}

fn run(state: &mut State, method: &str, params: &Map<String, Value>, config: &B24SandboxConfig) -> Outcome {
    match method {
        "scope" => Ok(Success::single(json!(state.scopes))),
        "profile" => Ok(Success::single(json!({
            "ID": config.user_id.to_string(),
            "ADMIN": true,
            "NAME": "Анна",
            "LAST_NAME": "Смирнова",
            "PERSONAL_GENDER": "",
            "TIME_ZONE": "",
            "TIME_ZONE_OFFSET": PORTAL_UTC_OFFSET_SECS,
        }))),
        "server.time" => Ok(Success::single(json!(portal_date(state.now())))),
        "crm.category.list" => category_list(state, params),
        "crm.dealcategory.list" => deal_category_list(state, params),
        "crm.dealcategory.default.get" => {
            let name = state.category(0).map(|category| category.name.clone()).unwrap_or_default();
            Ok(Success::single(json!({ "ID": 0, "NAME": name })))
        }
        "crm.dealcategory.stage.list" => Ok(Success::single(stage_list(state, params))),
        "crm.status.list" => status_list(state, params),
        _ if leads::is_known(method) => leads::run(state, method, params, config),
        _ if history::is_known(method) => history::run(state, params),
        _ if items::is_known(method) => items::run(state, params),
        _ => Err(Failure::method_not_found()),
    }
}

/// The newer API: JSON numbers, camelCase, and category 0 included.
fn category_list(state: &State, params: &Map<String, Value>) -> Outcome {
    if params.get("entityTypeId").and_then(as_int) != Some(DEALS_ENTITY_TYPE_ID) {
        return Err(Failure::new(400, "NOT_FOUND", "Smart process not found"));
    }
    let rows = state
        .categories
        .iter()
        .map(|category| {
            json!({
                "id": category.id,
                "name": category.name,
                "sort": category.sort,
                "entityTypeId": DEALS_ENTITY_TYPE_ID,
                "isDefault": if category.id == 0 { "Y" } else { "N" },
            })
        })
        .collect();
    let mut page = paginate(state, rows, params);
    page.result = json!({ "categories": page.result });
    Ok(page)
}

/// The deprecated API: strings everywhere, and no category 0.
fn deal_category_list(state: &State, params: &Map<String, Value>) -> Outcome {
    let rows = state
        .categories
        .iter()
        .filter(|category| category.id != 0)
        .map(|category| {
            json!({
                "ID": category.id.to_string(),
                "CREATED_DATE": CATEGORY_CREATED,
                "NAME": category.name,
                "IS_LOCKED": "N",
                "SORT": category.sort.to_string(),
            })
        })
        .collect();
    Ok(paginate(state, filtered(rows, params.get("filter")), params))
}

/// An unknown pipeline has no stages.
fn stage_list(state: &State, params: &Map<String, Value>) -> Value {
    let id = params.get("id").and_then(as_int).unwrap_or(0);
    let rows: Vec<Value> = state
        .category(id)
        .map(|category| sorted(&category.stages))
        .unwrap_or_default()
        .into_iter()
        .map(|stage| json!({ "NAME": stage.name, "SORT": stage.sort.to_string(), "STATUS_ID": stage.status_id }))
        .collect();
    Value::Array(rows)
}

fn status_list(state: &State, params: &Map<String, Value>) -> Outcome {
    Ok(paginate(state, filtered(status_rows(state), params.get("filter")), params))
}

/// Every row of the status table: lead statuses, then each pipeline's
/// stages. The default pipeline's entity is `DEAL_STAGE`, the others'
/// `DEAL_STAGE_{id}`; there is no `DEAL_STAGE_0`.
fn status_rows(state: &State) -> Vec<Value> {
    let mut rows = Vec::new();
    let mut push = |entity_id: String, category_id: Option<i32>, stage: &B24Stage, system: bool| {
        let id = rows.len() + 1;
        rows.push(json!({
            "ID": id.to_string(),
            "ENTITY_ID": entity_id,
            "STATUS_ID": stage.status_id,
            "NAME": stage.name,
            "NAME_INIT": if system { stage.name.as_str() } else { "" },
            "SORT": stage.sort.to_string(),
            "SYSTEM": if system { "Y" } else { "N" },
            "CATEGORY_ID": category_id.map(|id| id.to_string()),
            "COLOR": stage.color,
            "SEMANTICS": stage.semantics,
            "EXTRA": { "SEMANTICS": stage.extra_semantics, "COLOR": stage.color },
        }));
    };
    for status in sorted(&state.lead_statuses) {
        let system = matches!(status.status_id.as_str(), "NEW" | "CONVERTED" | "JUNK");
        push("STATUS".to_owned(), None, &status, system);
    }
    for category in &state.categories {
        let (entity_id, category_id) = match category.id {
            0 => ("DEAL_STAGE".to_owned(), None),
            id => (format!("DEAL_STAGE_{id}"), Some(id)),
        };
        for stage in sorted(&category.stages) {
            let bare = stage.status_id.rsplit(':').next().unwrap_or_default();
            let system = matches!(bare, "NEW" | "WON" | "LOSE");
            push(entity_id.clone(), category_id, &stage, system);
        }
    }
    rows
}

fn sorted(stages: &[B24Stage]) -> Vec<B24Stage> {
    let mut stages = stages.to_vec();
    stages.sort_by_key(|stage| stage.sort);
    stages
}

/// Page of `rows` from `start`, with `total` and, when more remain, `next`.
/// `start=-1` asks for the first page without counting. Lists that break
/// off answer every later page empty and without `next`.
fn paginate(state: &State, rows: Vec<Value>, params: &Map<String, Value>) -> Success {
    let size = state.page_size;
    let start = params.get("start").and_then(as_int).unwrap_or(0);
    if start < 0 {
        return Success { result: Value::Array(rows.into_iter().take(size).collect()), total: None, next: None };
    }
    let total = rows.len();
    if start > 0 && state.lists_break_off {
        return Success { result: Value::Array(Vec::new()), total: Some(total), next: None };
    }
    let start = usize::try_from(start).unwrap_or(usize::MAX);
    let end = start.saturating_add(size);
    let page = rows.into_iter().skip(start).take(size).collect();
    Success { result: Value::Array(page), total: Some(total), next: (end < total).then_some(end) }
}

/// Rows whose every filtered field equals the wanted value (or one of
/// several); a leading `=` on a key means the same. A field the rows do
/// not have matches nothing.
fn filtered(rows: Vec<Value>, filter: Option<&Value>) -> Vec<Value> {
    let Some(Value::Object(filter)) = filter else {
        return rows;
    };
    rows.into_iter()
        .filter(|row| {
            filter.iter().all(|(key, wanted)| {
                let actual = row.get(key.strip_prefix('=').unwrap_or(key)).and_then(as_text);
                let Some(actual) = actual else {
                    return false;
                };
                match wanted {
                    Value::Array(options) => options.iter().filter_map(as_text).any(|option| option == actual),
                    Value::Object(options) => options.values().filter_map(as_text).any(|option| option == actual),
                    wanted => as_text(wanted).is_some_and(|wanted| wanted == actual),
                }
            })
        })
        .collect()
}

/// The `time` block of an answer: a fast call starting at `start`, and the
/// method's `operating` total and when its window resets.
fn time_block(start: f64, operating: f64, reset_at: f64) -> Value {
    let finish = start + DURATION_SECS;
    json!({
        "start": start,
        "finish": finish,
        "duration": DURATION_SECS,
        "processing": PROCESSING_SECS,
        "date_start": portal_date(start),
        "date_finish": portal_date(finish),
        "operating": (operating * 1e6).round() / 1e6,
        "operating_reset_at": reset_at.ceil() as i64,
    })
}

/// `2026-11-26T12:00:00+03:00`: the portal's local time, to the second.
fn portal_date(unix_secs: f64) -> String {
    let offset = FixedOffset::east_opt(PORTAL_UTC_OFFSET_SECS);
    let moment = DateTime::from_timestamp(unix_secs.floor() as i64, 0);
    match (moment, offset) {
        (Some(moment), Some(offset)) => moment.with_timezone(&offset).format("%Y-%m-%dT%H:%M:%S%:z").to_string(),
        _ => String::new(),
    }
}

/// Bitrix24 lowercases method names and takes `.json` as the default format.
fn method_name(raw: &str) -> String {
    let name = raw.to_lowercase();
    match name.strip_suffix(".json") {
        Some(bare) => bare.to_owned(),
        None => name,
    }
}

/// A batch command `method?query` as its method and parameters; `None`
/// for a command that is not a string.
fn parse_command(command: &Value) -> Option<Command> {
    let Value::String(command) = command else {
        return None;
    };
    let (method, query) = command.split_once('?').unwrap_or((command, ""));
    let mut params = Map::new();
    merge_form(&mut params, query);
    Some((method_name(method), params))
}

/// The keys of `cmd` in the order the client sent them, which a parsed
/// `Map` (sorted by key) has lost. PHP runs batch commands in that order.
fn sent_command_order(request: &RecordedRequest) -> Vec<String> {
    let mut order = Vec::new();
    let mut note = |key: String| {
        if !order.contains(&key) {
            order.push(key);
        }
    };
    let mut forms = vec![request.query.as_deref().unwrap_or_default()];
    let body = request.body.trim();
    if body.starts_with('{') {
        let keys = serde_json::from_str::<BatchKeys>(body).map(|keys| keys.cmd.0).unwrap_or_default();
        keys.into_iter().for_each(&mut note);
    } else {
        forms.push(body);
    }
    let mut appended = 0;
    for form in forms {
        for (key, _) in url::form_urlencoded::parse(form.as_bytes()) {
            let path = key_path(&key);
            if let [name, key, ..] = path.as_slice()
                && name == "cmd"
            {
                if key.is_empty() {
                    note(appended.to_string());
                    appended += 1;
                } else {
                    note(key.clone());
                }
            }
        }
    }
    order
}

/// Just the key order of a JSON batch body's `cmd`.
#[derive(Deserialize)]
struct BatchKeys {
    #[serde(default)]
    cmd: KeyOrder,
}

#[derive(Default)]
struct KeyOrder(Vec<String>);

impl<'de> Deserialize<'de> for KeyOrder {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(KeyOrderVisitor)
    }
}

struct KeyOrderVisitor;

impl<'de> Visitor<'de> for KeyOrderVisitor {
    type Value = KeyOrder;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("batch commands")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<KeyOrder, A::Error> {
        let mut keys = Vec::new();
        while let Some(key) = map.next_key::<String>()? {
            map.next_value::<IgnoredAny>()?;
            keys.push(key);
        }
        Ok(KeyOrder(keys))
    }

    // A list's order is its indices', which sorting by key keeps anyway;
    // anything else is refused later.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<KeyOrder, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(KeyOrder::default())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<KeyOrder, E> {
        Ok(KeyOrder::default())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<KeyOrder, E> {
        Ok(KeyOrder::default())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<KeyOrder, E> {
        Ok(KeyOrder::default())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<KeyOrder, E> {
        Ok(KeyOrder::default())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<KeyOrder, E> {
        Ok(KeyOrder::default())
    }

    fn visit_unit<E: de::Error>(self) -> Result<KeyOrder, E> {
        Ok(KeyOrder::default())
    }
}

/// Query-string parameters overlaid with the body's, JSON or form-encoded.
fn request_params(request: &RecordedRequest) -> Result<Map<String, Value>, Failure> {
    let mut params = Map::new();
    if let Some(query) = &request.query {
        merge_form(&mut params, query);
    }
    let body = request.body.trim();
    if body.is_empty() {
        return Ok(params);
    }
    let content_type = request.header("content-type").unwrap_or_default().to_ascii_lowercase();
    let json = content_type.contains("json") || (content_type.is_empty() && body.starts_with('{'));
    if !json {
        merge_form(&mut params, body);
        return Ok(params);
    }
    match serde_json::from_str::<Value>(body) {
        Ok(Value::Object(object)) => {
            params.extend(object);
            Ok(params)
        }
        _ => Err(Failure::new(400, "INVALID_REQUEST", "Request body is not a JSON object")),
    }
}

/// Adds form-encoded pairs with PHP's reading of bracketed keys:
/// `filter[ENTITY_ID]=X` is `{"filter":{"ENTITY_ID":"X"}}` and `a[]=…`
/// appends under the next index.
fn merge_form(params: &mut Map<String, Value>, encoded: &str) {
    for (key, value) in url::form_urlencoded::parse(encoded.as_bytes()) {
        let path = key_path(&key);
        if path.len() <= MAX_NESTING {
            insert(params, &path, value.into_owned());
        }
    }
}

fn key_path(key: &str) -> Vec<String> {
    let Some(open) = key.find('[').filter(|open| *open > 0) else {
        return vec![key.to_owned()];
    };
    let mut path = vec![key[..open].to_owned()];
    let mut rest = &key[open..];
    while let Some(inner) = rest.strip_prefix('[') {
        let Some(close) = inner.find(']') else {
            break;
        };
        path.push(inner[..close].to_owned());
        rest = &inner[close + 1..];
    }
    path
}

fn insert(target: &mut Map<String, Value>, path: &[String], value: String) {
    let Some((first, rest)) = path.split_first() else {
        return;
    };
    let key = if first.is_empty() { target.len().to_string() } else { first.clone() };
    if rest.is_empty() {
        target.insert(key, Value::String(value));
        return;
    }
    let slot = target.entry(key).or_insert_with(|| Value::Object(Map::new()));
    if !slot.is_object() {
        *slot = Value::Object(Map::new());
    }
    if let Value::Object(inner) = slot {
        insert(inner, rest, value);
    }
}

/// A number, or a string holding one, as Bitrix24 takes either.
fn as_int(value: &Value) -> Option<i64> {
    match value {
        Value::Number(number) => number.as_i64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

fn as_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(if *flag { "Y" } else { "N" }.to_owned()),
        _ => None,
    }
}

/// PHP's truth for `halt`: `1`, `"1"`, `"Y"`, `true`.
fn truthy(value: &Value) -> bool {
    match value {
        Value::Bool(flag) => *flag,
        Value::Number(number) => number.as_f64().is_some_and(|number| number != 0.0),
        Value::String(text) => !matches!(text.trim(), "" | "0" | "N" | "n" | "false"),
        _ => false,
    }
}

/// PHP's `json_encode` of an array: `[]` when empty, a list when keyed
/// 0, 1, 2…, otherwise an object in insertion order.
fn php_array(entries: &[(String, Value)]) -> String {
    let is_list = entries.iter().enumerate().all(|(index, (key, _))| *key == index.to_string());
    if is_list {
        return Value::Array(entries.iter().map(|(_, value)| value.clone()).collect()).to_string();
    }
    let fields: Vec<String> =
        entries.iter().map(|(key, value)| format!("{}:{value}", Value::String(key.clone()))).collect();
    format!("{{{}}}", fields.join(","))
}

/// A full bucket's answer.
fn bucket_full() -> Response {
    respond(503, JSON, QUERY_LIMIT_BODY)
}

/// The old address's answer to anything once the portal is renamed.
fn redirect(new_base_url: &str, request: &RecordedRequest) -> Response {
    let query = request.query.as_deref().map(|query| format!("?{query}")).unwrap_or_default();
    let location = format!("{new_base_url}{}{query}", request.path);
    let mut response = respond(302, "text/html", REDIRECT_PAGE);
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}
