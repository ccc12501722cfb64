//! Shared by the hardening tests: children in a process of their own (a SIGBUS fails one test
//! instead of killing the run) and the file errors they expect.

use leanclip_engine::Error;
use std::process::Command;

/// Set in a child's environment, so that the child test runs there (and returns at once in
/// the ordinary run).
const CHILD_ENV: &str = "LEANCLIP_TEST_CHILD";
/// What a child prints when it has run to its end: a child that returned early, or a name that
/// matched no test, fails the parent.
const CHILD_DONE: &str = "child done";

/// Runs `child` (a test of this binary) in a process of its own and fails unless it ran to its
/// [`child_done`].
pub fn in_subprocess(child: &str) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args([child, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{child} failed ({:?}, a signal means it crashed):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(CHILD_DONE),
        "{child} did not run to its end"
    );
}

/// True in the process [`in_subprocess`] started.
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

/// The last line of a child test.
pub fn child_done() {
    println!("{CHILD_DONE}");
}

/// The reason a read of a mapped file that changed gives.
pub const CHANGED: &str = "changed after it was opened";

/// `r` is an `Error::File` whose reason contains `want` (`what` names the call).
pub fn is_file_error<T: std::fmt::Debug>(r: Result<T, Error>, want: &str, what: &str) {
    match r {
        Err(Error::File { reason, .. }) => assert!(reason.contains(want), "{what}: {reason}"),
        other => panic!("{what}: expected Error::File ({want}), got {other:?}"),
    }
}

/// Cuts the file at `path` to a third of its length, in place (what another program truncating
/// a mapped file does).
pub fn truncate_to_a_third(path: &std::path::Path) {
    let len = std::fs::metadata(path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len / 3)
        .unwrap();
}
