//! Packaging as the README describes it: the systemd units of
//! `contrib/systemd/` pass `systemd-analyze verify` (where it is installed)
//! and name the example config files, which the binaries accept; and
//! `cargo install --path .` puts the binaries in `<root>/bin`, checked with
//! the dev profile on the tests' own build (never a second C-core build).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const SERVER_BIN: &str = env!("CARGO_BIN_EXE_contact-server");
const CLIENT_BIN: &str = env!("CARGO_BIN_EXE_contact-client");
const BINARIES: [&str; 4] = [
    "contact-server",
    "contact-client",
    "contact-ctl",
    "contact-load",
];

fn contrib(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/systemd")
        .join(name)
}

/// The units, and the binary each starts.
const UNITS: [(&str, &str); 2] = [
    ("contact-server.service", SERVER_BIN),
    ("contact-client.service", CLIENT_BIN),
];

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIPPED: systemd-analyze is not installed (apt-get install systemd); the units in contrib/systemd were not verified");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut names = vec![];
    for (unit, bin) in UNITS {
        let text = std::fs::read_to_string(contrib(unit)).unwrap();
        let name = Path::new(bin).file_name().unwrap().to_str().unwrap();
        // Installed where `cargo install --root /usr/local` puts it; verified
        // against the binary built for these tests (verify checks it exists).
        let installed = format!("ExecStart=/usr/local/bin/{name} ");
        assert!(text.contains(&installed), "{unit} has no {installed:?}");
        let text = text.replace(&installed, &format!("ExecStart={bin} "));
        std::fs::write(dir.path().join(unit), text).unwrap();
        names.push(unit);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&names)
        .current_dir(dir.path())
        .output()
        .unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "systemd-analyze verify: {:?}\n{report}",
        out.status
    );

    // The check finds what it is for: an unknown setting is reported.
    let server = dir.path().join("contact-server.service");
    let text = std::fs::read_to_string(&server).unwrap();
    std::fs::write(&server, text.replace("ProtectHome=yes", "ProtectHomes=yes")).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "contact-server.service"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unknown key 'ProtectHomes'"));
}

#[test]
fn the_units_example_configs_are_accepted_by_the_binaries() {
    for (unit, config, bin) in [
        ("contact-server.service", "server.toml", SERVER_BIN),
        ("contact-client.service", "agent.toml", CLIENT_BIN),
    ] {
        let text = std::fs::read_to_string(contrib(unit)).unwrap();
        assert!(
            text.contains(&format!("--config /etc/contact/{config}")),
            "{unit} does not read /etc/contact/{config}"
        );
        // Every key is a flag and every value one it takes (clap checks the
        // file's settings before it answers --version).
        let out = Command::new(bin)
            .arg("--config")
            .arg(contrib(config))
            .arg("--version")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{config}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The server's state lives in the unit's StateDirectory.
    let unit = std::fs::read_to_string(contrib("contact-server.service")).unwrap();
    let config = std::fs::read_to_string(contrib("server.toml")).unwrap();
    assert!(unit.contains("StateDirectory=contact\n"));
    assert!(config.contains("state-dir = \"/var/lib/contact\""));
    assert!(unit.contains("RuntimeDirectory=contact\n"));
    assert!(config.contains("admin-listen = \"unix:/run/contact/admin.sock\""));
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
}

/// The target directory these tests were built in (`<dir>/debug/<binary>`).
fn target_dir() -> PathBuf {
    Path::new(SERVER_BIN)
        .parent()
        .and_then(Path::parent)
        .expect("the binary is in <target>/debug")
        .to_path_buf()
}

#[test]
fn cargo_install_puts_the_binaries_in_root_bin() {
    let Some(cargo) = std::env::var_os("CARGO") else {
        println!("SKIPPED: not run by cargo (CARGO is unset), so cargo install cannot be checked");
        return;
    };
    let root = tempfile::tempdir().unwrap();
    // The dev profile in the tests' target directory: only this crate's own
    // code may be built again. Should cargo start on the gRPC C-core (about
    // 14 minutes), the install is stopped and the test fails saying so.
    let mut install = Command::new(cargo)
        .args(["install", "--path", env!("CARGO_MANIFEST_DIR")])
        .args(["--debug", "--locked", "--offline", "--verbose", "--root"])
        .arg(root.path())
        .env("CARGO_TARGET_DIR", target_dir())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = vec![];
    for line in BufReader::new(install.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
    {
        if line.trim_start().starts_with("Compiling grpcio-sys") {
            let _ = install.kill();
            let _ = install.wait();
            panic!("cargo install --debug would build the gRPC C-core again instead of sharing the tests' build in {}", target_dir().display());
        }
        log.push(line);
    }
    let status = install.wait().unwrap();
    assert!(status.success(), "cargo install: {}", log.join("\n"));
    for name in BINARIES {
        let bin = root.path().join("bin").join(name);
        let out = Command::new(&bin)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("{}: {e}", bin.display()));
        let version = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            version.trim(),
            format!("{name} {}", env!("CARGO_PKG_VERSION")),
            "{}",
            bin.display()
        );
    }
}
