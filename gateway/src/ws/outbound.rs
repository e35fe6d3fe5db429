//! A socket's outbound queue, bounded in bytes as well as in frames: whatever a
//! socket is sent (live ops, catch-up, snapshots, answers) waits here until the
//! session writes it, and never more than `max_outbound_bytes` of it. Live frames
//! and answers never wait for room: a socket whose queue is full is a slow consumer
//! (closed 4001, it resumes from its cursor). Catch-up waits for room instead, so a
//! reader far behind holds at most the bound, and one that stops reading is closed by
//! the session's write timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::{Notify, mpsc};

/// A frame on its way to the socket.
#[derive(Debug)]
pub enum Outbound {
    Text(String),
    /// A frame encoded once and shared by every socket it goes to (a live op of a
    /// topic: `hub::LiveOp::frame`).
    Shared(Utf8Bytes),
    /// Frames that go out together in one socket write (the answers of one
    /// sequencer batch): one queue slot, one flush.
    Texts(Vec<String>),
}

impl Outbound {
    /// Bytes this item holds.
    pub fn len(&self) -> usize {
        match self {
            Self::Text(t) => t.len(),
            Self::Shared(t) => t.len(),
            Self::Texts(ts) => ts.iter().map(String::len).sum(),
        }
    }

    pub fn into_texts(self) -> Vec<Utf8Bytes> {
        match self {
            Self::Text(t) => vec![t.into()],
            Self::Shared(t) => vec![t],
            Self::Texts(ts) => ts.into_iter().map(Utf8Bytes::from).collect(),
        }
    }
}

/// Why an item was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    /// Over the bound: the socket is a slow consumer.
    Full,
    /// The session is gone.
    Closed,
}

#[derive(Debug)]
struct Shared {
    bytes: AtomicUsize,
    room: Notify,
    max_bytes: usize,
}

/// The sending side; cloned into every follower of the socket.
#[derive(Debug, Clone)]
pub struct OutQueue {
    tx: mpsc::Sender<Outbound>,
    shared: Arc<Shared>,
}

/// The session's side.
#[derive(Debug)]
pub struct OutReceiver {
    rx: mpsc::Receiver<Outbound>,
    shared: Arc<Shared>,
}

/// A queue of at most `max_frames` items and `max_bytes` bytes (an item larger than
/// the bound still passes when the queue is empty).
pub fn channel(max_frames: usize, max_bytes: usize) -> (OutQueue, OutReceiver) {
    let (tx, rx) = mpsc::channel(max_frames);
    let shared = Arc::new(Shared {
        bytes: AtomicUsize::new(0),
        room: Notify::new(),
        max_bytes,
    });
    (
        OutQueue {
            tx,
            shared: shared.clone(),
        },
        OutReceiver { rx, shared },
    )
}

impl Shared {
    fn fits(&self, len: usize) -> bool {
        let queued = self.bytes.load(Ordering::Acquire);
        queued == 0 || queued + len <= self.max_bytes
    }
}

impl OutQueue {
    /// Queues without waiting.
    pub fn try_push(&self, item: Outbound) -> Result<(), Refused> {
        let len = item.len();
        if !self.shared.fits(len) {
            return Err(Refused::Full);
        }
        self.shared.bytes.fetch_add(len, Ordering::AcqRel);
        self.tx.try_send(item).map_err(|e| {
            self.shared.bytes.fetch_sub(len, Ordering::AcqRel);
            match e {
                mpsc::error::TrySendError::Full(_) => Refused::Full,
                mpsc::error::TrySendError::Closed(_) => Refused::Closed,
            }
        })
    }

    /// Queues once there is room (catch-up and snapshots).
    pub async fn push(&self, item: Outbound) -> Result<(), Refused> {
        let len = item.len();
        loop {
            let room = self.shared.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            if self.tx.is_closed() {
                return Err(Refused::Closed);
            }
            if self.shared.fits(len) {
                break;
            }
            room.await;
        }
        self.shared.bytes.fetch_add(len, Ordering::AcqRel);
        self.tx.send(item).await.map_err(|_| {
            self.shared.bytes.fetch_sub(len, Ordering::AcqRel);
            Refused::Closed
        })
    }

    pub fn downgrade(&self) -> WeakOutQueue {
        WeakOutQueue {
            tx: self.tx.downgrade(),
        }
    }
}

/// A handle that does not keep the queue open.
pub struct WeakOutQueue {
    tx: mpsc::WeakSender<Outbound>,
}

impl WeakOutQueue {
    /// Frames waiting, while the queue exists.
    pub fn frames(&self) -> Option<usize> {
        self.tx
            .upgrade()
            .map(|tx| tx.max_capacity() - tx.capacity())
    }
}

impl OutReceiver {
    pub async fn recv(&mut self) -> Option<Outbound> {
        self.rx.recv().await
    }

    pub fn try_recv(&mut self) -> Option<Outbound> {
        self.rx.try_recv().ok()
    }

    /// `len` bytes have left (were written, or dropped): room for more.
    pub fn done(&self, len: usize) {
        self.shared.bytes.fetch_sub(len, Ordering::AcqRel);
        self.shared.room.notify_waiters();
    }

    /// Stops every waiting `push` (the session is closing).
    pub fn close(&mut self) {
        self.rx.close();
        self.shared.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_in_bytes_live_refused_catch_up_waits() {
        let (q, mut rx) = channel(100, 10);
        q.try_push(Outbound::Text("12345678".into())).expect("fits");
        assert_eq!(q.try_push(Outbound::Text("123".into())), Err(Refused::Full));
        let waiting = tokio::spawn({
            let q = q.clone();
            async move { q.push(Outbound::Text("123".into())).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        let item = rx.recv().await.expect("item");
        rx.done(item.len());
        waiting
            .await
            .expect("join")
            .expect("pushed after room was made");
        let item = rx.recv().await.expect("item");
        rx.done(item.len());
        // An item above the bound still passes into an empty queue.
        q.try_push(Outbound::Text("x".repeat(50)))
            .expect("empty queue takes it");
    }

    #[tokio::test]
    async fn closing_releases_waiters() {
        let (q, mut rx) = channel(100, 4);
        q.try_push(Outbound::Text("1234".into())).expect("fits");
        let waiting = tokio::spawn({
            let q = q.clone();
            async move { q.push(Outbound::Text("1".into())).await }
        });
        tokio::task::yield_now().await;
        rx.close();
        assert_eq!(waiting.await.expect("join"), Err(Refused::Closed));
    }
}
