//! The one reading of an image's USER (`user`, `user:group`, each a name or a number) that
//! ImageStatus, CreateContainer and exec all go by. A number is an id only within
//! 0..=2^31-1, as runc and moby take it: 4294967295 is `(uid_t)-1`, which setresuid reads as
//! "leave unchanged", so a wider range would let an image run as root while reporting a uid.

/// The largest uid or gid berth accepts, from an image, its files or a request.
pub const MAX_ID: u32 = i32::MAX as u32;

/// One half of USER: a numeric id or a name to look up in the image's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Id<'a> {
    /// A number within 0..=MAX_ID.
    Number(u32),
    /// A name (never a numeric-looking string).
    Name(&'a str),
}

/// USER as the image config has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ImageUser<'a> {
    /// The user part; `None` when USER is empty (root).
    pub user: Option<Id<'a>>,
    /// The group part after `:`, if any.
    pub group: Option<Id<'a>>,
}

/// Why a USER cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("USER {value:?}: {why}")]
pub struct UserError {
    /// The whole USER value.
    pub value: String,
    /// What is wrong with it.
    pub why: String,
}

/// Reads USER. A part made only of digits (with at most one leading sign) is a number and
/// must be within 0..=MAX_ID: it never falls back to a name lookup, where an image's
/// /etc/passwd could map that "name" to uid 0.
pub fn parse<'a>(value: &'a str) -> Result<ImageUser<'a>, UserError> {
    let err = |why: String| UserError {
        value: value.to_string(),
        why,
    };
    let (user, group) = match value.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (value, None),
    };
    if user.is_empty() && group.is_some_and(|g| !g.is_empty()) {
        return Err(err("a group without a user".into()));
    }
    let part = |p: &'a str, what: &str| -> Result<Option<Id<'a>>, UserError> {
        if p.is_empty() {
            return Ok(None);
        }
        if p.contains(':') {
            return Err(err(format!("the {what} holds a second ':'")));
        }
        if numeric_looking(p) {
            return match p.parse::<u32>() {
                Ok(n) if n <= MAX_ID => Ok(Some(Id::Number(n))),
                _ => Err(err(format!(
                    "the {what} id {p} is outside 0..={MAX_ID} (numeric ids are never looked up as names)"
                ))),
            };
        }
        Ok(Some(Id::Name(p)))
    };
    Ok(ImageUser {
        user: part(user, "user")?,
        group: group.map(|g| part(g, "group")).transpose()?.flatten(),
    })
}

/// Whether `s` is a decimal number, signed or not: such a string is an id, never a name.
fn numeric_looking(s: &str) -> bool {
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// A CRI id (run_as_user, run_as_group, a supplemental group) as a uid/gid, if within
/// 0..=MAX_ID.
pub fn checked_id(v: i64) -> Option<u32> {
    u32::try_from(v).ok().filter(|v| *v <= MAX_ID)
}

/// What ImageStatus reports of USER: the uid when the user part is a valid number, else the
/// name. A USER berth would refuse is reported whole as a name, so kubelet cannot verify it
/// as non-root (runAsNonRoot then fails closed) and CreateContainer refuses it.
pub fn reported(value: &str) -> (Option<i64>, String) {
    match parse(value) {
        Ok(ImageUser { user: None, .. }) => (None, String::new()),
        Ok(ImageUser {
            user: Some(Id::Number(n)),
            ..
        }) => (Some(i64::from(n)), String::new()),
        Ok(ImageUser {
            user: Some(Id::Name(n)),
            ..
        }) => (None, n.to_string()),
        Err(_) => (None, value.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_only_within_range_and_never_names() {
        assert_eq!(parse("").unwrap(), ImageUser::default());
        assert_eq!(
            parse("1000:50").unwrap(),
            ImageUser {
                user: Some(Id::Number(1000)),
                group: Some(Id::Number(50)),
            }
        );
        assert_eq!(
            parse("www-data:staff").unwrap(),
            ImageUser {
                user: Some(Id::Name("www-data")),
                group: Some(Id::Name("staff")),
            }
        );
        assert_eq!(parse("2147483647").unwrap().user, Some(Id::Number(MAX_ID)));
        for bad in [
            "4294967295",
            "2147483648",
            "4294967296",
            "-1",
            "-0",
            "9223372036854775807",
            "99999999999999999999999",
            "0:4294967295",
            "1:-1",
            ":0",
            "0:1:2",
        ] {
            assert!(parse(bad).is_err(), "{bad} was taken");
        }
        assert_eq!(parse("0x0").unwrap().user, Some(Id::Name("0x0")));
        assert_eq!(parse("+0").unwrap().user, Some(Id::Number(0)));
    }

    #[test]
    fn status_reports_only_valid_numbers_as_uids() {
        assert_eq!(reported("1000"), (Some(1000), String::new()));
        assert_eq!(reported("1003:1004"), (Some(1003), String::new()));
        assert_eq!(reported("www-data"), (None, "www-data".into()));
        assert_eq!(reported("www-data:1004"), (None, "www-data".into()));
        assert_eq!(reported(""), (None, String::new()));
        assert_eq!(reported("4294967295"), (None, "4294967295".into()));
        assert_eq!(reported("-1"), (None, "-1".into()));
        assert_eq!(checked_id(-1), None);
        assert_eq!(checked_id(4294967295), None);
        assert_eq!(checked_id(2147483647), Some(MAX_ID));
    }
}
