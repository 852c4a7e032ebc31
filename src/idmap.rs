//! Finding an object by its id or by a unique prefix of it, as people type ids from `crictl`.

use std::collections::HashMap;

/// What a lookup found.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<T> {
    /// Exactly one.
    Found(T),
    /// None.
    Missing,
    /// The prefix fits several.
    Ambiguous,
}

/// The entry whose id is `id`, or whose id alone starts with `id`.
pub fn find<T: Clone>(map: &HashMap<String, T>, id: &str) -> Lookup<T> {
    if let Some(v) = map.get(id) {
        return Lookup::Found(v.clone());
    }
    if id.is_empty() {
        return Lookup::Missing;
    }
    let mut hits = map.iter().filter(|(k, _)| k.starts_with(id));
    match (hits.next(), hits.next()) {
        (Some((_, v)), None) => Lookup::Found(v.clone()),
        (Some(_), Some(_)) => Lookup::Ambiguous,
        _ => Lookup::Missing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_ids_then_unique_prefixes() {
        let m: HashMap<String, u8> = [
            ("abc1".to_string(), 1),
            ("abc2".to_string(), 2),
            ("def".to_string(), 3),
        ]
        .into();
        assert_eq!(find(&m, "abc1"), Lookup::Found(1));
        assert_eq!(find(&m, "d"), Lookup::Found(3));
        assert_eq!(find(&m, "abc"), Lookup::Ambiguous);
        assert_eq!(find(&m, "x"), Lookup::Missing);
        assert_eq!(find(&m, ""), Lookup::Missing);
    }
}
