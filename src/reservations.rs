//! Names reserved while a pod or container is made, and objects whose caller gave up (a client
//! deadline) before the answer: the making goes on to the end, the object waits for a retry of
//! the same call to claim it, and goes if none comes in time. So a retry converges instead of
//! meeting a name "reserved" by an object nobody knows, and a cancelled call leaves nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// The names of one kind of object (pods, or containers) and their state.
#[derive(Default)]
pub struct Names {
    map: Mutex<HashMap<String, Entry>>,
}

enum Entry {
    /// Being made; the receiver changes when the making ends.
    Making(watch::Receiver<bool>),
    /// Made, with id `id`; `unclaimed` since when no caller has received the id.
    Taken {
        id: String,
        unclaimed: Option<Instant>,
    },
}

/// What reserving a name found.
pub enum Reserved {
    /// The name is the caller's: it makes the object, then `finish`es the ticket.
    Mine(Ticket),
    /// An object of that name whose caller left before the answer: now the caller's.
    Claimed(String),
    /// An object of that name that its caller has.
    Taken(String),
}

/// The right to make the object of one name; `finish` ends it.
pub struct Ticket {
    key: String,
    done: watch::Sender<bool>,
}

impl Names {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.map.lock().expect("names poisoned")
    }

    /// Reserves `key`, waiting while another call is making an object of that name.
    pub async fn reserve(&self, key: &str) -> Reserved {
        loop {
            let mut wait = {
                let mut map = self.map();
                match map.get_mut(key) {
                    None => {
                        let (done, rx) = watch::channel(false);
                        map.insert(key.to_string(), Entry::Making(rx));
                        return Reserved::Mine(Ticket {
                            key: key.to_string(),
                            done,
                        });
                    }
                    Some(Entry::Taken { id, unclaimed }) => {
                        return if unclaimed.take().is_some() {
                            Reserved::Claimed(id.clone())
                        } else {
                            Reserved::Taken(id.clone())
                        };
                    }
                    Some(Entry::Making(rx)) => rx.clone(),
                }
            };
            // Woken when the maker finishes (or drops its ticket).
            let _ = wait.changed().await;
        }
    }

    /// Ends the making: `made` is the new object's id (None: it failed, the name is free).
    /// `deliver` hands the answer to the caller and says whether the caller had left; it runs
    /// with the names locked, so no call sees the name between the answer and its state.
    pub fn finish(&self, ticket: Ticket, made: Option<&str>, deliver: impl FnOnce() -> bool) {
        let mut map = self.map();
        let caller_gone = deliver();
        match made {
            Some(id) => {
                map.insert(
                    ticket.key.clone(),
                    Entry::Taken {
                        id: id.to_string(),
                        unclaimed: caller_gone.then(Instant::now),
                    },
                );
            }
            None => {
                map.remove(&ticket.key);
            }
        }
        let _ = ticket.done.send(true);
    }

    /// Records an object made before (a restart adopting it): its caller had it or is gone.
    pub fn insert(&self, key: &str, id: &str) {
        self.map().insert(
            key.to_string(),
            Entry::Taken {
                id: id.to_string(),
                unclaimed: None,
            },
        );
    }

    /// Frees `key` if object `id` holds it (the object was removed).
    pub fn release(&self, key: &str, id: &str) {
        let mut map = self.map();
        if matches!(map.get(key), Some(Entry::Taken { id: t, .. }) if t == id) {
            map.remove(key);
        }
    }

    /// Object `id` was used by a call that knows it: it is claimed.
    pub fn claim(&self, key: &str, id: &str) {
        if let Some(Entry::Taken { id: t, unclaimed }) = self.map().get_mut(key)
            && t == id
        {
            *unclaimed = None;
        }
    }

    /// Whether `id` still holds `key` unclaimed after `timeout`: then it should go.
    pub fn expired(&self, key: &str, id: &str, timeout: Duration) -> bool {
        matches!(self.map().get(key), Some(Entry::Taken { id: t, unclaimed: Some(since) })
            if t == id && since.elapsed() >= timeout)
    }
}

/// Makes the object of `ticket`'s name on a task of its own, so the making ends whether or not
/// the caller waits, and answers what it made (None: the task died). When the caller left and
/// an object was made, the object waits `timeout` for a claim; unclaimed then, `expire`
/// removes it. `names` finds the owner's names.
pub async fn make_detached<T, E, Made, Gone>(
    owner: Arc<T>,
    names: fn(&T) -> &Names,
    ticket: Ticket,
    timeout: Duration,
    make: impl FnOnce(Arc<T>) -> Made + Send + 'static,
    expire: impl FnOnce(Arc<T>, String) -> Gone + Send + 'static,
) -> Option<Result<String, E>>
where
    T: Send + Sync + 'static,
    E: Send + 'static,
    Made: std::future::Future<Output = Result<String, E>> + Send + 'static,
    Gone: std::future::Future<Output = ()> + Send + 'static,
{
    let key = ticket.key.clone();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let r = make(owner.clone()).await;
        let made = r.as_ref().ok().cloned();
        let mut gone = false;
        names(&owner).finish(ticket, made.as_deref(), || {
            gone = tx.send(r).is_err();
            gone
        });
        let Some(id) = made.filter(|_| gone) else {
            return;
        };
        tracing::info!(%id, name = %key, "the caller left before the answer: kept for a retry to claim");
        let weak = Arc::downgrade(&owner);
        drop(owner);
        tokio::time::sleep(timeout).await;
        if let Some(owner) = weak.upgrade()
            && names(&owner).expired(&key, &id, timeout)
        {
            tracing::info!(%id, name = %key, "no retry claimed it: removing it");
            expire(owner, id).await;
        }
    });
    rx.await.ok()
}

impl Drop for Ticket {
    fn drop(&mut self) {
        // A ticket dropped without `finish` (a panic in the making) still wakes the waiters;
        // they find the name as `finish` left it, or still Making and wait again.
        let _ = self.done.send(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_retry_claims_what_a_gone_caller_left_once() {
        let n = Names::default();
        let Reserved::Mine(t) = n.reserve("p/c/0").await else {
            panic!()
        };
        n.finish(t, Some("id1"), || true);
        assert!(matches!(n.reserve("p/c/0").await, Reserved::Claimed(id) if id == "id1"));
        assert!(matches!(n.reserve("p/c/0").await, Reserved::Taken(id) if id == "id1"));
        assert!(!n.expired("p/c/0", "id1", Duration::ZERO));
    }

    #[tokio::test]
    async fn a_waiting_retry_gets_the_name_after_a_failure() {
        let n = std::sync::Arc::new(Names::default());
        let Reserved::Mine(t) = n.reserve("k").await else {
            panic!()
        };
        let n2 = n.clone();
        let waiter =
            tokio::spawn(async move { matches!(n2.reserve("k").await, Reserved::Mine(_)) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        n.finish(t, None, || false);
        assert!(waiter.await.unwrap());
    }

    #[tokio::test]
    async fn unclaimed_objects_expire_and_claimed_ones_do_not() {
        let n = Names::default();
        let Reserved::Mine(t) = n.reserve("k").await else {
            panic!()
        };
        n.finish(t, Some("a"), || true);
        assert!(n.expired("k", "a", Duration::ZERO));
        n.claim("k", "a");
        assert!(!n.expired("k", "a", Duration::ZERO));
        n.release("k", "other");
        assert!(matches!(n.reserve("k").await, Reserved::Taken(_)));
        n.release("k", "a");
        assert!(matches!(n.reserve("k").await, Reserved::Mine(_)));
    }
}
