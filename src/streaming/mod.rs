//! The streaming server behind Exec, Attach and PortForward (kubectl exec/attach/port-forward
//! and `crictl exec -it` end here): `server` (HTTP, the upgrade), `tokens` (single-use URLs),
//! `command` (an exec or attach session, whatever carries it), `remotecommand` (it over SPDY),
//! `wschannel` (it over WebSocket), `fdio` (the monitor's descriptors as async I/O),
//! `portforward` (SPDY `portforward.k8s.io`), `tunnel` (SPDY over WebSocket),
//! `wsportforward` (port-forward in WebSocket channels, kubelet's form), `spdy` (the framing),
//! `tls` (HTTPS).

pub mod command;
pub mod fdio;
pub mod portforward;
pub mod remotecommand;
pub mod server;
pub mod spdy;
pub mod tls;
pub mod tokens;
pub mod tunnel;
pub mod wschannel;
pub mod wsportforward;

pub use server::{Streaming, StreamingError};
pub use tokens::{Io, RemoteCommand, Session};
