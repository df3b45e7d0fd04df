//! `ltxfs bench` runs the `ltxfs-bench` program beside it (or on PATH) with
//! its own arguments, and says what to build when there is none.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::*;

/// A copy of the ltxfs under test in `dir`, so that what is beside it is the
/// test's.
fn ltxfs_in(dir: &Path) -> PathBuf {
    let ltxfs = dir.join("ltxfs");
    in_child(&format!(
        "cp '{}' '{}'",
        env!("CARGO_BIN_EXE_ltxfs"),
        ltxfs.display()
    ));
    ltxfs
}

/// Writes an `ltxfs-bench` into `dir` that prints its arguments and
/// `LTXFS_BIN`, and exits with status 7.
fn fake_bench_in(dir: &Path) {
    let bench = dir.join("ltxfs-bench").display().to_string();
    in_child(&format!(
        "printf '#!/bin/sh\\necho \"args: $*\"\\necho \"LTXFS_BIN=$LTXFS_BIN\"\\nexit 7\\n' > '{bench}' \
         && chmod 755 '{bench}'"
    ));
}

/// Runs `script` in `sh`. The programs are written by a child process: a
/// process another test forks while this one held a program open for writing
/// would keep it open, and running the program would fail (`ETXTBSY`).
fn in_child(script: &str) {
    let status = Command::new("sh")
        .args(["-c", script])
        .status()
        .expect("run sh");
    assert!(status.success(), "{script}: {status}");
}

fn run(ltxfs: &Path, args: &[&str], path: &str) -> Output {
    Command::new(ltxfs)
        .args(args)
        .env("PATH", path)
        .env_remove("LTXFS_BIN")
        .output()
        .expect("run ltxfs")
}

#[test]
fn ltxfs_bench_runs_the_benchmark_beside_it_with_its_arguments() {
    let (_dir, root) = temp_root("ltxfs-bench-command-");
    let ltxfs = ltxfs_in(&root);
    fake_bench_in(&root);
    let output = run(
        &ltxfs,
        &["bench", "handoff", "--rounds", "2", "--help"],
        "/usr/bin:/bin",
    );
    assert_eq!(output.status.code(), Some(7), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("args: handoff --rounds 2 --help\n"),
        "{stdout}"
    );
    // Its mounts run the ltxfs that ran it.
    assert!(
        stdout.contains(&format!("LTXFS_BIN={}\n", ltxfs.display())),
        "{stdout}"
    );
}

#[test]
fn ltxfs_bench_finds_the_benchmark_on_path() {
    let (_dir, root) = temp_root("ltxfs-bench-command-");
    let ltxfs = ltxfs_in(&root);
    let bin = root.join("bin");
    fs::create_dir(&bin).unwrap();
    fake_bench_in(&bin);
    let output = run(&ltxfs, &["bench", "--seconds", "1"], &bin.to_string_lossy());
    assert_eq!(output.status.code(), Some(7), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("args: --seconds 1\n"));
}

#[test]
fn without_the_benchmark_ltxfs_bench_says_what_to_build() {
    let (_dir, root) = temp_root("ltxfs-bench-command-");
    let ltxfs = ltxfs_in(&root);
    let output = run(&ltxfs, &["bench"], "/usr/bin:/bin");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("ltxfs-bench") && stderr.contains("cargo build --release -p ltxfs-bench"),
        "{stderr}"
    );
}
