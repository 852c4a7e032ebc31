//! The streaming server behind Exec, Attach and PortForward (kubectl exec/attach/port-forward
//! and `crictl exec -it` end here): `server` (HTTP, the upgrade), `tokens` (single-use URLs),
//! `portforward` (SPDY `portforward.k8s.io`), `remotecommand` (exec and attach over SPDY),
//! `fdio` (the monitor's descriptors as async I/O), `tunnel` (SPDY over WebSocket), `spdy`
//! (the framing).

pub mod fdio;
pub mod portforward;
pub mod remotecommand;
pub mod server;
pub mod spdy;
pub mod tokens;
pub mod tunnel;

pub use server::{Streaming, StreamingError};
pub use tokens::{Io, RemoteCommand, Session};
