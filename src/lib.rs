//! berth: a container runtime for Kubernetes nodes. `berthd` serves the CRI (runtime.v1) on a
//! unix socket; this library holds everything behind it. `cri` translates gRPC calls into the
//! domain modules, which act on the kernel, the registry and the disk.

pub mod cgroup;
pub mod config;
pub mod container;
pub mod cri;
pub mod daemon;
pub mod error;
pub mod events;
pub mod failpoint;
pub mod fdlimit;
pub mod fsutil;
pub mod handlers;
pub mod idmap;
pub mod image;
pub mod layout;
pub mod listen_guard;
pub mod monitor;
pub mod network;
pub mod proctitle;
pub mod reservations;
pub mod runtime;
pub mod sandbox;
pub mod store;
pub mod streaming;
pub mod systemd;
pub mod telemetry;
pub mod zygote;
