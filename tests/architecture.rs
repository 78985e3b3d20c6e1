//! The layering of `src/` as a test: a module may use only modules of lower layers, so the engine
//! never reaches into telemetry, the client never into the daemon's config, and no two modules form
//! an import circle. `src/lib.rs` names the same order in its module map; this test keeps them equal.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The layers of `src/`, lowest first. Modules in one layer do not use each other; the binaries in
/// `src/bin/` sit above them all.
const LAYERS: &[&[&str]] = &[
    &["units", "error", "codec", "auth"],
    &["proto"],
    &["outcome"],
    &["handlers"],
    &["config"],
    &["engine", "client"],
    &["telemetry"],
    &["service"],
    &["server"],
];

/// The layer of a top-level module.
fn layer(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// The order as `src/lib.rs` writes it: `units, error, codec, auth < proto < … < server`.
fn written_order() -> String {
    LAYERS
        .iter()
        .map(|l| l.join(", "))
        .collect::<Vec<_>>()
        .join(" < ")
}

/// Every `.rs` file below `dir`.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file of `src/` belongs to (`src/engine/session/admit.rs` → `engine`);
/// `None` for the crate root and the binaries.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_owned();
    match first.as_str() {
        "lib.rs" | "bin" => None,
        f => Some(f.strip_suffix(".rs").unwrap_or(f).to_owned()),
    }
}

/// The identifier at the start of `s`.
fn ident(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The top-level names a piece of code reaches through `crate::` (`crate::engine::Engine`,
/// `crate::{config, engine::Limits}`), comments left out.
fn crate_uses(code: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in code.lines() {
        let line = line.trim_start();
        if line.starts_with("//") {
            continue;
        }
        let line = line.split(" // ").next().unwrap_or(line);
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + "crate::".len()..];
            if let Some(group) = after.strip_prefix('{') {
                let group = group.split('}').next().unwrap_or(group);
                for item in group.split(',') {
                    let name = ident(item.trim());
                    if !name.is_empty() {
                        names.insert(name.to_owned());
                    }
                }
            } else {
                names.insert(ident(after).to_owned());
            }
            rest = after;
        }
    }
    names
}

#[test]
fn no_module_uses_one_of_its_own_or_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut wrong = Vec::new();
    let mut seen = BTreeSet::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        seen.insert(module.clone());
        let Some(own) = layer(&module) else {
            wrong.push(format!(
                "{}: module `{module}` has no layer: add it to LAYERS here and to src/lib.rs",
                file.display()
            ));
            continue;
        };
        let code = std::fs::read_to_string(file).unwrap();
        for used in crate_uses(&code) {
            if used == module {
                continue;
            }
            match layer(&used) {
                Some(l) if l < own => {}
                Some(l) => wrong.push(format!(
                    "{}: `{module}` (layer {own}) uses `{used}` (layer {l})",
                    file.display()
                )),
                None => wrong.push(format!(
                    "{}: `{module}` uses `crate::{used}`: name the module, not a re-export of the \
                     crate root",
                    file.display()
                )),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "the layering is {}:\n{}",
        written_order(),
        wrong.join("\n")
    );
    for name in LAYERS.iter().flat_map(|l| l.iter()) {
        assert!(
            seen.contains(*name),
            "LAYERS names `{name}`, which src/ lacks"
        );
    }
}

#[test]
fn lib_rs_names_the_same_order() {
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let order = written_order();
    assert!(
        lib.lines()
            .any(|l| l.trim_start_matches("//!").trim() == order),
        "src/lib.rs's module map must hold the line `//! {order}`"
    );
}

#[test]
fn the_scanner_sees_plain_grouped_and_nested_uses() {
    let code = "use crate::engine::Engine;\nuse crate::{config, units::ByteSize};\n\
                // crate::telemetry is only mentioned\nlet x = crate::handlers::quote(s); // crate::server\n";
    let names: Vec<String> = crate_uses(code).into_iter().collect();
    assert_eq!(names, ["config", "engine", "handlers", "units"]);
}
