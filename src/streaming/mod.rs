//! The streaming server behind Exec, Attach and PortForward (kubectl exec/attach/port-forward
//! and `crictl exec -it` end here). So far: the SPDY/3.1 framing those clients speak; the
//! server, its tokens and the remote-command and port-forward protocols are still to come.

pub mod spdy;
