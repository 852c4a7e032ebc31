//! The single-use tokens in streaming URLs: Exec, Attach and PortForward each mint one for
//! what the call validated; the server takes it back once. A token lives a minute, and only a
//! bounded number wait at once, so unused URLs cannot pile up.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a URL can be used.
pub const TTL: Duration = Duration::from_secs(60);
/// How many unused URLs may wait at once.
pub const MAX_OUTSTANDING: usize = 1024;

/// What a token lets its holder do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Session {
    /// Forward ports of a pod: connections to localhost:port in its network namespace
    /// (`None`: the node's, for a host-network pod).
    PortForward {
        /// The pod.
        pod_id: String,
        /// Its network namespace pin.
        netns: Option<PathBuf>,
        /// The ports the CRI call named: a WebSocket session whose URL names none forwards
        /// these.
        ports: Vec<u16>,
    },
    /// Run a command in a container, or attach to its own stdio.
    Remote(RemoteCommand),
}

/// An exec or attach a token allows, as the CRI call validated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteCommand {
    /// The container's pod.
    pub pod_id: String,
    /// Its monitor's socket.
    pub socket: PathBuf,
    /// An exec's process (its container, command, identity), or `None` for an attach.
    pub exec: Option<crate::monitor::proto::Exec>,
    /// The container attached to.
    pub container_id: String,
    /// The streams the client gets.
    pub io: Io,
}

/// Which streams a remote command has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Io {
    /// The client writes the process's input.
    pub stdin: bool,
    /// The client reads its output.
    pub stdout: bool,
    /// The client reads its errors (never with a terminal: it has one output).
    pub stderr: bool,
    /// A terminal, resized by the client.
    pub tty: bool,
}

/// The tokens waiting to be used.
#[derive(Default)]
pub struct Tokens {
    waiting: Mutex<HashMap<String, (Instant, Session)>>,
}

/// A token could not be minted.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Too many URLs are outstanding.
    #[error("{MAX_OUTSTANDING} streaming URLs are already waiting to be used; try again later")]
    Full,
    /// The kernel gave no random bytes.
    #[error("no random bytes for a streaming token: {0}")]
    Random(std::io::Error),
}

impl Tokens {
    /// A new token for `session`: 128 random bits, URL-safe.
    pub fn mint(&self, session: Session) -> Result<String, TokenError> {
        let mut raw = [0u8; 16];
        let mut filled = 0;
        while filled < raw.len() {
            let n =
                rustix::rand::getrandom(&mut raw[filled..], rustix::rand::GetRandomFlags::empty())
                    .map_err(|e| TokenError::Random(e.into()))?;
            filled += n;
        }
        let token = hex::encode(raw);
        let mut w = self.waiting.lock().expect("tokens poisoned");
        let now = Instant::now();
        w.retain(|_, (at, _)| now.duration_since(*at) < TTL);
        if w.len() >= MAX_OUTSTANDING {
            return Err(TokenError::Full);
        }
        w.insert(token.clone(), (now, session));
        Ok(token)
    }

    /// The session of `token`, once: a used, expired or unknown token gives `None`.
    pub fn take(&self, token: &str) -> Option<Session> {
        let (at, session) = self
            .waiting
            .lock()
            .expect("tokens poisoned")
            .remove(token)?;
        (at.elapsed() < TTL).then_some(session)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pf() -> Session {
        Session::PortForward {
            pod_id: "p".into(),
            netns: None,
            ports: vec![80],
        }
    }

    #[test]
    fn a_token_works_once_and_tokens_are_bounded() {
        let t = Tokens::default();
        let a = t.mint(pf()).unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, t.mint(pf()).unwrap());
        assert_eq!(t.take(&a), Some(pf()));
        assert_eq!(t.take(&a), None);
        assert_eq!(t.take("nonsense"), None);
        for _ in 0..MAX_OUTSTANDING - 1 {
            t.mint(pf()).unwrap();
        }
        assert!(matches!(t.mint(pf()), Err(TokenError::Full)));
    }
}
