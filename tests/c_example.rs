//! examples/c/classify.c compiled with the system C compiler against
//! libpoolformer_edge.a and .so, run on a synthetic model, and its printed top 5 compared
//! with the Rust API's; once more under valgrind when it is installed. Also: the link line
//! of docs/c-api.md and the pkg-config template stay true.
//!
//! Cross-compilation hooks: `PFE_C_COMPILER` (default `cc`) compiles, `PFE_C_RUNNER`
//! (e.g. `qemu-aarch64 -L /usr/aarch64-linux-gnu`) prefixes every run of the C program.
//! The libraries are found next to this test executable
//! (`target/[<triple>/]<profile>/deps/`, where `cargo test` builds them, else the profile
//! directory, where `cargo build` puts them).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use poolformer_edge::models::cache::synthetic_model_in;
use poolformer_edge::models::ArchConfig;
use poolformer_edge::pixfmt::{ColorRange, Yuyv};
use poolformer_edge::testimage::natural_image;
use poolformer_edge::{Engine, Options, RgbImage};

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

fn manifest_path(relative: &str) -> PathBuf {
    Path::new(MANIFEST_DIR).join(relative)
}

/// Where this test executable's build put things.
struct BuildDirs {
    /// `target/[<triple>/]<profile>/deps`
    deps: PathBuf,
    /// `target/[<triple>/]<profile>`
    profile: PathBuf,
    /// The target triple when cross-compiling (the target dir has a triple level).
    triple: Option<String>,
}

fn build_dirs() -> BuildDirs {
    let exe = std::env::current_exe().expect("the test executable's path");
    let deps = exe.parent().expect("deps directory").to_path_buf();
    let profile = deps.parent().expect("profile directory").to_path_buf();
    let above = profile.parent().expect("target directory");
    // A cross build sits in target/<triple>/<profile>; the triple names the architecture
    // this test was compiled for (`aarch64-…`, `armv7-…` for arm, `x86_64-…`), which the
    // target directory's own name (`target`, or any CARGO_TARGET_DIR) does not.
    let name = above.file_name().unwrap().to_string_lossy().into_owned();
    let triple = (name.starts_with(std::env::consts::ARCH) && name.matches('-').count() >= 2)
        .then_some(name);
    BuildDirs {
        deps,
        profile,
        triple,
    }
}

/// The first of `deps/name`, `profile/name` that exists.
fn find_library(dirs: &BuildDirs, name: &str) -> Option<PathBuf> {
    [&dirs.deps, &dirs.profile]
        .into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `cargo <args> [--target <triple>] [-- <rustc_args>]` in the crate's directory, with
/// `--target` when this test was cross-compiled.
fn cargo(args: &[&str], rustc_args: &[&str]) -> Output {
    let Some(cargo) = std::env::var_os("CARGO") else {
        panic!(
            "cargo is needed for `cargo {}` but $CARGO is not set: run this test through \
             `cargo test --release`",
            args.join(" ")
        )
    };
    let mut cmd = Command::new(cargo);
    cmd.current_dir(MANIFEST_DIR).args(args);
    if let Some(triple) = &build_dirs().triple {
        cmd.args(["--target", triple]);
    }
    if !rustc_args.is_empty() {
        cmd.arg("--").args(rustc_args);
    }
    cmd.output().expect("running cargo")
}

/// libpoolformer_edge.a and .so, built by `cargo build --release --lib` if missing.
fn libraries() -> &'static (PathBuf, PathBuf) {
    static LIBS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    LIBS.get_or_init(|| {
        let dirs = build_dirs();
        let find = || {
            let a = find_library(&dirs, "libpoolformer_edge.a")?;
            let so = find_library(&dirs, "libpoolformer_edge.so")?;
            Some((a, so))
        };
        if let Some(found) = find() {
            return found;
        }
        eprintln!(
            "libpoolformer_edge.{{a,so}} not in {} nor {}: running cargo build --release --lib",
            dirs.deps.display(),
            dirs.profile.display()
        );
        let out = cargo(&["build", "--release", "--lib"], &[]);
        assert!(
            out.status.success(),
            "cargo build --release --lib failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        find().unwrap_or_else(|| {
            panic!(
                "libpoolformer_edge.a / .so are still missing from {} after cargo build \
                 --release --lib (is crate-type [\"rlib\", \"cdylib\", \"staticlib\"] set?)",
                dirs.profile.display()
            )
        })
    })
}

/// Scratch space for the compiled programs and models, inside the target directory.
fn work_dir() -> PathBuf {
    let dir = build_dirs().profile.join("pfe-c-example");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn c_compiler() -> String {
    std::env::var("PFE_C_COMPILER").unwrap_or_else(|_| "cc".into())
}

/// The native libraries docs/c-api.md says a static link needs (its
/// `note: native-static-libs: …` line).
fn documented_native_libs() -> Vec<String> {
    let docs = std::fs::read_to_string(manifest_path("docs/c-api.md")).unwrap();
    let line = docs
        .lines()
        .find_map(|l| l.trim().strip_prefix("note: native-static-libs:"))
        .expect("docs/c-api.md quotes rustc's `note: native-static-libs: …` line");
    line.split_whitespace().map(String::from).collect()
}

/// Compiles examples/c/classify.c; `link` names the library (and native libraries).
fn compile(output: &Path, link: &[String]) {
    let cc = c_compiler();
    let out = Command::new(&cc)
        .args([
            "-std=c99",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Wpedantic",
            "-Werror",
        ])
        .arg("-I")
        .arg(manifest_path("include"))
        .arg(manifest_path("examples/c/classify.c"))
        .args(link)
        .arg("-o")
        .arg(output)
        .output()
        .unwrap_or_else(|e| panic!("running the C compiler `{cc}` (PFE_C_COMPILER): {e}"));
    assert!(
        out.status.success(),
        "compiling examples/c/classify.c with {cc} {link:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Programs {
    static_exe: PathBuf,
    shared_exe: PathBuf,
}

fn programs() -> &'static Programs {
    static PROGRAMS: OnceLock<Programs> = OnceLock::new();
    PROGRAMS.get_or_init(|| {
        let (a, so) = libraries();
        let dir = work_dir();
        let static_exe = dir.join("classify-static");
        let mut link = vec![a.display().to_string()];
        link.extend(documented_native_libs());
        compile(&static_exe, &link);
        let shared_exe = dir.join("classify-shared");
        let lib_dir = so.parent().unwrap().display().to_string();
        let link = [
            format!("-L{lib_dir}"),
            "-lpoolformer_edge".into(),
            format!("-Wl,-rpath,{lib_dir}"),
        ];
        compile(&shared_exe, &link);
        Programs {
            static_exe,
            shared_exe,
        }
    })
}

/// Runs a compiled C program, through `PFE_C_RUNNER` when set.
fn run_c(exe: &Path, args: &[&Path]) -> Output {
    let runner = std::env::var("PFE_C_RUNNER").unwrap_or_default();
    let mut words = runner.split_whitespace();
    let mut cmd = match words.next() {
        Some(program) => {
            let mut cmd = Command::new(program);
            cmd.args(words).arg(exe);
            cmd
        }
        None => Command::new(exe),
    };
    cmd.args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {} (runner {runner:?}): {e}", exe.display()))
}

/// A tiny PoolFormer with 1000 classes (ImageNet labels), generated fresh once per run.
fn model() -> &'static PathBuf {
    static MODEL: OnceLock<PathBuf> = OnceLock::new();
    MODEL.get_or_init(|| {
        let dir = work_dir().join("models");
        let arch = ArchConfig::custom("c_example", &[1, 1, 1, 1], &[16, 32, 48, 64], 1000).unwrap();
        // Removed first: the cache would keep a model from an older exporter.
        let _ = std::fs::remove_file(dir.join("c_example-synthetic-seed7.onnx"));
        synthetic_model_in(&dir, &arch, 7).unwrap()
    })
}

fn rust_engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    // The C program uses pfe_options_default(): the same as Options::default().
    ENGINE.get_or_init(|| Engine::from_path(model(), Options::default()).unwrap())
}

/// One printed line: `index probability label`.
#[derive(Debug, Clone, PartialEq)]
struct Line {
    index: usize,
    probability: f32,
    label: String,
}

/// The `== rgb8` and `== yuyv` sections of the program's output.
fn parse(stdout: &str) -> Vec<(String, Vec<Line>)> {
    let mut sections: Vec<(String, Vec<Line>)> = Vec::new();
    for line in stdout.lines() {
        if let Some(name) = line.strip_prefix("== ") {
            sections.push((name.to_string(), Vec::new()));
        } else if let Some((_, lines)) = sections.last_mut() {
            let mut words = line.splitn(3, ' ');
            let (Some(i), Some(p), Some(label)) = (words.next(), words.next(), words.next()) else {
                panic!("unexpected line {line:?}");
            };
            lines.push(Line {
                index: i.parse().unwrap(),
                probability: p.parse().unwrap(),
                label: label.to_string(),
            });
        }
    }
    sections
}

/// The C program's test pattern (make_pattern in classify.c), packed RGB8.
fn c_pattern(width: u32, height: u32) -> Vec<u8> {
    let mut rgb = Vec::with_capacity((3 * width * height) as usize);
    for y in 0..height {
        for x in 0..width {
            let mut h = x.wrapping_mul(73_856_093) ^ y.wrapping_mul(19_349_663);
            let (dx, dy) = (x as i64 - 200, y as i64 - 110);
            let in_disc = dx * dx + dy * dy < 60 * 60;
            h ^= h >> 13;
            h = h.wrapping_mul(0x5bd1_e995);
            h ^= h >> 15;
            let r = if in_disc { 220 } else { x * 255 / width };
            let g = if in_disc {
                40 + (h & 31)
            } else {
                y * 255 / height
            };
            let b = ((x + 2 * y) & 255) / 2 + (h & 63);
            rgb.extend([r as u8, g as u8, b as u8]);
        }
    }
    rgb
}

/// The C program's RGB8 → YUYV (to_yuyv in classify.c); rows `4 * ceil(w / 2)` bytes.
fn c_yuyv(rgb: &[u8], width: usize, height: usize) -> Vec<u8> {
    let stride = 4 * width.div_ceil(2);
    let mut out = vec![0u8; stride * height];
    let luma = |p: &[u8]| {
        let [r, g, b] = [p[0], p[1], p[2]].map(i32::from);
        (((66 * r + 129 * g + 25 * b + 128) >> 8) + 16) as u8
    };
    for y in 0..height {
        for x in (0..width).step_by(2) {
            let a = &rgb[3 * (y * width + x)..][..3];
            let b = if x + 1 < width {
                &rgb[3 * (y * width + x + 1)..][..3]
            } else {
                a
            };
            let avg = |c: usize| (a[c] as i32 + b[c] as i32 + 1) / 2;
            let (r, g, bl) = (avg(0), avg(1), avg(2));
            let o = &mut out[y * stride + 2 * x..][..4];
            o[0] = luma(a);
            o[1] = ((-38 * r - 74 * g + 112 * bl + 128 + (128 << 8)) >> 8) as u8;
            o[2] = luma(b);
            o[3] = ((112 * r - 94 * g - 18 * bl + 128 + (128 << 8)) >> 8) as u8;
        }
    }
    out
}

/// What the Rust API says about the same frame, as RGB8 and as the C program's YUYV.
fn expected(rgb: &[u8], width: usize, height: usize) -> Vec<(String, Vec<Line>)> {
    let engine = rust_engine();
    let top = |pixels: &[u8]| {
        let image = RgbImage::new(pixels, width, height, 3 * width).unwrap();
        engine
            .classify(&image, 5)
            .unwrap()
            .into_iter()
            .map(|p| Line {
                index: p.class_index,
                probability: p.probability,
                label: p.label,
            })
            .collect::<Vec<_>>()
    };
    let yuyv = c_yuyv(rgb, width, height);
    let from_yuyv = Yuyv::new(&yuyv, width, height, 4 * width.div_ceil(2))
        .unwrap()
        .to_rgb8(ColorRange::Limited)
        .unwrap();
    vec![("rgb8".into(), top(rgb)), ("yuyv".into(), top(&from_yuyv))]
}

#[track_caller]
fn assert_matches(what: &str, out: &Output, want: &[(String, Vec<Line>)]) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let got = parse(&stdout);
    assert_eq!(got.len(), want.len(), "{what}: sections of\n{stdout}");
    for ((name, lines), (want_name, want_lines)) in got.iter().zip(want) {
        assert_eq!(name, want_name, "{what}");
        assert_eq!(lines.len(), want_lines.len(), "{what} {name}: {stdout}");
        for (g, w) in lines.iter().zip(want_lines) {
            assert_eq!(g.index, w.index, "{what} {name}:\n{stdout}");
            assert_eq!(g.label, w.label, "{what} {name}");
            assert!(
                (g.probability - w.probability).abs() <= 1e-5,
                "{what} {name}: class {} probability {} vs {}",
                g.index,
                g.probability,
                w.probability
            );
        }
    }
}

#[test]
fn c_program_matches_the_rust_api_static_and_shared() {
    let programs = programs();
    let model = model();
    let want = expected(&c_pattern(320, 240), 320, 240);
    // The RGB8 and YUYV paths do not give the same top 5 by accident of a broken frame.
    assert_ne!(want[0].1, want[1].1);
    for exe in [&programs.static_exe, &programs.shared_exe] {
        let out = run_c(exe, &[model]);
        assert_matches(&exe.display().to_string(), &out, &want);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains(&format!("poolformer-edge {}", env!("CARGO_PKG_VERSION"))));
        assert!(
            stdout.contains("model: input 1x3x224x224, 1000 classes"),
            "{stdout}"
        );
    }
    // The shared build really links the .so: it is a fraction of the static one's size.
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert!(size(&programs.shared_exe) * 4 < size(&programs.static_exe));
}

#[test]
fn c_program_reads_a_ppm_of_odd_size() {
    let programs = programs();
    let (w, h) = (151u32, 103u32);
    let image = natural_image(w, h, 2);
    let path = work_dir().join("frame.ppm");
    let mut ppm = format!("P6\n# written by tests/c_example.rs\n{w} {h}\n255\n").into_bytes();
    ppm.extend_from_slice(image.as_raw());
    std::fs::write(&path, ppm).unwrap();
    let want = expected(image.as_raw(), w as usize, h as usize);
    let out = run_c(&programs.static_exe, &[model(), &path]);
    assert_matches("classify MODEL frame.ppm", &out, &want);
    assert!(String::from_utf8_lossy(&out.stdout).contains("frame: 151x103"));
}

#[test]
fn c_program_reports_library_errors() {
    let programs = programs();
    let missing = work_dir().join("no-such-model.onnx");
    let out = run_c(&programs.shared_exe, &[&missing]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "loading the model failed: PFE_STATUS_IO_ERROR: pfe_engine_new_from_path: model file"
        ) && stderr.contains("no-such-model.onnx"),
        "{stderr}"
    );
    let not_a_model = work_dir().join("not-a-model.onnx");
    std::fs::write(&not_a_model, "hello").unwrap();
    let out = run_c(&programs.shared_exe, &[&not_a_model]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("PFE_STATUS_MODEL_ERROR"), "{stderr}");
    let out = run_c(&programs.shared_exe, &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn c_program_is_clean_under_valgrind() {
    if std::env::var_os("PFE_C_RUNNER").is_some() {
        println!("skipped: valgrind is not run through PFE_C_RUNNER");
        return;
    }
    let found = Command::new("valgrind").arg("--version").output();
    if !found.is_ok_and(|o| o.status.success()) {
        println!("skipped: valgrind is not on PATH (apt-get install valgrind to run this check)");
        return;
    }
    let programs = programs();
    let want = expected(&c_pattern(320, 240), 320, 240);
    for exe in [&programs.static_exe, &programs.shared_exe] {
        let out = Command::new("valgrind")
            .args(["--error-exitcode=1", "--leak-check=full", "--quiet"])
            .arg(exe)
            .arg(model())
            .output()
            .unwrap();
        assert_matches(&format!("valgrind {}", exe.display()), &out, &want);
    }
}

/// The `native-static-libs` line rustc prints for our staticlib.
fn printed_native_libs() -> Vec<String> {
    let out = cargo(
        &["rustc", "--release", "--lib", "--crate-type", "staticlib"],
        &["--print", "native-static-libs"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "cargo rustc failed:\n{stderr}");
    let line = stderr
        .lines()
        .find_map(|l| l.split("native-static-libs:").nth(1))
        .unwrap_or_else(|| panic!("no native-static-libs line in:\n{stderr}"));
    line.split_whitespace().map(String::from).collect()
}

#[test]
fn documented_link_line_is_current() {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) {
        println!("skipped: docs/c-api.md documents the Linux (glibc) link line");
        return;
    }
    if build_dirs().triple.is_some() {
        // The check rebuilds the library as a staticlib (minutes under cross builds); the
        // host build checks the same glibc link line.
        println!("skipped in a cross build: checked by the host build");
        return;
    }
    let printed = printed_native_libs();
    let documented = documented_native_libs();
    assert_eq!(
        printed,
        documented,
        "docs/c-api.md quotes native-static-libs `{}`, rustc now prints `{}`: update the \
         docs' link lines and pfe.pc.in's Libs.private",
        documented.join(" "),
        printed.join(" ")
    );
    let docs = std::fs::read_to_string(manifest_path("docs/c-api.md")).unwrap();
    let link = format!("libpoolformer_edge.a {}", documented.join(" "));
    assert!(
        docs.contains(&link),
        "docs/c-api.md has no static link line with `{link}`"
    );
    let pc = std::fs::read_to_string(manifest_path("pfe.pc.in")).unwrap();
    let private = format!("Libs.private: {}", documented.join(" "));
    assert!(
        pc.lines().any(|l| l == private),
        "pfe.pc.in lacks `{private}`"
    );
}

/// pfe.pc.in as docs/c-api.md installs it, under `prefix`.
fn install_pc(prefix: &Path) -> PathBuf {
    let template = std::fs::read_to_string(manifest_path("pfe.pc.in")).unwrap();
    let pc = template
        .replace("@PREFIX@", &prefix.display().to_string())
        .replace("@VERSION@", env!("CARGO_PKG_VERSION"));
    assert!(
        !pc.contains('@'),
        "unreplaced placeholder in pfe.pc.in:\n{pc}"
    );
    let dir = prefix.join("lib/pkgconfig");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("pfe.pc"), pc).unwrap();
    dir
}

#[test]
fn pkg_config_template_links_the_example() {
    if !Command::new("pkg-config")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        println!("skipped: pkg-config is not on PATH");
        return;
    }
    let (_, so) = libraries();
    let prefix = tempfile::tempdir().unwrap();
    let pc_dir = install_pc(prefix.path());
    std::fs::create_dir_all(prefix.path().join("include")).unwrap();
    std::fs::copy(
        manifest_path("include/pfe.h"),
        prefix.path().join("include/pfe.h"),
    )
    .unwrap();
    // A link stands for the installed (large) library.
    std::os::unix::fs::symlink(so, prefix.path().join("lib/libpoolformer_edge.so")).unwrap();
    let pkg_config = |args: &[&str]| {
        let out = Command::new("pkg-config")
            .args(args)
            .arg("pfe")
            .env("PKG_CONFIG_PATH", &pc_dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    assert_eq!(pkg_config(&["--modversion"]), env!("CARGO_PKG_VERSION"));
    let p = prefix.path().display();
    assert_eq!(
        pkg_config(&["--cflags", "--libs"]),
        format!("-I{p}/include -L{p}/lib -lpoolformer_edge")
    );
    let statics = pkg_config(&["--static", "--libs"]);
    assert!(
        statics.ends_with(&documented_native_libs().join(" ")),
        "{statics}"
    );

    let exe = prefix.path().join("classify");
    let mut link: Vec<String> = pkg_config(&["--libs"])
        .split_whitespace()
        .map(String::from)
        .collect();
    link.push(format!("-Wl,-rpath,{p}/lib"));
    compile(&exe, &link);
    let out = run_c(&exe, &[model()]);
    assert_matches(
        "classify linked through pkg-config",
        &out,
        &expected(&c_pattern(320, 240), 320, 240),
    );
}
