//! Packaging: man pages and shell completions generated from the CLI definition,
//! `cargo install --path .`, and the Debian package (built with `scripts/package-deb.sh`,
//! installed with dpkg, `vfud --version` and `vfud devices` run from /usr/bin, removed).

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::qemu::repo_root;

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn vfud(args: &[&str]) -> String {
    ok(
        common::vfud_command(args).output().unwrap(),
        &args.join(" "),
    )
}

#[test]
fn man_pages_and_completions_come_from_the_cli_definition() {
    let page = vfud(&["man"]);
    assert!(page.contains(".TH vfud 1"), "{page}");
    assert!(
        page.contains("vfud\\-trace(1)") || page.contains("trace"),
        "{page}"
    );
    let dir = tempfile::tempdir().unwrap();
    vfud(&["man", "--out-dir", dir.path().to_str().unwrap()]);
    for p in [
        "vfud.1",
        "vfud-serve.1",
        "vfud-trace.1",
        "vfud-status.1",
        "vfud-migrate.1",
    ] {
        let text = std::fs::read_to_string(dir.path().join(p)).unwrap_or_default();
        assert!(text.contains(".TH"), "{p} missing or empty");
    }
    let serve = std::fs::read_to_string(dir.path().join("vfud-serve.1")).unwrap();
    assert!(serve.contains("\\-\\-config"), "serve page lists --config");
    let bash = vfud(&["completions", "bash"]);
    assert!(bash.contains("_vfud()") && bash.contains("trace"), "{bash}");
    let zsh = vfud(&["completions", "zsh"]);
    assert!(zsh.starts_with("#compdef vfud"), "{zsh}");
    let bad = common::vfud_command(&["completions"])
        .arg("cmd.exe")
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[test]
fn cargo_install_path_installs_a_working_vfud() {
    let root = tempfile::tempdir().unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The dev profile and this build's target directory, so nothing is built twice.
    ok(
        Command::new(cargo)
            .args(["install", "--path"])
            .arg(repo_root())
            .arg("--root")
            .arg(root.path())
            .args(["--debug", "--offline", "--locked", "--target-dir"])
            .arg(repo_root().join("target"))
            .output()
            .unwrap(),
        "cargo install --path .",
    );
    let bin = root.path().join("bin/vfud");
    installed_binary_works(&bin);
}

/// An installed `vfud` reports this version and lists every registered model.
fn installed_binary_works(bin: &Path) {
    let what = bin.display();
    let v = ok(
        Command::new(bin).arg("--version").output().unwrap(),
        &format!("{what} --version"),
    );
    assert_eq!(v.trim(), format!("vfud {}", env!("CARGO_PKG_VERSION")));
    let d = ok(
        Command::new(bin).arg("devices").output().unwrap(),
        &format!("{what} devices"),
    );
    let models: Vec<&str> = vfud_devices::MODELS.iter().map(|m| m.name).collect();
    assert_eq!(common::model_names(&d), models, "{d}");
}

/// Removes the installed package even when an assertion fails.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["-r", "vfud"]).output();
    }
}

#[test]
fn the_debian_package_installs_and_runs() {
    let out = ok(
        Command::new(repo_root().join("scripts/package-deb.sh"))
            .args(["--profile", "dev"])
            .current_dir(repo_root())
            .output()
            .unwrap(),
        "scripts/package-deb.sh",
    );
    let deb = out.lines().last().unwrap_or("").trim().to_string();
    assert!(deb.ends_with(".deb") && Path::new(&deb).exists(), "{out}");
    let _guard = Installed;
    ok(
        Command::new("dpkg").arg("-i").arg(&deb).output().unwrap(),
        "dpkg -i",
    );
    installed_binary_works(Path::new("/usr/bin/vfud"));
    let files = ok(
        Command::new("dpkg").args(["-L", "vfud"]).output().unwrap(),
        "dpkg -L",
    );
    for f in [
        "/usr/share/man/man1/vfud.1.gz",
        "/usr/share/man/man1/vfud-trace.1.gz",
        "/usr/share/bash-completion/completions/vfud",
        "/lib/systemd/system/vfud@.socket",
        "/lib/systemd/system/vfud@.service",
    ] {
        assert!(
            files.lines().any(|l| l == f),
            "{f} not in the package:\n{files}"
        );
    }
}
