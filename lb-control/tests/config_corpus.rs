//! The bad-config corpus: every `tests/config-corpus/*.toml` holds exactly
//! one problem and says what the error must contain.
//!
//! Header lines of each file:
//!
//! * `# expect: <text>`: one issue's Display (`file:line:col: message
//!   (hint: ...)`) contains `<text>` (required, first line);
//! * `# host-checks: yes`: validate with [`HostChecks::Yes`] (interface
//!   names are looked up on this host), else [`HostChecks::No`];
//! * `# line: <n>`: that issue is reported at line `<n>`.
//!
//! Each file must be rejected with exactly one issue, so a file cannot
//! pass by tripping over an unrelated problem.

use std::path::{Path, PathBuf};

use lb_control::config::{self, BackendEdit, ConfigIssue, HostChecks};

struct Case {
    path: PathBuf,
    source: String,
    expect: String,
    host: HostChecks,
    line: Option<usize>,
}

fn corpus() -> Vec<Case> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/config-corpus");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let source = std::fs::read_to_string(&path).unwrap();
            let header = |key: &str| {
                source
                    .lines()
                    .take_while(|l| l.starts_with('#'))
                    .find_map(|l| l.strip_prefix(&format!("# {key}: ")))
                    .map(str::to_string)
            };
            let expect = source
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("# expect: "))
                .unwrap_or_else(|| panic!("{}: first line must be `# expect: ...`", path.display()))
                .to_string();
            let host = match header("host-checks").as_deref() {
                Some("yes") => HostChecks::Yes,
                None | Some("no") => HostChecks::No,
                Some(other) => panic!("{}: host-checks: {other}?", path.display()),
            };
            let line = header("line").map(|l| l.parse().unwrap());
            Case {
                path,
                source,
                expect,
                host,
                line,
            }
        })
        .collect()
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}

#[test]
fn every_bad_config_is_rejected_with_the_expected_issue() {
    let cases = corpus();
    assert!(cases.len() >= 20, "only {} corpus files", cases.len());
    let mut failures = Vec::new();
    for case in &cases {
        let name = file_name(&case.path);
        let issues: Vec<ConfigIssue> = match config::check(&case.source, &name, case.host) {
            Ok(_) => {
                failures.push(format!("{name}: accepted"));
                continue;
            }
            Err(e) => e.0,
        };
        let shown: Vec<String> = issues.iter().map(ToString::to_string).collect();
        if issues.len() != 1 {
            failures.push(format!(
                "{name}: {} issues, expected exactly one:\n  {}",
                issues.len(),
                shown.join("\n  ")
            ));
            continue;
        }
        let issue = &issues[0];
        let text = &shown[0];
        if !text.contains(&case.expect) {
            failures.push(format!(
                "{name}: {text:?} does not contain {:?}",
                case.expect
            ));
        }
        if !text.starts_with(&format!("{name}:")) {
            failures.push(format!("{name}: {text:?} does not name the file"));
        }
        if let Some(line) = case.line
            && issue.line != Some(line)
        {
            failures.push(format!(
                "{name}: reported at line {:?}, expected {line}: {text}",
                issue.line
            ));
        }
        // Semantic issues always tell the operator what to do.
        let parsed = config::parse(&case.source, &name).is_ok();
        if parsed && issue.hint.is_none() {
            failures.push(format!("{name}: no hint: {text}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn host_checks_only_run_when_asked() {
    for case in corpus().iter().filter(|c| c.host == HostChecks::Yes) {
        let name = file_name(&case.path);
        config::check(&case.source, &name, HostChecks::No)
            .unwrap_or_else(|e| panic!("{name} should pass offline:\n{e}"));
    }
}

#[test]
fn syntax_errors_report_line_and_column() {
    let source = "[agent]\ninterface = \"eth0\"\n\n[[vip]]\nname = \"web\"\nport = = 80\n";
    let e = config::parse(source, "lb.toml").unwrap_err();
    assert_eq!(e.0.len(), 1);
    assert_eq!(e.0[0].line, Some(6), "{e}");
    assert_eq!(e.0[0].column, Some(8), "{e}");
    assert!(e.to_string().starts_with("lb.toml:6:8: "), "{e}");
    // The same through check() and load().
    let e = config::check(source, "lb.toml", HostChecks::No).unwrap_err();
    assert_eq!(e.0[0].line, Some(6));
}

#[test]
fn example_passes() {
    let cfg = config::check(config::EXAMPLE, "example.toml", HostChecks::No)
        .unwrap_or_else(|e| panic!("EXAMPLE is rejected:\n{e}"));
    assert!(!cfg.vips.is_empty());
    // The planner takes what the example describes, everything healthy.
    let spec = cfg.dataplane_spec(1, &|_, _| true);
    lb_control::plan::plan(&spec, &lb_control::plan::IdAllocator::default())
        .unwrap_or_else(|e| panic!("EXAMPLE does not plan: {e}"));
}

#[test]
fn edit_keeps_comments_and_reparses() {
    let src = config::EXAMPLE;
    let addr = "198.18.1.2".parse().unwrap();
    let out = config::edit_backend(src, "web", addr, BackendEdit::Weight(250)).unwrap();
    let comments = |t: &str| -> Vec<String> {
        t.lines()
            .filter_map(|l| l.find('#').map(|i| l[i..].to_string()))
            .collect()
    };
    assert_eq!(comments(&out), comments(src));
    let cfg = config::check(&out, "lb.toml", HostChecks::No).unwrap();
    let web = cfg.find_vip("web").unwrap();
    assert_eq!(web.backends[1].weight, 250);
    assert_eq!(web.backends[0].weight, 100);
    // Everything but the edited line is unchanged.
    let changed: Vec<(&str, &str)> = src
        .lines()
        .zip(out.lines())
        .filter(|(a, b)| a != b)
        .collect();
    assert_eq!(changed, [("weight = 100", "weight = 250")]);
}

/// The README shows `config::EXAMPLE`; once it embeds a config (a ```toml
/// block with an `[agent]` table), that block must be EXAMPLE verbatim.
#[test]
fn readme_example_matches() {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let text = std::fs::read_to_string(&readme).expect("README.md next to the workspace");
    let blocks: Vec<&str> = text
        .split("```toml\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(block, _)| block))
        .filter(|block| block.contains("[agent]"))
        .collect();
    assert_eq!(
        blocks.len(),
        1,
        "README.md must show the example config once"
    );
    for block in blocks {
        assert_eq!(
            block,
            config::EXAMPLE,
            "README.md's example config differs from lb_control::config::EXAMPLE"
        );
    }
}
