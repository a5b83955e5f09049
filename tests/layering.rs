//! The crate's modules import downward only. Reads every `src/**/*.rs`, collects the top-level
//! module edges from `use crate::…` lines (including `use crate::{a, b::c}` groups) and inline
//! `crate::x::…` paths (and `sluice::x` in `src/main.rs`), and fails on any edge that points up
//! the declared order, joins two modules of the same level, or closes a cycle. Run with
//! `--nocapture` to see the whole graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The declared order, top to bottom. A module may use only modules on a lower line; modules on
/// one line are independent of each other. Every `mod` of `src/lib.rs` must be placed here.
///
/// - `main`: the binary; parses the command line and calls `broker` or `cli`.
/// - `broker`: composition root: process guards and tuning, launch of the shards, signals.
/// - `cli`: the admin and console commands (Kafka clients; no broker internals).
/// - `server`: sockets, framing, per-connection and per-shard limits.
/// - `kafka`: dispatch and one handler per API; owns `Request`, `Response`, `Connection`.
/// - `txn`: transaction coordinators (create `__transaction_state` through `admin`; apply
///   transactional offsets through `group`).
/// - `group`: consumer group coordinators (creates `__consumer_offsets` through `admin`).
/// - `admin`: topic administration and producer-id blocks, run by the metadata owner, shard 0.
/// - `controller`: a cluster's controller raft group over the metadata records (shard 0).
/// - `shard`: executors' shared context, inboxes, cross-shard calls, partition routing.
/// - `metadata`: the topic catalogue (image, durable metadata log, topic configs); data only.
/// - `config`: the typed broker configuration.
/// - `storage`: the partition log.
/// - `protocol`: RecordBatch v2 codecs.
/// - `contain`, `fault`, `stats`: leaf utilities (panic containment, test fault points, per-shard
///   metrics counters).
/// - `types`: ids, offsets, the clock.
const LAYERS: &[&[&str]] = &[
    &["main"],
    &["broker", "cli"],
    &["server"],
    &["kafka"],
    &["txn"],
    &["group"],
    &["admin"],
    &["controller"],
    &["shard"],
    &["metadata"],
    &["config"],
    &["replica"],
    &["storage"],
    &["protocol"],
    &["contain", "fault", "stats"],
    &["types"],
];

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to: `src/kafka/handlers/fetch.rs` → `kafka`.
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(src_dir()).expect("under src");
    let first = rel.components().next().expect("non-empty");
    let first = first.as_os_str().to_string_lossy();
    first.strip_suffix(".rs").unwrap_or(&first).to_string()
}

/// `text` without `//` comments (doc comments included) and without string literals, so a doc
/// link or a message naming a path is not an edge.
fn code_only(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let b = text.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    i += 1;
                }
                i += 1;
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && b.get(i + 1) == Some(&b'\\') {
            // An escaped char literal such as '\n' or '\''.
            i += 3;
            while i < b.len() && b[i] != b'\'' {
                i += 1;
            }
            i += 1;
            out.push_str("' '");
        } else if b[i] == b'\'' && b.get(i + 2) == Some(&b'\'') {
            // A char literal such as '"' or '{'.
            out.push_str("' '");
            i += 3;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    out
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Top-level names a path starting at `at` (just after `crate::`) refers to: one name, or the
/// first segment of each path in a `{…}` group. Macros (`crate::m!`) are skipped.
fn names_at(code: &[u8], at: usize, out: &mut Vec<String>) {
    if code.get(at) == Some(&b'{') {
        let mut depth = 0;
        let mut i = at;
        let mut expect_name = true;
        while i < code.len() {
            match code[i] {
                b'{' => {
                    depth += 1;
                    if depth == 1 {
                        expect_name = true;
                    }
                }
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        return;
                    }
                }
                b',' if depth == 1 => expect_name = true,
                c if depth == 1 && expect_name && is_ident(c) => {
                    let start = i;
                    while i < code.len() && is_ident(code[i]) {
                        i += 1;
                    }
                    out.push(String::from_utf8_lossy(&code[start..i]).into_owned());
                    expect_name = false;
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
        return;
    }
    let mut end = at;
    while end < code.len() && is_ident(code[end]) {
        end += 1;
    }
    if end > at && code.get(end) != Some(&b'!') {
        out.push(String::from_utf8_lossy(&code[at..end]).into_owned());
    }
}

/// Every top-level name `code` reaches through `root::` (`crate::` or `sluice::`).
fn referenced(code: &str, root: &str) -> Vec<String> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(pos) = code[from..].find(root) {
        let at = from + pos;
        from = at + root.len();
        // `foo_crate::` is not `crate::`.
        if at > 0 && (is_ident(b[at - 1]) || b[at - 1] == b':') {
            continue;
        }
        names_at(b, from, &mut out);
    }
    out
}

/// The modules declared in `src/lib.rs` (`mod x;` / `pub mod x;`).
fn declared_modules() -> BTreeSet<String> {
    let lib = std::fs::read_to_string(src_dir().join("lib.rs")).expect("read src/lib.rs");
    code_only(&lib)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("pub ").unwrap_or(l);
            let name = l.strip_prefix("mod ")?.strip_suffix(';')?;
            Some(name.trim().to_string())
        })
        .collect()
}

/// Module → modules it uses, over the whole crate.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let modules = declared_modules();
    let mut files = Vec::new();
    rust_files(&src_dir(), &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let from = module_of(&f);
        if from == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&f).expect("read source file");
        let code = code_only(&text);
        let root = if from == "main" {
            "sluice::"
        } else {
            "crate::"
        };
        let edges = g.entry(from.clone()).or_default();
        for to in referenced(&code, root) {
            if to != from && modules.contains(&to) {
                edges.insert(to);
            }
        }
    }
    g
}

fn level_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// One cycle of `g`, if any, as the list of modules along it.
fn find_cycle(g: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        g: &BTreeMap<String, BTreeSet<String>>,
        m: &str,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = stack.iter().position(|s| s == m) {
            let mut cycle = stack[i..].to_vec();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if done.contains(m) {
            return None;
        }
        stack.push(m.to_string());
        for to in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(g, to, stack, done) {
                return Some(c);
            }
        }
        stack.pop();
        done.insert(m.to_string());
        None
    }
    let mut done = BTreeSet::new();
    for m in g.keys() {
        if let Some(c) = visit(g, m, &mut Vec::new(), &mut done) {
            return Some(c);
        }
    }
    None
}

fn print_graph(g: &BTreeMap<String, BTreeSet<String>>) -> String {
    let mut s = String::new();
    for (m, to) in g {
        let to: Vec<&str> = to.iter().map(String::as_str).collect();
        s.push_str(&format!("  {m} → {}\n", to.join(", ")));
    }
    s
}

#[test]
fn every_module_is_placed_in_the_declared_order() {
    let mut missing: Vec<String> = declared_modules()
        .into_iter()
        .filter(|m| level_of(m).is_none())
        .collect();
    missing.extend(
        LAYERS
            .iter()
            .flat_map(|l| l.iter())
            .filter(|m| **m != "main" && !declared_modules().contains(**m))
            .map(|m| format!("{m} (declared in the order but not in src/lib.rs)")),
    );
    assert!(
        missing.is_empty(),
        "place these modules in LAYERS in tests/layering.rs: {missing:?}"
    );
}

#[test]
fn imports_point_down_only() {
    let g = graph();
    println!("module import graph:\n{}", print_graph(&g));
    let mut bad = Vec::new();
    for (from, tos) in &g {
        let Some(lf) = level_of(from) else { continue };
        for to in tos {
            let Some(lt) = level_of(to) else { continue };
            if lt < lf {
                bad.push(format!("{from} → {to} points up"));
            } else if lt == lf {
                bad.push(format!("{from} → {to} joins two modules of one level"));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "imports that break the layering (declared in tests/layering.rs):\n  {}\nwhole graph:\n{}",
        bad.join("\n  "),
        print_graph(&g)
    );
}

#[test]
fn no_module_cycle() {
    let g = graph();
    if let Some(c) = find_cycle(&g) {
        panic!(
            "module cycle: {}\nwhole graph:\n{}",
            c.join(" → "),
            print_graph(&g)
        );
    }
}

#[test]
fn the_edge_reader_sees_groups_inline_paths_and_skips_comments() {
    let code = code_only(
        "use crate::{a, b::{c, d}, e::f};\n\
         // use crate::commented;\n\
         let x = crate::g::h();\n\
         let s = \"crate::in_string\";\n\
         crate::mac!(x);\n\
         use other_crate::z;\n",
    );
    let got = referenced(&code, "crate::");
    assert_eq!(got, ["a", "b", "e", "g"]);
}

/// The modules that may use the `sluice-client` crate: the command line's. The broker itself
/// (server, kafka and everything below) never speaks to brokers as a client.
const CLIENT_USERS: &[&str] = &["cli"];

#[test]
fn only_the_command_line_uses_the_client_crate() {
    let mut files = Vec::new();
    rust_files(&src_dir(), &mut files);
    let mut bad = BTreeSet::new();
    for f in files {
        let from = module_of(&f);
        if CLIENT_USERS.contains(&from.as_str()) {
            continue;
        }
        let code = code_only(&std::fs::read_to_string(&f).expect("read source file"));
        if code.contains("sluice_client") {
            bad.insert(format!("{} ({from})", f.display()));
        }
    }
    assert!(
        bad.is_empty(),
        "only {CLIENT_USERS:?} may use sluice_client; used in: {bad:?}"
    );
}
