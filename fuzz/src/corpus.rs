//! Every input of the checked-in corpora (`corpus/<target>/`), run through its target's checks as
//! libFuzzer would at the start of a run. A change that breaks an invariant for an input already in a
//! corpus fails here, in `cargo test`, rather than at the next fuzzing session.

use std::path::Path;

/// The targets in `fuzz_targets/`, each with the check its harness runs.
const TARGETS: [(&str, fn(&[u8])); 10] = [
    ("admin_tokens", crate::admin_tokens_target::run),
    ("backend_answer", crate::http_target::backend_answer),
    ("backend_response", crate::response_target::backend_response),
    ("config", crate::config_target::run),
    ("first_request", crate::http_target::first_request),
    ("origin", crate::origin_target::run),
    ("proxy_header", crate::proxy_header_target::run),
    ("scanner_client", |data| crate::scanner_target::run(true, data)),
    ("scanner_server", |data| crate::scanner_target::run(false, data)),
    ("tls_session", crate::tls_session_target::run),
];

#[test]
fn every_corpus_input_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut targets: Vec<String> = std::fs::read_dir(&root)
        .expect("corpus/")
        .map(|entry| entry.expect("corpus entry").file_name().to_string_lossy().into_owned())
        .collect();
    targets.sort();
    let named: Vec<&str> = TARGETS.iter().map(|(name, _)| *name).collect();
    assert_eq!(targets, named, "a corpus without a target here, or a target without one");
    let mut failing = Vec::new();
    for (name, check) in TARGETS {
        let mut inputs: Vec<_> = std::fs::read_dir(root.join(name))
            .expect("a target's corpus")
            .map(|entry| entry.expect("corpus input").path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{name}: empty corpus");
        for input in inputs {
            let data = std::fs::read(&input).expect("corpus input");
            if std::panic::catch_unwind(|| check(&data)).is_err() {
                failing.push(input);
            }
        }
    }
    assert!(failing.is_empty(), "inputs that fail their target: {failing:#?}");
}
