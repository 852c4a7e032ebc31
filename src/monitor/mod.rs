//! The per-pod monitor: the process that holds a pod's containers, berthd's client for it,
//! its wire format and the CRI log writer it uses.
//!
//! The monitor is one per pod, forked by the zygote, single-threaded. It is the parent (as
//! child subreaper) of the pod's containers, which it creates with youki's libcontainer (or,
//! for a runtime handler naming a binary, with runc through `oci_cli`); it
//! reaps them, writes each exit status to disk before reporting it, pumps their output into
//! CRI log files, and runs ExecSync processes. It outlives berthd: berthd reconnects after a
//! restart and asks for the state of every container. Its parts: `process` (its life),
//! `event_loop` (sources and timers), `state` (what it holds), `conn` (berthd's connections),
//! `containers`, `oci_cli` (a runtime binary's command line), `reap` (exits), `exec`,
//! `session` (streamed exec and attach), `enter` (a process into a
//! running container), `helper` (where libcontainer runs), `io`.

pub mod client;
mod conn;
mod containers;
pub mod cri_log;
mod enter;
mod event_loop;
mod exec;
mod fanout;
mod helper;
mod io;
mod oci_cli;
mod process;
pub mod proto;
mod reap;
mod session;
mod state;
pub mod stream;

pub use containers::lc_id;
pub use io::bind;
pub use process::run;
