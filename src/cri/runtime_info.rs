//! Version, Status, RuntimeConfig and UpdateRuntimeConfig.

use std::collections::HashMap;

use crate::cri::v1 as cri;
use tonic::Status;

use super::Cri;
use crate::runtime::{Condition, RUNTIME_API_VERSION, RUNTIME_NAME};

/// The CRI condition types kubelet looks for.
const RUNTIME_READY: &str = "RuntimeReady";
const NETWORK_READY: &str = "NetworkReady";

/// The Version response's `version` field: the CRI API version of the kubelet-facing wire
/// (kept at 0.1.0 like other CRI runtimes, as kubelet only logs it).
const KUBELET_API_VERSION: &str = "0.1.0";

fn condition(kind: &str, c: Condition) -> cri::RuntimeCondition {
    cri::RuntimeCondition {
        r#type: kind.into(),
        status: c.ready,
        reason: c.reason,
        message: c.message,
    }
}

impl Cri {
    pub(super) fn version(
        &self,
        _req: cri::VersionRequest,
    ) -> Result<cri::VersionResponse, Status> {
        Ok(cri::VersionResponse {
            version: KUBELET_API_VERSION.into(),
            runtime_name: RUNTIME_NAME.into(),
            runtime_version: self.rt.version().into(),
            runtime_api_version: RUNTIME_API_VERSION.into(),
        })
    }

    pub(super) fn status(&self, req: cri::StatusRequest) -> Result<cri::StatusResponse, Status> {
        let conditions = vec![
            condition(RUNTIME_READY, self.rt.runtime_condition()),
            condition(NETWORK_READY, self.rt.network_condition()),
        ];
        let mut info = HashMap::new();
        if req.verbose {
            let config = serde_json::to_string(self.rt.config())
                .map_err(|e| Status::internal(format!("serializing the configuration: {e}")))?;
            info.insert("config".to_string(), config);
            let apparmor = if super::container::host_has_apparmor() {
                "enabled on the kernel; berth loads no profiles"
            } else {
                "disabled: this kernel has no AppArmor"
            };
            info.insert(
                "apparmor".to_string(),
                serde_json::json!(apparmor).to_string(),
            );
            let cg = &self.rt.pods.cgroups;
            info.insert(
                "cgroups".to_string(),
                serde_json::json!({"version": cg.version_name(), "driver": cg.driver}).to_string(),
            );
            if let Some(cidr) = self.rt.pod_cidr() {
                info.insert(
                    "podCIDR".to_string(),
                    serde_json::json!(cidr.to_string()).to_string(),
                );
            }
        }
        Ok(cri::StatusResponse {
            status: Some(cri::RuntimeStatus { conditions }),
            info,
            runtime_handlers: self.runtime_handlers(),
            // Features are claimed only once they are implemented: kubelet trusts them.
            features: Some(cri::RuntimeFeatures {
                supplemental_groups_policy: true,
                // A user-namespaced pod on the node's network is refused at RunPodSandbox.
                user_namespaces_host_network: false,
                // noexec, nodev and nosuid per bind mount, under every handler.
                mount_options: true,
            }),
        })
    }

    /// The handlers berth serves, each with what it can do: the embedded runtime ("") and
    /// each configured OCI runtime binary, its features as its `features` command said.
    fn runtime_handlers(&self) -> Vec<cri::RuntimeHandler> {
        self.rt
            .pods
            .handlers
            .all()
            .iter()
            .map(|h| cri::RuntimeHandler {
                name: h.name.clone(),
                features: Some(cri::RuntimeHandlerFeatures {
                    recursive_read_only_mounts: h.features.recursive_read_only,
                    user_namespaces: h.features.user_namespaces,
                }),
            })
            .collect()
    }

    pub(super) fn runtime_config(
        &self,
        _req: cri::RuntimeConfigRequest,
    ) -> Result<cri::RuntimeConfigResponse, Status> {
        Ok(cri::RuntimeConfigResponse {
            linux: Some(cri::LinuxRuntimeConfiguration {
                cgroup_driver: match self.rt.pods.cgroups.driver {
                    crate::cgroup::Driver::Cgroupfs => cri::CgroupDriver::Cgroupfs,
                    crate::cgroup::Driver::Systemd => cri::CgroupDriver::Systemd,
                } as i32,
            }),
        })
    }

    pub(super) async fn update_runtime_config(
        &self,
        req: cri::UpdateRuntimeConfigRequest,
    ) -> Result<cri::UpdateRuntimeConfigResponse, Status> {
        let cidr = req
            .runtime_config
            .and_then(|c| c.network_config)
            .map(|n| n.pod_cidr)
            .unwrap_or_default();
        // kubelet may send several CIDRs separated by commas (dual stack); berth's network is
        // IPv4 only, so it takes the IPv4 one.
        let v4 = cidr
            .split(',')
            .map(str::trim)
            .find(|c| !c.contains(':'))
            .unwrap_or("");
        self.rt.update_pod_cidr(v4).await?;
        Ok(cri::UpdateRuntimeConfigResponse {})
    }
}
