//! The user a container runs as: `run_as_user`, `run_as_username`, `run_as_group` or the
//! image's USER, names resolved through the image's own /etc/passwd and /etc/group (read by
//! `super::image_file`, which treats them as the hostile input they are), plus the user's
//! groups from the image and the pod's supplemental groups.

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

/// Resolves the identity from the image's files (`passwd_text`, `group_text`).
pub fn resolve(
    w: &Wanted<'_>,
    passwd_text: Option<&str>,
    group_text: Option<&str>,
) -> Result<User, String> {
    let users = passwd(passwd_text.unwrap_or(""));
    let grps = groups(group_text.unwrap_or(""));
    let (img_user, img_group) = match w.image_user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (w.image_user, None),
    };
    // The user: the request's uid, the request's name, or the image's USER.
    let (uid, entry) = if let Some(uid) = w.uid {
        let uid = u32::try_from(uid).map_err(|_| format!("run_as_user {uid} is out of range"))?;
        (uid, users.iter().find(|e| e.uid == uid))
    } else if !w.username.is_empty() {
        let e = users
            .iter()
            .find(|e| e.name == w.username)
            .ok_or_else(|| format!("user {:?} is not in the image's /etc/passwd", w.username))?;
        (e.uid, Some(e))
    } else if img_user.is_empty() {
        (0, users.iter().find(|e| e.uid == 0))
    } else if let Ok(uid) = img_user.parse::<u32>() {
        (uid, users.iter().find(|e| e.uid == uid))
    } else {
        let e = users
            .iter()
            .find(|e| e.name == img_user)
            .ok_or_else(|| format!("the image's USER {img_user:?} is not in its /etc/passwd"))?;
        (e.uid, Some(e))
    };
    // The group: the request's, the image USER's group part (when the request did not name the
    // user), the user's primary group, or 0.
    let gid = if let Some(g) = w.gid {
        u32::try_from(g).map_err(|_| format!("run_as_group {g} is out of range"))?
    } else if let (Some(g), None, true) = (img_group, w.uid, w.username.is_empty()) {
        match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => grps
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
        let g = u32::try_from(*g).map_err(|_| format!("supplemental group {g} is out of range"))?;
        if !additional.contains(&g) {
            additional.push(g);
        }
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
