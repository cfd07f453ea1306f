//! `vfud serve --config FILE`: several devices from a TOML file, served exactly as with the
//! equivalent flags; a bad file is refused with the file, line and key named.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Child;
use std::time::Duration;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn probe(sock: &std::path::Path) -> String {
    let out = common::vfud_command(&["probe"]).arg(sock).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).replace(&sock.to_string_lossy().into_owned(), "SOCK")
}

#[test]
fn a_config_file_serves_its_devices_like_the_flags_do() {
    let dir = tempfile::tempdir().unwrap();
    let (uart, dma) = (dir.path().join("uart.sock"), dir.path().join("dma.sock"));
    let cfg = dir.path().join("vfud.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"socket_mode = "600"

[[device]]
spec = "uart16550,backend=file:{out}"
socket = "{uart}"

[[device]]
spec = "dma-engine"
socket = "{dma}"
"#,
            out = dir.path().join("uart.out").display(),
            uart = uart.display(),
            dma = dma.display()
        ),
    )
    .unwrap();
    let _from_file = Killed(
        common::serve_command()
            .arg("--config")
            .arg(&cfg)
            .spawn()
            .unwrap(),
    );
    for s in [&uart, &dma] {
        assert!(
            common::wait_for_path(s, Duration::from_secs(10)),
            "{}",
            s.display()
        );
    }
    let mode = std::fs::metadata(&uart).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    let flags_sock = dir.path().join("flags.sock");
    let _from_flags = Killed(
        common::serve_command()
            .args(["--device", "dma-engine", "--socket"])
            .arg(&flags_sock)
            .spawn()
            .unwrap(),
    );
    assert!(common::wait_for_path(&flags_sock, Duration::from_secs(10)));
    assert_eq!(probe(&dma), probe(&flags_sock));
    assert!(
        probe(&uart).contains("BAR0      size 0x1000"),
        "{}",
        probe(&uart)
    );
}

#[test]
fn a_bad_config_file_is_refused_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        "[[device]]\nspec = \"dma-engine\"\nsokcet = \"/tmp/x.sock\"\n",
    )
    .unwrap();
    let out = common::serve_command()
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("bad.toml") && err.contains("sokcet"), "{err}");
}

#[test]
fn the_readme_example_config_serves_its_devices() {
    let readme = std::fs::read_to_string(common::qemu::repo_root().join("README.md")).unwrap();
    let section = &readme[readme
        .find("### Many devices from a configuration file")
        .expect("README config section")..];
    let start = section.find("```toml\n").expect("toml block") + "```toml\n".len();
    let example = &section[start..start + section[start..].find("```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("vfud.toml");
    std::fs::write(
        &cfg,
        example.replace("/run/vfud", &dir.path().to_string_lossy()),
    )
    .unwrap();
    let _server = Killed(
        common::serve_command()
            .arg("--config")
            .arg(&cfg)
            .spawn()
            .unwrap(),
    );
    for name in ["uart.sock", "dma.sock", "uart.host"] {
        let p = dir.path().join(name);
        assert!(common::wait_for_path(&p, Duration::from_secs(10)), "{name}");
    }
    assert!(probe(&dir.path().join("dma.sock")).contains("BAR2      size 0x100000"));
    assert!(probe(&dir.path().join("uart.sock")).contains("BAR0      size 0x1000"));
    let mode = std::fs::metadata(dir.path().join("dma.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
}
