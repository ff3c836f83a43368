//! The listening socket: accepts connections up to `--max-connections` at once. A
//! connection beyond the limit is closed as soon as it is accepted (its client sees
//! UNAVAILABLE and can retry), so a flood of connections costs a bounded number of sockets,
//! buffers and tasks, and never the file descriptors the open connections need.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use super::metrics::Metrics;

/// File descriptors kept free for everything but connections (logs, metrics, the pool).
const RESERVED_FDS: u64 = 64;

/// The connection limit that fits this process: `wanted`, lowered (with a warning) when
/// the open-files limit would run out first.
pub fn connection_limit(wanted: usize) -> usize {
    match open_files_limit() {
        Some(limit) if (wanted as u64).saturating_add(RESERVED_FDS) > limit => {
            let fitting = limit.saturating_sub(RESERVED_FDS).max(1) as usize;
            tracing::warn!(
                wanted,
                fitting,
                open_files_limit = limit,
                "--max-connections exceeds what the open-files limit (ulimit -n) allows: lowered"
            );
            fitting
        }
        _ => wanted,
    }
}

/// The soft RLIMIT_NOFILE, from /proc/self/limits (Linux).
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Accepted connections, at most `limit` open at once.
pub struct Incoming {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    limit: usize,
    metrics: Arc<Metrics>,
    /// After an accept error such as EMFILE: wait before accepting again.
    backoff: Option<Pin<Box<Sleep>>>,
    last_warning: Option<Instant>,
}

impl Incoming {
    pub fn new(listener: TcpListener, limit: usize, metrics: Arc<Metrics>) -> Self {
        metrics.set_connection_limit(limit);
        Self {
            listener,
            slots: Arc::new(Semaphore::new(limit)),
            limit,
            metrics,
            backoff: None,
            last_warning: None,
        }
    }

    /// Logs at most one warning every 10 s: a flood must not flood the log too.
    fn warn(&mut self, message: &str, error: Option<&io::Error>) {
        let now = Instant::now();
        if self
            .last_warning
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(10))
        {
            self.last_warning = Some(now);
            match error {
                Some(error) => tracing::warn!(%error, limit = self.limit, "{message}"),
                None => tracing::warn!(limit = self.limit, "{message}"),
            }
        }
    }
}

impl Stream for Incoming {
    type Item = io::Result<Connection>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(backoff) = self.backoff.as_mut() {
                ready!(backoff.as_mut().poll(cx));
                self.backoff = None;
            }
            match ready!(self.listener.poll_accept(cx)) {
                Ok((stream, _peer)) => match Arc::clone(&self.slots).try_acquire_owned() {
                    Ok(slot) => {
                        let _ = stream.set_nodelay(true);
                        self.metrics.connection_opened();
                        return Poll::Ready(Some(Ok(Connection {
                            stream,
                            _slot: slot,
                            metrics: Arc::clone(&self.metrics),
                            linger: None,
                        })));
                    }
                    Err(_) => {
                        self.metrics.connection_rejected();
                        self.warn(
                            "connection limit reached: closing new connections (--max-connections)",
                            None,
                        );
                        drop(stream);
                    }
                },
                Err(error) => {
                    // Per-connection failures: just go on. Others (EMFILE, ENOBUFS): wait a
                    // little instead of spinning on an error that is still there.
                    if !matches!(
                        error.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::Interrupted
                    ) {
                        self.warn("accept failed; retrying in 100 ms", Some(&error));
                        self.backoff =
                            Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
                    }
                }
            }
        }
    }
}

/// How long a closing connection waits for its client to close too (see
/// [`Connection::poll_shutdown`]).
const LINGER: Duration = Duration::from_secs(2);

/// An accepted connection; holds its slot until it is dropped.
pub struct Connection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
    /// Set once the write side is shut: until when the read side is drained.
    linger: Option<Pin<Box<Sleep>>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.metrics.connection_closed();
    }
}

impl Connected for Connection {
    // The same as a plain TcpStream's, so that `Request::remote_addr` keeps working.
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    /// Sends FIN, then reads and discards until the client closes too, for up to [`LINGER`]
    /// (a lingering close). Closing the socket at once would leave the client's last frames
    /// (window updates, pings) unread, and the kernel answers those with a reset, which can
    /// make the client drop the end of a stream it has not read yet, e.g. while draining
    /// after SIGTERM.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
            this.linger = Some(Box::pin(tokio::time::sleep(LINGER)));
        }
        let mut discard = [0u8; 4096];
        loop {
            if let Some(deadline) = this.linger.as_mut()
                && deadline.as_mut().poll(cx).is_ready()
            {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut discard);
            match ready!(Pin::new(&mut this.stream).poll_read(cx, &mut buf)) {
                Ok(()) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Ok(()) => continue,
                // The client is gone: nothing left to protect.
                Err(_) => return Poll::Ready(Ok(())),
            }
        }
    }
}
