//! The user a container runs as: `run_as_user`, `run_as_username`, `run_as_group` or the
//! image's USER, names resolved through the image's own /etc/passwd and /etc/group (read by
//! `super::image_file`, which treats them as the hostile input they are), plus the user's
//! groups from the image and the pod's supplemental groups.

use crate::image::user::{self as image_user, Id};

/// The resolved identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct User {
    /// uid.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Supplementary gids.
    pub additional_gids: Vec<u32>,
    /// The user's name in the image, if it has one.
    pub username: String,
    /// Home directory from /etc/passwd (for HOME).
    pub home: String,
}

/// What the request and the image ask for.
#[derive(Debug, Clone, Default)]
pub struct Wanted<'a> {
    /// run_as_user.
    pub uid: Option<i64>,
    /// run_as_username.
    pub username: &'a str,
    /// run_as_group.
    pub gid: Option<i64>,
    /// The image config's USER (`name`, `uid`, `name:group`, `uid:gid`).
    pub image_user: &'a str,
    /// supplemental_groups.
    pub supplemental: &'a [i64],
    /// SupplementalGroupsPolicy Strict: the image's groups are not added.
    pub strict: bool,
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

fn passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(PasswdEntry {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5).unwrap_or(&"").to_string(),
            })
        })
        .collect()
}

/// (name, gid, members) of each group.
fn groups(text: &str) -> Vec<(String, u32, Vec<String>)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let members = f
                .get(3)
                .map(|m| {
                    m.split(',')
                        .filter(|x| !x.is_empty())
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            Some((f.first()?.to_string(), f.get(2)?.parse().ok()?, members))
        })
        .collect()
}

/// Resolves the identity from the image's files (`passwd_text`, `group_text`). Every id, from
/// the request, USER or the image's files, must be within 0..=`MAX_ID`: a larger one
/// (4294967295 is `(uid_t)-1`, "unchanged" to setresuid) would leave the process root.
pub fn resolve(
    w: &Wanted<'_>,
    passwd_text: Option<&str>,
    group_text: Option<&str>,
) -> Result<User, String> {
    let users = passwd(passwd_text.unwrap_or(""));
    let grps = groups(group_text.unwrap_or(""));
    let image = image_user::parse(w.image_user).map_err(|e| format!("the image's {e}"))?;
    let checked = |v: i64, what: &str| {
        image_user::checked_id(v)
            .ok_or_else(|| format!("{what} {v} is outside 0..={}", image_user::MAX_ID))
    };
    let by_name = |name: &str, what: &str| {
        users
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| format!("{what} {name:?} is not in the image's /etc/passwd"))
    };
    // The user: the request's uid, the request's name, or the image's USER.
    let (uid, entry) = if let Some(uid) = w.uid {
        let uid = checked(uid, "run_as_user")?;
        (uid, users.iter().find(|e| e.uid == uid))
    } else if !w.username.is_empty() {
        let e = by_name(w.username, "user")?;
        (e.uid, Some(e))
    } else {
        match image.user {
            None => (0, users.iter().find(|e| e.uid == 0)),
            Some(Id::Number(uid)) => (uid, users.iter().find(|e| e.uid == uid)),
            Some(Id::Name(name)) => {
                let e = by_name(name, "the image's USER")?;
                (e.uid, Some(e))
            }
        }
    };
    // The group: the request's, the image USER's group part (when the request did not name the
    // user), the user's primary group, or 0.
    let gid = if let Some(g) = w.gid {
        checked(g, "run_as_group")?
    } else if let (Some(g), None, true) = (image.group, w.uid, w.username.is_empty()) {
        match g {
            Id::Number(gid) => gid,
            Id::Name(g) => grps
                .iter()
                .find(|(n, _, _)| n == g)
                .map(|(_, gid, _)| *gid)
                .ok_or_else(|| format!("group {g:?} is not in the image's /etc/group"))?,
        }
    } else {
        entry.map(|e| e.gid).unwrap_or(0)
    };
    let username = entry.map(|e| e.name.clone()).unwrap_or_default();
    // The primary group leads the list, as on other runtimes: a process keeps it when it
    // changes its gid, and ContainerStatus reports the groups the process has.
    let mut additional: Vec<u32> = vec![gid];
    if !w.strict && !username.is_empty() {
        for (_, g, members) in &grps {
            if members.contains(&username) && !additional.contains(g) {
                additional.push(*g);
            }
        }
    }
    for g in w.supplemental {
        let g = checked(*g, "supplemental group")?;
        if !additional.contains(&g) {
            additional.push(g);
        }
    }
    // Ids taken from the image's own files are checked last, naming the file they came from.
    if uid > image_user::MAX_ID {
        return Err(format!(
            "uid {uid} (from the image's /etc/passwd) is outside 0..={}",
            image_user::MAX_ID
        ));
    }
    if let Some(g) = additional.iter().find(|g| **g > image_user::MAX_ID) {
        return Err(format!(
            "gid {g} (from the image's /etc/passwd or /etc/group) is outside 0..={}",
            image_user::MAX_ID
        ));
    }
    Ok(User {
        uid,
        gid,
        additional_gids: additional,
        home: entry
            .map(|e| e.home.clone())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "/".into()),
        username,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nwww-data:x:33:33:www-data:/var/www:/bin/false\ndefault-user:x:1000:1000::/home/default-user:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwww-data:x:33:\ndefault-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\nextra:x:1004:\n";

    fn r(w: Wanted<'_>) -> Result<User, String> {
        resolve(&w, Some(PASSWD), Some(GROUP))
    }

    #[test]
    fn image_user_forms() {
        let u = r(Wanted {
            image_user: "www-data",
            ..Default::default()
        })
        .unwrap();
        assert_eq!((u.uid, u.gid, u.home.as_str()), (33, 33, "/var/www"));
        let u = r(Wanted {
            image_user: "1003:1004",
            ..Default::default()
        })
        .unwrap();
        assert_eq!((u.uid, u.gid), (1003, 1004));
        let u = r(Wanted {
            image_user: "www-data:extra",
            ..Default::default()
        })
        .unwrap();
        assert_eq!((u.uid, u.gid), (33, 1004));
        let u = r(Wanted::default()).unwrap();
        assert_eq!((u.uid, u.gid), (0, 0));
        assert!(
            r(Wanted {
                image_user: "nobody-here",
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn ids_outside_the_range_never_resolve() {
        // A name that looks like a number is never looked up, even where /etc/passwd has it.
        let evil = "root:x:0:0::/:/bin/sh\n4294967296:x:0:0::/:/bin/sh\n-1:x:0:0::/:/bin/sh\nwide:x:4294967295:4294967295::/:/bin/sh\n";
        let group = "wideg:x:4294967295:root\n";
        for user in [
            "4294967295",
            "4294967296",
            "-1",
            "9223372036854775807",
            "0:4294967295",
        ] {
            let got = resolve(
                &Wanted {
                    image_user: user,
                    ..Default::default()
                },
                Some(evil),
                Some(group),
            );
            assert!(got.is_err(), "USER {user} resolved to {got:?}");
        }
        for w in [
            Wanted {
                image_user: "wide",
                ..Default::default()
            },
            Wanted {
                username: "wide",
                ..Default::default()
            },
            Wanted {
                uid: Some(4294967295),
                ..Default::default()
            },
            Wanted {
                uid: Some(-1),
                ..Default::default()
            },
            Wanted {
                uid: Some(1),
                gid: Some(2147483648),
                ..Default::default()
            },
            Wanted {
                uid: Some(1),
                supplemental: &[4294967295],
                ..Default::default()
            },
            Wanted {
                image_user: "root",
                ..Default::default()
            },
        ] {
            let got = resolve(&w, Some(evil), Some(group));
            assert!(got.is_err(), "{w:?} resolved to {got:?}");
        }
    }

    #[test]
    fn request_overrides_and_groups_merge() {
        let u = r(Wanted {
            uid: Some(1000),
            image_user: "www-data",
            supplemental: &[1234],
            ..Default::default()
        })
        .unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.additional_gids, vec![1000, 50000, 1234]);
        let strict = r(Wanted {
            uid: Some(1000),
            supplemental: &[1234],
            strict: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(strict.additional_gids, vec![1000, 1234]);
        let u = r(Wanted {
            username: "www-data",
            gid: Some(7),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((u.uid, u.gid), (33, 7));
        assert!(
            r(Wanted {
                username: "ghost",
                ..Default::default()
            })
            .is_err()
        );
    }
}
