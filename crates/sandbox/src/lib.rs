//! In-process emulators of the CRM APIs ("sandboxes") for tests and the demo,
//! and the HTTP plumbing they share: a loopback server whose connections can
//! be dropped or throttled on purpose, and the pipeline in front of each
//! CRM's handler (request log, injected faults, rate limit).

pub mod amocrm;
pub mod bitrix24;
pub mod faults;
pub mod files;
pub mod hook;
pub mod playground;
pub mod postgres;
pub mod recorder;
pub mod tenant_file;

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::serve::{IncomingStream, Listener};
use chrono::{DateTime, Utc};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use faults::{Fault, Faults, RecordedRequest, RequestLog, TOO_MANY_REQUESTS_PAGE};

/// Request bodies above this are refused; no CRM call comes near it.
const BODY_LIMIT: usize = 4 * 1024 * 1024;

/// A sandbox's state stays usable after a panicking test thread poisoned it.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A CRM's own answer to a request that got past faults and the rate limit.
/// Synchronous, so no lock is ever held across an await.
pub(crate) type Handler = dyn Fn(&RecordedRequest) -> Response + Send + Sync;

/// A listener's answer ahead of the rate limit (a redirect, say), or `None`
/// to let the request through to the limit and the handler.
pub(crate) type Gate = dyn Fn(&RecordedRequest) -> Option<Response> + Send + Sync;

/// A sandbox's own time: the real clock moved on by `advance_clock`. Its
/// state and the `Date` header of its answers read the same one, so a client
/// that takes server time from the header sees the jumps a test makes.
#[derive(Debug, Default)]
pub(crate) struct Clock {
    offset: Mutex<Duration>,
}

impl Clock {
    /// Time since the Unix epoch on this clock.
    pub(crate) fn since_epoch(&self) -> Duration {
        let real = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        real.saturating_add(*lock(&self.offset))
    }

    pub(crate) fn advance(&self, by: Duration) {
        let mut offset = lock(&self.offset);
        *offset = offset.saturating_add(by);
    }

    /// `Sun, 06 Nov 1994 08:49:37 GMT`: RFC 7231's IMF-fixdate, to the second.
    fn http_date(&self) -> String {
        let secs = i64::try_from(self.since_epoch().as_secs()).unwrap_or(i64::MAX);
        let moment: DateTime<Utc> = DateTime::from_timestamp(secs, 0).unwrap_or_default();
        moment.format("%a, %d %b %Y %H:%M:%S GMT").to_string()
    }
}

/// A response with a body and, unless empty, a content type.
pub(crate) fn respond(status: u16, content_type: &str, body: impl Into<Body>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, body.into()).into_response();
    if let Ok(value) = HeaderValue::from_str(content_type)
        && !content_type.is_empty()
    {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

/// How a sandbox meters the requests that got past the injected faults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Limit {
    /// At most `per_sec` requests over any sliding second; 0 is no limit.
    Window { per_sec: u32 },
    /// A bucket holding up to `capacity` requests that empties at
    /// `drain_per_sec`; a capacity of 0 is no limit.
    LeakyBucket { capacity: u32, drain_per_sec: f64 },
}

/// A limit with what it remembers between requests.
#[derive(Debug)]
enum Meter {
    Window { per_sec: u32, admitted: VecDeque<Instant> },
    Bucket { capacity: u32, drain_per_sec: f64, level: f64, at: Instant },
}

impl Meter {
    fn new(limit: Limit) -> Meter {
        match limit {
            Limit::Window { per_sec } => Meter::Window { per_sec, admitted: VecDeque::new() },
            Limit::LeakyBucket { capacity, drain_per_sec } => {
                // A nonsensical rate (negative, NaN) never drains rather than misbehaving.
                let drain_per_sec = if drain_per_sec.is_finite() { drain_per_sec.max(0.0) } else { 0.0 };
                Meter::Bucket { capacity, drain_per_sec, level: 0.0, at: Instant::now() }
            }
        }
    }

    fn admit(&mut self, now: Instant) -> bool {
        match self {
            Meter::Window { per_sec: 0, .. } | Meter::Bucket { capacity: 0, .. } => true,
            Meter::Window { per_sec, admitted } => {
                while admitted.front().is_some_and(|first| now.duration_since(*first) >= Duration::from_secs(1)) {
                    admitted.pop_front();
                }
                let room = admitted.len() < *per_sec as usize;
                if room {
                    admitted.push_back(now);
                }
                room
            }
            Meter::Bucket { capacity, drain_per_sec, level, at } => {
                *level = (*level - now.duration_since(*at).as_secs_f64() * *drain_per_sec).max(0.0);
                *at = now;
                let room = *level + 1.0 <= f64::from(*capacity);
                if room {
                    *level += 1.0;
                }
                room
            }
        }
    }
}

/// Applies a `Limit` in real time. A refused request is counted as a
/// violation and occupies nothing, so a client that backs off recovers.
#[derive(Debug)]
struct RateLimit {
    meter: Mutex<Meter>,
    violations: AtomicUsize,
}

impl RateLimit {
    fn new(limit: Limit) -> RateLimit {
        RateLimit { meter: Mutex::new(Meter::new(limit)), violations: AtomicUsize::new(0) }
    }

    fn admit(&self) -> bool {
        let admitted = lock(&self.meter).admit(Instant::now());
        if !admitted {
            self.violations.fetch_add(1, Ordering::Relaxed);
        }
        admitted
    }
}

/// What stands between the network and a CRM handler.
#[derive(Debug)]
pub(crate) struct Front {
    pub(crate) faults: Faults,
    pub(crate) log: RequestLog,
    rate: RateLimit,
    /// The CRM's answer to a request over its limit.
    refusal: fn() -> Response,
    /// How long every answered request waits before its answer goes out,
    /// as a CRM across a network would take; zero answers at once.
    latency: Duration,
    /// Where the `Date` header of every answer comes from; without one the
    /// HTTP server writes the real time.
    clock: Option<Arc<Clock>>,
}

impl Front {
    /// A sliding-window limit refused with an HTML 429; `rate_limit_per_sec`
    /// 0 turns the limit off.
    pub(crate) fn new(rate_limit_per_sec: u32) -> Front {
        Front::limited(Limit::Window { per_sec: rate_limit_per_sec }, too_many_requests)
    }

    pub(crate) fn limited(limit: Limit, refusal: fn() -> Response) -> Front {
        Front {
            faults: Faults::default(),
            log: RequestLog::default(),
            rate: RateLimit::new(limit),
            refusal,
            latency: Duration::ZERO,
            clock: None,
        }
    }

    /// The same front, dating every answer (faults and refusals too, as the
    /// CRM's web server does) by `clock`.
    pub(crate) fn with_clock(mut self, clock: Arc<Clock>) -> Front {
        self.clock = Some(clock);
        self
    }

    /// The same front, answering every request `latency` late (a dropped
    /// connection is dropped at once).
    pub(crate) fn with_latency(mut self, latency: Duration) -> Front {
        self.latency = latency;
        self
    }

    pub(crate) fn violations(&self) -> usize {
        self.rate.violations.load(Ordering::Relaxed)
    }

    async fn answer(&self, request: Request, connection: &Connection, serving: &Serving) -> Response {
        let (mut recorded, readable) = read_request(request).await;
        let (status, mut response) = if readable {
            self.answer_readable(&recorded, connection, serving).await
        } else {
            (400, respond(400, "", Body::empty()))
        };
        if let Some(clock) = &self.clock
            && let Ok(date) = HeaderValue::from_str(&clock.http_date())
        {
            response.headers_mut().insert(header::DATE, date);
        }
        if status != 0 && !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
        recorded.status = status;
        self.log.record(recorded);
        response
    }

    /// Injected faults come first and, apart from a delay, a late answer
    /// and a drop after executing, replace the normal answer without
    /// touching the rate limit or the CRM state.
    async fn answer_readable(
        &self,
        request: &RecordedRequest,
        connection: &Connection,
        serving: &Serving,
    ) -> (u16, Response) {
        match self.faults.take(&request.method, &request.path) {
            None => self.admit_then(request, serving),
            Some(Fault::Delay(pause)) => {
                tokio::time::sleep(pause).await;
                self.admit_then(request, serving)
            }
            Some(Fault::LateAnswer(hold)) => {
                let answered = self.admit_then(request, serving);
                tokio::time::sleep(hold).await;
                answered
            }
            Some(Fault::Status { status, content_type, body }) => (status, respond(status, content_type, body)),
            Some(Fault::TruncatedBody) => (200, respond(200, "application/json", Fault::truncated_body())),
            Some(Fault::DropConnection) => {
                connection.drop_now();
                (0, respond(500, "", Body::empty()))
            }
            Some(Fault::DropAfterExecuting) => {
                // The work is done (or refused by the limit) before the
                // connection goes: what the CRM decided stands, unseen.
                let _executed = self.admit_then(request, serving);
                connection.drop_now();
                (0, respond(500, "", Body::empty()))
            }
            Some(Fault::HugeBody(len)) => {
                // A body of unknown length goes out chunked, without a
                // Content-Length: the client has to count while it reads.
                let body = Body::from_stream(Body::from(Fault::huge_body(len)).into_data_stream());
                (200, respond(200, "application/json", body))
            }
            Some(Fault::SlowDrip { chunk_every }) => {
                let (status, mut response) = self.admit_then(request, serving);
                connection.drip(chunk_every);
                // The connection dribbles from now on: no later answer may use it.
                response.headers_mut().insert(header::CONNECTION, HeaderValue::from_static("close"));
                (status, response)
            }
        }
    }

    /// A listener's gate answers before the rate limit, as a front server
    /// would, so its answers cost the client nothing.
    fn admit_then(&self, request: &RecordedRequest, serving: &Serving) -> (u16, Response) {
        let gated = serving.gate.as_ref().and_then(|gate| gate(request));
        let response = match gated {
            Some(response) => response,
            None if self.rate.admit() => (serving.handler)(request),
            None => (self.refusal)(),
        };
        (response.status().as_u16(), response)
    }
}

fn too_many_requests() -> Response {
    respond(429, "text/html", TOO_MANY_REQUESTS_PAGE)
}

/// The request in loggable form, and whether its body could be read.
async fn read_request(request: Request) -> (RecordedRequest, bool) {
    let at = Instant::now();
    let (parts, body) = request.into_parts();
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
        .collect();
    let body = to_bytes(body, BODY_LIMIT).await;
    let readable = body.is_ok();
    let recorded = RecordedRequest {
        method: parts.method.as_str().to_owned(),
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers,
        body: body.map(|bytes| String::from_utf8_lossy(&bytes).into_owned()).unwrap_or_default(),
        status: 0,
        at,
    };
    (recorded, readable)
}

/// How many bytes a dripping connection writes at a time.
const DRIP_BYTES: usize = 8;

/// One accepted connection's kill switch and throttle, shared by its
/// stream and the requests it carries.
#[derive(Clone, Debug, Default)]
struct Connection {
    dropped: Arc<AtomicBool>,
    /// While non-zero, writes leave `DRIP_BYTES` at a time, this many
    /// microseconds apart.
    drip_micros: Arc<AtomicU64>,
}

impl Connection {
    /// From now on the stream reads end-of-file and refuses writes, so the
    /// server closes it without sending what the handler answered.
    fn drop_now(&self) {
        self.dropped.store(true, Ordering::SeqCst);
    }

    fn is_dropped(&self) -> bool {
        self.dropped.load(Ordering::SeqCst)
    }

    /// From now on the stream writes a few bytes at a time, `every` apart.
    fn drip(&self, every: Duration) {
        let micros = u64::try_from(every.as_micros()).unwrap_or(u64::MAX).max(1);
        self.drip_micros.store(micros, Ordering::SeqCst);
    }

    fn drip_every(&self) -> Option<Duration> {
        match self.drip_micros.load(Ordering::SeqCst) {
            0 => None,
            micros => Some(Duration::from_micros(micros)),
        }
    }
}

impl Connected<IncomingStream<'_, DroppableListener>> for Connection {
    fn connect_info(stream: IncomingStream<'_, DroppableListener>) -> Self {
        stream.io().connection.clone()
    }
}

struct DroppableStream {
    inner: TcpStream,
    connection: Connection,
    /// While dripping: when the next bytes may go.
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl DroppableStream {
    fn poll_write_dripping(&mut self, cx: &mut Context<'_>, buf: &[u8], every: Duration) -> Poll<io::Result<usize>> {
        match self.pause.as_mut() {
            Some(pause) => std::task::ready!(pause.as_mut().poll(cx)),
            // Tiny writes must leave at once, not wait for acknowledgements.
            None => {
                let _ = self.inner.set_nodelay(true);
            }
        }
        let some = &buf[..buf.len().min(DRIP_BYTES)];
        let written = std::task::ready!(Pin::new(&mut self.inner).poll_write(cx, some))?;
        self.pause = Some(Box::pin(tokio::time::sleep(every)));
        Poll::Ready(Ok(written))
    }
}

fn aborted() -> io::Error {
    io::Error::from(io::ErrorKind::ConnectionAborted)
}

impl AsyncRead for DroppableStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.connection.is_dropped() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for DroppableStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.connection.is_dropped() {
            return Poll::Ready(Err(aborted()));
        }
        if let Some(every) = this.connection.drip_every() {
            return this.poll_write_dripping(cx, buf, every);
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.connection.is_dropped() {
            return Poll::Ready(Err(aborted()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

struct DroppableListener {
    inner: TcpListener,
}

impl Listener for DroppableListener {
    type Io = DroppableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((inner, peer)) => {
                    let stream = DroppableStream { inner, connection: Connection::default(), pause: None };
                    return (stream, peer);
                }
                // Out of file descriptors and the like: give the system a moment.
                Err(error) => {
                    tracing::warn!(%error, "sandbox accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// A loopback port reserved before serving, so a sandbox can put its own
/// absolute URL into the state its handler answers from.
pub(crate) struct Bound {
    listener: TcpListener,
    base_url: String,
}

impl Bound {
    pub(crate) async fn loopback() -> io::Result<Bound> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let base_url = format!("http://{}", listener.local_addr()?);
        Ok(Bound { listener, base_url })
    }

    pub(crate) fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Serves every path through `front` and then `handler` until the
    /// returned `Server` is dropped.
    pub(crate) fn serve(self, front: Arc<Front>, handler: Arc<Handler>) -> Server {
        self.serve_gated(front, None, handler)
    }

    /// Like `serve`, with `gate` between the injected faults and the rate
    /// limit. Listeners sharing a `Front` share its log, faults and limit.
    pub(crate) fn serve_gated(self, front: Arc<Front>, gate: Option<Arc<Gate>>, handler: Arc<Handler>) -> Server {
        let (stop, stopped) = oneshot::channel::<()>();
        let app = Router::new()
            .fallback(entry)
            .with_state(App { front, serving: Arc::new(Serving { gate, handler }) })
            .into_make_service_with_connect_info::<Connection>();
        let listener = DroppableListener { inner: self.listener };
        tokio::spawn(async move {
            let shutdown = async {
                // A dropped sender means the sandbox is gone: stop as well.
                let _ = stopped.await;
            };
            if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
                tracing::warn!(%error, "sandbox server stopped");
            }
        });
        Server { _stop: stop }
    }
}

#[derive(Clone)]
struct App {
    front: Arc<Front>,
    serving: Arc<Serving>,
}

/// What one listener answers with once faults are out of the way.
struct Serving {
    gate: Option<Arc<Gate>>,
    handler: Arc<Handler>,
}

async fn entry(State(app): State<App>, ConnectInfo(connection): ConnectInfo<Connection>, request: Request) -> Response {
    app.front.answer(request, &connection, &app.serving).await
}

/// A running sandbox server; dropping it shuts the server down.
pub(crate) struct Server {
    _stop: oneshot::Sender<()>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn latency_delays_every_answer_and_zero_delays_none() {
        let latency = Duration::from_millis(120);
        let handler: Arc<Handler> = Arc::new(|_: &RecordedRequest| respond(200, "text/plain", "ok"));
        for (front, expected) in [(Front::new(0).with_latency(latency), latency), (Front::new(0), Duration::ZERO)] {
            let bound = Bound::loopback().await.expect("a loopback port");
            let url = format!("{}/any", bound.base_url());
            let front = Arc::new(front);
            let _server = bound.serve(Arc::clone(&front), Arc::clone(&handler));
            let client = reqwest::Client::new();
            for _ in 0..2 {
                let started = Instant::now();
                let status = client.get(&url).send().await.expect("an answer").status();
                let elapsed = started.elapsed();
                assert_eq!(status, 200);
                assert!(elapsed >= expected, "answered after {elapsed:?}, expected at least {expected:?}");
                if expected.is_zero() {
                    assert!(elapsed < latency, "answered after {elapsed:?} without latency");
                }
            }
            assert_eq!(front.log.records().len(), 2);
        }
    }
}
