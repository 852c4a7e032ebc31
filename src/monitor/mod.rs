//! The per-pod monitor: the process that holds a pod's containers (server), berthd's client
//! for it, its wire format and the CRI log writer it uses.

pub mod client;
pub mod cri_log;
pub mod proto;
pub mod server;
