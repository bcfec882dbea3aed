//! A TCP proxy on loopback in front of a server, which a test can turn into
//! a black hole — every connection stays open but nothing more is
//! forwarded, and new connections are accepted but never answered: a
//! network partition as a client sees it (no reset, no end of stream: it
//! waits) — or take down: every connection is closed and new ones are
//! closed at once, as when the server is stopped, until it is up again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};

const FORWARDING: u8 = 0;
const HOLED: u8 = 1;
const DOWN: u8 = 2;

#[derive(Default)]
struct State {
    mode: AtomicU8,
    /// Told when the mode changes, so that open connections see it.
    changed: Notify,
    /// Connections closed at once because the server was down.
    refused: AtomicUsize,
}

impl State {
    fn mode(&self) -> u8 {
        self.mode.load(Ordering::SeqCst)
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}

pub struct Proxy {
    port: u16,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Forwards 127.0.0.1:(a free port) to `upstream` until dropped.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("the proxy binds a loopback port");
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(State::default());
        let task = tokio::spawn(accept(listener, upstream, Arc::clone(&state)));
        Proxy { port, state, task }
    }

    /// In front of the PostgreSQL server of `url` (`postgresql://…@127.0.0.1:PORT/…`).
    pub async fn in_front_of(url: &str) -> Proxy {
        let parsed = url::Url::parse(url).expect("a database URL");
        let upstream = SocketAddr::from(([127, 0, 0, 1], parsed.port().expect("a port in the database URL")));
        Proxy::start(upstream).await
    }

    /// `url` with its port replaced by the proxy's.
    pub fn url_for(&self, url: &str) -> String {
        let mut parsed = url::Url::parse(url).expect("a database URL");
        parsed.set_port(Some(self.port)).expect("the URL takes a port");
        parsed.to_string()
    }

    /// From now on nothing passes, in either direction, on any connection.
    pub fn black_hole(&self) {
        self.state.set(HOLED);
    }

    /// The server is down: every open connection is closed, and each new
    /// one is closed as soon as it is accepted.
    pub fn down(&self) {
        self.state.set(DOWN);
    }

    /// Forwards new connections again.
    pub fn up(&self) {
        self.state.set(FORWARDING);
    }

    /// Waits until `n` connections in all were closed at once while down.
    pub async fn refused_at_least(&self, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.state.refused.load(Ordering::SeqCst) < n {
            assert!(tokio::time::Instant::now() < deadline, "no client tried to connect while the server was down");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The accept task owns every connection's task: all of them end.
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, state: Arc<State>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        let state = Arc::clone(&state);
        connections.spawn(async move {
            match state.mode() {
                HOLED => {
                    let _kept_open = client;
                    return std::future::pending().await;
                }
                DOWN => {
                    state.refused.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                _ => {}
            }
            let Ok(server) = TcpStream::connect(upstream).await else { return };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::select! {
                _ = async {
                    tokio::join!(
                        pump(client_read, server_write, Arc::clone(&state)),
                        pump(server_read, client_write, Arc::clone(&state))
                    )
                } => {}
                // Both halves of both sides are dropped: closed.
                _ = went_down(&state) => {}
            }
        });
        // Reap finished connections so that the set does not grow.
        while connections.try_join_next().is_some() {}
    }
}

async fn went_down(state: &State) {
    loop {
        let changed = state.changed.notified();
        if state.mode() == DOWN {
            return;
        }
        changed.await;
    }
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, state: Arc<State>) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if state.mode() == HOLED {
            // Both halves stay open: the peer neither gets an answer nor
            // learns that none is coming.
            let _kept_open = (from, to);
            return std::future::pending().await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
