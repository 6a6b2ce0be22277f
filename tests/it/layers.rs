//! The library's modules form layers (docs/ARCHITECTURE.md, "Layers"): each uses only its own layer and
//! the ones below it, and no two modules use each other, directly or in a ring. This test reads `src/`,
//! builds the graph of references between top-level modules (every `crate::` path, and every `super::`
//! path that climbs to the crate root, in any `use` tree, comments and strings left out), and fails on a
//! reference upward, on a cycle, on a module missing from the table, or on a name reached through a
//! crate-root re-export (which would hide the module it comes from), naming the files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top to bottom. A module may use modules of its own layer or of a lower one, never of a higher one;
/// within a layer the references must not form a cycle.
const LAYERS: &[&[&str]] = &[
    &["gateway"],
    &["server", "admin", "health_checks", "discovery"],
    &["proxy"],
    &["state", "conn"],
    &[
        "websocket",
        "http1",
        "admission",
        "balancer",
        "upstream",
        "router",
        "tls",
        "metrics",
        "headers",
        "body",
        "config",
        "origin",
        "proxy_protocol",
        "resolver",
    ],
];

/// The binary's own files: they use the library as `wsgate::`, never `crate::`.
const BINARY: &[&str] = &["main.rs", "demo.rs"];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The source's tokens that matter here: identifiers, `::`, and the punctuation of `use` trees and
/// blocks. Comments, string and character literals are dropped (a `//` inside a string is not a comment).
fn tokens(source: &str) -> Vec<String> {
    let chars: Vec<char> = source.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == 'r'
            && (at(i + 1) == '"' || (at(i + 1) == '#' && matches!(at(i + 2), '"' | '#')))
        {
            // A raw string: r"…", r#"…"#, …
            let mut hashes = 0;
            i += 1;
            while at(i) == '#' {
                hashes += 1;
                i += 1;
            }
            i += 1;
            while i < chars.len() {
                if chars[i] == '"' && (0..hashes).all(|h| at(i + 1 + h) == '#') {
                    i += 1 + hashes;
                    break;
                }
                i += 1;
            }
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '\'' {
            // A character literal ('x', '\n', '\'') or a lifetime ('a).
            if at(i + 1) == '\\' {
                i += 2;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(chars[start..i].iter().collect());
        } else if c == ':' && at(i + 1) == ':' {
            out.push("::".into());
            i += 2;
        } else {
            if matches!(c, '{' | '}' | ',' | ';' | '*') {
                out.push(c.to_string());
            }
            i += 1;
        }
    }
    out
}

/// The first segments of the `use` tree (or path) starting at `tokens[i]`: `a::b` gives `a`,
/// `{a::b, c::{d, e}}` gives `a` and `c`, `*` gives `*`.
fn first_segments(tokens: &[String], i: usize) -> Vec<String> {
    match tokens.get(i).map(String::as_str) {
        Some("{") => {
            let mut names = Vec::new();
            let mut depth = 0;
            let mut expecting = true;
            for token in &tokens[i..] {
                match token.as_str() {
                    "{" => {
                        depth += 1;
                        if depth > 1 {
                            expecting = false;
                        }
                    }
                    "}" => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    "," if depth == 1 => expecting = true,
                    name if expecting && depth == 1 => {
                        names.push(name.to_string());
                        expecting = false;
                    }
                    _ => {}
                }
            }
            names
        }
        Some(name) => vec![name.to_string()],
        None => Vec::new(),
    }
}

/// The top-level names a file refers to at the crate root: after `crate::`, or after as many `super::` as
/// climb from the file's module (`module_path`, with its inline `mod x { … }` blocks) to the root.
fn references(source: &str, module_path: &[String]) -> BTreeSet<String> {
    let tokens = tokens(source);
    let mut found = BTreeSet::new();
    // Inline modules open at each brace depth.
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut depth = 0;
    let mut i = 0;
    while i < tokens.len() {
        match tokens[i].as_str() {
            "mod" if tokens.get(i + 2).is_some_and(|t| t == "{") => {
                inline.push((tokens[i + 1].clone(), depth + 1));
            }
            "{" => depth += 1,
            "}" => {
                if inline.last().is_some_and(|(_, d)| *d == depth) {
                    inline.pop();
                }
                depth -= 1;
            }
            "crate" if tokens.get(i + 1).is_some_and(|t| t == "::") => {
                found.extend(first_segments(&tokens, i + 2));
            }
            "super" if i == 0 || tokens[i - 1] != "::" => {
                let mut supers = 0;
                let mut j = i;
                while tokens.get(j).is_some_and(|t| t == "super")
                    && tokens.get(j + 1).is_some_and(|t| t == "::")
                {
                    supers += 1;
                    j += 2;
                }
                if supers > 0 && supers >= module_path.len() + inline.len() {
                    found.extend(first_segments(&tokens, j));
                }
                i = j.max(i + 1);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    found.remove("self");
    found
}

/// A file's module path (`src/proxy/http.rs` → `proxy::http`, `src/proxy/mod.rs` → `proxy`); `None`
/// for the crate root and the binary's files.
fn module_path(src: &Path, file: &Path) -> Option<Vec<String>> {
    let relative = file.strip_prefix(src).expect("under src");
    let parts: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.len() == 1 && (parts[0] == "lib.rs" || BINARY.contains(&parts[0].as_str())) {
        return None;
    }
    let mut path: Vec<String> = parts
        .into_iter()
        .map(|p| p.trim_end_matches(".rs").to_string())
        .collect();
    if path.last().is_some_and(|p| p == "mod") {
        path.pop();
    }
    Some(path)
}

/// Module → (used module → the files that use it).
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

/// The graph of `src/`, and the names used at the crate root that are not modules (re-exports).
fn graph() -> (Graph, Vec<String>) {
    let src = src();
    let mut files = Vec::new();
    sources(&src, &mut files);
    let modules: BTreeSet<String> = files
        .iter()
        .filter_map(|f| module_path(&src, f))
        .map(|p| p[0].clone())
        .collect();
    let mut graph = Graph::new();
    let mut not_modules = Vec::new();
    for file in files {
        let Some(path) = module_path(&src, &file) else {
            continue;
        };
        let module = path[0].clone();
        let text = std::fs::read_to_string(&file).expect("readable source");
        let shown = file
            .strip_prefix(&src)
            .expect("under src")
            .display()
            .to_string();
        let uses = graph.entry(module.clone()).or_default();
        for used in references(&text, &path) {
            if !modules.contains(&used) {
                not_modules.push(format!("`{used}` in {shown}"));
            } else if used != module {
                uses.entry(used).or_default().insert(shown.clone());
            }
        }
    }
    (graph, not_modules)
}

/// A cycle through `start`, if any, as the list of modules along it.
fn cycle_from(graph: &Graph, start: &str) -> Option<Vec<String>> {
    fn walk(
        graph: &Graph,
        at: &str,
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        for next in graph.get(at).into_iter().flat_map(|uses| uses.keys()) {
            if next == start {
                return true;
            }
            if seen.insert(next.clone()) {
                path.push(next.clone());
                if walk(graph, next, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start.to_string()];
    let mut seen = BTreeSet::new();
    walk(graph, start, start, &mut path, &mut seen).then_some(path)
}

#[test]
fn every_module_is_in_a_layer_and_reached_by_its_own_name() {
    let (graph, not_modules) = graph();
    let unknown: Vec<_> = graph.keys().filter(|m| layer_of(m).is_none()).collect();
    assert!(
        unknown.is_empty(),
        "modules missing from LAYERS in tests/it/layers.rs (and from docs/ARCHITECTURE.md): {unknown:?}"
    );
    assert!(
        not_modules.is_empty(),
        "names reached at the crate root that are not modules (use the module that defines them): {not_modules:?}"
    );
}

#[test]
fn modules_use_only_their_layer_and_the_ones_below() {
    let mut upward = Vec::new();
    for (module, uses) in graph().0 {
        let Some(own) = layer_of(&module) else {
            continue;
        };
        for (used, files) in uses {
            if layer_of(&used).is_some_and(|layer| layer < own) {
                upward.push(format!("{module} uses {used} (above it) in {files:?}"));
            }
        }
    }
    assert!(
        upward.is_empty(),
        "references upward:\n{}",
        upward.join("\n")
    );
}

#[test]
fn modules_do_not_use_each_other_in_a_ring() {
    let (graph, _) = graph();
    for module in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, module) {
            let mut steps = Vec::new();
            for (from, to) in cycle.iter().zip(cycle.iter().skip(1).chain([&cycle[0]])) {
                let files = &graph[from][to];
                steps.push(format!("{from} → {to} (in {files:?})"));
            }
            panic!("import cycle:\n{}", steps.join("\n"));
        }
    }
}

#[test]
fn the_checker_sees_every_form_of_reference() {
    let path = |p: &str| -> Vec<String> { p.split("::").map(String::from).collect() };
    let names = |source: &str, module: &str| -> Vec<String> {
        references(source, &path(module)).into_iter().collect()
    };
    // Plain paths, in code; comments and strings do not count.
    let source = "use crate::proxy::Answer; // crate::gateway\n/* crate::server */\n\
                  let url = \"http://x/ crate::admin\"; let c = '\"'; let x = crate::metrics::f(1);";
    assert_eq!(names(source, "conn"), ["metrics", "proxy"]);
    // Groups, nested and wrapped over lines as rustfmt writes them; globs.
    let source =
        "use crate::{\n    balancer::{Backend, Pool},\n    state::Shared,\n};\nuse crate::*;";
    assert_eq!(names(source, "proxy::http"), ["*", "balancer", "state"]);
    // `super::` climbing to the root, from a file and from an inline module; not when it stays inside.
    assert_eq!(names("use super::server::X;", "conn"), ["server"]);
    assert_eq!(
        names("use super::frame::Y;", "websocket::end"),
        Vec::<String>::new()
    );
    let source = "mod tests { use super::super::super::gateway::Z; use super::super::frame; }";
    assert_eq!(names(source, "websocket::end"), ["gateway"]);
    // Macros: `$crate::`.
    assert_eq!(
        names("macro_rules! m { () => { $crate::tls::f() } }", "body"),
        ["tls"]
    );

    let mut graph = Graph::new();
    for (from, to) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")] {
        graph
            .entry(from.into())
            .or_default()
            .entry(to.into())
            .or_default()
            .insert(format!("{from}.rs"));
    }
    assert_eq!(
        cycle_from(&graph, "a"),
        Some(vec!["a".into(), "b".into(), "c".into()])
    );
    assert_eq!(cycle_from(&graph, "d"), None);
}
