//! The stream watchdog: the response stream tonic sends from, and the idle check that
//! gives up on a client that reads nothing for `--stream-idle-timeout`.
//!
//! A Generate stream's producer waits on a bounded channel, so memory per stream is bounded
//! whatever the client does. But a client that stops reading would hold its stream slot and
//! its chunks forever. The watchdog notices when a message has been waiting in a full
//! channel with nothing taken for the idle limit. The transport takes a message only when the
//! client's HTTP/2 flow-control window has room for it, so takes follow what the client
//! consumes, a window behind: a slow but steady reader keeps taking
//! (tests/integration/abuse.rs). An idle stream's producer is then dropped (freeing its
//! workers, chunks and slot), the queued messages are dropped, and the stream ends with
//! DEADLINE_EXCEEDED whenever the transport next asks for a message: never with OK, so a
//! client cannot mistake a cut stream for a complete one.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tonic::Status;

use super::metrics::Metrics;
use crate::proto::{GenerateResponse, generate_response::Item};

type Message = Result<GenerateResponse, Status>;

/// The state shared by a stream and its watchdog.
pub struct Watch {
    state: Mutex<State>,
    /// Messages taken by the transport so far.
    taken: AtomicU64,
    /// Chunk bytes taken by the transport so far.
    sent: AtomicU64,
    metrics: Arc<Metrics>,
}

struct State {
    receiver: Option<mpsc::Receiver<Message>>,
    /// Sent after the queued messages, in place of the end of the stream.
    failure: Option<Status>,
    waker: Option<Waker>,
}

impl Watch {
    /// A stream over `receiver` and the watch that controls it.
    pub fn new(
        receiver: mpsc::Receiver<Message>,
        metrics: Arc<Metrics>,
    ) -> (Arc<Self>, WatchedStream) {
        let watch = Arc::new(Self {
            state: Mutex::new(State {
                receiver: Some(receiver),
                failure: None,
                waker: None,
            }),
            taken: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            metrics,
        });
        let stream = WatchedStream {
            watch: Arc::clone(&watch),
            ended: false,
        };
        (watch, stream)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The lock is never held across a panic point that matters: recover the state.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Chunk bytes the transport has taken.
    pub fn sent_bytes(&self) -> u64 {
        self.sent.load(Relaxed)
    }

    /// Ends the stream with `status` once the messages already queued have been taken.
    pub fn fail_after_queued(&self, status: Status) {
        self.state().failure = Some(status);
    }

    /// Ends the stream with `status` at once: the queued messages are dropped.
    pub fn fail_now(&self, status: Status) {
        let (receiver, waker) = {
            let mut state = self.state();
            state.failure = Some(status);
            (state.receiver.take(), state.waker.take())
        };
        drop(receiver);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Completes when the client has taken nothing for `idle` while a message waited for it
    /// in a full channel (`sender`'s). Checks eight times per `idle`, so it fires between
    /// `idle` and `idle * 9 / 8` after the client's last read.
    pub async fn idle(&self, sender: &mpsc::Sender<Message>, idle: Duration) {
        let tick = (idle / 8).max(Duration::from_millis(5));
        let mut seen = self.taken.load(Relaxed);
        let mut stalled_since: Option<Instant> = None;
        loop {
            tokio::time::sleep(tick).await;
            let taken = self.taken.load(Relaxed);
            if taken != seen || sender.capacity() > 0 {
                // The client took something, or the producer is the one behind.
                seen = taken;
                stalled_since = None;
                continue;
            }
            let since = *stalled_since.get_or_insert_with(|| Instant::now() - tick);
            if since.elapsed() >= idle {
                return;
            }
        }
    }
}

/// The messages of one stream, as tonic takes them.
pub struct WatchedStream {
    watch: Arc<Watch>,
    ended: bool,
}

impl Drop for WatchedStream {
    /// The client is gone: closing the channel tells the producer at its next send.
    fn drop(&mut self) {
        let receiver = self.watch.state().receiver.take();
        drop(receiver);
    }
}

impl Stream for WatchedStream {
    type Item = Message;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        if self.ended {
            return Poll::Ready(None);
        }
        let watch = Arc::clone(&self.watch);
        let mut state = watch.state();
        if let Some(receiver) = state.receiver.as_mut() {
            match receiver.poll_recv(cx) {
                Poll::Ready(Some(message)) => {
                    watch.taken.fetch_add(1, Relaxed);
                    if let Ok(GenerateResponse {
                        item: Some(Item::Chunk(chunk)),
                    }) = &message
                    {
                        let bytes = chunk.data.len() as u64;
                        watch.sent.fetch_add(bytes, Relaxed);
                        watch.metrics.bytes_sent(bytes);
                    }
                    return Poll::Ready(Some(message));
                }
                Poll::Ready(None) => state.receiver = None,
                Poll::Pending => {
                    state.waker = Some(cx.waker().clone());
                    return Poll::Pending;
                }
            }
        }
        let failure = state.failure.take();
        drop(state);
        self.ended = true;
        Poll::Ready(failure.map(Err))
    }
}
