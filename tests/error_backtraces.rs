//! `engine::skip_error_backtraces`, in a process of its own: it sets an environment
//! variable, and the standard library reads the backtrace setting once per process.

use poolformer_edge::engine::skip_error_backtraces;

#[test]
fn error_backtraces_are_off_unless_asked_for() {
    // An explicit setting is left alone.
    std::env::set_var("RUST_LIB_BACKTRACE", "1");
    skip_error_backtraces();
    assert_eq!(std::env::var("RUST_LIB_BACKTRACE").unwrap(), "1");

    // Without one, RUST_BACKTRACE=1 no longer makes errors capture backtraces (before
    // any error has been created: the setting is read at the first capture).
    std::env::remove_var("RUST_LIB_BACKTRACE");
    std::env::set_var("RUST_BACKTRACE", "1");
    skip_error_backtraces();
    assert_eq!(std::env::var("RUST_LIB_BACKTRACE").unwrap(), "0");
    let e = anyhow::anyhow!("an error tract would create and drop");
    assert_eq!(
        e.backtrace().status(),
        std::backtrace::BacktraceStatus::Disabled
    );
}
