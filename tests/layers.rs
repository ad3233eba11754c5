//! docs/architecture.md's "Who may import whom", enforced: the rules are the `layers` block of
//! that file (one line per top-level module of src/: `module: what it may import`, and after
//! `| upward:` an edge against the layering that the document explains), and every
//! `crate::module` path in a module's files must be one its line allows. A new top-level
//! module needs a line; the allowed edges, upward ones aside, must form no cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// module -> (may import, may import against the layering).
type Rules = BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `layers` code block of docs/architecture.md.
fn rules() -> Rules {
    let doc = std::fs::read_to_string(root().join("docs/architecture.md")).unwrap();
    let start = doc
        .find("```layers\n")
        .expect("docs/architecture.md has a ```layers block");
    let block = &doc[start + "```layers\n".len()..];
    let block = &block[..block.find("```").expect("the layers block ends")];
    let mut rules = Rules::new();
    for line in block.lines().filter(|l| !l.trim().is_empty()) {
        let (module, rest) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("layers line without `module:`: {line:?}"));
        let (down, up) = rest.split_once("| upward:").unwrap_or((rest, ""));
        let words = |s: &str| s.split_whitespace().map(str::to_string).collect();
        let old = rules.insert(module.trim().to_string(), (words(down), words(up)));
        assert!(old.is_none(), "{module} has two lines");
    }
    rules
}

/// Top-level modules of the library: src/NAME.rs and src/NAME/ (the binary aside).
fn modules() -> BTreeMap<String, Vec<PathBuf>> {
    let src = root().join("src");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_str().unwrap().to_string();
        if name == "lib" || name == "bin" {
            continue;
        }
        let mut files = Vec::new();
        if path.is_dir() {
            rust_files(&path, &mut files);
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        } else {
            continue;
        }
        out.entry(name).or_insert_with(Vec::new).extend(files);
    }
    out
}

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

/// The code of a Rust file without its comments (doc comments included: an intra-doc link is
/// not an import).
fn code(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix("//") {
            rest = after.find('\n').map_or("", |n| &after[n..]);
        } else if let Some(after) = rest.strip_prefix("/*") {
            rest = after.find("*/").map_or("", |n| &after[n + 2..]);
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// The top-level modules that `crate::` paths in `code` name: `crate::a::..`, and each first
/// segment of a group, `crate::{a::.., b, c::{..}}`.
fn imported(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut out = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        // `$crate::` and `flashpack_crate::` are not this crate's root.
        let before = code[..at].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$') {
            continue;
        }
        let rest = code[at + "crate::".len()..].trim_start();
        if let Some(group) = rest.strip_prefix('{') {
            // Split the group at its own commas, not at those of nested groups.
            let mut depth = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if c.is_whitespace() => {}
                    _ if item_start => {
                        item_start = false;
                        out.insert(ident(&group[i..]));
                    }
                    _ => {}
                }
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.retain(|m| !m.is_empty() && m != "self");
    out
}

/// Every import a module's files make that its line does not allow, as "file: crate::target".
fn violations(rules: &Rules, modules: &BTreeMap<String, Vec<PathBuf>>) -> Vec<String> {
    let mut bad = Vec::new();
    for (module, files) in modules {
        let (down, up) = &rules[module];
        for file in files {
            let text = std::fs::read_to_string(file).unwrap();
            for target in imported(&code(&text)) {
                if &target != module
                    && modules.contains_key(&target)
                    && !down.contains(&target)
                    && !up.contains(&target)
                {
                    let file = file.strip_prefix(root()).unwrap().display();
                    bad.push(format!("{file}: crate::{target}"));
                }
            }
        }
    }
    bad
}

#[test]
fn imports_follow_the_documented_layers() {
    let rules = rules();
    let modules = modules();
    let unplaced: Vec<_> = modules.keys().filter(|m| !rules.contains_key(*m)).collect();
    assert!(
        unplaced.is_empty(),
        "modules with no line in docs/architecture.md's layers block: {unplaced:?}"
    );
    let bad = violations(&rules, &modules);
    assert!(
        bad.is_empty(),
        "imports against docs/architecture.md's \"Who may import whom\" (move the code to a \
         module both may use, or change the rule there and say why):\n{}",
        bad.join("\n")
    );
}

/// The rules themselves layer the modules: the allowed edges, less the upward ones the
/// document explains, have no cycle.
#[test]
fn the_documented_layers_have_no_cycle() {
    let rules = rules();
    // Depth-first search; `on_path` holds the modules of the current path.
    fn visit<'a>(
        m: &'a str,
        rules: &'a Rules,
        done: &mut BTreeSet<&'a str>,
        on_path: &mut Vec<&'a str>,
    ) {
        if done.contains(m) {
            return;
        }
        assert!(!on_path.contains(&m), "import cycle: {on_path:?} -> {m}");
        on_path.push(m);
        for next in rules.get(m).map(|r| &r.0).into_iter().flatten() {
            visit(next, rules, done, on_path);
        }
        on_path.pop();
        done.insert(m);
    }
    let mut done = BTreeSet::new();
    for m in rules.keys() {
        visit(m, &rules, &mut done, &mut Vec::new());
    }
    for (m, (down, up)) in &rules {
        for target in down.iter().chain(up) {
            assert!(
                rules.contains_key(target),
                "{m} names {target}, which has no line"
            );
        }
    }
}

/// The scanner finds what a `use` names, and not what a comment says.
#[test]
fn the_import_scanner_reads_paths_and_groups() {
    let src = "use crate::a::X;\nuse crate::{b, c::{D, e::F}, self};\nfn f() { crate::g::h() }\n\
               // crate::comment\n/* crate::block */ let _ = $crate::m;";
    let got: Vec<String> = imported(&code(src)).into_iter().collect();
    assert_eq!(got, ["a", "b", "c", "g"]);
}
