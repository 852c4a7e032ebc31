//! GetContainerEvents: each subscriber gets its own stream of the runtime's lifecycle events,
//! translated as they leave. A subscriber that reads too slowly (its backlog overflows) gets a
//! ResourceExhausted and its stream ends; kubelet then relists and subscribes again.

use crate::cri::v1 as cri;
use tonic::Status;

use super::container::container_status;
use super::sandbox::pod_status;
use super::{Cri, EventStream};
use crate::container::{Event, EventKind};
use crate::events::{Next, Subscriber};

fn kind(k: EventKind) -> i32 {
    (match k {
        EventKind::Created => cri::ContainerEventType::ContainerCreatedEvent,
        EventKind::Started => cri::ContainerEventType::ContainerStartedEvent,
        EventKind::Stopped => cri::ContainerEventType::ContainerStoppedEvent,
        EventKind::Deleted => cri::ContainerEventType::ContainerDeletedEvent,
    }) as i32
}

fn response(e: Event) -> cri::ContainerEventResponse {
    cri::ContainerEventResponse {
        container_id: e.id,
        container_event_type: kind(e.kind),
        created_at: e.at,
        pod_sandbox_status: e.pod.as_ref().map(pod_status),
        containers_statuses: e.containers.iter().map(container_status).collect(),
    }
}

/// Where a subscription stands between two reads.
enum Reading {
    On(Subscriber<Event>),
    Done,
}

impl Cri {
    pub(super) fn get_container_events(&self) -> EventStream {
        let sub = self.rt.containers.changes.subscribe();
        tracing::debug!(
            subscribers = self.rt.containers.changes.subscribers(),
            "an event subscriber joined"
        );
        Box::pin(futures::stream::unfold(
            Reading::On(sub),
            |state| async move {
                let Reading::On(mut sub) = state else {
                    return None;
                };
                match sub.next().await {
                    Next::Event(e) => Some((Ok(response(e)), Reading::On(sub))),
                    Next::Lagged(n) => {
                        tracing::warn!(
                            missed = n,
                            "an event subscriber fell behind and is dropped"
                        );
                        let s = Status::resource_exhausted(format!(
                            "this subscriber fell {n} events behind (backlog {}); subscribe again and relist",
                            crate::events::BACKLOG
                        ));
                        Some((Err(s), Reading::Done))
                    }
                    Next::Closed => None,
                }
            },
        ))
    }
}
