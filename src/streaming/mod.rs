//! The streaming server behind Exec, Attach and PortForward (kubectl exec/attach/port-forward
//! and `crictl exec -it` end here): `server` (HTTP, the upgrade), `tokens` (single-use URLs),
//! `portforward` (SPDY `portforward.k8s.io`), `tunnel` (SPDY over WebSocket), `spdy` (the
//! framing). Exec and attach are still to come.

pub mod portforward;
pub mod server;
pub mod spdy;
pub mod tokens;
pub mod tunnel;

pub use server::{Streaming, StreamingError};
pub use tokens::Session;
