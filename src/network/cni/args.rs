//! What the plugins are given and what they answer, as plain data: each plugin's stdin (its
//! configuration with the list's name and version, `prevResult`, `runtimeConfig`), `CNI_ARGS`,
//! the `bandwidth` capability from a pod's annotations, and the pod's addresses in a result.

use std::collections::BTreeMap;
use std::net::IpAddr;

use rscni_types::types::CNIResult;
use serde_json::{Value, json};

use super::conf::Loaded;

/// A plugin's `type`.
pub(super) fn plugin_type(plugin: &Value) -> String {
    plugin["type"].as_str().unwrap_or_default().to_string()
}

/// What a plugin reads on stdin: its own configuration with the list's name and version,
/// the previous result, and the capability arguments it declared (`runtimeConfig`).
pub(super) fn plugin_conf(l: &Loaded, plugin: &Value, prev: Option<&Value>, caps: &Value) -> Value {
    let mut conf = plugin.clone();
    conf["name"] = json!(l.name);
    conf["cniVersion"] = json!(l.version_string());
    if let Some(prev) = prev {
        conf["prevResult"] = prev.clone();
    }
    let mut runtime = serde_json::Map::new();
    if let Some(declared) = plugin["capabilities"].as_object() {
        for (cap, on) in declared {
            if on == &json!(true)
                && let Some(v) = caps.get(cap)
            {
                runtime.insert(cap.clone(), v.clone());
            }
        }
    }
    if !runtime.is_empty() {
        conf["runtimeConfig"] = Value::Object(runtime);
    }
    conf
}

/// `CNI_ARGS` as Kubernetes runtimes pass them, for a pod's namespace, name, id and uid.
pub(super) fn cni_args(namespace: &str, name: &str, id: &str, uid: &str) -> Result<String, String> {
    let pairs = [
        ("K8S_POD_NAMESPACE", namespace),
        ("K8S_POD_NAME", name),
        ("K8S_POD_INFRA_CONTAINER_ID", id),
        ("K8S_POD_UID", uid),
    ];
    let mut out = String::from("IgnoreUnknown=1");
    for (k, v) in pairs {
        if v.contains([';', '=']) || v.chars().any(char::is_control) {
            return Err(format!(
                "{k} {v:?} cannot be passed to CNI plugins (';', '=' or a control character)"
            ));
        }
        out.push_str(&format!(";{k}={v}"));
    }
    Ok(out)
}

/// The pod's addresses from a final result, the first IPv4 first.
pub(super) fn addresses(result: &Value) -> Result<Vec<IpAddr>, String> {
    let r: CNIResult = serde_json::from_value(result.clone())
        .map_err(|e| format!("the final result cannot be read: {e}"))?;
    let mut ips: Vec<IpAddr> = r.ips.iter().map(|i| i.address.addr()).collect();
    if ips.is_empty() {
        return Err("the final result gives the pod no IP address".into());
    }
    if let Some(i) = ips.iter().position(IpAddr::is_ipv4) {
        let v4 = ips.remove(i);
        ips.insert(0, v4);
    }
    Ok(ips)
}

/// The `bandwidth` capability from the pod's annotations, in bits per second.
pub(super) fn bandwidth(annotations: &BTreeMap<String, String>) -> Result<Option<Value>, String> {
    // No burst is asked for by Kubernetes: the largest the plugin takes, as other runtimes.
    const BURST: u64 = i32::MAX as u64;
    let mut bw = serde_json::Map::new();
    for (key, rate, burst) in [
        (
            "kubernetes.io/ingress-bandwidth",
            "ingressRate",
            "ingressBurst",
        ),
        (
            "kubernetes.io/egress-bandwidth",
            "egressRate",
            "egressBurst",
        ),
    ] {
        if let Some(q) = annotations.get(key) {
            let bits = quantity(q).ok_or_else(|| {
                format!("annotation {key} {q:?} is not a quantity (for example 10M)")
            })?;
            bw.insert(rate.into(), json!(bits));
            bw.insert(burst.into(), json!(BURST));
        }
    }
    Ok((!bw.is_empty()).then_some(Value::Object(bw)))
}

/// A Kubernetes quantity (`10M`, `1Gi`, `500k`, `1e6`) as a whole number.
fn quantity(q: &str) -> Option<u64> {
    let q = q.trim();
    let split = q
        .find(|c: char| c.is_ascii_alphabetic() && c != 'e' && c != 'E')
        .unwrap_or(q.len());
    let (num, suffix) = q.split_at(split);
    let factor: f64 = match suffix {
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0f64.powi(2),
        "Gi" => 1024.0f64.powi(3),
        "Ti" => 1024.0f64.powi(4),
        "Pi" => 1024.0f64.powi(5),
        "Ei" => 1024.0f64.powi(6),
        _ => return None,
    };
    let n: f64 = num.parse().ok()?;
    let v = n * factor;
    (v.is_finite() && v >= 1.0 && v < u64::MAX as f64).then_some(v as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn quantities_args_and_capabilities() {
        assert_eq!(quantity("10M"), Some(10_000_000));
        assert_eq!(quantity("1Gi"), Some(1 << 30));
        assert_eq!(quantity("1.5k"), Some(1500));
        assert_eq!(quantity("1e6"), Some(1_000_000));
        assert_eq!(quantity("10 lots"), None);
        assert_eq!(quantity("-1M"), None);
        let mut a = BTreeMap::new();
        a.insert(
            "kubernetes.io/ingress-bandwidth".to_string(),
            "1M".to_string(),
        );
        let bw = bandwidth(&a).unwrap().unwrap();
        assert_eq!(bw["ingressRate"], 1_000_000);
        assert!(bw.get("egressRate").is_none());
        a.insert(
            "kubernetes.io/egress-bandwidth".to_string(),
            "fast".to_string(),
        );
        assert!(bandwidth(&a).unwrap_err().contains("egress-bandwidth"));

        assert_eq!(
            cni_args("default", "web", "abc", "u-1").unwrap(),
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1"
        );
        assert!(cni_args("default", "a;b=c", "abc", "u-1").is_err());

        let l = Loaded::from_cached(
            Path::new("/x.conflist"),
            json!({"cniVersion": "1.0.0", "name": "net", "plugins": [
                {"type": "bridge"},
                {"type": "portmap", "capabilities": {"portMappings": true, "bandwidth": false}}]}),
        )
        .unwrap();
        let caps = json!({"portMappings": [{"hostPort": 80}], "bandwidth": {"ingressRate": 1}});
        let plugins = l.plugins();
        let first = plugin_conf(&l, &plugins[0], None, &caps);
        assert_eq!(first["name"], "net");
        assert!(first.get("runtimeConfig").is_none() && first.get("prevResult").is_none());
        let prev = json!({"ips": [{"address": "10.1.0.5/24"}]});
        let second = plugin_conf(&l, &plugins[1], Some(&prev), &caps);
        assert_eq!(second["prevResult"], prev);
        assert_eq!(
            second["runtimeConfig"],
            json!({"portMappings": [{"hostPort": 80}]})
        );
    }

    #[test]
    fn the_first_ipv4_address_leads() {
        let r = json!({"cniVersion": "1.0.0", "ips": [
            {"address": "fd00::5/64"}, {"address": "10.1.0.5/24", "gateway": "10.1.0.1"}]});
        let ips = addresses(&r).unwrap();
        assert_eq!(
            ips,
            vec![
                "10.1.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert!(addresses(&json!({"cniVersion": "1.0.0"})).is_err());
    }
}
