//! The ImageService: PullImage, ListImages, ImageStatus, RemoveImage, ImageFsInfo.

use std::collections::HashMap;
use std::time::SystemTime;

use crate::cri::v1 as cri;
use tonic::Status;

use super::Cri;
use crate::error::Error;
use crate::image::credentials::{Credentials, CriAuth};
use crate::image::{Image, Usage};

fn image_name(spec: Option<&cri::ImageSpec>) -> Result<&str, Status> {
    match spec.map(|s| s.image.as_str()) {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(Status::invalid_argument(
            "image spec is missing or names no image",
        )),
    }
}

/// The CRI view of an image.
pub(super) fn to_cri(img: &Image) -> cri::Image {
    let user = img
        .config
        .config
        .as_ref()
        .map(|c| c.user.as_str())
        .unwrap_or("");
    let (uid, username) = crate::image::user::reported(user);
    cri::Image {
        id: img.record.id.clone(),
        repo_tags: img.record.repo_tags.clone(),
        repo_digests: img.record.repo_digests.clone(),
        size: img.record.size,
        uid: uid.map(|value| cri::Int64Value { value }),
        username,
        spec: Some(cri::ImageSpec {
            image: img.record.id.clone(),
            ..Default::default()
        }),
        pinned: false,
    }
}

fn fs_usage(u: Usage, now: i64) -> cri::FilesystemUsage {
    cri::FilesystemUsage {
        timestamp: now,
        fs_id: Some(cri::FilesystemIdentifier {
            mountpoint: u.mountpoint.display().to_string(),
        }),
        used_bytes: Some(cri::UInt64Value { value: u.bytes }),
        inodes_used: Some(cri::UInt64Value { value: u.inodes }),
    }
}

impl Cri {
    pub(super) async fn pull_image(
        &self,
        req: cri::PullImageRequest,
    ) -> Result<cri::PullImageResponse, Status> {
        let name = image_name(req.image.as_ref())?;
        tracing::Span::current().record("image", name);
        let creds = match &req.auth {
            Some(a) => Credentials::from_cri(
                &a.username,
                &a.password,
                &a.auth,
                &a.identity_token,
                &a.registry_token,
            )
            .map_err(|e| Status::invalid_argument(format!("auth for {name}: {e}")))?
            .map(|credentials| CriAuth {
                credentials,
                server_address: a.server_address.clone(),
            }),
            None => None,
        };
        let id = self
            .rt
            .images
            .pull(name, creds)
            .await
            .map_err(Error::from)?;
        Ok(cri::PullImageResponse { image_ref: id })
    }

    pub(super) fn list_images(
        &self,
        req: cri::ListImagesRequest,
    ) -> Result<cri::ListImagesResponse, Status> {
        let filter = req
            .filter
            .as_ref()
            .and_then(|f| f.image.as_ref())
            .map(|s| s.image.as_str());
        let mut images: Vec<cri::Image> = self
            .rt
            .images
            .list(filter)
            .iter()
            .map(|i| to_cri(i))
            .collect();
        images.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(cri::ListImagesResponse { images })
    }

    pub(super) fn image_status(
        &self,
        req: cri::ImageStatusRequest,
    ) -> Result<cri::ImageStatusResponse, Status> {
        let name = image_name(req.image.as_ref())?;
        tracing::Span::current().record("image", name);
        let Some(img) = self.rt.images.find(name) else {
            // Absent is not an error: kubelet asks before every pull.
            return Ok(cri::ImageStatusResponse::default());
        };
        let mut info = HashMap::new();
        if req.verbose {
            let v = serde_json::json!({
                "id": img.record.id,
                "manifestDigest": img.record.manifest_digest,
                "indexDigest": img.record.index_digest,
                "chainIDs": img.chain_ids(),
                "snapshots": self.rt.images.lower_dirs(&img),
                "imageSpec": img.config_json,
            });
            info.insert("info".to_string(), v.to_string());
        }
        Ok(cri::ImageStatusResponse {
            image: Some(to_cri(&img)),
            info,
        })
    }

    pub(super) async fn remove_image(
        &self,
        req: cri::RemoveImageRequest,
    ) -> Result<cri::RemoveImageResponse, Status> {
        let name = image_name(req.image.as_ref())?;
        tracing::Span::current().record("image", name);
        self.rt.images.remove(name).await.map_err(Error::from)?;
        Ok(cri::RemoveImageResponse {})
    }

    pub(super) fn image_fs_info(
        &self,
        _req: cri::ImageFsInfoRequest,
    ) -> Result<cri::ImageFsInfoResponse, Status> {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let images = self.rt.images.usage();
        let containers = self.rt.container_fs_usage();
        Ok(cri::ImageFsInfoResponse {
            image_filesystems: vec![fs_usage(images, now)],
            container_filesystems: vec![fs_usage(containers, now)],
        })
    }
}
