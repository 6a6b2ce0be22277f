//! The library's modules form layers (docs/ARCHITECTURE.md): each uses only the layers below it, and
//! no two modules use each other, directly or in a ring. This test reads `src/`, builds the graph of
//! `crate::` references between top-level modules, and fails on a reference upward or on a cycle, naming
//! the files that make it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top to bottom. A module may use modules of its own layer or of a lower one, never of a higher one;
/// within a layer the references must not form a cycle.
const LAYERS: &[&[&str]] = &[
    &["gateway"],
    &["server", "admin", "health_checks"],
    &["proxy"],
    &["state", "conn"],
    &[
        "websocket",
        "http1",
        "balancer",
        "upstream",
        "router",
        "tls",
        "metrics",
        "headers",
        "body",
        "config",
    ],
];

/// The binary's own files: they use the library as `wsgate::`, never `crate::`.
const BINARY: &[&str] = &["main.rs", "demo.rs"];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
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

/// The top-level modules a piece of Rust source refers to through `crate::`, comments left out.
fn references(source: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a, b::c}`: the first segment of each item.
                let inner = group.split('}').next().unwrap_or("");
                for item in inner.split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        found.insert(name);
                    }
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        }
    }
    found
}

/// The top-level module a file belongs to (`src/proxy/http.rs` → `proxy`); `None` for the crate root
/// and the binary's files.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).expect("under src");
    let first = relative.components().next()?.as_os_str().to_str()?;
    if relative.components().count() == 1 && (first == "lib.rs" || BINARY.contains(&first)) {
        return None;
    }
    Some(first.trim_end_matches(".rs").to_string())
}

/// Module → (used module → the files that use it).
type Graph = BTreeMap<String, BTreeMap<String, BTreeSet<String>>>;

fn graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let Some(module) = module_of(&src, &file) else {
            continue;
        };
        let text = std::fs::read_to_string(&file).expect("readable source");
        let shown = file
            .strip_prefix(&src)
            .expect("under src")
            .display()
            .to_string();
        let uses = graph.entry(module.clone()).or_default();
        for used in references(&text) {
            if used != module {
                uses.entry(used).or_default().insert(shown.clone());
            }
        }
    }
    graph
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
fn every_module_is_in_a_layer() {
    let graph = graph();
    let unknown: Vec<_> = graph.keys().filter(|m| layer_of(m).is_none()).collect();
    assert!(
        unknown.is_empty(),
        "modules missing from LAYERS in tests/it/layers.rs (and from docs/ARCHITECTURE.md): {unknown:?}"
    );
}

#[test]
fn modules_use_only_their_layer_and_the_ones_below() {
    let mut upward = Vec::new();
    for (module, uses) in graph() {
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
    let graph = graph();
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
fn the_checker_sees_references_and_cycles() {
    let refs = references(
        "use crate::proxy::Answer; // crate::gateway\nuse crate::{state::Shared, conn};\nlet x = crate::metrics::status_class(200);",
    );
    let names: Vec<_> = refs.iter().map(String::as_str).collect();
    assert_eq!(names, ["conn", "metrics", "proxy", "state"]);
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
