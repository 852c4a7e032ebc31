//! Running one CNI plugin, per the CNI specification's execution protocol: the binary named
//! by the plugin's `type`, found in the configured directories; parameters in `CNI_*`
//! environment variables and the network configuration on stdin; a result or an error object
//! on stdout. A plugin that runs past its timeout is killed. Errors carry what the plugin
//! said (its error object and the end of its stderr), so a failed call names the plugin.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// How much of a plugin's stderr goes into an error message.
const STDERR_TAIL: usize = 2048;

/// One call of a plugin.
#[derive(Debug, Clone)]
pub struct Invocation<'a> {
    /// `ADD`, `DEL`, `CHECK`, `GC`, `STATUS`.
    pub command: &'a str,
    /// `CNI_CONTAINERID` (the pod's id); empty for GC and STATUS.
    pub container_id: &'a str,
    /// `CNI_NETNS`, when there is one.
    pub netns: Option<&'a Path>,
    /// `CNI_IFNAME`.
    pub ifname: &'a str,
    /// `CNI_ARGS`.
    pub args: &'a str,
}

/// A plugin call that failed.
#[derive(Debug, thiserror::Error)]
#[error("CNI plugin {plugin} ({command}) failed: {message}")]
pub struct PluginError {
    /// The plugin's type.
    pub plugin: String,
    /// The command.
    pub command: String,
    /// What went wrong, with what the plugin said.
    pub message: String,
}

/// Runs `plugin` with `conf` on stdin; its stdout parsed (`None` when it printed nothing, as
/// DEL may).
pub async fn run(
    bin_dirs: &[PathBuf],
    plugin: &str,
    inv: &Invocation<'_>,
    conf: &Value,
    timeout: Duration,
) -> Result<Option<Value>, PluginError> {
    let fail = |message: String| PluginError {
        plugin: plugin.to_string(),
        command: inv.command.to_string(),
        message,
    };
    let binary = find(bin_dirs, plugin).ok_or_else(|| {
        fail(format!(
            "no executable {plugin:?} in {}",
            bin_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let cni_path = std::env::join_paths(bin_dirs).map_err(|e| fail(e.to_string()))?;
    let mut cmd = tokio::process::Command::new(&binary);
    cmd.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("CNI_COMMAND", inv.command)
        .env("CNI_CONTAINERID", inv.container_id)
        .env("CNI_IFNAME", inv.ifname)
        .env("CNI_PATH", cni_path)
        .env("CNI_ARGS", inv.args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(ns) = inv.netns {
        cmd.env("CNI_NETNS", ns);
    }
    crate::fdlimit::for_child(cmd.as_std_mut());
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(format!("{}: {e}", binary.display())))?;
    let input = serde_json::to_vec(conf).expect("JSON values serialize");
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let output = tokio::time::timeout(timeout, async move {
        // A plugin that exits without reading its input is judged by its exit, not by EPIPE.
        let _ = stdin.write_all(&input).await;
        drop(stdin);
        child.wait_with_output().await
    })
    .await
    .map_err(|_| fail(format!("no answer within {} s (killed)", timeout.as_secs())))?
    .map_err(|e| fail(e.to_string()))?;
    let stderr = tail(&output.stderr);
    let said = |stdout: &[u8]| -> String {
        let err = serde_json::from_slice::<Value>(stdout).ok();
        let obj = err.as_ref().filter(|v| v.get("code").is_some());
        let mut m = match obj {
            Some(v) => format!(
                "error {}: {}{}",
                v["code"],
                v["msg"].as_str().unwrap_or(""),
                match v["details"].as_str() {
                    Some(d) if !d.is_empty() => format!(" ({d})"),
                    _ => String::new(),
                }
            ),
            None => String::from_utf8_lossy(stdout).trim().to_string(),
        };
        if !stderr.is_empty() {
            m.push_str(&format!("; stderr: {stderr}"));
        }
        m
    };
    if !output.status.success() {
        return Err(fail(format!("{}: {}", output.status, said(&output.stdout))));
    }
    if output.stdout.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    let v: Value = serde_json::from_slice(&output.stdout).map_err(|e| {
        fail(format!(
            "its output is not JSON ({e}): {}",
            said(&output.stdout)
        ))
    })?;
    Ok(Some(v))
}

/// The first `plugin` executable in `dirs`.
fn find(dirs: &[PathBuf], plugin: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    dirs.iter().map(|d| d.join(plugin)).find(|p| {
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

/// The end of a plugin's stderr, trimmed, as text.
fn tail(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let s = s.trim();
    let mut start = s.len().saturating_sub(STDERR_TAIL);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    s[start..].replace('\n', " | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(dir: &Path, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn results_errors_missing_binaries_and_timeouts() {
        let dir = std::env::temp_dir().join(format!("berth-cni-exec-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        plugin(
            &dir,
            "echoer",
            r#"read conf; printf '{"cniVersion":"1.0.0","cmd":"%s","ifname":"%s","conf":%s}' "$CNI_COMMAND" "$CNI_IFNAME" "$conf""#,
        );
        plugin(
            &dir,
            "failer",
            r#"echo "it broke" >&2; echo '{"code":7,"msg":"bad config","details":"no bridge"}'; exit 1"#,
        );
        plugin(&dir, "sleeper", "sleep 5");
        let inv = Invocation {
            command: "ADD",
            container_id: "c1",
            netns: None,
            ifname: "eth0",
            args: "IgnoreUnknown=1",
        };
        let conf = serde_json::json!({"type": "echoer", "x": 1});
        let dirs = vec![PathBuf::from("/nonexistent"), dir.clone()];
        let out = run(&dirs, "echoer", &inv, &conf, Duration::from_secs(5))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (out["cmd"].as_str(), out["ifname"].as_str()),
            (Some("ADD"), Some("eth0"))
        );
        assert_eq!(out["conf"]["x"], 1);
        let e = run(&dirs, "failer", &inv, &conf, Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("failer (ADD)") && e.contains("bad config") && e.contains("no bridge"),
            "{e}"
        );
        assert!(e.contains("it broke"), "{e}");
        let e = run(&dirs, "absent", &inv, &conf, Duration::from_secs(5))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no executable \"absent\""), "{e}");
        let e = run(&dirs, "sleeper", &inv, &conf, Duration::from_millis(300))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("no answer within"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
