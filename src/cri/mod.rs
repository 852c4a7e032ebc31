//! The gRPC façade: kubelet's CRI calls are validated here, translated into the runtime core's
//! terms, and its errors mapped back to gRPC codes. Nothing in here touches the kernel.
//! One file per RPC family; this file wires them into the two tonic services.

mod container;
mod deadline;
mod events;
mod image;
mod lists;
mod metric_descs;
mod metrics;
mod mounts;
mod runtime_info;
mod sandbox;
mod stats;
mod trace;
pub mod v1;

use std::sync::Arc;

use crate::cri::v1 as cri;
use crate::cri::v1::image_service_server::{ImageService, ImageServiceServer};
use crate::cri::v1::runtime_service_server::{RuntimeService, RuntimeServiceServer};
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::runtime::Runtime;
use crate::sandbox::NsMode;
use lists::{ListStream, chunked};
use trace::rpc;

pub use deadline::DeadlineLayer;

/// The largest CRI message berthd takes or sends: kubelet's limit, 16 MiB.
pub const MAX_MESSAGE: usize = 16 << 20;

/// Both CRI services over one runtime core.
#[derive(Clone)]
pub struct Cri {
    rt: Arc<Runtime>,
}

impl Cri {
    /// A façade over `rt`.
    pub fn new(rt: Arc<Runtime>) -> Self {
        Cri { rt }
    }

    /// The tonic services to mount on a server, taking and giving messages up to the size
    /// kubelet's CRI client allows (tonic's default is 4 MiB in).
    pub fn services(self) -> (RuntimeServiceServer<Cri>, ImageServiceServer<Cri>) {
        (
            RuntimeServiceServer::new(self.clone())
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
            ImageServiceServer::new(self)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
    }
}

impl Cri {
    /// Runs a call that reads many kernel files (cgroups, /proc, a disk walk) on the blocking
    /// pool: with a hundred containers it takes milliseconds, which must not hold one of the
    /// few async workers and every call queued behind it.
    async fn off_worker<T, F>(&self, call: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Cri) -> Result<T, Status> + Send + 'static,
    {
        let cri = self.clone();
        tokio::task::spawn_blocking(move || call(&cri))
            .await
            .map_err(|e| Status::internal(format!("the call's worker thread failed: {e}")))?
    }
}

/// A CRI NamespaceMode in berth's terms.
pub(super) fn ns_mode(m: i32) -> Result<NsMode, Status> {
    match cri::NamespaceMode::try_from(m) {
        Ok(cri::NamespaceMode::Pod) => Ok(NsMode::Pod),
        Ok(cri::NamespaceMode::Container) => Ok(NsMode::Container),
        Ok(cri::NamespaceMode::Node) => Ok(NsMode::Node),
        Ok(cri::NamespaceMode::Target) => Ok(NsMode::Target),
        Err(_) => Err(Status::invalid_argument(format!(
            "unknown namespace mode {m}"
        ))),
    }
}

/// The answer for an RPC berth does not serve (yet). kubelet falls back only on this code.
/// The streams an Exec or Attach asks for.
fn streams(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> crate::streaming::Io {
    crate::streaming::Io {
        stdin,
        stdout,
        stderr,
        tty,
    }
}

fn unimplemented(method: &str) -> Status {
    Status::unimplemented(format!("{method} is not implemented by berth"))
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        let msg = e.to_string();
        match e {
            Error::InvalidArgument(_) => Status::invalid_argument(msg),
            Error::NotFound(_) => Status::not_found(msg),
            Error::FailedPrecondition(_) => Status::failed_precondition(msg),
            Error::AlreadyExists(_) => Status::already_exists(msg),
            Error::PermissionDenied(_) => Status::permission_denied(msg),
            Error::DeadlineExceeded(_) => Status::deadline_exceeded(msg),
            Error::ResourceExhausted(_) => Status::resource_exhausted(msg),
            Error::Unavailable(_) => Status::unavailable(msg),
            Error::Internal(_) => Status::internal(msg),
        }
    }
}

type RpcResult<T> = Result<Response<T>, Status>;

/// The stream one GetContainerEvents call answers with (made in events.rs).
type EventStream = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<cri::ContainerEventResponse, Status>> + Send>,
>;

#[tonic::async_trait]
impl RuntimeService for Cri {
    type GetContainerEventsStream = EventStream;
    type StreamPodSandboxesStream = ListStream<cri::StreamPodSandboxesResponse>;
    type StreamContainersStream = ListStream<cri::StreamContainersResponse>;
    type StreamContainerStatsStream = ListStream<cri::StreamContainerStatsResponse>;
    type StreamPodSandboxStatsStream = ListStream<cri::StreamPodSandboxStatsResponse>;
    type StreamPodSandboxMetricsStream = ListStream<cri::StreamPodSandboxMetricsResponse>;

    async fn version(&self, r: Request<cri::VersionRequest>) -> RpcResult<cri::VersionResponse> {
        rpc("Version", async { self.version(r.into_inner()) }).await
    }

    async fn run_pod_sandbox(
        &self,
        r: Request<cri::RunPodSandboxRequest>,
    ) -> RpcResult<cri::RunPodSandboxResponse> {
        rpc("RunPodSandbox", self.run_pod_sandbox(r.into_inner())).await
    }

    async fn stop_pod_sandbox(
        &self,
        r: Request<cri::StopPodSandboxRequest>,
    ) -> RpcResult<cri::StopPodSandboxResponse> {
        rpc("StopPodSandbox", self.stop_pod_sandbox(r.into_inner())).await
    }

    async fn remove_pod_sandbox(
        &self,
        r: Request<cri::RemovePodSandboxRequest>,
    ) -> RpcResult<cri::RemovePodSandboxResponse> {
        rpc("RemovePodSandbox", self.remove_pod_sandbox(r.into_inner())).await
    }

    async fn pod_sandbox_status(
        &self,
        r: Request<cri::PodSandboxStatusRequest>,
    ) -> RpcResult<cri::PodSandboxStatusResponse> {
        rpc("PodSandboxStatus", async {
            self.pod_sandbox_status(r.into_inner())
        })
        .await
    }

    async fn list_pod_sandbox(
        &self,
        r: Request<cri::ListPodSandboxRequest>,
    ) -> RpcResult<cri::ListPodSandboxResponse> {
        rpc("ListPodSandbox", async {
            self.list_pod_sandbox(r.into_inner())
        })
        .await
    }

    async fn create_container(
        &self,
        r: Request<cri::CreateContainerRequest>,
    ) -> RpcResult<cri::CreateContainerResponse> {
        rpc("CreateContainer", self.create_container(r.into_inner())).await
    }

    async fn start_container(
        &self,
        r: Request<cri::StartContainerRequest>,
    ) -> RpcResult<cri::StartContainerResponse> {
        rpc("StartContainer", self.start_container(r.into_inner())).await
    }

    async fn stop_container(
        &self,
        r: Request<cri::StopContainerRequest>,
    ) -> RpcResult<cri::StopContainerResponse> {
        rpc("StopContainer", self.stop_container(r.into_inner())).await
    }

    async fn remove_container(
        &self,
        r: Request<cri::RemoveContainerRequest>,
    ) -> RpcResult<cri::RemoveContainerResponse> {
        rpc("RemoveContainer", self.remove_container(r.into_inner())).await
    }

    async fn list_containers(
        &self,
        r: Request<cri::ListContainersRequest>,
    ) -> RpcResult<cri::ListContainersResponse> {
        rpc("ListContainers", async {
            self.list_containers(r.into_inner())
        })
        .await
    }

    async fn container_status(
        &self,
        r: Request<cri::ContainerStatusRequest>,
    ) -> RpcResult<cri::ContainerStatusResponse> {
        rpc("ContainerStatus", async {
            self.container_status(r.into_inner())
        })
        .await
    }

    async fn update_container_resources(
        &self,
        r: Request<cri::UpdateContainerResourcesRequest>,
    ) -> RpcResult<cri::UpdateContainerResourcesResponse> {
        rpc("UpdateContainerResources", async {
            self.update_container_resources(r.into_inner()).await
        })
        .await
    }

    async fn reopen_container_log(
        &self,
        r: Request<cri::ReopenContainerLogRequest>,
    ) -> RpcResult<cri::ReopenContainerLogResponse> {
        rpc(
            "ReopenContainerLog",
            self.reopen_container_log(r.into_inner()),
        )
        .await
    }

    async fn exec_sync(
        &self,
        r: Request<cri::ExecSyncRequest>,
    ) -> RpcResult<cri::ExecSyncResponse> {
        rpc("ExecSync", self.exec_sync(r.into_inner())).await
    }

    async fn exec(&self, r: Request<cri::ExecRequest>) -> RpcResult<cri::ExecResponse> {
        rpc("Exec", async {
            let req = r.into_inner();
            tracing::Span::current().record("container", &req.container_id);
            let io = streams(req.stdin, req.stdout, req.stderr, req.tty);
            let url = self
                .rt
                .remote_command_url(&req.container_id, Some(req.cmd), io)?;
            Ok(cri::ExecResponse { url })
        })
        .await
    }

    async fn attach(&self, r: Request<cri::AttachRequest>) -> RpcResult<cri::AttachResponse> {
        rpc("Attach", async {
            let req = r.into_inner();
            tracing::Span::current().record("container", &req.container_id);
            let io = streams(req.stdin, req.stdout, req.stderr, req.tty);
            let url = self.rt.remote_command_url(&req.container_id, None, io)?;
            Ok(cri::AttachResponse { url })
        })
        .await
    }

    async fn port_forward(
        &self,
        r: Request<cri::PortForwardRequest>,
    ) -> RpcResult<cri::PortForwardResponse> {
        rpc("PortForward", async {
            let req = r.into_inner();
            if req.pod_sandbox_id.is_empty() {
                return Err(Status::invalid_argument(
                    "PortForward: pod_sandbox_id is empty",
                ));
            }
            if let Some(p) = req.port.iter().find(|p| !(1..=65535).contains(*p)) {
                return Err(Status::invalid_argument(format!(
                    "PortForward: port {p} is not a TCP port (1-65535)"
                )));
            }
            // Checked above to be in range.
            let ports = req.port.iter().map(|&p| p as u16).collect();
            let url = self.rt.port_forward_url(&req.pod_sandbox_id, ports)?;
            Ok(cri::PortForwardResponse { url })
        })
        .await
    }

    async fn container_stats(
        &self,
        r: Request<cri::ContainerStatsRequest>,
    ) -> RpcResult<cri::ContainerStatsResponse> {
        let req = r.into_inner();
        rpc(
            "ContainerStats",
            self.off_worker(move |c| c.container_stats(req)),
        )
        .await
    }

    async fn list_container_stats(
        &self,
        r: Request<cri::ListContainerStatsRequest>,
    ) -> RpcResult<cri::ListContainerStatsResponse> {
        let req = r.into_inner();
        rpc(
            "ListContainerStats",
            self.off_worker(move |c| c.list_container_stats(req)),
        )
        .await
    }

    async fn pod_sandbox_stats(
        &self,
        r: Request<cri::PodSandboxStatsRequest>,
    ) -> RpcResult<cri::PodSandboxStatsResponse> {
        let req = r.into_inner();
        rpc(
            "PodSandboxStats",
            self.off_worker(move |c| c.pod_sandbox_stats(req)),
        )
        .await
    }

    async fn list_pod_sandbox_stats(
        &self,
        r: Request<cri::ListPodSandboxStatsRequest>,
    ) -> RpcResult<cri::ListPodSandboxStatsResponse> {
        let req = r.into_inner();
        rpc(
            "ListPodSandboxStats",
            self.off_worker(move |c| c.list_pod_sandbox_stats(req)),
        )
        .await
    }

    async fn update_runtime_config(
        &self,
        r: Request<cri::UpdateRuntimeConfigRequest>,
    ) -> RpcResult<cri::UpdateRuntimeConfigResponse> {
        rpc(
            "UpdateRuntimeConfig",
            self.update_runtime_config(r.into_inner()),
        )
        .await
    }

    async fn status(&self, r: Request<cri::StatusRequest>) -> RpcResult<cri::StatusResponse> {
        rpc("Status", async { self.status(r.into_inner()) }).await
    }

    async fn checkpoint_container(
        &self,
        _r: Request<cri::CheckpointContainerRequest>,
    ) -> RpcResult<cri::CheckpointContainerResponse> {
        rpc("CheckpointContainer", async {
            Err(unimplemented("CheckpointContainer"))
        })
        .await
    }

    async fn get_container_events(
        &self,
        _r: Request<cri::GetEventsRequest>,
    ) -> RpcResult<Self::GetContainerEventsStream> {
        rpc("GetContainerEvents", async {
            Ok(self.get_container_events())
        })
        .await
    }

    async fn list_metric_descriptors(
        &self,
        _r: Request<cri::ListMetricDescriptorsRequest>,
    ) -> RpcResult<cri::ListMetricDescriptorsResponse> {
        rpc("ListMetricDescriptors", async {
            Ok(self.list_metric_descriptors())
        })
        .await
    }

    async fn list_pod_sandbox_metrics(
        &self,
        _r: Request<cri::ListPodSandboxMetricsRequest>,
    ) -> RpcResult<cri::ListPodSandboxMetricsResponse> {
        rpc(
            "ListPodSandboxMetrics",
            self.off_worker(move |c| Ok(c.list_pod_sandbox_metrics())),
        )
        .await
    }

    async fn runtime_config(
        &self,
        r: Request<cri::RuntimeConfigRequest>,
    ) -> RpcResult<cri::RuntimeConfigResponse> {
        rpc("RuntimeConfig", async {
            self.runtime_config(r.into_inner())
        })
        .await
    }

    async fn stream_pod_sandboxes(
        &self,
        r: Request<cri::StreamPodSandboxesRequest>,
    ) -> RpcResult<Self::StreamPodSandboxesStream> {
        let filter = r.into_inner().filter;
        rpc("StreamPodSandboxes", async {
            let items = self
                .list_pod_sandbox(cri::ListPodSandboxRequest { filter })?
                .items;
            Ok(chunked(items, |pod_sandboxes| {
                cri::StreamPodSandboxesResponse { pod_sandboxes }
            }))
        })
        .await
    }

    async fn stream_containers(
        &self,
        r: Request<cri::StreamContainersRequest>,
    ) -> RpcResult<Self::StreamContainersStream> {
        let filter = r.into_inner().filter;
        rpc("StreamContainers", async {
            let items = self.list_containers(cri::ListContainersRequest { filter })?;
            Ok(chunked(items.containers, |containers| {
                cri::StreamContainersResponse { containers }
            }))
        })
        .await
    }

    async fn stream_container_stats(
        &self,
        r: Request<cri::StreamContainerStatsRequest>,
    ) -> RpcResult<Self::StreamContainerStatsStream> {
        let filter = r.into_inner().filter;
        rpc("StreamContainerStats", async {
            let items = self
                .off_worker(move |c| {
                    c.list_container_stats(cri::ListContainerStatsRequest { filter })
                })
                .await?;
            Ok(chunked(items.stats, |container_stats| {
                cri::StreamContainerStatsResponse { container_stats }
            }))
        })
        .await
    }

    async fn stream_pod_sandbox_stats(
        &self,
        r: Request<cri::StreamPodSandboxStatsRequest>,
    ) -> RpcResult<Self::StreamPodSandboxStatsStream> {
        let filter = r.into_inner().filter;
        rpc("StreamPodSandboxStats", async {
            let items = self
                .off_worker(move |c| {
                    c.list_pod_sandbox_stats(cri::ListPodSandboxStatsRequest { filter })
                })
                .await?;
            Ok(chunked(items.stats, |pod_sandbox_stats| {
                cri::StreamPodSandboxStatsResponse { pod_sandbox_stats }
            }))
        })
        .await
    }

    async fn stream_pod_sandbox_metrics(
        &self,
        _r: Request<cri::StreamPodSandboxMetricsRequest>,
    ) -> RpcResult<Self::StreamPodSandboxMetricsStream> {
        rpc("StreamPodSandboxMetrics", async {
            let items = self
                .off_worker(move |c| Ok(c.list_pod_sandbox_metrics()))
                .await?;
            Ok(chunked(items.pod_metrics, |pod_sandbox_metrics| {
                cri::StreamPodSandboxMetricsResponse {
                    pod_sandbox_metrics,
                }
            }))
        })
        .await
    }

    async fn update_pod_sandbox_resources(
        &self,
        r: Request<cri::UpdatePodSandboxResourcesRequest>,
    ) -> RpcResult<cri::UpdatePodSandboxResourcesResponse> {
        rpc("UpdatePodSandboxResources", async {
            self.update_pod_sandbox_resources(r.into_inner())
        })
        .await
    }

    async fn checkpoint_pod(
        &self,
        _r: Request<cri::CheckpointPodRequest>,
    ) -> RpcResult<cri::CheckpointPodResponse> {
        // Alpha in Kubernetes 1.37; no runtime ships it.
        rpc("CheckpointPod", async {
            Err(unimplemented("CheckpointPod"))
        })
        .await
    }

    async fn restore_pod(
        &self,
        _r: Request<cri::RestorePodRequest>,
    ) -> RpcResult<cri::RestorePodResponse> {
        rpc("RestorePod", async { Err(unimplemented("RestorePod")) }).await
    }
}

#[tonic::async_trait]
impl ImageService for Cri {
    type StreamImagesStream = ListStream<cri::StreamImagesResponse>;

    async fn stream_images(
        &self,
        r: Request<cri::StreamImagesRequest>,
    ) -> RpcResult<Self::StreamImagesStream> {
        let filter = r.into_inner().filter;
        rpc("StreamImages", async {
            let items = self.list_images(cri::ListImagesRequest { filter })?;
            Ok(chunked(items.images, |images| cri::StreamImagesResponse {
                images,
            }))
        })
        .await
    }

    async fn list_images(
        &self,
        r: Request<cri::ListImagesRequest>,
    ) -> RpcResult<cri::ListImagesResponse> {
        rpc("ListImages", async { self.list_images(r.into_inner()) }).await
    }

    async fn image_status(
        &self,
        r: Request<cri::ImageStatusRequest>,
    ) -> RpcResult<cri::ImageStatusResponse> {
        rpc("ImageStatus", async { self.image_status(r.into_inner()) }).await
    }

    async fn pull_image(
        &self,
        r: Request<cri::PullImageRequest>,
    ) -> RpcResult<cri::PullImageResponse> {
        rpc("PullImage", self.pull_image(r.into_inner())).await
    }

    async fn remove_image(
        &self,
        r: Request<cri::RemoveImageRequest>,
    ) -> RpcResult<cri::RemoveImageResponse> {
        rpc("RemoveImage", self.remove_image(r.into_inner())).await
    }

    async fn image_fs_info(
        &self,
        r: Request<cri::ImageFsInfoRequest>,
    ) -> RpcResult<cri::ImageFsInfoResponse> {
        let req = r.into_inner();
        rpc(
            "ImageFsInfo",
            self.off_worker(move |c| c.image_fs_info(req)),
        )
        .await
    }
}
