//! include/pfe.h is what cbindgen generates from src/capi/ today, and it compiles.
//!
//! A stale header fails here; `PFE_BLESS=1 cargo test --release --test capi_header`
//! rewrites it.

use std::path::{Path, PathBuf};
use std::process::Command;

use poolformer_edge::capi::PfeStatus;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The header as cbindgen generates it from src/capi/ with cbindgen.toml.
fn generate() -> String {
    let root = root();
    let config =
        cbindgen::Config::from_file(root.join("cbindgen.toml")).expect("cbindgen.toml parses");
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_src(root.join("src/capi/mod.rs"))
        .generate()
        .expect("cbindgen generates the header");
    let mut out = Vec::new();
    bindings.write(&mut out);
    String::from_utf8(out).expect("the header is UTF-8")
}

/// The first lines where `a` and `b` differ, for the failure message.
fn diff_hint(committed: &str, generated: &str) -> String {
    let (a, b): (Vec<_>, Vec<_>) = (committed.lines().collect(), generated.lines().collect());
    let first = a
        .iter()
        .zip(&b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    let show = |lines: &[&str]| {
        lines[first.min(lines.len())..(first + 5).min(lines.len())]
            .iter()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    format!(
        "first difference at line {}:\n  committed:\n{}  generated:\n{}",
        first + 1,
        show(&a),
        show(&b)
    )
}

#[test]
fn committed_header_is_up_to_date() {
    let generated = generate();
    let path = root().join("include/pfe.h");
    if std::env::var_os("PFE_BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &generated).unwrap();
        eprintln!("PFE_BLESS=1: wrote {}", path.display());
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "include/pfe.h is stale: the C ABI in src/capi/ changed. Regenerate it with\n    \
         PFE_BLESS=1 cargo test --release --test capi_header\nand commit it; {}",
        diff_hint(&committed, &generated)
    );
}

#[test]
fn header_declares_every_status_and_function() {
    let header = generate();
    for status in PfeStatus::all() {
        let line = format!("{} = {},", status.name(), status as u32);
        assert!(header.contains(&line), "missing `{line}` in the header");
    }
    assert!(header.contains("PFE_COLOR_RANGE_LIMITED = 0,"));
    assert!(header.contains("PFE_COLOR_RANGE_FULL = 1,"));
    assert!(header.contains("typedef uint32_t PfeStatus;"));
    // Every `#[no_mangle]` function of src/capi/ is declared.
    let mut functions = 0;
    for entry in std::fs::read_dir(root().join("src/capi")).unwrap() {
        let source = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for item in source.split("#[no_mangle]").skip(1) {
            let name = item
                .split("fn ")
                .nth(1)
                .and_then(|rest| rest.split('(').next())
                .unwrap();
            assert!(
                header.contains(&format!(" {name}(")) || header.contains(&format!("*{name}(")),
                "{name} is not declared in the header"
            );
            functions += 1;
        }
    }
    assert!(functions >= 17, "found only {functions} functions");
    assert!(header.contains("#ifndef PFE_H"));
    assert!(header.contains("Thread safety"));
}

/// Compiles `source` with the C (or C++) compiler; `None` when there is none.
fn compile(compiler: &str, args: &[&str], source: &str, dir: &Path) -> Option<(bool, String)> {
    let file = dir.join(if args.contains(&"c++") {
        "t.cpp"
    } else {
        "t.c"
    });
    std::fs::write(&file, source).unwrap();
    let out = Command::new(compiler)
        .args(args)
        .arg("-I")
        .arg(root().join("include"))
        .arg("-fsyntax-only")
        .arg(&file)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    Some((out.status.success(), text))
}

#[test]
fn header_compiles_as_strict_c_and_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let source = "#include \"pfe.h\"\n#include \"pfe.h\"\n\
                  int main(void) { PfeOptions o = pfe_options_default(); \
                  PfeStatus s = PFE_STATUS_OK; (void)o; return (int)s; }\n";
    let cc = std::env::var("PFE_C_COMPILER").unwrap_or_else(|_| "cc".into());
    let c_args = ["-std=c99", "-Wall", "-Wextra", "-Wpedantic", "-Werror"];
    match compile(&cc, &c_args, source, dir.path()) {
        Some((ok, err)) => assert!(ok, "pfe.h does not compile as C99:\n{err}"),
        None => panic!("no C compiler `{cc}` (set PFE_C_COMPILER)"),
    }
    let cpp_args = ["-x", "c++", "-std=c++11", "-Wall", "-Wextra", "-Werror"];
    match compile("c++", &cpp_args, source, dir.path()) {
        Some((ok, err)) => assert!(ok, "pfe.h does not compile as C++11:\n{err}"),
        None => eprintln!("skipped the C++ check: no `c++` compiler on PATH"),
    }
}
