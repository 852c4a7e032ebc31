//! Finding the network configuration: the first `.conflist`, `.conf` or `.json` file of the
//! configuration directory in lexical order, as containerd and CRI-O pick it. A single-plugin
//! `.conf` becomes a list of one. The list is kept as the administrator wrote it (plugins'
//! own keys untouched) next to its parsed form.

use std::path::{Path, PathBuf};

use rscni_types::types::NetConfList;
use rscni_types::version::SpecVersion;
use serde_json::Value;

/// A network configuration list ready to run.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The file it came from.
    pub file: PathBuf,
    /// The list as JSON (a `.conf` wrapped into one), what the cache keeps.
    pub raw: Value,
    /// Its name.
    pub name: String,
    /// Its CNI version.
    pub version: SpecVersion,
    /// Whether GC must not be called for it.
    pub disable_gc: bool,
}

/// The chosen configuration of `dir`, or why there is none (the message names the
/// directory or the file).
pub fn load(dir: &Path) -> Result<Loaded, String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("no CNI network configuration: {}: {e}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && matches!(
                    p.extension().and_then(|x| x.to_str()),
                    Some("conflist" | "conf" | "json")
                )
        })
        .collect();
    files.sort();
    let Some(file) = files.into_iter().next() else {
        return Err(format!(
            "no CNI network configuration in {} (a .conflist, .conf or .json file)",
            dir.display()
        ));
    };
    parse_file(&file)
}

/// Parses one configuration file.
pub fn parse_file(file: &Path) -> Result<Loaded, String> {
    let bad = |m: String| format!("CNI network configuration {}: {m}", file.display());
    let text = std::fs::read(file).map_err(|e| bad(e.to_string()))?;
    let v: Value = serde_json::from_slice(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let raw = if file.extension().and_then(|x| x.to_str()) == Some("conflist") {
        v
    } else {
        // A single plugin's configuration: its name and version are the list's.
        serde_json::json!({
            "cniVersion": v.get("cniVersion").cloned().unwrap_or(Value::Null),
            "name": v.get("name").cloned().unwrap_or(Value::Null),
            "plugins": [v],
        })
    };
    parse(file, raw).map_err(bad)
}

fn parse(file: &Path, raw: Value) -> Result<Loaded, String> {
    let list: NetConfList = serde_json::from_value(raw.clone()).map_err(|e| e.to_string())?;
    if list.plugins.is_empty() {
        return Err("it lists no plugin".into());
    }
    let named = |s: &str| {
        let mut c = s.chars();
        c.next().is_some_and(|c| c.is_ascii_alphanumeric())
            && c.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    };
    if !named(&list.name) {
        return Err(format!("network name {:?} is not a valid name", list.name));
    }
    for p in &list.plugins {
        if p.r#type.is_empty() || p.r#type.contains('/') || p.r#type.starts_with('.') {
            return Err(format!("plugin type {:?} is not a binary name", p.r#type));
        }
    }
    let version = list.version().map_err(|e| e.to_string())?;
    Ok(Loaded {
        file: file.to_path_buf(),
        name: list.name.clone(),
        version,
        disable_gc: list.disable_gc,
        raw,
    })
}

impl Loaded {
    /// The plugins' own configurations, in list order.
    pub fn plugins(&self) -> Vec<Value> {
        self.raw["plugins"].as_array().cloned().unwrap_or_default()
    }

    /// The list's version as the plugins receive it (`cniVersion`).
    pub fn version_string(&self) -> String {
        self.raw["cniVersion"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| self.version.to_string())
    }

    /// Rebuilds a loaded list from what the cache kept.
    pub fn from_cached(file: &Path, raw: Value) -> Result<Loaded, String> {
        parse(file, raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_file_in_lexical_order_wins_and_a_conf_becomes_a_list() {
        let dir = std::env::temp_dir().join(format!("berth-cni-conf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        assert!(
            load(&dir)
                .unwrap_err()
                .contains("no CNI network configuration in")
        );
        std::fs::write(
            dir.join("20-b.conflist"),
            r#"{"cniVersion":"1.0.0","name":"b","plugins":[{"type":"bridge"},{"type":"portmap","capabilities":{"portMappings":true}}]}"#,
        )
        .unwrap();
        std::fs::write(dir.join("README"), "not a config").unwrap();
        let l = load(&dir).unwrap();
        assert_eq!((l.name.as_str(), l.plugins().len()), ("b", 2));
        std::fs::write(
            dir.join("10-a.conf"),
            r#"{"cniVersion":"0.4.0","name":"a","type":"ptp","ipMasq":true}"#,
        )
        .unwrap();
        let l = load(&dir).unwrap();
        assert_eq!(l.name, "a");
        assert_eq!(l.plugins()[0]["ipMasq"], true);
        assert_eq!(l.version_string(), "0.4.0");
        std::fs::write(dir.join("05-bad.conflist"), "{").unwrap();
        let e = load(&dir).unwrap_err();
        assert!(
            e.contains("05-bad.conflist") && e.contains("not JSON"),
            "{e}"
        );
        std::fs::write(
            dir.join("05-bad.conflist"),
            r#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"../sbin/evil"}]}"#,
        )
        .unwrap();
        let e = load(&dir).unwrap_err();
        assert!(e.contains("not a binary name"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
