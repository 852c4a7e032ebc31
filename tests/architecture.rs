//! The shape of the source tree, checked: data flows one way, so no module of `src/` may reach
//! back to one that reaches it (no import cycle, between top-level modules nor between the
//! files of one directory), and no file outgrows what one reader takes in at once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Files longer than this are split by responsibility.
const MAX_LINES: usize = 650;

/// A source file as a module path (`sandbox/run.rs` → ["sandbox", "run"]; `mod.rs` is its
/// directory).
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap();
    let mut parts: Vec<String> = rel
        .iter()
        .map(|c| c.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs").to_string();
    if stem != "mod" {
        parts.push(stem);
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without comments, string literals and its `#[cfg(test)]` module (tests
/// may reach anywhere).
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .map(|l| {
            let l = l.split("//").next().unwrap_or("");
            let mut out = String::new();
            let mut in_str = false;
            for c in l.chars() {
                if c == '"' {
                    in_str = !in_str;
                } else if !in_str {
                    out.push(c);
                }
            }
            out
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn idents_after<'a>(code: &'a str, prefix: &str) -> Vec<Vec<&'a str>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        // `a::b::c`, or `{a, b::c}` (one level of braces is enough for this tree).
        let path_end = rest
            .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':'))
            .unwrap_or(rest.len());
        let path = &rest[..path_end];
        if path.is_empty() && rest.starts_with('{') {
            let close = rest.find('}').unwrap_or(rest.len());
            for item in rest[1..close].split(',') {
                let item = item.trim();
                if !item.is_empty() {
                    out.push(item.split("::").map(str::trim).collect());
                }
            }
            continue;
        }
        out.push(path.split("::").filter(|s| !s.is_empty()).collect());
    }
    out
}

/// The longest prefix of `path` that is a module of the tree.
fn resolve(modules: &BTreeSet<Vec<String>>, path: &[String]) -> Option<Vec<String>> {
    (1..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| modules.contains(p))
}

fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == n) {
            let mut c = stack[i..].to_vec();
            c.push(n.to_string());
            return Some(c);
        }
        if done.contains(n) {
            return None;
        }
        stack.push(n.to_string());
        for m in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(m, edges, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(n.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for n in edges.keys() {
        if let Some(c) = visit(n, edges, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

struct Tree {
    /// Every module and what it refers to (resolved module paths).
    refs: BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
    lines: BTreeMap<PathBuf, usize>,
}

fn tree() -> Tree {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.retain(|f| !f.ends_with("main.rs") && !f.ends_with("lib.rs"));
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut refs = BTreeMap::new();
    let mut lines = BTreeMap::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        lines.insert(f.clone(), text.lines().count());
        let me = module_of(&src, f);
        let c = code(&text);
        let mut to = BTreeSet::new();
        for p in idents_after(&c, "crate::") {
            let p: Vec<String> = p.iter().map(|s| s.to_string()).collect();
            if let Some(m) = resolve(&modules, &p) {
                to.insert(m);
            }
        }
        // `super::` from a file is its directory's module (`mod.rs`), or a sibling below it.
        let parent = &me[..me.len() - 1];
        for p in idents_after(&c, "super::") {
            let mut full = parent.to_vec();
            full.extend(p.iter().map(|s| s.to_string()));
            if let Some(m) = resolve(&modules, &full) {
                to.insert(m);
            }
        }
        // From a `mod.rs`, a child named without a prefix (`child::f()`, `use child::X`). A
        // `pub use` re-export is the module's public face, not a dependency of its code.
        if f.ends_with("mod.rs") {
            let body: String = c
                .lines()
                .filter(|l| !l.trim_start().starts_with("pub use "))
                .collect::<Vec<_>>()
                .join("\n");
            for child in modules
                .iter()
                .filter(|m| m.len() == me.len() + 1 && m.starts_with(&me))
            {
                let name = child.last().unwrap();
                if !idents_after(&body, &format!("{name}::")).is_empty() {
                    to.insert(child.clone());
                }
            }
        }
        to.remove(&me);
        refs.insert(me, to);
    }
    Tree { refs, lines }
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    let t = tree();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in &t.refs {
        for to in tos {
            if from[0] != to[0] {
                edges
                    .entry(from[0].clone())
                    .or_default()
                    .insert(to[0].clone());
            }
        }
    }
    assert!(
        edges.len() > 5,
        "the check found too few modules: {edges:?}"
    );
    if let Some(c) = find_cycle(&edges) {
        panic!("import cycle between top-level modules: {}", c.join(" -> "));
    }
}

#[test]
fn no_import_cycle_between_the_files_of_a_directory() {
    let t = tree();
    // Within each top-level module: its files, mod.rs included.
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in &t.refs {
        for to in tos {
            if from[0] == to[0] && from != to {
                edges
                    .entry(from.join("/"))
                    .or_default()
                    .insert(to.join("/"));
            }
        }
    }
    if let Some(c) = find_cycle(&edges) {
        panic!("import cycle between files: {}", c.join(" -> "));
    }
}

#[test]
fn no_source_file_outgrows_one_reading() {
    let t = tree();
    let big: Vec<String> = t
        .lines
        .iter()
        .filter(|(_, n)| **n > MAX_LINES)
        .map(|(f, n)| format!("{} ({n} lines)", f.display()))
        .collect();
    assert!(big.is_empty(), "files over {MAX_LINES} lines: {big:?}");
}
