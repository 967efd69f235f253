//! `TaskFeed`: the crossbeam channel that carries deliveries from the
//! dispatcher (on whatever thread produced or acknowledged a task) to one
//! client's `getTask` stream, which runs as a future on grpcio's completion
//! queue. The future must never block, so the feed pairs the channel with an
//! `AtomicWaker`: senders wake the stream, the stream only ever `try_recv`s.

use crate::task::Task;
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use futures::task::AtomicWaker;
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// One task on its way to one client.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub task: Arc<Task>,
    /// 1 for the first delivery of this task, higher for redeliveries.
    pub attempt: u32,
}

/// Creates a feed holding at most `capacity` undelivered tasks. Its memory
/// follows what it holds, not its capacity (an idle client's feed is small
/// whatever `--max-in-flight` is).
pub fn channel(capacity: usize) -> (FeedSender, TaskFeed) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let waker = Arc::new(AtomicWaker::new());
    (
        FeedSender {
            tx: Some(tx),
            capacity: capacity.max(1),
            waker: waker.clone(),
        },
        TaskFeed { rx, waker },
    )
}

/// The dispatcher's end. Dropping it ends the client's stream (cleanly).
/// There is one sender per feed, so what it holds only shrinks between a
/// look at its length and a send.
pub struct FeedSender {
    tx: Option<Sender<Delivery>>,
    capacity: usize,
    waker: Arc<AtomicWaker>,
}

/// Why a feed did not take a delivery (which it gives back).
#[derive(Debug)]
pub enum SendError {
    /// The stream is not written as fast as tasks come: try again later.
    Full(Delivery),
    /// The stream is gone.
    Closed(Delivery),
}

impl SendError {
    pub fn into_delivery(self) -> Delivery {
        match self {
            SendError::Full(d) | SendError::Closed(d) => d,
        }
    }
}

impl FeedSender {
    /// Queues a delivery without blocking; gives it back if the feed is full or closed.
    pub fn send(&self, d: Delivery) -> Result<(), SendError> {
        let tx = self.tx.as_ref().expect("sender is only taken in drop");
        if tx.len() >= self.capacity {
            return Err(SendError::Full(d));
        }
        let res = tx.send(d).map_err(|e| SendError::Closed(e.into_inner()));
        self.waker.wake();
        res
    }
}

impl FeedSender {
    /// Whether a delivery sent now would be refused as [`SendError::Full`]
    /// (only the dispatcher sends, so this holds until it sends).
    pub fn is_full(&self) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.len() >= self.capacity)
    }
}

impl Drop for FeedSender {
    fn drop(&mut self) {
        // Disconnect first, then wake, so that the stream sees the end.
        drop(self.tx.take());
        self.waker.wake();
    }
}

/// The stream's end: yields deliveries, ends when the dispatcher drops the sender.
pub struct TaskFeed {
    rx: Receiver<Delivery>,
    waker: Arc<AtomicWaker>,
}

impl TaskFeed {
    /// The next delivery if one is already queued (for batching writes).
    pub fn try_next(&self) -> Option<Delivery> {
        self.rx.try_recv().ok()
    }
}

impl Stream for TaskFeed {
    type Item = Delivery;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Delivery>> {
        // Register before looking, so that a send between the two is not missed.
        self.waker.register(cx.waker());
        match self.rx.try_recv() {
            Ok(d) => Poll::Ready(Some(d)),
            Err(TryRecvError::Empty) => Poll::Pending,
            Err(TryRecvError::Disconnected) => Poll::Ready(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::time::SystemTime;

    fn delivery(id: u64) -> Delivery {
        let task = Task {
            id,
            text: format!("t{id}"),
            target: None,
            key: None,
            any_of: None,
            produced_at: SystemTime::now(),
        };
        Delivery {
            task: Arc::new(task),
            attempt: 1,
        }
    }

    #[test]
    fn a_blocked_stream_is_woken_by_a_send_from_another_thread_and_ends_on_drop() {
        let (tx, mut feed) = channel(4);
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            tx.send(delivery(1)).unwrap();
            tx.send(delivery(2)).unwrap();
            // dropped here: the stream must end after the two deliveries
        });
        let got: Vec<u64> = futures::executor::block_on(async {
            let mut ids = vec![];
            while let Some(d) = feed.next().await {
                ids.push(d.task.id);
            }
            ids
        });
        t.join().unwrap();
        assert_eq!(got, vec![1, 2]);
    }

    #[test]
    fn a_full_feed_gives_the_delivery_back() {
        let (tx, feed) = channel(1);
        tx.send(delivery(1)).unwrap();
        assert!(matches!(tx.send(delivery(2)), Err(SendError::Full(d)) if d.task.id == 2));
        assert_eq!(feed.try_next().unwrap().task.id, 1);
        assert!(feed.try_next().is_none());
        drop(feed);
        assert!(matches!(tx.send(delivery(3)), Err(SendError::Closed(d)) if d.task.id == 3));
    }
}
