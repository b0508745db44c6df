//! The house keeps its layers (ARCHITECTURE.md): core < the softmax engine < families side by
//! side < drivers. A module may name modules of its own layer or below, a family never another
//! family, and the module graph has no cycle. Reads `src/` (without `main.rs` and `cli/`, which
//! sit on top), the way `../shared/tools/layers.py` does: `crate::` paths outside comments and
//! strings, grouped `use crate::{..}` too, root re-exports resolved through `lib.rs`, unit-test
//! modules left out.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const CORE: &[&str] = &[
    "builder",
    "error",
    "wgsl",
    "dtype",
    "tensor",
    "context",
    "pipeline",
    "resources",
    "timing",
    "tuning",
];
const ENGINE: &[&str] = &["softmax"];
const FAMILIES: &[&str] = &[
    "flash",
    "neighborhood",
    "sparse",
    "linear",
    "decode",
    "baseline",
];
const DRIVERS: &[&str] = &["registry", "bench", "tune"];

fn layer(module: &str) -> Option<usize> {
    [CORE, ENGINE, FAMILIES, DRIVERS]
        .iter()
        .position(|l| l.contains(&module))
}

/// Code without comments, string and char literals.
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let (mut out, mut i) = (String::with_capacity(b.len()), 0);
    while i < b.len() {
        let rest = &text[i..];
        if rest.starts_with("//") {
            i += rest.find('\n').unwrap_or(rest.len());
        } else if rest.starts_with("/*") {
            let (mut depth, mut j) = (1, 2);
            while j < rest.len() && depth > 0 {
                if rest[j..].starts_with("/*") {
                    depth += 1;
                    j += 2;
                } else if rest[j..].starts_with("*/") {
                    depth -= 1;
                    j += 2;
                } else {
                    j += 1;
                }
            }
            i += j;
        } else if (rest.starts_with("r\"") || rest.starts_with("r#"))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            let hashes = rest[1..].bytes().take_while(|&c| c == b'#').count();
            if rest.as_bytes().get(1 + hashes) != Some(&b'"') {
                out.push('r');
                i += 1;
                continue;
            }
            let close = format!("\"{}", "#".repeat(hashes));
            let body = 2 + hashes;
            i += rest[body..]
                .find(&close)
                .map_or(rest.len(), |e| body + e + close.len());
            out.push_str("\"\"");
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if b[i] == b'\'' && char_literal(rest) > 0 {
            i += char_literal(rest);
            out.push_str("' '");
        } else {
            let c = rest.chars().next().unwrap_or(' ');
            out.push(c);
            i += c.len_utf8();
        }
    }
    out
}

/// The length of a char literal at the start of `s` (0: a lifetime, not a literal).
fn char_literal(s: &str) -> usize {
    let c: Vec<char> = s.chars().take(12).collect();
    if c.len() >= 3 && c[1] != '\\' && c[2] == '\'' {
        return 2 + c[1].len_utf8();
    }
    if c.len() >= 4 && c[1] == '\\' {
        if let Some(end) = c[2..].iter().position(|&x| x == '\'') {
            return c[..end + 3].iter().map(|x| x.len_utf8()).sum();
        }
    }
    0
}

/// Without `#[cfg(test)] mod .. { .. }` blocks: unit tests may reach across layers.
fn drop_tests(mut text: String) -> String {
    while let Some(start) = text.find("#[cfg(test)]") {
        let after = &text[start..];
        let Some(open) = after.find('{') else { break };
        if !after[..open].contains("mod ") {
            // a #[cfg(test)] item that is not a module: keep it, look further on
            text.replace_range(start..start + 12, "            ");
            continue;
        }
        let (mut depth, mut j) = (0i32, open);
        for (k, ch) in after[open..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            if depth == 0 {
                j = open + k + 1;
                break;
            }
        }
        text.replace_range(start..start + j, "");
    }
    text
}

/// The first path segment of every `crate::` path, grouped imports included.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + 7..];
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut item) = (0, String::new());
            for ch in group.chars() {
                match ch {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        out.insert(ident(&item));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.insert(ident(&item));
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(ch);
            }
        } else {
            out.insert(ident(rest));
        }
    }
    out.remove("");
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src/").flatten() {
        let p = entry.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`None`: the crate root, the CLI).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    match first.strip_suffix(".rs") {
        Some("lib" | "main") => None,
        Some(m) => Some(m.to_string()),
        None if first == "cli" || first == "bin" => None,
        None => Some(first),
    }
}

/// Names the crate root re-exports, each with the module it comes from.
fn root_names(lib: &str, modules: &BTreeSet<String>) -> BTreeMap<String, String> {
    let mut names = BTreeMap::new();
    for stmt in lib.split(';') {
        let Some(at) = stmt.find("pub use ") else {
            continue;
        };
        let path = stmt[at + 8..].trim();
        let base: String = path
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        if !modules.contains(&base) {
            continue;
        }
        let items = match path.rfind('{') {
            Some(open) => path[open + 1..].trim_end_matches('}').to_string(),
            None => path.rsplit("::").next().unwrap_or("").to_string(),
        };
        for item in items.split(',') {
            let name = item.rsplit(" as ").next().unwrap_or("").trim();
            if !name.is_empty() {
                names.insert(name.to_string(), base.clone());
            }
        }
    }
    names
}

fn module_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| module_of(&src, f)).collect();
    let read = |f: &Path| drop_tests(strip(&std::fs::read_to_string(f).expect("read a source")));
    let roots = root_names(&read(&src.join("lib.rs")), &modules);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in &files {
        let Some(m) = module_of(&src, f) else {
            continue;
        };
        let entry = edges.entry(m.clone()).or_default();
        for r in crate_refs(&read(f)) {
            let target = if modules.contains(&r) {
                Some(r)
            } else {
                roots.get(&r).cloned()
            };
            if let Some(t) = target.filter(|t| *t != m) {
                entry.insert(t);
            }
        }
    }
    edges
}

#[test]
fn modules_name_only_their_layer_and_below_and_families_no_other_family() {
    let graph = module_graph();
    let mut faults = Vec::new();
    for (m, uses) in &graph {
        let Some(lm) = layer(m) else {
            faults.push(format!(
                "{m}: in no layer (add it to tests/layers.rs and ARCHITECTURE.md)"
            ));
            continue;
        };
        for u in uses {
            match layer(u) {
                Some(lu) if lu > lm => faults.push(format!("{m} names {u}, a higher layer")),
                Some(_) if lm == 2 && FAMILIES.contains(&u.as_str()) => {
                    faults.push(format!("family {m} names family {u}"))
                }
                _ => {}
            }
        }
    }
    assert!(faults.is_empty(), "layering broken:\n{}", faults.join("\n"));
    // the graph has no cycle (a cycle inside one layer would pass the checks above)
    fn visit(
        m: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match state.get(m) {
            Some(2) => return None,
            Some(1) => {
                let from = path.iter().position(|p| p == m).unwrap_or(0);
                return Some(path[from..].to_vec());
            }
            _ => {}
        }
        state.insert(m.to_string(), 1);
        path.push(m.to_string());
        for u in g.get(m).into_iter().flatten() {
            if let Some(c) = visit(u, g, state, path) {
                return Some(c);
            }
        }
        path.pop();
        state.insert(m.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for m in graph.keys() {
        if let Some(cycle) = visit(m, &graph, &mut state, &mut Vec::new()) {
            panic!("module cycle: {}", cycle.join(" -> "));
        }
    }
}

/// The scanner itself: it sees paths in code, grouped imports and root re-exports, not paths
/// in comments or strings, so the test above can fail.
#[test]
fn the_scanner_finds_what_it_must() {
    let code = strip(
        "use crate::flash::X; // crate::linear\nlet s = \"crate::sparse\"; use crate::{tensor::T, \
         context::{A, B}, Tile};\n/* crate::bench */ let c = 'x'; fn f<'a>() { crate::wgsl::w() }",
    );
    let refs = crate_refs(&code);
    let want: BTreeSet<String> = ["flash", "tensor", "context", "Tile", "wgsl"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(refs, want);
    let modules: BTreeSet<String> = ["softmax".to_string()].into();
    let roots = root_names("pub use softmax::{Tile, Strategy as S};", &modules);
    assert_eq!(roots.get("Tile").map(String::as_str), Some("softmax"));
    assert_eq!(roots.get("S").map(String::as_str), Some("softmax"));
    let kept = drop_tests("a #[cfg(test)] mod tests { use crate::bench; } b".to_string());
    assert!(!kept.contains("bench"), "{kept}");
}
