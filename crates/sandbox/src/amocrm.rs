//! The AmoCRM API v4 sandbox: OAuth 2.0 with single-use codes and rotating
//! refresh tokens, the account, pipelines with their system statuses (paged
//! on demand, endlessly if asked), and the 7 requests per second limit,
//! answered the way the vendor documents them, every answer dated by the
//! sandbox clock. Leads, their contacts, custom fields and notes are in
//! `leads`; the events feed (funnel history) in `events`.

use std::collections::HashMap;
use std::io;
use std::ops::Deref;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use serde_json::{Value, json};

use super::faults::RecordedRequest;
use super::recorder::Recorder;
use super::{Bound, Clock, Front, Handler, Server, lock, respond};

mod events;
mod leads;

pub use events::{AmoEventOrder, LeadMove, SandboxEvent};
pub use leads::{SandboxContact, SandboxCustomField, SandboxFieldValue, SandboxLead, SandboxNote, validation_refusal};

/// How long an authorization code can be exchanged.
const CODE_LIFETIME_SECS: i64 = 20 * 60;
/// How long an unused refresh token stays valid.
const REFRESH_LIFETIME_SECS: i64 = 90 * 24 * 60 * 60;
/// The user every token belongs to.
const CURRENT_USER_ID: i64 = 9_000_001;
/// Made-up pipelines of endless pages get ids from here on.
const ENDLESS_FIRST_PIPELINE_ID: i64 = 8_000_000;

/// The system statuses every pipeline ends with, with the same ids everywhere.
const WON_STATUS_ID: i64 = 142;
const LOST_STATUS_ID: i64 = 143;
const UNSORTED_TYPE: i32 = 1;

const OAUTH_PROBLEM_TYPE: &str = "https://developers.amocrm.ru/v3/errors/OAuthProblemJson";
const BAD_OAUTH_REQUEST: &str = "Некорректный запрос";
const BAD_CLIENT: &str = "Некорректный клиент";
const BAD_OAUTH_DETAIL: &str = "В запросе отсутствует ряд параметров или параметры невалидны";
const BAD_CLIENT_DETAIL: &str = "Клиент не найден или его данные не совпадают с настройками интеграции";

const PROBLEM_JSON: &str = "application/problem+json";
const JSON: &str = "application/json";
/// What AmoCRM's API v4 (not its OAuth endpoint) labels its JSON with.
const HAL_JSON: &str = "application/hal+json";

/// The integration the sandbox plays the account of.
#[derive(Clone, Debug)]
pub struct AmoSandboxConfig {
    pub client_id: String,
    pub client_secret: String,
    pub redirect_uri: String,
    pub subdomain: String,
    pub account_id: i64,
    /// Lifetime of the access tokens the token endpoint issues.
    pub expires_in: Duration,
    /// Requests per second over a sliding window; 0 turns the limit off.
    pub rate_limit_per_sec: u32,
    /// Pipelines per page of `GET /api/v4/leads/pipelines`; `None` serves
    /// them all at once, as AmoCRM does. `Some(0)` counts as `Some(1)`.
    pub pipelines_page_size: Option<usize>,
    /// How long every answered request waits before its answer goes out
    /// (a network round trip, say); zero answers at once.
    pub latency: Duration,
}

impl Default for AmoSandboxConfig {
    fn default() -> Self {
        AmoSandboxConfig {
            client_id: "sandbox-client-id".to_owned(),
            client_secret: "sandbox-client-secret".to_owned(),
            redirect_uri: "https://example.com/oauth".to_owned(),
            subdomain: "sandbox".to_owned(),
            account_id: 31_000_001,
            expires_in: Duration::from_secs(86_400),
            rate_limit_per_sec: 7,
            pipelines_page_size: None,
            latency: Duration::ZERO,
        }
    }
}

/// A status of a pipeline; `status_type` 1 is the unsorted status, 0 any other.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxStatus {
    pub id: i64,
    pub name: String,
    pub sort: i32,
    pub status_type: i32,
}

/// A pipeline with its own statuses; the sandbox adds the unsorted status
/// (unless one is given) and the system statuses 142 and 143 when serving.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxPipeline {
    pub id: i64,
    pub name: String,
    pub sort: i32,
    pub is_main: bool,
    pub statuses: Vec<SandboxStatus>,
}

/// Token-endpoint outcomes. A rejection counts under the grant it asked for,
/// whatever the reason (client, code, or token).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenStats {
    pub refreshed: usize,
    pub refresh_rejected: usize,
    pub exchanged: usize,
    pub exchange_rejected: usize,
}

/// A running AmoCRM emulator on a loopback port; dropping it shuts the
/// server down.
pub struct AmoSandbox {
    shared: Arc<Shared>,
    recorder: Recorder,
    _server: Server,
}

/// Faults, the request log and the rate limit: see [`Recorder`].
impl Deref for AmoSandbox {
    type Target = Recorder;

    fn deref(&self) -> &Recorder {
        &self.recorder
    }
}

impl AmoSandbox {
    /// Binds 127.0.0.1 on a free port and starts serving.
    pub async fn start(config: AmoSandboxConfig) -> io::Result<AmoSandbox> {
        let bound = Bound::loopback().await?;
        let clock = Arc::new(Clock::default());
        let front = Front::new(config.rate_limit_per_sec).with_latency(config.latency).with_clock(Arc::clone(&clock));
        let front = Arc::new(front);
        let shared = Arc::new(Shared {
            base_url: bound.base_url().to_owned(),
            config,
            state: Mutex::new(State::new(AmoSandbox::default_pipelines(), clock)),
        });
        let answering = Arc::clone(&shared);
        let handler: Arc<Handler> = Arc::new(move |request: &RecordedRequest| answering.route(request));
        let recorder = Recorder::new(Arc::clone(&front));
        let server = bound.serve(front, handler);
        Ok(AmoSandbox { shared, recorder, _server: server })
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn base_url(&self) -> String {
        self.shared.base_url.clone()
    }

    pub fn config(&self) -> &AmoSandboxConfig {
        &self.shared.config
    }

    /// A fresh authorization code, exchangeable once within 20 minutes.
    pub fn issue_code(&self) -> String {
        let code = opaque_token();
        let mut state = lock(&self.shared.state);
        let now = state.now();
        state.codes.insert(code.clone(), AuthCode { issued_at: now, used: false });
        code
    }

    /// An access token valid for `valid_for` with no refresh token, like a
    /// private integration's long-lived token.
    pub fn issue_long_lived_token(&self, valid_for: Duration) -> String {
        let mut state = lock(&self.shared.state);
        let now = state.now();
        let exp = now.saturating_add(secs(valid_for));
        let token = jwt(&self.shared.config, now, exp);
        state.access.insert(token.clone(), exp);
        token
    }

    /// Moves the sandbox clock, which code and token expiry, the times of
    /// new leads and events and the `Date` header of every answer follow;
    /// the rate limit keeps to real time.
    pub fn advance_clock(&self, by: Duration) {
        lock(&self.shared.state).clock.advance(by);
    }

    /// The sandbox clock in unix seconds: what the `Date` header says now.
    pub fn now_unix(&self) -> i64 {
        lock(&self.shared.state).now()
    }

    /// From now on the token endpoint writes `expires_in` as `value` (a
    /// string, a float, a negative or huge number, `null` for absent) while
    /// its tokens still live `expires_in` of the configuration: the shapes
    /// other OAuth servers and proxies have been seen to send.
    pub fn set_expires_in_wire(&self, value: Option<serde_json::Value>) {
        lock(&self.shared.state).expires_in_wire = value;
    }

    /// Invalidates every access and refresh token issued so far.
    pub fn revoke_all_tokens(&self) {
        let mut state = lock(&self.shared.state);
        state.access.clear();
        state.refresh.clear();
    }

    /// While on, every page of `GET /api/v4/leads/pipelines` links a next
    /// one (paging even without `pipelines_page_size`); past the account's
    /// pipelines each page lists one made-up pipeline of its own, so
    /// `_links.next` never ends and no page repeats another.
    pub fn set_endless_pipeline_pages(&self, on: bool) {
        lock(&self.shared.state).endless_pipeline_pages = on;
    }

    pub fn set_pipelines(&self, pipelines: Vec<SandboxPipeline>) {
        lock(&self.shared.state).pipelines = served_pipelines(pipelines);
    }

    /// "Воронка" (main) and "Продажи", three statuses each.
    pub fn default_pipelines() -> Vec<SandboxPipeline> {
        let status = |id: i64, name: &str, sort: i32| SandboxStatus { id, name: name.to_owned(), sort, status_type: 0 };
        vec![
            SandboxPipeline {
                id: 7_000_001,
                name: "Воронка".to_owned(),
                sort: 1,
                is_main: true,
                statuses: vec![
                    status(61_000_001, "Первичный контакт", 20),
                    status(61_000_002, "Переговоры", 30),
                    status(61_000_003, "Квалифицирован", 40),
                ],
            },
            SandboxPipeline {
                id: 7_000_002,
                name: "Продажи".to_owned(),
                sort: 2,
                is_main: false,
                statuses: vec![
                    status(61_000_004, "Новый", 20),
                    status(61_000_005, "Квалифицирован", 30),
                    status(61_000_006, "Счёт выставлен", 40),
                ],
            },
        ]
    }

    pub fn token_stats(&self) -> TokenStats {
        lock(&self.shared.state).stats
    }

    /// Whether the API would accept `token` now (sandbox clock).
    pub fn is_access_token_valid(&self, token: &str) -> bool {
        lock(&self.shared.state).access_valid(token)
    }
}

struct AuthCode {
    issued_at: i64,
    used: bool,
}

/// A pipeline as served, with the statuses the sandbox adds.
struct ServedPipeline {
    pipeline: SandboxPipeline,
    statuses: Vec<SandboxStatus>,
}

struct State {
    clock: Arc<Clock>,
    codes: HashMap<String, AuthCode>,
    /// Access token → expiry, unix seconds.
    access: HashMap<String, i64>,
    /// Refresh token → expiry, unix seconds; removed when used.
    refresh: HashMap<String, i64>,
    pipelines: Vec<ServedPipeline>,
    /// Leads, contacts, notes and the account's custom fields.
    crm: leads::Store,
    /// The account's events: lead additions, status and responsible changes.
    events: events::Store,
    stats: TokenStats,
    /// What the token endpoint writes as `expires_in`, when not the number.
    expires_in_wire: Option<serde_json::Value>,
    endless_pipeline_pages: bool,
}

impl State {
    fn new(pipelines: Vec<SandboxPipeline>, clock: Arc<Clock>) -> State {
        State {
            clock,
            codes: HashMap::new(),
            access: HashMap::new(),
            refresh: HashMap::new(),
            pipelines: served_pipelines(pipelines),
            crm: leads::Store::new(),
            events: events::Store::default(),
            stats: TokenStats::default(),
            expires_in_wire: None,
            endless_pipeline_pages: false,
        }
    }

    /// The sandbox clock in unix seconds.
    fn now(&self) -> i64 {
        secs(self.clock.since_epoch())
    }

    fn access_valid(&self, token: &str) -> bool {
        self.access.get(token).is_some_and(|exp| self.now() < *exp)
    }
}

fn secs(duration: Duration) -> i64 {
    i64::try_from(duration.as_secs()).unwrap_or(i64::MAX)
}

/// Adds the unsorted status and 142/143. The unsorted status's id follows
/// from its pipeline's id alone, so that, as in AmoCRM, it stays the same
/// when other pipelines come and go.
fn served_pipelines(pipelines: Vec<SandboxPipeline>) -> Vec<ServedPipeline> {
    pipelines
        .into_iter()
        .map(|pipeline| {
            let mut statuses = Vec::new();
            if !pipeline.statuses.iter().any(|s| s.status_type == UNSORTED_TYPE) {
                let id = pipeline.id.saturating_mul(10).saturating_add(1);
                statuses.push(status(id, "Неразобранное", 10, UNSORTED_TYPE));
            }
            statuses.extend(pipeline.statuses.iter().cloned());
            for (id, name, sort) in
                [(WON_STATUS_ID, "Успешно реализовано", 10_000), (LOST_STATUS_ID, "Закрыто и не реализовано", 11_000)]
            {
                if !statuses.iter().any(|s| s.id == id) {
                    statuses.push(status(id, name, sort, 0));
                }
            }
            statuses.sort_by_key(|s| s.sort);
            ServedPipeline { pipeline, statuses }
        })
        .collect()
}

fn status(id: i64, name: &str, sort: i32, status_type: i32) -> SandboxStatus {
    SandboxStatus { id, name: name.to_owned(), sort, status_type }
}

/// What the server task and the test-facing handle share.
struct Shared {
    base_url: String,
    config: AmoSandboxConfig,
    state: Mutex<State>,
}

impl Shared {
    fn route(&self, request: &RecordedRequest) -> Response {
        let method = request.method.as_str();
        match request.path.as_str() {
            "/oauth2/access_token" if method == "POST" => self.token_endpoint(request),
            "/api/v4/account" if method == "GET" => self.authorized(request, |shared, _| shared.account()),
            "/api/v4/leads/pipelines" if method == "GET" => self.authorized(request, Shared::pipelines),
            "/oauth2/access_token" | "/api/v4/account" | "/api/v4/leads/pipelines" => respond(405, "", Body::empty()),
            "/api/v4/events" if method == "GET" => self.authorized(request, Shared::list_events),
            "/api/v4/events" => respond(405, "", Body::empty()),
            _ => self.route_leads(request).unwrap_or_else(|| respond(404, "", Body::empty())),
        }
    }

    fn link(&self, path: &str) -> Value {
        json!({ "href": format!("{}{path}", self.base_url) })
    }

    fn token_endpoint(&self, request: &RecordedRequest) -> Response {
        let field = |name: &str| request.form_or_json_field(name).filter(|value| !value.is_empty());
        let Some(grant_type) = field("grant_type") else {
            return Refusal::bad_request("Check the `grant_type` parameter").response();
        };
        let refreshing = match grant_type.as_str() {
            "authorization_code" => false,
            "refresh_token" => true,
            _ => return Refusal::bad_request("Unsupported grant type").response(),
        };
        let mut state = lock(&self.state);
        let outcome = if !self.client_matches(&field) {
            Err(Refusal::bad_client())
        } else if refreshing {
            refresh(&mut state, field("refresh_token"))
        } else {
            exchange(&mut state, field("code"))
        };
        let stats = &mut state.stats;
        match (refreshing, outcome.is_ok()) {
            (true, true) => stats.refreshed += 1,
            (true, false) => stats.refresh_rejected += 1,
            (false, true) => stats.exchanged += 1,
            (false, false) => stats.exchange_rejected += 1,
        }
        match outcome {
            Ok(()) => self.issue_pair(&mut state),
            Err(refusal) => refusal.response(),
        }
    }

    /// Client id, secret and redirect URI must equal the integration's
    /// settings exactly, trailing slash included.
    fn client_matches(&self, field: &impl Fn(&str) -> Option<String>) -> bool {
        let config = &self.config;
        field("client_id").as_deref() == Some(config.client_id.as_str())
            && field("client_secret").as_deref() == Some(config.client_secret.as_str())
            && field("redirect_uri").as_deref() == Some(config.redirect_uri.as_str())
    }

    fn issue_pair(&self, state: &mut State) -> Response {
        let now = state.now();
        let expires_in = secs(self.config.expires_in);
        let exp = now.saturating_add(expires_in);
        let access_token = jwt(&self.config, now, exp);
        let refresh_token = opaque_token();
        state.access.insert(access_token.clone(), exp);
        state.refresh.insert(refresh_token.clone(), now.saturating_add(REFRESH_LIFETIME_SECS));
        let mut body = json!({
            "token_type": "Bearer",
            "expires_in": expires_in,
            "server_time": now,
            "access_token": access_token,
            "refresh_token": refresh_token,
        });
        match &state.expires_in_wire {
            Some(serde_json::Value::Null) => drop(body.as_object_mut().map(|o| o.remove("expires_in"))),
            Some(value) => body["expires_in"] = value.clone(),
            None => {}
        }
        respond(200, JSON, body.to_string())
    }

    fn authorized(
        &self,
        request: &RecordedRequest,
        answer: impl FnOnce(&Shared, &RecordedRequest) -> Response,
    ) -> Response {
        let token = request.header("authorization").and_then(bearer_token);
        let valid = token.is_some_and(|token| lock(&self.state).access_valid(token));
        if !valid {
            let body = json!({
                "title": "Unauthorized",
                "type": "https://httpstatus.es/401",
                "status": 401,
                "detail": "Неверный логин или пароль",
            });
            return respond(401, PROBLEM_JSON, body.to_string());
        }
        answer(self, request)
    }

    fn account(&self) -> Response {
        let config = &self.config;
        let body = json!({
            "id": config.account_id,
            "name": format!("Песочница {}", config.subdomain),
            "subdomain": config.subdomain,
            "created_at": 1_600_000_000,
            "created_by": CURRENT_USER_ID,
            "updated_at": 1_600_000_000,
            "updated_by": CURRENT_USER_ID,
            "current_user_id": CURRENT_USER_ID,
            "country": "RU",
            "currency": "RUB",
            "currency_symbol": "₽",
            "customers_mode": "disabled",
            "is_unsorted_on": true,
            "is_loss_reason_enabled": true,
            "is_helpbot_enabled": false,
            "is_technical_account": false,
            "contact_name_display_order": 1,
            "_links": { "self": self.link("/api/v4/account") },
        });
        respond(200, HAL_JSON, body.to_string())
    }

    fn pipelines(&self, request: &RecordedRequest) -> Response {
        let state = lock(&self.state);
        let all = &state.pipelines;
        let endless = state.endless_pipeline_pages;
        let page_size = match (self.config.pipelines_page_size, endless) {
            (Some(size), _) => size,
            (None, true) => all.len(),
            (None, false) => return self.pipelines_page(all.iter().collect(), None),
        };
        let page = match request.query_param("page") {
            None => 1,
            Some(text) => match text.parse::<usize>() {
                Ok(page) if page >= 1 => page,
                _ => return api_problem(400, "The page parameter must be a positive integer"),
            },
        };
        let page_size = page_size.max(1);
        let start = (page - 1).saturating_mul(page_size);
        if endless && start >= all.len() {
            let id = ENDLESS_FIRST_PIPELINE_ID.saturating_add(i64::try_from(page).unwrap_or(i64::MAX));
            let made_up = SandboxPipeline {
                id,
                name: format!("Воронка {page}"),
                sort: i32::try_from(page).unwrap_or(i32::MAX),
                is_main: false,
                statuses: Vec::new(),
            };
            let served = served_pipelines(vec![made_up]);
            return self.pipelines_page(served.iter().collect(), Some((page, true)));
        }
        if start >= all.len() {
            // AmoCRM answers an empty list with 204 and no body.
            return respond(204, "", Body::empty());
        }
        let end = start.saturating_add(page_size).min(all.len());
        let has_next = endless || end < all.len();
        self.pipelines_page(all[start..end].iter().collect(), Some((page, has_next)))
    }

    /// `paging` is the page number and whether another follows.
    fn pipelines_page(&self, pipelines: Vec<&ServedPipeline>, paging: Option<(usize, bool)>) -> Response {
        let path = "/api/v4/leads/pipelines";
        let mut links = json!({ "self": self.link(path) });
        if let Some((page, has_next)) = paging {
            links["self"] = self.link(&format!("{path}?page={page}"));
            if has_next {
                links["next"] = self.link(&format!("{path}?page={}", page + 1));
            }
        }
        let served: Vec<Value> = pipelines.iter().map(|p| self.pipeline_json(p)).collect();
        let mut body = json!({
            "_total_items": served.len(),
            "_links": links,
            "_embedded": { "pipelines": served },
        });
        if let Some((page, _)) = paging {
            body["_page"] = json!(page);
        }
        respond(200, HAL_JSON, body.to_string())
    }

    fn pipeline_json(&self, served: &ServedPipeline) -> Value {
        let pipeline = &served.pipeline;
        let statuses: Vec<Value> = served.statuses.iter().map(|s| self.status_json(pipeline.id, s)).collect();
        json!({
            "id": pipeline.id,
            "name": pipeline.name,
            "sort": pipeline.sort,
            "is_main": pipeline.is_main,
            "is_unsorted_on": true,
            "is_archive": false,
            "account_id": self.config.account_id,
            "_links": { "self": self.link(&format!("/api/v4/leads/pipelines/{}", pipeline.id)) },
            "_embedded": { "statuses": statuses },
        })
    }

    fn status_json(&self, pipeline_id: i64, status: &SandboxStatus) -> Value {
        let system = status.status_type == UNSORTED_TYPE || status.id == WON_STATUS_ID || status.id == LOST_STATUS_ID;
        let href = format!("/api/v4/leads/pipelines/{pipeline_id}/statuses/{}", status.id);
        json!({
            "id": status.id,
            "name": status.name,
            "sort": status.sort,
            "is_editable": !system,
            "pipeline_id": pipeline_id,
            "color": status_color(status),
            "type": status.status_type,
            "account_id": self.config.account_id,
            "_links": { "self": self.link(&href) },
        })
    }
}

fn api_problem(status: u16, detail: &str) -> Response {
    let body = json!({
        "title": "Bad Request",
        "type": format!("https://httpstatus.es/{status}"),
        "status": status,
        "detail": detail,
    });
    respond(status, PROBLEM_JSON, body.to_string())
}

/// A code works once and for 20 minutes (sandbox clock).
fn exchange(state: &mut State, code: Option<String>) -> Result<(), Refusal> {
    let code = code.ok_or(Refusal::bad_request("Check the `code` parameter"))?;
    let now = state.now();
    let issued = state.codes.get_mut(&code).ok_or(Refusal::bad_request("Cannot decrypt the authorization code"))?;
    if issued.used {
        return Err(Refusal::bad_request("Authorization code has been revoked"));
    }
    if now >= issued.issued_at.saturating_add(CODE_LIFETIME_SECS) {
        return Err(Refusal::bad_request("Authorization code has expired"));
    }
    issued.used = true;
    Ok(())
}

/// A refresh token works once: it is removed before the new pair is
/// issued, and any later use finds nothing.
fn refresh(state: &mut State, token: Option<String>) -> Result<(), Refusal> {
    let token = token.ok_or(Refusal::bad_request("Check the `refresh_token` parameter"))?;
    let expires_at = state.refresh.remove(&token).ok_or(Refusal::bad_token("Token has been revoked"))?;
    if state.now() >= expires_at {
        return Err(Refusal::bad_token("Token has expired"));
    }
    Ok(())
}

/// Why the token endpoint refused: the problem's status, title and hint.
#[derive(Clone, Copy, Debug)]
struct Refusal {
    status: u16,
    title: &'static str,
    hint: &'static str,
}

impl Refusal {
    fn bad_request(hint: &'static str) -> Refusal {
        Refusal { status: 400, title: BAD_OAUTH_REQUEST, hint }
    }

    /// AmoCRM answers a dead refresh token with 401, not the 400 of a bad code.
    fn bad_token(hint: &'static str) -> Refusal {
        Refusal { status: 401, title: BAD_OAUTH_REQUEST, hint }
    }

    fn bad_client() -> Refusal {
        Refusal { status: 401, title: BAD_CLIENT, hint: "Client authentication failed" }
    }

    fn response(self) -> Response {
        let detail = if self.title == BAD_CLIENT { BAD_CLIENT_DETAIL } else { BAD_OAUTH_DETAIL };
        let body = json!({
            "hint": self.hint,
            "title": self.title,
            "type": OAUTH_PROBLEM_TYPE,
            "status": self.status,
            "detail": detail,
        });
        respond(self.status, PROBLEM_JSON, body.to_string())
    }
}

/// The token after `Bearer ` (scheme in any case).
fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

fn status_color(status: &SandboxStatus) -> &'static str {
    const PALETTE: [&str; 6] = ["#99ccff", "#ffff99", "#ffcc66", "#ccc8f9", "#deff81", "#87f2c0"];
    match status.id {
        WON_STATUS_ID => "#CCFF66",
        LOST_STATUS_ID => "#D5D8DB",
        _ if status.status_type == UNSORTED_TYPE => "#c1c1c1",
        id => PALETTE[usize::try_from(id.rem_euclid(6)).unwrap_or(0)],
    }
}

fn random_bytes(count: usize) -> Vec<u8> {
    let mut bytes = vec![0; count];
    rand::rng().fill_bytes(&mut bytes);
    bytes
}

/// Shaped like AmoCRM's: a `def50200` prefix and a long hex tail.
fn opaque_token() -> String {
    format!("def50200{}", hex::encode(random_bytes(160)))
}

/// An RS256-looking JWT; the signature is random bytes since nothing
/// verifies it but the sandbox, which looks tokens up instead.
fn jwt(config: &AmoSandboxConfig, issued_at: i64, exp: i64) -> String {
    let header = json!({ "typ": "JWT", "alg": "RS256" });
    let payload = json!({
        "aud": config.client_id,
        "jti": hex::encode(random_bytes(20)),
        "iat": issued_at,
        "nbf": issued_at,
        "exp": exp,
        "sub": CURRENT_USER_ID.to_string(),
        "grant_type": "",
        "account_id": config.account_id,
        "base_domain": "amocrm.ru",
        "version": 2,
        "scopes": ["crm", "files", "files_delete", "notifications", "push_notifications"],
        "api_domain": "api-b.amocrm.ru",
    });
    let encode = |value: &Value| URL_SAFE_NO_PAD.encode(value.to_string());
    format!("{}.{}.{}", encode(&header), encode(&payload), URL_SAFE_NO_PAD.encode(random_bytes(256)))
}
