//! The socket under a database connection, opened as tokio-postgres opens
//! its own (TCP with `TCP_NODELAY` and the URL's keepalives, or a Unix
//! socket), but whose shutdown waits for the server to close its end.
//!
//! A server frees a connection's slot, and drops it from
//! `pg_stat_activity`, only as its backend exits — after our end closed.
//! The budget's permit is released when the connection's task ends; were
//! that the moment we close, a new connection could overlap the old one on
//! the server for a few milliseconds, and the server would see one more
//! connection of ours than the budget allows.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Sleep;
use tokio_postgres::Config;
use tokio_postgres::config::{Host, LoadBalanceHosts, TargetSessionAttrs};

/// How long a closing connection waits for the server's end to close.
const CLOSE_WAIT: Duration = Duration::from_secs(5);

/// Where one connection goes: the URL's only host (or address).
pub(crate) struct Target {
    host: Host,
    /// The name TLS checks (a TCP host's name, or the address alone).
    pub(crate) tls_name: Option<String>,
    port: u16,
}

impl Target {
    /// The URL's target when it names exactly one host and nothing that
    /// tokio-postgres decides while connecting (a choice among hosts, a
    /// read-write check); otherwise `None`, and tokio-postgres connects.
    pub(crate) fn of(config: &Config) -> Option<Target> {
        let (hosts, addrs) = (config.get_hosts(), config.get_hostaddrs());
        if hosts.len().max(addrs.len()) != 1
            || config.get_ports().len() > 1
            || config.get_target_session_attrs() != TargetSessionAttrs::Any
            || config.get_load_balance_hosts() != LoadBalanceHosts::Disable
        {
            return None;
        }
        let port = config.get_ports().first().copied().unwrap_or(5432);
        // libpq checks an address alone against the certificate's IP
        // addresses.
        let tls_name = match (hosts.first(), addrs.first()) {
            (Some(Host::Tcp(name)), _) => Some(name.clone()),
            (_, Some(addr)) => Some(addr.to_string()),
            _ => None,
        };
        let host = match (addrs.first(), hosts.first()) {
            (Some(addr), _) => Host::Tcp(addr.to_string()),
            (None, Some(host)) => host.clone(),
            (None, None) => return None,
        };
        Some(Target { host, tls_name, port })
    }

    pub(crate) async fn open(&self, config: &Config) -> io::Result<Socket> {
        let connect = self.connect(config);
        match config.get_connect_timeout() {
            Some(limit) => tokio::time::timeout(*limit, connect)
                .await
                .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "connection timed out"))),
            None => connect.await,
        }
    }

    async fn connect(&self, config: &Config) -> io::Result<Socket> {
        let stream = match &self.host {
            Host::Tcp(host) => {
                // Every address the name resolves to, in turn.
                let stream = TcpStream::connect((host.as_str(), self.port)).await?;
                stream.set_nodelay(true)?;
                let socket = SockRef::from(&stream);
                if let Some(timeout) = config.get_tcp_user_timeout() {
                    socket.set_tcp_user_timeout(Some(*timeout))?;
                }
                if config.get_keepalives() {
                    let mut keepalive = TcpKeepalive::new().with_time(config.get_keepalives_idle());
                    if let Some(interval) = config.get_keepalives_interval() {
                        keepalive = keepalive.with_interval(interval);
                    }
                    if let Some(retries) = config.get_keepalives_retries() {
                        keepalive = keepalive.with_retries(retries);
                    }
                    socket.set_tcp_keepalive(&keepalive)?;
                }
                Stream::Tcp(stream)
            }
            Host::Unix(dir) => Stream::Unix(UnixStream::connect(dir.join(format!(".s.PGSQL.{}", self.port))).await?),
        };
        Ok(Socket { stream, shut: false, closing: None })
    }
}

enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

pub(crate) struct Socket {
    stream: Stream,
    /// Our end is shut down for writing.
    shut: bool,
    /// The wait for the server's end gives up then.
    closing: Option<Pin<Box<Sleep>>>,
}

impl Socket {
    fn read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.stream {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.get_mut().read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.stream {
            Stream::Tcp(s) => s.is_write_vectored(),
            Stream::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().stream {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    /// Shuts our end, then reads (and drops) whatever still comes until
    /// the server closes its end, an error, or [`CLOSE_WAIT`].
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.shut {
            let shut = match &mut this.stream {
                Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
                Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            };
            if ready!(shut).is_err() {
                return Poll::Ready(Ok(()));
            }
            this.shut = true;
        }
        let mut scratch = [0u8; 512];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            match this.read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    let deadline = this.closing.get_or_insert_with(|| Box::pin(tokio::time::sleep(CLOSE_WAIT)));
                    return match deadline.as_mut().poll(cx) {
                        Poll::Ready(()) => Poll::Ready(Ok(())),
                        Poll::Pending => Poll::Pending,
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn closing_waits_for_the_server_to_close_its_end() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let closed = Arc::new(AtomicBool::new(false));
        let server = {
            let closed = closed.clone();
            tokio::spawn(async move {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut buf = [0; 64];
                // Our shutdown arrives as the end of what we send; a server
                // whose backend is still exiting takes its time, and may
                // still send something.
                while stream.read(&mut buf).await.unwrap() > 0 {}
                tokio::time::sleep(Duration::from_millis(50)).await;
                stream.write_all(b"last words").await.unwrap();
                closed.store(true, Ordering::SeqCst);
            })
        };
        let config: Config = format!("host=127.0.0.1 port={port} user=u").parse().unwrap();
        let mut socket = Target::of(&config).expect("one host").open(&config).await.unwrap();
        socket.write_all(b"X").await.unwrap();
        socket.shutdown().await.unwrap();
        assert!(closed.load(Ordering::SeqCst), "the shutdown returned before the server closed its end");
        server.await.unwrap();
    }

    #[test]
    fn several_hosts_or_a_read_write_check_are_left_to_tokio_postgres() {
        let target = |url: &str| Target::of(&url.parse::<Config>().unwrap()).map(|t| t.tls_name);
        assert_eq!(target("host=db.example port=5433"), Some(Some("db.example".into())));
        assert_eq!(target("hostaddr=10.0.0.1"), Some(Some("10.0.0.1".into())));
        assert_eq!(target("host=/run/postgresql"), Some(None));
        assert_eq!(target("host=a,b"), None);
        assert_eq!(target("host=a target_session_attrs=read-write"), None);
    }
}
