//! Image volumes (CRI `Mount.image`): the files of an image pulled on the node, given to a
//! container read-only, all of it or one directory or file of it (`image_sub_path`). Each is a
//! read-only overlay of the image's snapshots, attached under `state/idmapped/<container>.img<n>`
//! only while the runtime binds it, like the idmapped copies of volumes; the container's image
//! lease keeps the snapshots for as long as the container exists.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use super::rootfs::Target;
use super::volumes_idmapped::Attached;

/// Where image volume `n` of container `ctr` is attached under `dir`.
pub fn mount_point(dir: &Path, ctr: &str, n: usize) -> PathBuf {
    dir.join(format!("{ctr}.img{n}"))
}

/// Mounts an image read-only at `at` (a `mount_point`): `layers` are its snapshots, top
/// first, ending with an empty directory (see `overlay::mount_readonly`); `userns` idmaps them
/// for a pod with its own user namespace. With a `sub_path`, that path is resolved inside the
/// image (its links cannot lead out) and a copy of the overlay's mount rooted there is what
/// the runtime gets. Returns the source to bind; every mount point made goes into
/// `attached`.
pub fn attach(
    attached: &mut Attached,
    at: PathBuf,
    layers: &[PathBuf],
    sub_path: &str,
    userns: Option<&Path>,
) -> Result<PathBuf, String> {
    std::fs::create_dir(&at).map_err(|e| format!("making its mount point: {e}"))?;
    attached.push(at.clone());
    super::overlay::mount_readonly(layers, &at, userns).map_err(|e| e.message)?;
    if sub_path.is_empty() {
        return Ok(at);
    }
    sub_tree(attached, &at, sub_path)
}

/// Attaches a copy of the overlay at `at` rooted at `sub_path` next to it.
fn sub_tree(attached: &mut Attached, at: &Path, sub_path: &str) -> Result<PathBuf, String> {
    use rustix::fs::{FileType, Mode, OFlags};
    use rustix::mount::{MoveMountFlags, OpenTreeFlags};
    let root = rustix::fs::open(
        at,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("opening the mounted image: {e}"))?;
    let found =
        super::rootfs::open_in_root(&root, sub_path, OFlags::PATH).map_err(|e| match e {
            rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR => {
                format!("image_sub_path {sub_path:?} does not exist in the image")
            }
            e => format!("image_sub_path {sub_path:?}: {e}"),
        })?;
    let st = rustix::fs::fstat(&found).map_err(|e| format!("image_sub_path {sub_path:?}: {e}"))?;
    let kind = match FileType::from_raw_mode(st.st_mode) {
        FileType::Directory => Target::Dir,
        FileType::RegularFile => Target::File,
        other => {
            return Err(format!(
                "image_sub_path {sub_path:?} is a {other:?} in the image; only a directory or a \
                 regular file can be mounted"
            ));
        }
    };
    let tree = rustix::mount::open_tree(
        found.as_fd(),
        "",
        OpenTreeFlags::OPEN_TREE_CLONE
            | OpenTreeFlags::OPEN_TREE_CLOEXEC
            | OpenTreeFlags::AT_EMPTY_PATH,
    )
    .map_err(|e| format!("image_sub_path {sub_path:?}: open_tree: {e}"))?;
    let mut sub = at.as_os_str().to_owned();
    sub.push(".sub");
    let sub = PathBuf::from(sub);
    match kind {
        Target::Dir => std::fs::create_dir(&sub),
        Target::File => std::fs::File::create_new(&sub).map(drop),
    }
    .map_err(|e| format!("making the mount point of its sub path: {e}"))?;
    attached.push(sub.clone());
    rustix::mount::move_mount(
        &tree,
        "",
        rustix::fs::CWD,
        &sub,
        MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH,
    )
    .map_err(|e| format!("image_sub_path {sub_path:?}: attaching it: {e}"))?;
    Ok(sub)
}
