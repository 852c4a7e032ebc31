//! A fan-out of lifecycle events to any number of subscribers (GetContainerEvents streams).
//! Publishing never waits: each subscriber has a bounded backlog, and one that falls further
//! behind than that loses its place (`Next::Lagged`) and is dropped by its reader. Nothing is
//! built when nobody listens.

use tokio::sync::broadcast;

/// How many events one subscriber may have unread before it is dropped.
pub const BACKLOG: usize = 4096;

/// The publishing side; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Hub<T: Clone> {
    tx: broadcast::Sender<T>,
}

impl<T: Clone> Default for Hub<T> {
    fn default() -> Self {
        Hub {
            tx: broadcast::channel(BACKLOG).0,
        }
    }
}

impl<T: Clone> Hub<T> {
    /// Sends the event `make` builds to every subscriber; `make` runs only when there is one.
    pub fn publish(&self, make: impl FnOnce() -> T) {
        if self.tx.receiver_count() > 0 {
            // An error means the last subscriber left meanwhile: nobody to tell.
            let _ = self.tx.send(make());
        }
    }

    /// A new subscriber: it sees every event published from now on.
    pub fn subscribe(&self) -> Subscriber<T> {
        Subscriber {
            rx: self.tx.subscribe(),
        }
    }

    /// How many subscribers there are.
    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// What a subscriber reads next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next<T> {
    /// The next event, in publishing order.
    Event(T),
    /// The subscriber fell more than `BACKLOG` events behind and missed this many: its view is
    /// no longer whole.
    Lagged(u64),
    /// The hub is gone.
    Closed,
}

/// The reading side of one subscription.
#[derive(Debug)]
pub struct Subscriber<T: Clone> {
    rx: broadcast::Receiver<T>,
}

impl<T: Clone> Subscriber<T> {
    /// Waits for the next event.
    pub async fn next(&mut self) -> Next<T> {
        match self.rx.recv().await {
            Ok(t) => Next::Event(t),
            Err(broadcast::error::RecvError::Lagged(n)) => Next::Lagged(n),
            Err(broadcast::error::RecvError::Closed) => Next::Closed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_subscriber_gets_every_event_in_order() {
        let hub = Hub::default();
        let mut a = hub.subscribe();
        let mut b = hub.subscribe();
        for i in 0..BACKLOG {
            hub.publish(|| i);
        }
        for i in 0..BACKLOG {
            assert_eq!(a.next().await, Next::Event(i));
            assert_eq!(b.next().await, Next::Event(i));
        }
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_told_and_others_are_not_slowed() {
        let hub = Hub::default();
        let mut slow = hub.subscribe();
        let mut fast = hub.subscribe();
        for i in 0..BACKLOG + 10 {
            hub.publish(|| i);
            assert_eq!(fast.next().await, Next::Event(i));
        }
        assert_eq!(slow.next().await, Next::Lagged(10));
    }

    #[test]
    fn nothing_is_built_without_subscribers() {
        let hub: Hub<u32> = Hub::default();
        hub.publish(|| panic!("built an event nobody reads"));
        assert_eq!(hub.subscribers(), 0);
    }
}
