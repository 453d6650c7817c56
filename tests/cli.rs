//! The command-line contract: a usage error is one line on stderr and exit status 1;
//! `--help` and `--version` print to stdout and exit 0.

use std::process::Command;

fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_snapfs"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn usage_errors_are_one_line_and_exit_1() {
    let cases: &[&[&str]] = &[
        &["stat", "/tmp", "--no-such-flag"],
        &["snapshot", "create"],
        &["mount", "/tmp/s", "/tmp/m", "--threads", "many"],
        &["mount", "/tmp/s", "/tmp/m", "--cache-size", "12XB"],
        &["no-such-command"],
        &[],
    ];
    for args in cases {
        let (code, out, err) = run(args);
        assert_eq!(
            code,
            Some(1),
            "snapfs {args:?}: exit {code:?}, stderr:\n{err}"
        );
        assert_eq!(
            err.lines().count(),
            1,
            "snapfs {args:?}: stderr not one line:\n{err}"
        );
        assert!(err.starts_with("snapfs: "), "snapfs {args:?}: {err}");
        assert!(err.contains("--help"), "snapfs {args:?}: {err}");
        assert!(out.is_empty(), "snapfs {args:?}: stdout {out}");
    }
}

#[test]
fn help_and_version_exit_0() {
    for args in [&["--help"][..], &["--version"], &["snapshot", "--help"]] {
        let (code, out, _) = run(args);
        assert_eq!(code, Some(0), "snapfs {args:?}");
        assert!(!out.is_empty(), "snapfs {args:?} printed nothing");
    }
}
