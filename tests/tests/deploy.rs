//! The recipes under deploy/ against the code they drive: every YAML document parses, the job in the
//! ConfigMap is a valid job and the example hosts file a valid hosts file, every `acrf …` command line in the
//! scripts, the manifests and the README is accepted by the current binary's argument parser, and the shell
//! in them passes shellcheck.

use std::collections::BTreeSet;
use std::iter::Peekable;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::Chars;

use acrf_common::config::Config;
use acrf_coordinator::args::Cli;
use acrf_coordinator::launch::ssh::HostsFile;
use anyhow::{Context, Result, bail};
use clap::Parser;
use serde::Deserialize;
use serde_yaml_ng::Value;

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

/// Values for the variables the recipes' command lines expand, of the shape they have in production, so that
/// the parser sees what it would there.
const SAMPLES: &[(&str, &str)] = &[
    ("ACRF", "acrf"),
    ("JOB", "/shared/jobs/lora.toml"),
    ("PORT", "7600"),
    ("HEAD_IP", "10.0.0.1"),
    ("STATE", "/shared/.acrf-1234"),
    ("WORKERS", "8"),
    ("SLURM_LOCALID", "0"),
];

/// Stands for an expansion without a sample value; a command line that holds one cannot be checked.
const UNKNOWN: char = '\u{0}';

fn deploy_files(ext: &[&str]) -> Vec<PathBuf> {
    fn walk(dir: &Path, ext: &[&str], out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("deploy/ is readable").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, ext, out);
            } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| ext.contains(&e)) {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new(DEPLOY), ext, &mut out);
    out.sort();
    out
}

fn name(path: &Path) -> String {
    path.strip_prefix(DEPLOY).unwrap_or(path).display().to_string()
}

/// A shell word, or an operator (`;`, `&`, `|`, a parenthesis, a redirection) that ends a simple command.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Op,
}

/// Splits shell text into words the way the shell would (quotes, escapes, line continuations, comments),
/// expanding variables with [`SAMPLES`] and anything else to [`UNKNOWN`].
fn lex(src: &str) -> Result<Vec<Tok>> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    let mut chars = src.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => out.extend(cur.take().map(Tok::Word)),
            // An unescaped line break ends a command, as `;` does.
            '\n' => {
                out.extend(cur.take().map(Tok::Word));
                out.push(Tok::Op);
            }
            '#' if cur.is_none() => while chars.next_if(|&n| n != '\n').is_some() {},
            ';' | '&' | '|' | '(' | ')' | '<' | '>' => {
                // The digits right before a redirection are its file descriptor (`2>&1`), not a word.
                let fd =
                    matches!(c, '<' | '>') && cur.as_deref().is_some_and(|w| w.bytes().all(|b| b.is_ascii_digit()));
                if fd {
                    cur = None;
                }
                out.extend(cur.take().map(Tok::Word));
                out.push(Tok::Op);
            }
            '\\' => match chars.next() {
                Some('\n') | None => {}
                Some(n) => cur.get_or_insert_default().push(n),
            },
            '\'' => {
                let word = cur.get_or_insert_default();
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => word.push(ch),
                        None => bail!("unterminated ' in {src:?}"),
                    }
                }
            }
            '"' => {
                let mut word = cur.take().unwrap_or_default();
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(n @ ('$' | '`' | '"' | '\\')) => word.push(n),
                            Some('\n') => {}
                            Some(n) => word.extend(['\\', n]),
                            None => bail!("unterminated \" in {src:?}"),
                        },
                        Some('$') => word.push_str(&expand(&mut chars)?),
                        Some(ch) => word.push(ch),
                        None => bail!("unterminated \" in {src:?}"),
                    }
                }
                cur = Some(word);
            }
            '$' => {
                let value = expand(&mut chars)?;
                cur.get_or_insert_default().push_str(&value);
            }
            _ => cur.get_or_insert_default().push(c),
        }
    }
    out.extend(cur.map(Tok::Word));
    Ok(out)
}

/// The value of the expansion after a `$`.
fn expand(chars: &mut Peekable<Chars>) -> Result<String> {
    let sample = |name: &str| SAMPLES.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string());
    let unknown = |what: &str| format!("{UNKNOWN}{what}{UNKNOWN}");
    match chars.peek() {
        Some('{') => {
            let inner = enclosed(chars, '{', '}')?;
            let name: String = inner.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            Ok(sample(&name).unwrap_or_else(|| unknown(&name)))
        }
        Some('(') => {
            enclosed(chars, '(', ')')?;
            Ok(unknown("a command substitution"))
        }
        Some(c) if c.is_ascii_alphabetic() || *c == '_' => {
            let mut name = String::new();
            while let Some(c) = chars.next_if(|c| c.is_ascii_alphanumeric() || *c == '_') {
                name.push(c);
            }
            Ok(sample(&name).unwrap_or_else(|| unknown(&name)))
        }
        Some(c) if c.is_ascii_digit() || "?!$@*#-".contains(*c) => {
            Ok(unknown(&chars.next().expect("peeked").to_string()))
        }
        _ => Ok("$".into()),
    }
}

/// The text from the `open` at `chars` to its matching `close`, which may nest; single-quoted text is taken
/// as it is (`${IP:-$(hostname -I | awk '{print $1}')}`).
fn enclosed(chars: &mut Peekable<Chars>, open: char, close: char) -> Result<String> {
    let (mut depth, mut inner) = (0, String::new());
    while let Some(ch) = chars.next() {
        if ch == '\'' {
            inner.push(ch);
            for quoted in chars.by_ref() {
                inner.push(quoted);
                if quoted == '\'' {
                    break;
                }
            }
            continue;
        }
        if ch == open {
            depth += 1;
            if depth == 1 {
                continue;
            }
        } else if ch == close {
            depth -= 1;
            if depth == 0 {
                return Ok(inner);
            }
        }
        inner.push(ch);
    }
    bail!("unterminated {open}")
}

/// The arguments after every `acrf` word of `script`, up to the operator that ends its command, also inside
/// words that are scripts themselves (`bash -c '…'`, messages that tell what to run).
fn acrf_commands(script: &str) -> Result<Vec<Vec<String>>> {
    let toks = lex(script)?;
    let mut found = Vec::new();
    for (i, tok) in toks.iter().enumerate() {
        let Tok::Word(word) = tok else { continue };
        if word == "acrf" || word.ends_with("/acrf") {
            let args = toks[i + 1..].iter().map_while(|t| match t {
                Tok::Word(w) => Some(w.clone()),
                Tok::Op => None,
            });
            found.push(args.collect());
        } else if word.contains(char::is_whitespace) {
            match acrf_commands(word) {
                Ok(inner) => found.extend(inner),
                Err(e) if word.to_lowercase().contains("acrf") => return Err(e),
                Err(_) => {}
            }
        }
    }
    Ok(found)
}

/// The bodies of the shell code blocks of a Markdown text.
fn markdown_shell(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut block: Option<(bool, String)> = None;
    for line in text.lines() {
        let fence = line.trim_start().strip_prefix("```");
        block = match (block.take(), fence) {
            (None, Some(info)) => {
                Some((matches!(info.trim(), "" | "sh" | "bash" | "shell" | "console"), String::new()))
            }
            (Some((shell, body)), Some(_)) => {
                if shell {
                    blocks.push(body);
                }
                None
            }
            (Some((shell, mut body)), None) => {
                body.push_str(line.trim_start().strip_prefix("$ ").unwrap_or(line));
                body.push('\n');
                Some((shell, body))
            }
            (None, None) => None,
        };
    }
    blocks
}

/// Every YAML document of every file under deploy/, by file.
fn yaml_documents() -> Result<Vec<(String, Vec<Value>)>> {
    let mut all = Vec::new();
    for path in deploy_files(&["yaml", "yml"]) {
        let text = std::fs::read_to_string(&path)?;
        let docs = serde_yaml_ng::Deserializer::from_str(&text)
            .map(Value::deserialize)
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{} is not YAML", name(&path)))?;
        all.push((name(&path), docs));
    }
    Ok(all)
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The `acrf` command lines of the containers anywhere in a manifest: `command` (acrf, or a shell running
/// a script) followed by `args`.
fn container_commands(v: &Value, found: &mut Vec<Vec<String>>) -> Result<()> {
    match v {
        Value::Mapping(m) => {
            for key in ["containers", "initContainers"] {
                for c in m.get(key).and_then(Value::as_sequence).into_iter().flatten() {
                    let words = |k: &str| -> Vec<String> {
                        c.get(k).and_then(Value::as_sequence).into_iter().flatten().filter_map(scalar).collect()
                    };
                    let (command, args) = (words("command"), words("args"));
                    let argv: Vec<String> = command.iter().chain(&args).cloned().collect();
                    match argv.first().map(String::as_str) {
                        Some(p) if p == "acrf" || p.ends_with("/acrf") => found.push(argv[1..].to_vec()),
                        Some("sh" | "bash") if argv.get(1).map(String::as_str) == Some("-c") => {
                            found.extend(acrf_commands(argv.get(2).map_or("", String::as_str))?)
                        }
                        _ => {}
                    }
                }
            }
            for value in m.values() {
                container_commands(value, found)?;
            }
        }
        Value::Sequence(s) => {
            for value in s {
                container_commands(value, found)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[test]
fn every_yaml_document_parses_and_the_job_in_the_config_map_is_valid() -> Result<()> {
    let mut jobs = 0;
    let files = yaml_documents()?;
    assert!(files.len() >= 4, "the Kubernetes recipes: {files:?}");
    for (file, docs) in files {
        assert!(!docs.is_empty(), "{file}: no document");
        for doc in docs {
            for key in ["apiVersion", "kind"] {
                assert!(doc.get(key).and_then(Value::as_str).is_some(), "{file}: a document without `{key}`");
            }
            if doc.get("kind").and_then(Value::as_str) == Some("ConfigMap") {
                let data = doc.get("data").and_then(Value::as_mapping).into_iter().flatten();
                for (key, text) in data {
                    let key = key.as_str().unwrap_or_default();
                    if key.ends_with(".toml") {
                        let text = text.as_str().with_context(|| format!("{file}: {key} is not text"))?;
                        Config::parse(text, &format!("{file}: {key}"))?;
                        jobs += 1;
                    }
                }
            }
        }
    }
    assert_eq!(jobs, 1, "the job of configmap-job.yaml");
    Ok(())
}

#[test]
fn the_example_hosts_file_is_a_valid_hosts_file() -> Result<()> {
    let hosts = deploy_files(&["toml"]);
    assert!(!hosts.is_empty());
    for path in hosts {
        HostsFile::load(&path)?;
    }
    Ok(())
}

#[test]
fn every_acrf_command_line_in_deploy_is_accepted_by_the_binary() -> Result<()> {
    let mut commands: Vec<(String, Vec<String>)> = Vec::new();
    let mut per_file = |file: String, found: Vec<Vec<String>>| {
        assert!(!found.is_empty(), "{file}: no acrf command line found");
        commands.extend(found.into_iter().map(|args| (file.clone(), args)));
    };
    for path in deploy_files(&["sbatch", "sh"]) {
        per_file(name(&path), acrf_commands(&std::fs::read_to_string(&path)?)?);
    }
    for (file, docs) in yaml_documents()? {
        let mut found = Vec::new();
        for doc in &docs {
            container_commands(doc, &mut found)?;
        }
        if docs.iter().any(|d| matches!(d.get("kind").and_then(Value::as_str), Some("Job" | "JobSet"))) {
            per_file(file, found);
        }
    }
    for path in deploy_files(&["md"]) {
        let mut found = Vec::new();
        for block in markdown_shell(&std::fs::read_to_string(&path)?) {
            found.extend(acrf_commands(&block)?);
        }
        per_file(name(&path), found);
    }

    let mut failures = Vec::new();
    let mut subcommands = BTreeSet::new();
    for (file, args) in &commands {
        let line = args.join(" ");
        if line.contains(UNKNOWN) {
            failures.push(format!(
                "{file}: `acrf {}` expands a variable with no sample value in SAMPLES (or a command \
                 substitution: set a variable first)",
                line.replace(UNKNOWN, "§")
            ));
            continue;
        }
        match Cli::try_parse_from(std::iter::once("acrf").chain(args.iter().map(String::as_str))) {
            Ok(_) => {
                subcommands.insert(args[0].clone());
            }
            Err(e) => failures.push(format!("{file}: `acrf {line}`:\n{e}")),
        }
    }
    assert!(failures.is_empty(), "{} command line(s) refused:\n{}", failures.len(), failures.join("\n"));
    for expected in ["coordinator", "launch", "token", "train", "worker"] {
        assert!(subcommands.contains(expected), "no `acrf {expected}` checked; seen {subcommands:?}");
    }
    Ok(())
}

#[test]
fn the_checker_sees_what_the_shell_sees() -> Result<()> {
    let script = "# acrf train commented.toml\nexport ACRF=${ACRF:-acrf}\n\"$ACRF\" coordinator \"$JOB\" \\\n  --listen \"0.0.0.0:$PORT\" >log 2>&1 &\nsrun bash -c 'exec acrf worker --device \"cuda:$SLURM_LOCALID\"'\necho 'acrf token' | cat\n";
    let found = acrf_commands(script)?;
    assert_eq!(
        found,
        vec![
            vec!["coordinator", "/shared/jobs/lora.toml", "--listen", "0.0.0.0:7600"],
            vec!["worker", "--device", "cuda:0"],
            vec!["token"],
        ]
    );
    assert!(Cli::try_parse_from(["acrf", "worker", "--device", "cuda:0", "--no-such-flag"]).is_err());
    assert!(acrf_commands("acrf train \"$NOT_A_SAMPLE.toml\"")?[0][1].contains(UNKNOWN));
    // A line break ends the command; an escaped one does not.
    assert_eq!(
        acrf_commands("acrf token --identity i \\\n  --advertise a\necho done\n")?,
        vec![vec!["token", "--identity", "i", "--advertise", "a"]]
    );
    Ok(())
}

/// Runs shellcheck on `path`, or fails saying which package provides it.
fn shellcheck(path: &Path, what: &str) -> Result<()> {
    let out = Command::new("shellcheck").arg(path).output().map_err(|e| {
        anyhow::anyhow!(
            "cannot run shellcheck ({e}): run the tests with .ci/test, which installs Debian's `shellcheck`"
        )
    })?;
    if !out.status.success() {
        bail!("shellcheck {what}:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

#[test]
fn the_scripts_and_the_readme_shell_pass_shellcheck() -> Result<()> {
    let scripts = deploy_files(&["sbatch", "sh"]);
    assert!(!scripts.is_empty());
    for path in &scripts {
        shellcheck(path, &name(path))?;
    }
    for script in ["test", "run"] {
        shellcheck(&Path::new(ROOT).join(".ci").join(script), &format!(".ci/{script}"))?;
    }
    let dir = tempfile::tempdir()?;
    for path in deploy_files(&["md"]) {
        for (i, block) in markdown_shell(&std::fs::read_to_string(&path)?).into_iter().enumerate() {
            let script = dir.path().join(format!("block{i}.sh"));
            std::fs::write(&script, format!("#!/bin/bash\n{block}"))?;
            shellcheck(&script, &format!("{}, shell block {}:\n{block}", name(&path), i + 1))?;
        }
    }
    Ok(())
}

#[test]
fn every_nccl_setting_says_why_it_is_there() -> Result<()> {
    let text = std::fs::read_to_string(Path::new(DEPLOY).join("env/nccl-4090.env"))?;
    let (mut explained, mut names) = (false, Vec::new());
    for line in text.lines().map(str::trim) {
        if line.is_empty() {
            explained = false;
        } else if line.starts_with('#') {
            explained = true;
        } else {
            let (name, value) = line.split_once('=').with_context(|| format!("not NAME=value: {line}"))?;
            assert!(name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_'), "{line}");
            assert!(
                !value.is_empty() && !value.contains([' ', '"', '\'']),
                "a value the shell, Docker and kubectl read alike: {line}"
            );
            assert!(explained, "{name} has no comment above it saying why");
            names.push(name.to_string());
        }
    }
    for name in ["NCCL_P2P_DISABLE", "NCCL_IB_DISABLE", "NCCL_SOCKET_IFNAME", "NCCL_DEBUG"] {
        assert!(names.iter().any(|n| n == name), "{name} missing");
    }
    Ok(())
}

/// Programs of Debian's essential packages (coreutils, dash), on every machine.
const ESSENTIAL: &[&str] = &["id", "sh"];

/// The programs that `src` starts, as its `Command::new` names them: a literal, a `const` holding one, or a
/// function that returns one (the last literal of its body, e.g. the fallback of an environment variable).
/// Others (the acrf binary under test, a path from a variable) are not programs to install.
fn programs_started(src: &str) -> BTreeSet<String> {
    let literal = |text: &str| -> Option<String> { Some(text.strip_prefix('"')?.split('"').next()?.to_string()) };
    let mut found = BTreeSet::new();
    for (at, _) in src.match_indices("Command::new(") {
        let arg = &src[at + "Command::new(".len()..];
        let ident: String = arg.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        let program = if arg.starts_with('"') {
            literal(arg)
        } else if ident.is_empty() {
            None
        } else if arg[ident.len()..].starts_with("()") {
            let body = src.split_once(&format!("fn {ident}()")).map(|(_, rest)| rest.split("\n}").next().unwrap_or(""));
            body.and_then(|b| b.rsplit('"').nth(1)).map(str::to_string)
        } else {
            src.split_once(&format!("const {ident}: &str = ")).and_then(|(_, rest)| literal(rest))
        };
        // A path or a name; anything else is not a program (this file's own `"Command::new("` included).
        let plausible =
            |p: &String| !p.is_empty() && p.chars().all(|c| c.is_ascii_alphanumeric() || "/._-".contains(c));
        if let Some(program) = program.filter(plausible) {
            found.insert(program.rsplit('/').next().unwrap_or(&program).to_string());
        }
    }
    found
}

/// A newcomer's test command is the README's, on a machine with only the Rust toolchain: it has to install
/// every program the tests start. The README names `.ci/test`, and `.ci/test` names each program that a test
/// or the binary under test starts, so a test that needs a new one fails here until `.ci/test` installs it.
#[test]
fn the_readme_test_command_installs_what_the_tests_need() -> Result<()> {
    let readme = std::fs::read_to_string(Path::new(ROOT).join("README.md"))?;
    let (_, after) = readme.split_once("Run the tests").context("the README's \"Run the tests\"")?;
    let command = markdown_shell(after).into_iter().next().context("no shell block after \"Run the tests\"")?;
    assert_eq!(command.trim(), ".ci/test", "the README's test command");
    assert!(readme.contains("`.ci/test` installs"), "the README's Install section says what .ci/test installs");
    let script = std::fs::read_to_string(Path::new(ROOT).join(".ci/test"))?;
    assert!(script.contains("cargo test --workspace \"$@\""), ".ci/test runs the workspace's tests");
    let ci = std::fs::read_to_string(Path::new(ROOT).join(".ci/run"))?;
    assert!(ci.lines().any(|l| l.trim() == ".ci/test"), ".ci/run runs the README's test command");

    let mut programs = BTreeSet::new();
    let crate_dirs = ["tests/src", "tests/tests", "coordinator/src", "worker/src", "common/src"];
    for dir in crate_dirs.map(|d| Path::new(ROOT).join(d)) {
        let mut stack = vec![dir];
        while let Some(dir) = stack.pop() {
            for path in std::fs::read_dir(&dir)?.map(|e| e.map(|e| e.path())) {
                let path = path?;
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    programs.extend(programs_started(&std::fs::read_to_string(&path)?));
                }
            }
        }
    }
    for expected in ["sshd", "ssh", "ssh-keygen", "shellcheck", "chromium", "kill"] {
        assert!(programs.contains(expected), "{expected} is not found among the programs started: {programs:?}");
    }
    let named = |program: &str| {
        script.match_indices(program).any(|(at, _)| {
            let word = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
            !script[..at].ends_with(word) && !script[at + program.len()..].starts_with(word)
        })
    };
    let missing: Vec<&String> = programs.iter().filter(|p| !ESSENTIAL.contains(&p.as_str()) && !named(p)).collect();
    assert!(missing.is_empty(), "the tests start {missing:?}, which .ci/test neither checks for nor installs");
    Ok(())
}

#[test]
fn the_program_finder_reads_literals_constants_and_fallbacks() {
    let src = "const SSHD: &str = \"/usr/sbin/sshd\";\nconst BIN: &str = env!(\"X\");\n\
               fn browser() -> String {\n    var(\"B\").unwrap_or_else(|_| \"chromium\".into())\n}\n\
               Command::new(SSHD); Command::new(BIN); Command::new(browser()); Command::new(\"kill\"); Command::new(&exe);";
    let found: Vec<String> = programs_started(src).into_iter().collect();
    assert_eq!(found, ["chromium", "kill", "sshd"]);
}
