//! The CRI runtime.v1 API as berth describes it in proto/cri.proto (Kubernetes 1.37): the
//! message types, both services' server traits, and the clients the tests and benchmarks use.
//! Generated at build time: berth keeps its own bindings because no maintained crate follows
//! the API past 1.32; hack/check-cri-api keeps the file equal to upstream's descriptor.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

include!(concat!(env!("OUT_DIR"), "/runtime.v1.rs"));
