//! A TCP proxy on loopback in front of a server, which a test can turn into
//! a black hole: every connection stays open but nothing more is forwarded,
//! and new connections are accepted but never answered — a network
//! partition as a client sees it (no reset, no end of stream: it waits).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};

pub struct Proxy {
    port: u16,
    holed: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Forwards 127.0.0.1:(a free port) to `upstream` until dropped.
    pub async fn start(upstream: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("the proxy binds a loopback port");
        let port = listener.local_addr().unwrap().port();
        let holed = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(accept(listener, upstream, Arc::clone(&holed)));
        Proxy { port, holed, task }
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
        self.holed.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // The accept task owns every connection's task: all of them end.
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, holed: Arc<AtomicBool>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        let holed = Arc::clone(&holed);
        connections.spawn(async move {
            if holed.load(Ordering::SeqCst) {
                let _kept_open = client;
                return std::future::pending().await;
            }
            let Ok(server) = TcpStream::connect(upstream).await else { return };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::join!(pump(client_read, server_write, Arc::clone(&holed)), pump(server_read, client_write, holed));
        });
        // Reap finished connections so that the set does not grow.
        while connections.try_join_next().is_some() {}
    }
}

async fn pump(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, holed: Arc<AtomicBool>) {
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if holed.load(Ordering::SeqCst) {
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
