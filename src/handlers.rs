//! Runtime handlers (RuntimeClass): "" is the embedded runtime; each `[runtimes.<name>]` of
//! the configuration names an OCI runtime binary (runc) the pod's monitor drives through the
//! OCI runtime command line. Each binary is checked at start, and what it can do (recursive
//! read-only mounts, idmapped mounts for user namespaces) is read from its `features`
//! command, so Status claims for it only what it does.

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

/// Runs `binary args` and returns its standard output; an error says how it failed.
fn run(binary: &Path, args: &[&str]) -> Result<String, String> {
    use std::io::Read;
    let mut child = std::process::Command::new(binary)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
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
    fn a_runtime_that_is_not_there_or_fails_is_refused_by_name() {
        let mut c = BTreeMap::new();
        c.insert(
            "ghost".to_string(),
            RuntimeHandlerConfig {
                path: Some("/nonexistent/runc".into()),
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
            },
        );
        let e = Handlers::probe(&c, None).unwrap_err().to_string();
        assert!(e.contains("failed"), "{e}");
        c.insert("ghost".to_string(), RuntimeHandlerConfig { path: None });
        let e = Handlers::probe(&c, None).unwrap_err().to_string();
        assert!(e.contains("no path"), "{e}");
    }
}
