//! The layout is the architecture: `src/` is a sans-IO core. This test walks
//! `src/` and fails if a core file uses actix, awc, tokio networking, a socket,
//! the file system or randomness, or reads a clock. The binary's entry
//! (`main.rs`) is the only file left out, and the bodies of `#[cfg(test)] mod`
//! blocks the only code skipped.
//!
//! The scan reads Rust, not lines: comments and string literals are blanked
//! out, `use` trees are expanded into whole paths (`use tokio::{io, net}` is
//! `tokio::io` and `tokio::net`) and every path in code is read with its `::`
//! and spacing normalised, so grouped imports and line breaks hide nothing.
//!
//! The runtime's layout is checked too: every file directly in `actors/` is
//! one actor (`impl Actor for`, in the file or in the child modules of its
//! folder), handles live in `actors/handles/` and IO plumbing in
//! `actors/io/`, neither holding an actor, and no file in `actors/` runs over
//! 350 lines. Each rule's exceptions are listed, with why, beside it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

/// What the core must not touch, as path segments that must appear in a row
/// anywhere in a path. The first segment also matches a crate of its family
/// (`actix` matches `actix_web`, `rand` matches `rand_core`). The socket types
/// are forbidden by name, whichever crate they come from.
const FORBIDDEN: &[&str] = &[
    "actix",
    "awc",
    "tokio::net",
    "TcpStream",
    "TcpListener",
    "UdpSocket",
    "Instant::now",
    "SystemTime::now",
    "rand",
    "std::fs",
];

/// A word or punctuation of the blanked source, with its line (1-based).
#[derive(Debug, Clone, PartialEq)]
struct Token {
    text: String,
    line: usize,
}

/// The forbidden paths of a file's code, as (line, rule), sorted.
fn violations(text: &str) -> Vec<(usize, &'static str)> {
    let tokens = without_test_modules(tokenize(&blank_literals(text)));
    let mut found: Vec<(usize, &'static str)> = paths(&tokens)
        .iter()
        .flat_map(|(line, path)| {
            FORBIDDEN
                .iter()
                .filter(|rule| matches_rule(path, rule))
                .map(move |rule| (*line, *rule))
        })
        .collect();
    found.sort_unstable();
    found.dedup();
    found
}

/// Whether the segments of `rule` appear in a row in `path`.
fn matches_rule(path: &[String], rule: &str) -> bool {
    let rule: Vec<&str> = rule.split("::").collect();
    path.windows(rule.len()).any(|window| {
        window
            .iter()
            .zip(&rule)
            .enumerate()
            .all(|(i, (seg, want))| seg == want || (i == 0 && seg.starts_with(&format!("{want}_"))))
    })
}

/// Replaces comments, string and char literals by spaces, keeping newlines,
/// so that neither their words nor their braces count.
fn blank_literals(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let end = literal_end(&chars, i);
        if end == i {
            out.push(chars[i]);
            i += 1;
        } else {
            out.extend(
                chars[i..end]
                    .iter()
                    .map(|&c| if c == '\n' { c } else { ' ' }),
            );
            i = end;
        }
    }
    out
}

/// Where the comment or literal starting at `i` ends, or `i` if none starts there.
fn literal_end(chars: &[char], i: usize) -> usize {
    let at = |k: usize| chars.get(k).copied().unwrap_or('\0');
    let after_word = i > 0 && (chars[i - 1].is_alphanumeric() || chars[i - 1] == '_');
    match (at(i), at(i + 1)) {
        ('/', '/') => (i..chars.len())
            .find(|&k| chars[k] == '\n')
            .unwrap_or(chars.len()),
        ('/', '*') => block_comment_end(chars, i),
        ('"', _) => quoted_end(chars, i + 1, '"'),
        ('\'', '\\') => quoted_end(chars, i + 1, '\''),
        ('\'', _) if at(i + 2) == '\'' => i + 3,
        ('r', '"' | '#') if !after_word => raw_string_end(chars, i + 1).unwrap_or(i),
        ('b', 'r') if !after_word => raw_string_end(chars, i + 2).unwrap_or(i),
        _ => i,
    }
}

fn block_comment_end(chars: &[char], start: usize) -> usize {
    let (mut depth, mut k) = (0usize, start);
    while k + 1 < chars.len() {
        match (chars[k], chars[k + 1]) {
            ('/', '*') => (depth, k) = (depth + 1, k + 2),
            ('*', '/') if depth == 1 => return k + 2,
            ('*', '/') => (depth, k) = (depth - 1, k + 2),
            _ => k += 1,
        }
    }
    chars.len()
}

/// The end of a quoted literal whose body starts at `k`, honouring `\` escapes.
fn quoted_end(chars: &[char], mut k: usize, quote: char) -> usize {
    while k < chars.len() {
        match chars[k] {
            '\\' => k += 2,
            c if c == quote => return k + 1,
            _ => k += 1,
        }
    }
    chars.len()
}

/// The end of a raw string whose `#`s (if any) start at `k`; `None` if it is not one.
fn raw_string_end(chars: &[char], k: usize) -> Option<usize> {
    let hashes = chars[k..].iter().take_while(|&&c| c == '#').count();
    if chars.get(k + hashes) != Some(&'"') {
        return None;
    }
    let close: Vec<char> = std::iter::once('"')
        .chain(std::iter::repeat_n('#', hashes))
        .collect();
    let body = k + hashes + 1;
    let end = (body..chars.len())
        .find(|&j| chars[j..].starts_with(&close))
        .map_or(chars.len(), |j| j + close.len());
    Some(end)
}

/// Splits blanked source into words (identifiers, keywords, numbers), `::`
/// and single punctuation characters.
fn tokenize(code: &str) -> Vec<Token> {
    let mut tokens = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            let len = if c.is_alphanumeric() || c == '_' {
                chars[i..]
                    .iter()
                    .take_while(|c| c.is_alphanumeric() || **c == '_')
                    .count()
            } else if c == ':' && chars.get(i + 1) == Some(&':') {
                2
            } else {
                1
            };
            if !c.is_whitespace() {
                let text = chars[i..i + len].iter().collect();
                tokens.push(Token { text, line: n + 1 });
            }
            i += len;
        }
    }
    tokens
}

/// Drops every `#[cfg(test)] mod name { ... }` block (matched by braces) and
/// `#[cfg(test)] mod name;` declaration; other `#[cfg(test)]` items stay.
fn without_test_modules(tokens: Vec<Token>) -> Vec<Token> {
    let mut kept = Vec::with_capacity(tokens.len());
    let mut i = 0;
    while i < tokens.len() {
        match test_module_end(&tokens, i) {
            Some(end) => i = end,
            None => {
                kept.push(tokens[i].clone());
                i += 1;
            }
        }
    }
    kept
}

/// If a `#[cfg(test)]`-gated module starts at `i`, the index just past it.
fn test_module_end(tokens: &[Token], i: usize) -> Option<usize> {
    const CFG_TEST: [&str; 7] = ["#", "[", "cfg", "(", "test", ")", "]"];
    let is = |k: usize, s: &str| tokens.get(k).is_some_and(|t| t.text == s);
    if !CFG_TEST.iter().enumerate().all(|(k, s)| is(i + k, s)) {
        return None;
    }
    let mut k = i + CFG_TEST.len();
    while is(k, "#") && is(k + 1, "[") {
        k = closing(tokens, k + 1, "[", "]")?;
    }
    if is(k, "pub") && is(k + 1, "(") {
        k = closing(tokens, k + 1, "(", ")")?;
    } else if is(k, "pub") {
        k += 1;
    }
    if !is(k, "mod") {
        return None;
    }
    match tokens.get(k + 2).map(|t| t.text.as_str()) {
        Some(";") => Some(k + 3),
        Some("{") => closing(tokens, k + 2, "{", "}"),
        _ => None,
    }
}

/// The index just past the `close` that matches the `open` at `start`.
fn closing(tokens: &[Token], start: usize, open: &str, close: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (k, token) in tokens.iter().enumerate().skip(start) {
        if token.text == open {
            depth += 1;
        } else if token.text == close {
            depth -= 1;
            if depth == 0 {
                return Some(k + 1);
            }
        }
    }
    None
}

/// Every path in the code with the line of its last segment: `use` trees
/// expanded, and runs of `word :: word` elsewhere.
fn paths(tokens: &[Token]) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i].text == "use" {
            i = use_tree(tokens, i + 1, &[], &mut out);
        } else if is_word(&tokens[i]) {
            let (path, end) = path_at(tokens, i);
            out.push((tokens[end - 1].line, path));
            i = end;
        } else {
            i += 1;
        }
    }
    out
}

fn is_word(token: &Token) -> bool {
    token
        .text
        .starts_with(|c: char| c.is_alphabetic() || c == '_')
}

/// The path `word (:: word)*` starting at `i`, and the index just past it.
fn path_at(tokens: &[Token], i: usize) -> (Vec<String>, usize) {
    let mut path = vec![tokens[i].text.clone()];
    let mut k = i + 1;
    while tokens.get(k).is_some_and(|t| t.text == "::") && tokens.get(k + 1).is_some_and(is_word) {
        path.push(tokens[k + 1].text.clone());
        k += 2;
    }
    (path, k)
}

/// Expands the use tree starting at `i` under `prefix` into `out`; returns
/// the index just past it (past the `;` at the top level).
fn use_tree(
    tokens: &[Token],
    mut i: usize,
    prefix: &[String],
    out: &mut Vec<(usize, Vec<String>)>,
) -> usize {
    let mut path = prefix.to_vec();
    while let Some(token) = tokens.get(i) {
        match token.text.as_str() {
            "::" => i += 1,
            "{" => return use_group(tokens, i + 1, &path, out),
            "*" => {
                path.push("*".into());
                out.push((token.line, path));
                return i + 1;
            }
            ";" => return i + 1,
            _ if is_word(token) && token.text != "as" => {
                path.push(token.text.clone());
                i += 1;
                if tokens.get(i).is_some_and(|t| t.text == "as") {
                    i += 2;
                }
                if tokens.get(i).is_none_or(|t| t.text != "::") {
                    out.push((token.line, path));
                    return i;
                }
            }
            _ => return i,
        }
    }
    i
}

/// Expands the trees of a `{ a, b::c }` group whose body starts at `i`.
fn use_group(
    tokens: &[Token],
    mut i: usize,
    prefix: &[String],
    out: &mut Vec<(usize, Vec<String>)>,
) -> usize {
    while let Some(token) = tokens.get(i) {
        match token.text.as_str() {
            "}" => return i + 1,
            "," => i += 1,
            _ => {
                let next = use_tree(tokens, i, prefix, out);
                i = if next == i { i + 1 } else { next };
            }
        }
    }
    i
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

/// True for `dir/tests.rs` mounted only under `#[cfg(test)]` by `dir.rs` or `dir/mod.rs`.
fn is_test_module(file: &Path) -> bool {
    if file.file_name().is_none_or(|n| n != "tests.rs") {
        return false;
    }
    let Some(dir) = file.parent() else {
        return false;
    };
    let parents = [dir.with_extension("rs"), dir.join("mod.rs")];
    parents.iter().any(|parent| {
        std::fs::read_to_string(parent).is_ok_and(|text| text.contains("#[cfg(test)]\nmod tests;"))
    })
}

#[test]
fn the_core_does_no_io() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    // the binary (main.rs and its modules under src/main/) is not the core,
    // and neither are unit-test files (`#[cfg(test)] mod tests;`), which
    // fabricate their clocks from `Instant::now`
    files.retain(|f| f != &src.join("main.rs") && !f.starts_with(src.join("main")));
    files.retain(|f| !is_test_module(f));
    assert!(
        files.len() >= 10,
        "scanned only {} files in src/",
        files.len()
    );
    let mut report = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (line, word) in violations(&text) {
            report.push(format!("{}:{line}: uses {word}", file.display()));
        }
    }
    assert!(
        report.is_empty(),
        "IO in the sans-IO core:\n{}",
        report.join("\n")
    );
}

#[test]
fn the_scan_catches_a_planted_violation() {
    let planted = "fn f() {\n    let t = std::time::Instant::now();\n}\nuse actix::prelude::*;\n";
    assert_eq!(violations(planted), vec![(2, "Instant::now"), (4, "actix")]);
    assert_eq!(
        violations("let s = tokio::net::TcpStream::connect(a);"),
        vec![(1, "TcpStream"), (1, "tokio::net")]
    );
    let after_tests = "fn f() {}\n#[cfg(test)]\nmod tests { fn t() { Instant::now(); } }";
    assert!(violations(after_tests).is_empty());
    assert!(violations("#[path = \"../actors/mod.rs\"]\npub mod actors;").is_empty());
}

#[test]
fn the_scan_expands_grouped_imports() {
    for (code, rule) in [
        ("use tokio::{net::TcpStream};", "tokio::net"),
        ("use tokio::{io, net};", "tokio::net"),
        (
            "use tokio :: {\n    io,\n    net :: { self },\n};",
            "tokio::net",
        ),
        ("use {std::fs, std::io};", "std::fs"),
        ("use std::{fs::File, io};", "std::fs"),
        ("use std::net::{SocketAddr, TcpStream};", "TcpStream"),
        ("use std::net::{UdpSocket as Socket};", "UdpSocket"),
        ("use actix::{Actor, Context};", "actix"),
        ("use actix_web::{web};", "actix"),
        ("use awc;", "awc"),
        ("let c = awc::Client::default();", "awc"),
        ("let c = ::awc :: Client::default();", "awc"),
        ("use rand::{Rng};", "rand"),
        (
            "use std::time::{Instant};\nlet t = Instant :: now();",
            "Instant::now",
        ),
    ] {
        let found: Vec<&str> = violations(code).into_iter().map(|(_, r)| r).collect();
        assert!(found.contains(&rule), "{code:?} gave {found:?}");
    }
}

#[test]
fn the_scan_reads_past_a_mid_file_test_module() {
    let planted = "\
fn f() {}
#[cfg(test)]
mod helpers {
    fn g() { let s = \"}\"; let c = '}'; /* } */ }
}
#[cfg(test)]
mod tests;
#[cfg(test)]
fn test_only() { let t = Instant::now(); }
use tokio::{net::UdpSocket};
";
    assert_eq!(
        violations(planted),
        vec![(9, "Instant::now"), (10, "UdpSocket"), (10, "tokio::net")]
    );
}

#[test]
fn the_scan_ignores_comments_and_strings() {
    let quiet = "\
// use actix::prelude::*;
/* tokio::net /* nested */ std::fs */
/// Instant::now
let s = \"awc::Client\";
let r = r#\"rand::random \"quoted\"\"#;
let c = '\"'; let l: &'static str = \"\";
";
    assert!(violations(quiet).is_empty(), "{:?}", violations(quiet));
}

#[test]
fn actors_are_mounted_from_lib() {
    let lib =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    assert!(lib.contains("#[path = \"../actors/mod.rs\"]"));
}

// ---------------------------------------------------------------------------
// The runtime's layout: a file directly in `actors/` is an actor; handles and
// IO plumbing live in folders named for what they are; files stay small.
// ---------------------------------------------------------------------------

/// Folders of `actors/` that hold no actor: the types a host holds and the
/// state they share with their actors, and the IO plumbing.
const NON_ACTOR_FOLDERS: &[&str] = &["handles", "io"];

/// Files directly in `actors/` that hold no actor (none: a helper lives in
/// its owner's folder or in `actors/io/`).
const NOT_ACTORS_YET: &[&str] = &[];

/// The longest a file under `actors/` may be.
const MAX_ACTOR_FILE_LINES: usize = 350;

/// Files over [`MAX_ACTOR_FILE_LINES`] allowed for now (none).
const LONG_FILES_BEING_SHRUNK: &[&str] = &[];

/// The types given an `impl Actor for` in a file's code (test modules
/// skipped), with their lines: `impl Actor for T`, `impl<A> actix::Actor for
/// T<A>`, whatever the spacing; other traits ending in `Actor` do not count.
fn actor_impls(text: &str) -> Vec<(usize, String)> {
    let tokens = without_test_modules(tokenize(&blank_literals(text)));
    let is = |k: usize, s: &str| tokens.get(k).is_some_and(|t| t.text == s);
    let mut found = Vec::new();
    for i in (0..tokens.len()).filter(|&i| is(i, "impl")) {
        let k = generics_end(&tokens, i + 1);
        if !tokens.get(k).is_some_and(is_word) {
            continue;
        }
        let (path, end) = path_at(&tokens, k);
        if path.last().is_some_and(|p| p == "Actor")
            && is(end, "for")
            && let Some(ty) = tokens.get(end + 1)
        {
            found.push((ty.line, ty.text.clone()));
        }
    }
    found
}

/// Just past the `<...>` generics starting at `k` (the `>` of a `->` inside
/// them does not close them), or `k` if none start there.
fn generics_end(tokens: &[Token], k: usize) -> usize {
    if tokens.get(k).is_none_or(|t| t.text != "<") {
        return k;
    }
    let mut depth = 0usize;
    for j in k..tokens.len() {
        match tokens[j].text.as_str() {
            "<" => depth += 1,
            ">" if j > 0 && tokens[j - 1].text == "-" => {}
            ">" => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
    }
    tokens.len()
}

/// `file` relative to the crate, for messages.
fn shown(file: &Path) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    file.strip_prefix(root)
        .unwrap_or(file)
        .display()
        .to_string()
}

/// The actor impls of each file, with the file's path.
fn actor_impls_in(files: &[PathBuf]) -> Vec<(String, usize, String)> {
    files
        .iter()
        .flat_map(|file| {
            let text = std::fs::read_to_string(file).unwrap();
            actor_impls(&text)
                .into_iter()
                .map(|(line, ty)| (shown(file), line, ty))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn a_file_directly_in_actors_is_one_actor() {
    let actors = Path::new(env!("CARGO_MANIFEST_DIR")).join("actors");
    let mut report = Vec::new();
    let mut checked = 0;
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&actors)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            let owner = actors.join(format!("{name}.rs"));
            if !NON_ACTOR_FOLDERS.contains(&name.as_str()) && !owner.is_file() {
                report.push(format!(
                    "{}/: a folder neither named for an actor file (actors/{name}.rs) nor one of {NON_ACTOR_FOLDERS:?}",
                    shown(&path)
                ));
            }
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") || name == "mod.rs" {
            continue;
        }
        let mut files = vec![path.clone()];
        let children = path.with_extension("");
        if children.is_dir() {
            rust_files(&children, &mut files);
        }
        let impls = actor_impls_in(&files);
        if NOT_ACTORS_YET.contains(&name.as_str()) {
            if !impls.is_empty() {
                report.push(format!(
                    "{}: holds an actor now; take it off NOT_ACTORS_YET",
                    shown(&path)
                ));
            }
            continue;
        }
        checked += 1;
        match impls.len() {
            1 => {}
            0 => report.push(format!(
                "{}: no `impl Actor for`; a handle goes to actors/handles/, IO plumbing to actors/io/, pure code to src/",
                shown(&path)
            )),
            _ => report.push(format!(
                "{}: {} actors ({}); one actor per file",
                shown(&path),
                impls.len(),
                impls
                    .iter()
                    .map(|(file, line, ty)| format!("{ty} at {file}:{line}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
    assert!(checked >= 8, "found only {checked} actor files in actors/");
    assert!(
        report.is_empty(),
        "every .rs file directly in actors/ (but mod.rs) is exactly one actor, with its child modules in the folder of its name:\n{}",
        report.join("\n")
    );
}

#[test]
fn handles_and_io_hold_no_actor() {
    let actors = Path::new(env!("CARGO_MANIFEST_DIR")).join("actors");
    let mut report = Vec::new();
    for folder in NON_ACTOR_FOLDERS {
        let dir = actors.join(folder);
        let module = std::fs::read_to_string(dir.join("mod.rs")).unwrap_or_default();
        if !module.starts_with("//!") {
            report.push(format!(
                "actors/{folder}/mod.rs: missing, or without a `//!` doc saying what lives there"
            ));
        }
        let mut files = Vec::new();
        rust_files(&dir, &mut files);
        for (file, line, ty) in actor_impls_in(&files) {
            report.push(format!(
                "{file}:{line}: `impl Actor for {ty}`; an actor is a file directly in actors/"
            ));
        }
    }
    assert!(
        report.is_empty(),
        "actors/handles/ and actors/io/ hold handles and plumbing, not actors:\n{}",
        report.join("\n")
    );
}

#[test]
fn files_in_actors_stay_small() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("actors"), &mut files);
    files.sort();
    let long: Vec<String> = files
        .iter()
        .filter(|file| !LONG_FILES_BEING_SHRUNK.iter().any(|f| file.ends_with(f)))
        .filter_map(|file| {
            let lines = std::fs::read_to_string(file).unwrap().lines().count();
            (lines > MAX_ACTOR_FILE_LINES).then(|| format!("{}: {lines} lines", shown(file)))
        })
        .collect();
    assert!(
        long.is_empty(),
        "files in actors/ over {MAX_ACTOR_FILE_LINES} lines; split them by concern into child modules (actors/<actor>/<concern>.rs) or move pure parts to src/:\n{}",
        long.join("\n")
    );
}

#[test]
fn the_actor_scan_reads_impls() {
    let planted = "\
impl Actor for Registry {
    type Context = Context<Self>;
}
impl<S: Stream<Item = u8>, F: Fn() -> u8> actix::Actor
    for Pump<S, F> {}
impl Handler<OpenTunnel> for Registry {}
impl ActorFactory for Maker {}
// impl Actor for Commented {}
const S: &str = \"impl Actor for Quoted\";
#[cfg(test)]
mod tests {
    impl Actor for Probe {}
}
";
    let found: Vec<(usize, String)> = actor_impls(planted);
    assert_eq!(
        found,
        vec![(1, "Registry".to_owned()), (5, "Pump".to_owned())]
    );
}
