//! Each checkout tests itself: the repository root that tests drive (deploy/local scripts,
//! SQL files, logs) is found at run time, never taken from the path baked into the test
//! binary, so a binary built in one clone cannot run another clone's scripts.

use std::path::{Path, PathBuf};
use tally_tests::{find_repo_root, is_repo_root, repo_root};

/// A minimal fake checkout (what `is_repo_root` looks for) in a fresh temp dir.
fn fake_checkout(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tally-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("deploy/local")).unwrap();
    std::fs::create_dir_all(dir.join("tests/src")).unwrap();
    std::fs::write(dir.join("Cargo.toml"), "[workspace]\nmembers = []\n").unwrap();
    std::fs::write(dir.join("deploy/local/up.sh"), "#!/bin/sh\n").unwrap();
    dir
}

fn compiled_from() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn a_second_clone_is_tested_from_its_own_directory() {
    let clone2 = fake_checkout("clone2");
    // cargo runs a test binary in the package directory of the checkout under test.
    let root = find_repo_root(None, Some(clone2.join("tests")), None);
    assert_eq!(root, clone2);
    assert_ne!(
        root,
        compiled_from(),
        "took the path baked in at build time"
    );
    std::fs::remove_dir_all(&clone2).unwrap();
}

#[test]
fn the_makefile_variable_wins_then_the_executable_then_the_build_path() {
    let a = fake_checkout("clone-a");
    let b = fake_checkout("clone-b");
    let outside = std::env::temp_dir();
    assert_eq!(
        find_repo_root(Some(a.clone()), Some(b.join("tests")), None),
        a
    );
    // Run from outside any checkout: the test executable's own target dir decides.
    let exe = b.join("target/debug/deps/relay-0123");
    assert_eq!(find_repo_root(None, Some(outside.clone()), Some(exe)), b);
    assert_eq!(
        find_repo_root(Some(PathBuf::new()), Some(outside), None),
        compiled_from()
    );
    assert!(!is_repo_root(&a.join("tests")));
    std::fs::remove_dir_all(&a).unwrap();
    std::fs::remove_dir_all(&b).unwrap();
}

#[test]
#[should_panic(expected = "is not a tally checkout")]
fn a_wrong_makefile_variable_is_refused() {
    find_repo_root(Some(std::env::temp_dir()), None, None);
}

#[test]
fn this_run_tests_the_checkout_it_runs_in() {
    let cwd = std::env::current_dir().unwrap();
    let root = repo_root();
    assert!(is_repo_root(&root), "{}", root.display());
    let around = cwd.ancestors().find(|d| is_repo_root(d));
    if let (None, Some(around)) = (std::env::var_os("TALLY_REPO_ROOT"), around) {
        assert_eq!(root, around, "run inside {}", cwd.display());
    }
}
