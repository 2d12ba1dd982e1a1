//! Typed, bounded message rings into a reactor.
//!
//! A mailbox is created on the reactor that receives: it registers an `Early` poller
//! that drains up to a batch of messages per tick into a handler, and hands out a
//! [`MailSender`] that any thread may clone and use. Messages are plain typed values
//! (request descriptors, slot indices), never boxed closures, and the ring is a
//! fixed-capacity `crossbeam_queue::ArrayQueue`, so sending allocates nothing. A full
//! ring is a status ([`MailSender::try_send`] hands the message back); a sender on a
//! reactor can [`MailSender::send`], which yields until there is room.

use std::sync::Arc;

use crossbeam_queue::ArrayQueue;

use crate::executor::yield_now;
use crate::reactor::{
    PollerId, Shared, on_reactor, register_poller_with_pending, unregister_poller, with_core,
};

/// Messages a mailbox hands to its handler per tick.
const MAILBOX_BATCH: usize = 64;

/// The sending side of a mailbox; cheap to clone, usable from any thread.
pub struct MailSender<T> {
    ring: Arc<ArrayQueue<T>>,
    target: Arc<Shared>,
}

impl<T> Clone for MailSender<T> {
    fn clone(&self) -> Self {
        MailSender { ring: self.ring.clone(), target: self.target.clone() }
    }
}

impl<T: Send> MailSender<T> {
    /// Queues `msg`, or hands it back when the ring is full.
    pub fn try_send(&self, msg: T) -> Result<(), T> {
        self.ring.push(msg)?;
        self.target.doorbell.ring();
        Ok(())
    }

    /// Queues `msg`, yielding (on a reactor) or sleeping briefly (elsewhere) while the
    /// ring is full.
    pub async fn send(&self, mut msg: T) {
        loop {
            match self.try_send(msg) {
                Ok(()) => return,
                Err(back) => {
                    msg = back;
                    if on_reactor() {
                        yield_now().await;
                    } else {
                        std::thread::sleep(std::time::Duration::from_micros(20));
                    }
                }
            }
        }
    }

    /// Messages waiting in the ring.
    pub fn len(&self) -> usize {
        self.ring.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ring.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.ring.capacity()
    }
}

/// The receiving side: keeps the poller registered while it lives.
pub struct Mailbox {
    poller: PollerId,
}

impl Drop for Mailbox {
    fn drop(&mut self) {
        unregister_poller(self.poller);
    }
}

/// Creates a mailbox on the current reactor whose messages go to `handler`.
pub fn mailbox<T: Send + 'static>(
    capacity: usize,
    mut handler: impl FnMut(T) + 'static,
) -> (Mailbox, MailSender<T>) {
    let ring = Arc::new(ArrayQueue::new(capacity));
    let target = with_core(|c| c.shared.clone());
    let rx = ring.clone();
    let pending = ring.clone();
    let poller = register_poller_with_pending(
        crate::reactor::Phase::Early,
        move || {
            let mut n = 0;
            while n < MAILBOX_BATCH {
                let Some(m) = rx.pop() else { break };
                handler(m);
                n += 1;
            }
            n > 0
        },
        move || !pending.is_empty(),
    );
    (Mailbox { poller }, MailSender { ring, target })
}
