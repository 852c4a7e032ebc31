//! Runtime handlers (RuntimeClass): "" is the embedded runtime; each `[runtimes.<name>]` of
//! the configuration names an OCI runtime binary (runc) the pod's monitor drives through the
//! OCI runtime command line. Each binary is checked at start, and what it can do (recursive
//! read-only mounts, idmapped mounts for user namespaces) is read from its `features`
//! command, so Status claims for it only what it does. A runc without the November 2025
//! container-breakout fixes is refused unless its section allows it (`allow_vulnerable`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::config::RuntimeHandlerConfig;

/// How long `<runtime> --version` or `features` may take at start.
const PROBE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a handler's runtime can do beyond the basics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// Recursive read-only mounts (`rro`).
    pub recursive_read_only: bool,
    /// Pods with a user namespace of their own (idmapped mounts).
    pub user_namespaces: bool,
}

/// One handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handler {
    /// The RuntimeClass handler name ("" for the embedded runtime).
    pub name: String,
    /// The OCI runtime binary; `None` for the embedded runtime.
    pub binary: Option<PathBuf>,
    /// What `<binary> --version` printed first (the embedded runtime's own name otherwise).
    pub version: String,
    /// What it can do.
    pub features: Features,
}

/// A configured runtime cannot serve.
#[derive(Debug, thiserror::Error)]
#[error("runtimes.{name}: {message}")]
pub struct HandlerError {
    /// The handler.
    pub name: String,
    /// Why.
    pub message: String,
}

/// Every handler berth serves, the embedded one first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handlers {
    list: Vec<Handler>,
}

impl Handlers {
    /// The embedded runtime alone.
    pub fn embedded() -> Handlers {
        Handlers {
            list: vec![Handler {
                name: String::new(),
                binary: None,
                version: "berth (embedded libcontainer)".into(),
                features: Features {
                    recursive_read_only: true,
                    user_namespaces: true,
                },
            }],
        }
    }

    /// The embedded runtime and each configured binary, checked: it runs, and it can run
    /// containers on this host's cgroups (`hybrid_v2`: the controllers a cgroup2 mount beside
    /// the v1 hierarchies has, if any).
    pub fn probe(
        configured: &BTreeMap<String, RuntimeHandlerConfig>,
        hybrid_v2: Option<&str>,
    ) -> Result<Handlers, HandlerError> {
        let mut h = Handlers::embedded();
        for (name, c) in configured {
            let err = |message: String| HandlerError {
                name: name.clone(),
                message,
            };
            let Some(binary) = &c.path else {
                return Err(err(
                    "no path: name the OCI runtime binary (path = \"/usr/sbin/runc\")".into(),
                ));
            };
            let version = run(binary, &["--version"]).map_err(err)?;
            let version = version
                .lines()
                .next()
                .unwrap_or_default()
                .trim()
                .to_string();
            check_runc_release(name, binary, &version, c.allow_vulnerable).map_err(err)?;
            // crun refuses every container on a hybrid host whose cgroup2 mount has
            // controllers ("cgroups in hybrid mode not supported"): said once, here.
            if let Some(ctrls) = hybrid_v2
                && version.starts_with("crun")
            {
                return Err(err(format!(
                    "{} ({version}) cannot run containers on this host: it refuses hybrid cgroups \
                     whose cgroup2 mount has controllers (here: {ctrls}); use runc on this host, \
                     or crun on a cgroup v2 (or pure v1) host",
                    binary.display()
                )));
            }
            let features = run(binary, &["features"])
                .ok()
                .map(|json| parse_features(&json))
                .unwrap_or_default();
            h.list.push(Handler {
                name: name.clone(),
                binary: Some(binary.clone()),
                version,
                features,
            });
        }
        Ok(h)
    }

    /// The handler called `name`.
    pub fn get(&self, name: &str) -> Option<&Handler> {
        self.list.iter().find(|h| h.name == name)
    }

    /// Every handler, the embedded one first.
    pub fn all(&self) -> &[Handler] {
        &self.list
    }
}

/// The November 2025 runc advisories: each lets a container break out through runc's writes
/// to /proc (masked paths over a fake /dev/null, the /dev/console bind mount, LSM labels
/// written to a fake procfs file). Fixed in 1.2.8, 1.3.3 and 1.4.0-rc.3.
const RUNC_CVES: &str = "CVE-2025-31133, CVE-2025-52565 and CVE-2025-52881";
/// The first fixed release of each affected series, for the messages.
const RUNC_FIXED: &str =
    "runc 1.2.8+ in 1.2, 1.3.3+ in 1.3, and 1.4.0-rc.3 and every release after it";

/// Refuses a handler binary that identifies as runc (`runc version X.Y.Z` first) without the
/// November 2025 fixes, or as a runc whose version cannot be read, unless its section says
/// `allow_vulnerable = true`: then a warning says the same and the handler is served.
///
/// Only runc is judged: the advisories are runc's. crun and youki (and any other runtime) are
/// taken as before, on their `--version` answering; their own advisories are not tracked here.
fn check_runc_release(
    name: &str,
    binary: &Path,
    version_line: &str,
    allow_vulnerable: bool,
) -> Result<(), String> {
    let mut words = version_line.split_whitespace();
    if (words.next(), words.next()) != (Some("runc"), Some("version")) {
        return Ok(());
    }
    let v = words.collect::<Vec<_>>().join(" ");
    let problem = match RuncVersion::parse(&v) {
        Some(parsed) if parsed.has_2025_fixes() => return Ok(()),
        Some(_) => format!(
            "{} is runc {v}, which lacks the fixes for {RUNC_CVES} (container breakouts \
             through runc's writes to /proc, November 2025), fixed in {RUNC_FIXED}",
            binary.display()
        ),
        None => format!(
            "{} answers `--version` with \"{version_line}\", a runc version berthd cannot read, \
             so it cannot tell whether it has the fixes for {RUNC_CVES} (container breakouts \
             through runc's writes to /proc, November 2025; fixed in {RUNC_FIXED})",
            binary.display()
        ),
    };
    if allow_vulnerable {
        tracing::warn!(
            handler = %name,
            path = %binary.display(),
            version = %v,
            "runtimes.{name}: {problem}; running it anyway because its section says \
             allow_vulnerable = true"
        );
        Ok(())
    } else {
        Err(format!(
            "{problem}. Install one of those, or, for a build with the fixes backported under \
             an older version number, set allow_vulnerable = true in [runtimes.{name}]"
        ))
    }
}

/// A runc release as `runc --version` prints it: `MAJOR.MINOR.PATCH`, an optional pre-release
/// (`-rc.3`), an optional build suffix (`+ds1`, `+dev`; ignored, as semver orders them).
#[derive(Debug, Clone, PartialEq, Eq)]
struct RuncVersion {
    release: (u64, u64, u64),
    /// Dot-separated pre-release identifiers; empty for a release.
    pre: Vec<PreId>,
}

/// One pre-release identifier: numbers order numerically and before words (semver 2.0).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum PreId {
    Num(u64),
    Word(String),
}

impl RuncVersion {
    fn parse(s: &str) -> Option<RuncVersion> {
        let s = s.split('+').next()?;
        let (release, pre) = match s.split_once('-') {
            Some((r, p)) => (r, Some(p)),
            None => (s, None),
        };
        let mut nums = release.split('.').map(|n| {
            if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
                None
            } else {
                n.parse::<u64>().ok()
            }
        });
        let release = (nums.next()??, nums.next()??, nums.next()??);
        if nums.next().is_some() {
            return None;
        }
        let pre = match pre {
            None => Vec::new(),
            Some(p) => p
                .split('.')
                .map(|id| {
                    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                        None
                    } else if id.bytes().all(|b| b.is_ascii_digit()) {
                        id.parse().ok().map(PreId::Num)
                    } else {
                        Some(PreId::Word(id.to_string()))
                    }
                })
                .collect::<Option<Vec<_>>>()?,
        };
        Some(RuncVersion { release, pre })
    }

    /// Whether this release has the November 2025 fixes: 1.2.8+ in 1.2, 1.3.3+ in 1.3,
    /// 1.4.0-rc.3 and later in 1.4, every 1.5 and later; nothing before 1.2.
    fn has_2025_fixes(&self) -> bool {
        let at_least = |min: &str| *self >= RuncVersion::parse(min).expect("a valid version");
        match self.release {
            (0, _, _) | (1, 0..=1, _) => false,
            (1, 2, _) => at_least("1.2.8"),
            (1, 3, _) => at_least("1.3.3"),
            (1, 4, _) => at_least("1.4.0-rc.3"),
            _ => true,
        }
    }
}

impl PartialOrd for RuncVersion {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for RuncVersion {
    /// Semver precedence: the release numbers, then a pre-release before its release, then
    /// the pre-release identifiers in turn (fewer before more when one is a prefix).
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.release.cmp(&other.release).then_with(|| {
            match (self.pre.is_empty(), other.pre.is_empty()) {
                (true, true) => std::cmp::Ordering::Equal,
                (true, false) => std::cmp::Ordering::Greater,
                (false, true) => std::cmp::Ordering::Less,
                (false, false) => self.pre.cmp(&other.pre),
            }
        })
    }
}

/// Runs `binary args` and returns its standard output; an error says how it failed.
fn run(binary: &Path, args: &[&str]) -> Result<String, String> {
    use std::io::Read;
    let mut cmd = std::process::Command::new(binary);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    crate::fdlimit::for_child(&mut cmd);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("{}: {e}", binary.display()))?;
    let deadline = std::time::Instant::now() + PROBE_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`{} {}` did not answer within {} s",
                    binary.display(),
                    args.join(" "),
                    PROBE_TIMEOUT.as_secs()
                ));
            }
        }
    };
    let mut out = String::new();
    let mut err = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if !status.success() {
        return Err(format!(
            "`{} {}` failed ({status}): {}",
            binary.display(),
            args.join(" "),
            err.trim()
        ));
    }
    Ok(out)
}

/// Reads the OCI runtime features document (`runc features`): `rro` among the mount options,
/// idmapped mounts enabled and the user namespace among the namespaces.
fn parse_features(json: &str) -> Features {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(json) else {
        return Features::default();
    };
    let has = |list: &serde_json::Value, want: &str| {
        list.as_array()
            .is_some_and(|a| a.iter().any(|x| x.as_str() == Some(want)))
    };
    Features {
        recursive_read_only: has(&v["mountOptions"], "rro"),
        user_namespaces: has(&v["linux"]["namespaces"], "user")
            && v["linux"]["mountExtensions"]["idmap"]["enabled"] == serde_json::json!(true),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn features_come_from_the_runtimes_document() {
        // runc 1.1: rro, user namespaces but no idmapped mounts.
        let runc11 = r#"{"mountOptions":["ro","rro"],"linux":{"namespaces":["mount","user"]}}"#;
        assert_eq!(
            parse_features(runc11),
            Features {
                recursive_read_only: true,
                user_namespaces: false
            }
        );
        let runc12 = r#"{"mountOptions":["rro"],"linux":{"namespaces":["user"],
            "mountExtensions":{"idmap":{"enabled":true}}}}"#;
        assert!(parse_features(runc12).user_namespaces);
        assert_eq!(parse_features("not json"), Features::default());
    }

    #[test]
    fn runc_versions_are_judged_against_the_2025_fixes() {
        let fixed = |v: &str| {
            RuncVersion::parse(v)
                .unwrap_or_else(|| panic!("{v} does not parse"))
                .has_2025_fixes()
        };
        // Fixed: the first release of each series, later ones, later series.
        for v in [
            "1.2.8",
            "1.2.9",
            "1.3.3",
            "1.3.6",
            "1.4.0-rc.3",
            "1.4.0",
            "1.4.3",
            "1.5.0-rc.1",
            "1.5.3",
            "1.6.0-rc.1",
            "2.0.0",
            "1.5.3+dev",
        ] {
            assert!(fixed(v), "{v} should count as fixed");
        }
        // Not fixed: before 1.2.8, 1.3.0-1.3.2, 1.4.0 release candidates before rc.3, and
        // pre-releases of a fixed release (1.2.8-rc.1 comes before 1.2.8).
        for v in [
            "1.1.5",
            "1.1.5+ds1",
            "1.1.15",
            "1.0.0-rc93",
            "0.1.1",
            "1.2.0-rc.1",
            "1.2.0",
            "1.2.7",
            "1.2.8-rc.1",
            "1.3.0-rc.1",
            "1.3.0",
            "1.3.2",
            "1.4.0-rc.1",
            "1.4.0-rc.2",
            "1.4.0-rc.2+dev",
        ] {
            assert!(!fixed(v), "{v} should count as vulnerable");
        }
        // Semver precedence of pre-releases.
        let v = |s: &str| RuncVersion::parse(s).unwrap();
        assert!(v("1.4.0-rc.2") < v("1.4.0-rc.3"));
        assert!(v("1.4.0-rc.3") < v("1.4.0-rc.10"));
        assert!(v("1.4.0-rc.3") < v("1.4.0"));
        assert!(v("1.4.0-rc") < v("1.4.0-rc.1"));
        assert!(v("1.4.0-1") < v("1.4.0-rc"));
        assert_eq!(v("1.1.5+ds1"), v("1.1.5"));
        // What cannot be read.
        for bad in [
            "",
            "1.2",
            "1.2.x",
            "v1.2.8",
            "1.2.8.1",
            "1.4.0-",
            "1.4.0-rc..3",
            "unknown",
        ] {
            assert_eq!(RuncVersion::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_runc_without_the_2025_fixes_is_refused_unless_allowed() {
        let runc = Path::new("/usr/sbin/runc");
        let e = check_runc_release("runc", runc, "runc version 1.1.5+ds1", false).unwrap_err();
        for want in [
            "/usr/sbin/runc",
            "1.1.5+ds1",
            "CVE-2025-31133",
            "CVE-2025-52565",
            "CVE-2025-52881",
            "1.2.8",
            "1.3.3",
            "1.4.0-rc.3",
            "allow_vulnerable = true in [runtimes.runc]",
        ] {
            assert!(e.contains(want), "{want}: {e}");
        }
        assert!(check_runc_release("runc", runc, "runc version 1.1.5+ds1", true).is_ok());
        assert!(check_runc_release("runc", runc, "runc version 1.5.3", false).is_ok());
        assert!(check_runc_release("runc", runc, "runc version 1.3.3", false).is_ok());
        let e = check_runc_release("runc", runc, "runc version 1.4.0-rc.2", false).unwrap_err();
        assert!(e.contains("1.4.0-rc.2"), "{e}");
        // A version that cannot be read: refused, or allowed with allow_vulnerable.
        let e = check_runc_release("runc", runc, "runc version unknown", false).unwrap_err();
        assert!(
            e.contains("cannot read") && e.contains("CVE-2025-31133"),
            "{e}"
        );
        assert!(check_runc_release("runc", runc, "runc version unknown", true).is_ok());
        // Other runtimes are not judged by runc's advisories.
        for other in [
            "crun version 1.8.1",
            "youki version 0.5.0",
            "runsc version release-2024",
        ] {
            assert!(
                check_runc_release("x", runc, other, false).is_ok(),
                "{other}"
            );
        }
    }

    #[test]
    fn a_runtime_that_is_not_there_or_fails_is_refused_by_name() {
        let mut c = BTreeMap::new();
        c.insert(
            "ghost".to_string(),
            RuntimeHandlerConfig {
                path: Some("/nonexistent/runc".into()),
                ..Default::default()
            },
        );
        let e = Handlers::probe(&c, None).unwrap_err().to_string();
        assert!(
            e.contains("runtimes.ghost") && e.contains("/nonexistent/runc"),
            "{e}"
        );
        c.insert(
            "ghost".to_string(),
            RuntimeHandlerConfig {
                path: Some("/bin/false".into()),
                ..Default::default()
            },
        );
        let e = Handlers::probe(&c, None).unwrap_err().to_string();
        assert!(e.contains("failed"), "{e}");
        c.insert("ghost".to_string(), RuntimeHandlerConfig::default());
        let e = Handlers::probe(&c, None).unwrap_err().to_string();
        assert!(e.contains("no path"), "{e}");
    }
}
