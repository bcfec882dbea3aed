//! The daemon's HTTP side (`--listen`): `/healthz`, `/metrics`, and the
//! AmoCRM OAuth callback that completes an authorisation started by
//! `crm-connect auth-url`. The state, referer and URL rules are
//! [`crate::oauth`]'s; this module only serves them.

use std::future::{Future, IntoFuture};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::config::TenantConfig;
use crate::context::Context;
use crate::db::DbError;
use crate::metrics;
use crate::oauth::{self, referer_matches, state_slug};
use crate::secret::Secret;
use crate::tokens::{Obtained, Owner, TokenError};

/// `/healthz` answers 200 while the main loop went round this recently.
pub const HEALTHY_WITHIN: Duration = Duration::from_secs(60);

/// After the shutdown signal, connections get this long to finish (an
/// exchange in flight, mostly) before `serve` returns anyway: the daemon
/// must exit within 10 s.
pub(crate) const DRAIN: Duration = Duration::from_secs(8);

/// How long a callback waits for a token pair kept in memory to be stored
/// before it answers; the daemon keeps trying after that.
const STORE_PENDING_WITHIN: Duration = Duration::from_secs(20);

type Lookup = dyn Fn(&str) -> Option<TenantConfig> + Send + Sync;
type LoopAge = dyn Fn() -> Duration + Send + Sync;

/// Callbacks served at once, and how long one may take: each holds a
/// database connection from the server's budget while it exchanges.
const CALLBACKS_AT_ONCE: usize = 4;
const CALLBACK_WITHIN: Duration = Duration::from_secs(30);

#[derive(Clone)]
struct AppState {
    ctx: Context,
    tenants: Arc<Lookup>,
    loop_age: Arc<LoopAge>,
    callbacks: Arc<tokio::sync::Semaphore>,
}

/// Serves until `shutdown` resolves, then lets open requests finish (for
/// at most [`DRAIN`]). `tenants` finds a tenant in force by slug (the
/// daemon passes its view of the files); `loop_age` says how long ago the
/// main loop last went round (`/healthz`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    ctx: Context,
    tenants: impl Fn(&str) -> Option<TenantConfig> + Send + Sync + 'static,
    loop_age: impl Fn() -> Duration + Send + Sync + 'static,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = AppState {
        ctx,
        tenants: Arc::new(tenants),
        loop_age: Arc::new(loop_age),
        callbacks: Arc::new(tokio::sync::Semaphore::new(CALLBACKS_AT_ONCE)),
    };
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_page))
        .route("/oauth/amocrm/callback", get(amocrm_callback))
        .route("/leads/wake", post(leads_wake))
        .with_state(state);
    let (fired, signalled) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        let _ = fired.send(());
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(signal).into_future();
    let drained = async {
        if signalled.await.is_err() {
            // The server ended without the signal; the other branch has won.
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(DRAIN).await;
    };
    tokio::select! {
        served = server => served,
        () = drained => {
            tracing::warn!(within = ?DRAIN, "HTTP requests still open at shutdown were left unfinished");
            Ok(())
        }
    }
}

async fn healthz(State(state): State<AppState>) -> Response {
    if (state.loop_age)() < HEALTHY_WITHIN {
        (StatusCode::OK, "ok").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "the main loop has stalled").into_response()
    }
}

/// `POST /leads/wake?tenant=SLUG`: that tenant's delivery pass starts at
/// once. Always 202: it reveals nothing, and changes nothing but timing.
async fn leads_wake(State(state): State<AppState>, RawQuery(raw): RawQuery) -> Response {
    let tenant = url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .find(|(key, _)| key == "tenant")
        .map(|(_, value)| value.into_owned());
    if let Some(slug) = tenant.filter(|slug| slug.len() <= 64) {
        state.ctx.wakes.wake(&slug);
    }
    StatusCode::ACCEPTED.into_response()
}

/// OpenMetrics, or the classic text format for a client that asks only
/// for that (`Accept: text/plain`).
async fn metrics_page(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let (text, content_type) = if metrics::wants_classic_text(accept) {
        (state.ctx.metrics.encode_classic(), metrics::CLASSIC_CONTENT_TYPE)
    } else {
        (state.ctx.metrics.encode(), metrics::CONTENT_TYPE)
    };
    let mut response = text.into_response();
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The callback's query; only the first of a repeated key counts.
#[derive(Default)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    referer: Option<String>,
    error: Option<String>,
}

impl CallbackQuery {
    fn parse(raw: Option<&str>) -> CallbackQuery {
        let mut query = CallbackQuery::default();
        for (key, value) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            let slot = match key.as_ref() {
                "code" => &mut query.code,
                "state" => &mut query.state,
                "referer" => &mut query.referer,
                "error" => &mut query.error,
                _ => continue,
            };
            if slot.is_none() && !value.is_empty() {
                *slot = Some(value.into_owned());
            }
        }
        query
    }
}

/// Why a callback did not connect a tenant. Messages hold no code, state
/// or token, and no value taken from the request.
#[derive(Debug, thiserror::Error)]
enum CallbackError {
    #[error("unknown, used or expired state")]
    UnknownState,
    #[error("the referer is not the tenant's account host {expected}")]
    WrongReferer { expected: String },
    #[error("the user denied access")]
    AccessDenied,
    #[error("the callback carries no code")]
    NoCode,
    #[error("the tenant uses `amocrm.long_lived_token`; the code flow is off")]
    LongLivedToken,
    #[error("AmoCRM rejected the code: {0}")]
    CodeRejected(String),
    #[error("this code was sent before; a code is used at most once")]
    CodeAlreadySent,
    #[error("the tenant database is unavailable: {0}")]
    Db(#[from] DbError),
    #[error("obtaining tokens failed: {0}")]
    Token(#[from] TokenError),
    #[error("unexpected outcome: {0}")]
    Unexpected(String),
}

impl CallbackError {
    fn status(&self) -> StatusCode {
        match self {
            CallbackError::UnknownState
            | CallbackError::WrongReferer { .. }
            | CallbackError::NoCode
            | CallbackError::CodeRejected(_)
            | CallbackError::CodeAlreadySent => StatusCode::BAD_REQUEST,
            CallbackError::AccessDenied => StatusCode::FORBIDDEN,
            CallbackError::LongLivedToken => StatusCode::CONFLICT,
            CallbackError::Db(_) => StatusCode::SERVICE_UNAVAILABLE,
            CallbackError::Token(e) if e.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
            CallbackError::Token(_) | CallbackError::Unexpected(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// What the browser is told. Database errors name hosts the public
    /// need not see; the log has them.
    fn page(&self) -> Response {
        let (title, detail) = match self {
            CallbackError::UnknownState => (
                "Unknown or expired link",
                "This authorisation link is unknown, was used already, or has expired. \
                 Run `crm-connect auth-url` again for a new one."
                    .to_string(),
            ),
            CallbackError::WrongReferer { .. } => (
                "Wrong account",
                "The authorisation came from an account other than the tenant's. \
                 Run `crm-connect auth-url` again and authorise in the tenant's own account."
                    .to_string(),
            ),
            CallbackError::AccessDenied => (
                "Access denied",
                "Access was denied in AmoCRM; nothing changed. Run `crm-connect auth-url` again to retry.".to_string(),
            ),
            CallbackError::Db(_) => {
                ("Not completed", "The tenant's database could not be reached. Try the link again shortly.".to_string())
            }
            CallbackError::Token(TokenError::Db(_) | TokenError::Unstored(_)) => (
                "Not completed",
                "The tenant's database failed while storing the tokens; see the daemon's log.".to_string(),
            ),
            other => ("Not connected", format!("{other}.")),
        };
        page(self.status(), title, &detail)
    }
}

async fn amocrm_callback(State(app): State<AppState>, RawQuery(raw): RawQuery) -> Response {
    let query = CallbackQuery::parse(raw.as_deref());
    // A malformed state never costs a database connection or a wait.
    if query.state.as_deref().and_then(state_slug).is_none() {
        return CallbackError::UnknownState.page();
    }
    let bounded = async {
        let _turn = app.callbacks.acquire().await;
        let outcome = complete(&app, &query).await;
        if let Some(slug) = query.state.as_deref().and_then(state_slug) {
            app.ctx.pools.close_idle(slug);
        }
        outcome
    };
    // The exchange itself runs on if the answer is late (its pair is stored).
    let Ok(outcome) = tokio::time::timeout(CALLBACK_WITHIN, bounded).await else {
        tracing::warn!(crm = "amocrm", within = ?CALLBACK_WITHIN, "a browser authorisation took too long to answer");
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Try again",
            "The authorisation is taking longer than expected. Check `crm-connect status` in a minute.",
        );
    };
    match outcome {
        Ok(slug) => {
            tracing::info!(tenant = slug, crm = "amocrm", "browser authorisation completed, tokens stored");
            page(
                StatusCode::OK,
                "Connected",
                &format!("AmoCRM is connected for tenant {slug}. You may close this page."),
            )
        }
        Err((slug, e)) => {
            match slug.as_deref() {
                Some(slug) => {
                    tracing::warn!(tenant = slug, crm = "amocrm", error = %e, "browser authorisation refused")
                }
                // The slug came from the request and names no tenant: not logged.
                None => tracing::warn!(crm = "amocrm", error = %e, "browser authorisation refused"),
            }
            e.page()
        }
    }
}

/// Checks and consumes the state, then the referer, then exchanges the
/// code: nothing reaches the CRM before a live state was consumed.
async fn complete(app: &AppState, query: &CallbackQuery) -> Result<String, (Option<String>, CallbackError)> {
    let unknown = || (None, CallbackError::UnknownState);
    let state = query.state.as_deref().ok_or_else(unknown)?;
    let slug = state_slug(state).ok_or_else(unknown)?;
    let tenant = (app.tenants)(slug).ok_or_else(unknown)?;
    let amo = tenant.amocrm.as_ref().ok_or_else(unknown)?;
    let slug = tenant.slug.as_str();
    let fail = |e: CallbackError| (Some(slug.to_string()), e);

    let db = app.ctx.pools.get(slug, &tenant.database_url).map_err(|e| fail(e.into()))?;
    let consumed = oauth::consume_state(&db, state).await.map_err(|e| fail(e.into()))?;
    if !consumed {
        return Err(fail(CallbackError::UnknownState));
    }
    // From here on the state is spent, whatever happens: a state that came
    // with a foreign referer may have leaked, and a new one costs one command.
    if query.error.is_some() {
        return Err(fail(CallbackError::AccessDenied));
    }
    let expected = amo.account.host().to_string();
    if !query.referer.as_deref().is_some_and(|r| referer_matches(r, &expected)) {
        return Err(fail(CallbackError::WrongReferer { expected }));
    }
    let code = query.code.as_deref().ok_or_else(|| fail(CallbackError::NoCode))?;
    if amo.long_lived_token.is_some() {
        return Err(fail(CallbackError::LongLivedToken));
    }
    let ctx = &app.ctx;
    let tokens = ctx.tokens();
    let owner = Owner::of(&tenant, amo, &db);
    let obtained = tokens.obtain(owner, Some(&Secret::new(code))).await.map_err(|e| fail(e.into()))?;
    if ctx.vault.contains(slug)
        && let Err(e) = tokens.store_registered_within(slug, STORE_PENDING_WITHIN).await
    {
        // The pair stays in memory; the daemon stores it once the database is back.
        tracing::warn!(tenant = slug, crm = "amocrm", error = %e, "exchanged tokens are not stored yet");
    }
    match obtained {
        Obtained::Exchanged => {
            // The daemon times the new pair's refresh.
            ctx.vault.exchanged(slug);
            Ok(slug.to_string())
        }
        Obtained::CodeRejected(reason) => Err(fail(CallbackError::CodeRejected(reason))),
        Obtained::CodeAlreadySent => Err(fail(CallbackError::CodeAlreadySent)),
        other => Err(fail(CallbackError::Unexpected(format!("{other:?}")))),
    }
}

/// A small self-contained HTML page; it loads nothing, so the callback URL
/// (code and state in its query) is never sent on as a Referer.
fn page(status: StatusCode, title: &str, detail: &str) -> Response {
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>crm-connect: {title}</title></head>\
         <body><h1>{title}</h1><p>{detail}</p></body></html>\n",
        title = escape(title),
        detail = escape(detail),
    );
    let mut response = (status, html).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_callback_query_keeps_the_first_of_each_key() {
        let q = CallbackQuery::parse(Some("code=a%2Bb&state=s&state=t&referer=&error=access_denied&platform=1"));
        assert_eq!(q.code.as_deref(), Some("a+b"));
        assert_eq!(q.state.as_deref(), Some("s"));
        assert_eq!(q.referer, None);
        assert_eq!(q.error.as_deref(), Some("access_denied"));
        assert!(CallbackQuery::parse(None).state.is_none());
    }

    #[test]
    fn pages_escape_their_text() {
        assert_eq!(escape("<b>\"x\" & 'y'</b>"), "&lt;b&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/b&gt;");
    }
}
