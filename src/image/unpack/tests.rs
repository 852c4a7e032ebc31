//! Layers built in memory, hostile ones included, unpacked into temporary directories.
use super::*;
use std::os::unix::fs::{MetadataExt, PermissionsExt};

fn header(path: &str, kind: tar::EntryType, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).ok();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_cksum();
    h
}

/// A tar built entry by entry; raw names bypass the tar crate's own path checks, as a
/// hostile layer would.
struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Self {
        Tar(tar::Builder::new(Vec::new()))
    }
    fn raw(
        mut self,
        name: &[u8],
        kind: tar::EntryType,
        data: &[u8],
        link: Option<&[u8]>,
        mode: u32,
    ) -> Self {
        let mut h = header("x", kind, data.len() as u64, mode);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name = [0; 100];
        gnu.name[..name.len()].copy_from_slice(name);
        if let Some(l) = link {
            gnu.linkname = [0; 100];
            gnu.linkname[..l.len()].copy_from_slice(l);
        }
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }
    fn file(self, name: &str, data: &[u8], mode: u32) -> Self {
        self.raw(name.as_bytes(), tar::EntryType::Regular, data, None, mode)
    }
    fn dir(self, name: &str) -> Self {
        self.raw(name.as_bytes(), tar::EntryType::Directory, b"", None, 0o755)
    }
    fn symlink(self, name: &str, target: &str) -> Self {
        self.raw(
            name.as_bytes(),
            tar::EntryType::Symlink,
            b"",
            Some(target.as_bytes()),
            0o777,
        )
    }
    fn hardlink(self, name: &str, target: &str) -> Self {
        self.raw(
            name.as_bytes(),
            tar::EntryType::Link,
            b"",
            Some(target.as_bytes()),
            0o644,
        )
    }
    fn pax(self, name: &str, records: &[u8]) -> Self {
        self.raw(
            name.as_bytes(),
            tar::EntryType::XHeader,
            records,
            None,
            0o644,
        )
    }
    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn unpack_into(
    t: Vec<u8>,
) -> (
    tempfile::TempDir,
    std::path::PathBuf,
    Result<UnpackStats, UnpackError>,
) {
    let d = tempfile::tempdir().unwrap();
    let dest = d.path().join("snap");
    std::fs::create_dir(&dest).unwrap();
    let r = unpack(&t[..], &dest, Limits::default().inodes);
    (d, dest, r)
}

fn rejected(t: Vec<u8>, entry: &str) {
    let (d, _dest, r) = unpack_into(t);
    match r {
        Err(UnpackError::Rejected { entry: e, .. }) => assert_eq!(e, entry),
        other => panic!("expected rejection of {entry}, got {other:?}"),
    }
    // Nothing was created beside the snapshot.
    let names: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("snap")]);
}

#[test]
fn files_dirs_links_modes_and_owners_are_kept() {
    let t = Tar::new()
        .dir("bin")
        .file("bin/tool", b"#!/bin/sh\n", 0o4755)
        .hardlink("bin/tool2", "bin/tool")
        .symlink("bin/sh", "/bin/busybox")
        .file("etc/deep/file", b"x", 0o640)
        .bytes();
    let (_d, dest, r) = unpack_into(t);
    let stats = r.unwrap();
    assert_eq!(stats.bytes, 11);
    let m = std::fs::metadata(dest.join("bin/tool")).unwrap();
    assert_eq!(m.permissions().mode() & 0o7777, 0o4755);
    assert_eq!(m.nlink(), 2);
    assert_eq!(
        std::fs::read_link(dest.join("bin/sh")).unwrap(),
        Path::new("/bin/busybox")
    );
    assert_eq!(std::fs::read(dest.join("etc/deep/file")).unwrap(), b"x");
    assert_eq!(m.mtime(), 1_700_000_000);
}

#[test]
fn whiteouts_become_overlay_whiteouts_and_opaque_xattrs() {
    let t = Tar::new()
        .dir("a")
        .file("a/.wh.gone", b"", 0o644)
        .file("a/.wh..wh..opq", b"", 0o644)
        .bytes();
    let (_d, dest, r) = unpack_into(t);
    r.unwrap();
    let m = std::fs::symlink_metadata(dest.join("a/gone")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &m.file_type()
    ));
    assert_eq!(m.rdev(), 0);
    let mut buf = [0u8; 4];
    let n = rustix::fs::getxattr(dest.join("a"), OPAQUE_XATTR, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"y");
    assert!(!dest.join("a/.wh..wh..opq").exists());
}

#[test]
fn dot_dot_is_rejected() {
    rejected(
        Tar::new().file("a/../../escape", b"x", 0o644).bytes(),
        "a/../../escape",
    );
}

#[test]
fn absolute_paths_are_rejected() {
    rejected(
        Tar::new().file("/etc/escape", b"x", 0o644).bytes(),
        "/etc/escape",
    );
}

#[test]
fn writing_through_a_symlink_is_rejected() {
    let d = tempfile::tempdir().unwrap();
    let outside = d.path().to_str().unwrap().to_string();
    rejected(
        Tar::new()
            .symlink("link", &outside)
            .file("link/escape", b"x", 0o644)
            .bytes(),
        "link/escape",
    );
    assert!(!d.path().join("escape").exists());
    rejected(
        Tar::new()
            .symlink("rel", "..")
            .file("rel/escape", b"x", 0o644)
            .bytes(),
        "rel/escape",
    );
}

#[test]
fn hard_links_pointing_out_are_rejected() {
    rejected(Tar::new().hardlink("hl", "../outside").bytes(), "hl");
    rejected(Tar::new().hardlink("hl", "/etc/passwd").bytes(), "hl");
    rejected(
        Tar::new()
            .symlink("s", "/etc")
            .hardlink("hl", "s/passwd")
            .bytes(),
        "hl",
    );
}

#[test]
fn a_symlink_replacing_a_directory_is_rejected() {
    rejected(
        Tar::new()
            .dir("d")
            .symlink("d", "/tmp")
            .file("d/x", b"x", 0o644)
            .bytes(),
        "d",
    );
}

#[test]
fn later_entries_replace_earlier_files() {
    let t = Tar::new()
        .file("f", b"old", 0o644)
        .file("f", b"new", 0o600)
        .bytes();
    let (_d, dest, r) = unpack_into(t);
    r.unwrap();
    assert_eq!(std::fs::read(dest.join("f")).unwrap(), b"new");
}

#[test]
fn a_truncated_stream_is_a_read_error() {
    let mut t = Tar::new().file("big", &[7u8; 4096], 0o644).bytes();
    t.truncate(1024);
    let (_d, _dest, r) = unpack_into(t);
    assert!(matches!(r, Err(UnpackError::Read(_))), "{r:?}");
}

/// A PAX record as tar writes it: "<len> key=value\n", the length counting itself.
fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = [b" ", key.as_bytes(), b"=", value, b"\n"].concat();
    let mut len = body.len() + 1;
    while format!("{len}").len() + body.len() != len {
        len += 1;
    }
    [format!("{len}").into_bytes(), body].concat()
}

#[test]
fn long_names_and_pax_paths_and_links_are_taken() {
    let long = format!("{}/file", "d".repeat(150));
    let pax = [pax_record("path", b"pax/named"), pax_record("uid", b"4242")].concat();
    let t = Tar::new()
        .raw(
            b"././@LongLink",
            tar::EntryType::GNULongName,
            format!("{long}\0").as_bytes(),
            None,
            0o644,
        )
        .file("short-name", b"long\n", 0o644)
        .pax("PaxHeaders/x", &pax)
        .file("ignored-name", b"pax\n", 0o644)
        .raw(
            b"././@LongLink",
            tar::EntryType::GNULongLink,
            format!("{long}\0").as_bytes(),
            None,
            0o644,
        )
        .symlink("lnk", "short")
        .bytes();
    let (_d, dest, r) = unpack_into(t);
    r.unwrap();
    assert_eq!(std::fs::read(dest.join(&long)).unwrap(), b"long\n");
    assert_eq!(std::fs::read(dest.join("pax/named")).unwrap(), b"pax\n");
    assert_eq!(
        std::fs::metadata(dest.join("pax/named")).unwrap().uid(),
        4242
    );
    assert!(!dest.join("ignored-name").exists());
    assert_eq!(
        std::fs::read_link(dest.join("lnk")).unwrap(),
        Path::new(&long)
    );
}

#[test]
fn extension_headers_over_a_mebibyte_are_refused_unread() {
    for kind in [
        tar::EntryType::XHeader,
        tar::EntryType::XGlobalHeader,
        tar::EntryType::GNULongName,
        tar::EntryType::GNULongLink,
    ] {
        // The header claims 2 MiB; only a little follows, as a bomb's gzip stream would hold
        // it back: the refusal must come before any of it is read.
        let mut h = header("ext", kind, 2 << 20, 0o644);
        h.set_cksum();
        let t = [h.as_bytes().as_slice(), &[0u8; 4096]].concat();
        let (_d, _dest, r) = unpack_into(t);
        match r {
            Err(UnpackError::TooLarge { entry, why }) => {
                assert_eq!(entry, "ext");
                assert!(why.contains("2097152"), "{why}");
            }
            other => panic!("{kind:?}: expected a refusal, got {other:?}"),
        }
    }
    // Exactly the limit is fine.
    let pax = pax_record("comment", &vec![b'a'; (MAX_HEADER_BYTES - 20) as usize]);
    let t = Tar::new()
        .pax("PaxHeaders/x", &pax)
        .file("f", b"x", 0o644)
        .bytes();
    assert!(pax.len() as u64 <= MAX_HEADER_BYTES);
    unpack_into(t).2.unwrap();
}

#[test]
fn a_pax_size_that_disagrees_with_the_header_and_dangling_extensions_are_refused() {
    let t = Tar::new()
        .pax("PaxHeaders/x", &pax_record("size", b"3"))
        .file("f", b"twelve bytes", 0o644)
        .bytes();
    rejected(t, "f");
    let t = Tar::new()
        .pax("PaxHeaders/x", &pax_record("path", b"a"))
        .pax("PaxHeaders/y", &pax_record("path", b"b"))
        .file("f", b"x", 0o644)
        .bytes();
    rejected(t, "PaxHeaders/y");
    let t = Tar::new()
        .file("f", b"x", 0o644)
        .pax("PaxHeaders/x", &pax_record("path", b"a"))
        .bytes();
    let (_d, _dest, r) = unpack_into(t);
    assert!(matches!(r, Err(UnpackError::Rejected { .. })), "{r:?}");
}

#[test]
fn more_entries_than_the_limit_are_refused() {
    let t = Tar::new()
        .file("a", b"1", 0o644)
        .file("b", b"2", 0o644)
        .file("c", b"3", 0o644)
        .bytes();
    let d = tempfile::tempdir().unwrap();
    let r = unpack(&t[..], d.path(), 2);
    assert!(
        matches!(&r, Err(UnpackError::TooLarge { entry, .. }) if entry == "c"),
        "{r:?}"
    );
}
