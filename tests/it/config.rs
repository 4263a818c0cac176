//! `fleetcast check-config` and `serve --config` run one validation: the real binary on
//! temporary files.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, text: &str) -> TempFile {
        let path =
            std::env::temp_dir().join(format!("fleetcast-it-config-{}-{name}", std::process::id()));
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs the binary to completion (killed after 10 s: a `serve` that starts is a failure
/// of the test, reported by the caller from the exit status).
fn run(args: &[&str]) -> (Output, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fleetcast"))
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("FLEETCAST_CONFIG")
        .env_remove("FLEETCAST_LISTEN")
        .env_remove("FLEETCAST_SHARDS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fleetcast");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

fn check_config(path: &str) -> (Output, String) {
    run(&["check-config", path])
}

fn serve(path: &str) -> (Output, String) {
    run(&["serve", "--config", path, "--listen", "127.0.0.1:0"])
}

#[test]
fn missing_rs256_key_file_fails_check_config_and_serve_alike() {
    let missing = std::env::temp_dir().join(format!(
        "fleetcast-it-config-{}-no-such-key.pem",
        std::process::id()
    ));
    let missing = missing.to_str().unwrap();
    let cfg = TempFile::new(
        "missing-rs256.toml",
        &format!("[auth]\njwt_rs256_public_key_file = {missing:?}\n"),
    );
    let (out, text) = check_config(cfg.path());
    assert!(!out.status.success(), "check-config accepted it: {text}");
    assert!(
        text.contains(missing) && text.contains("auth.jwt_rs256_public_key_file"),
        "{text}"
    );
    let (out, text) = serve(cfg.path());
    assert!(!out.status.success(), "serve started: {text}");
    assert!(!text.contains("listening on"), "{text}");
    assert!(text.contains(missing), "{text}");
}

#[test]
fn valid_key_files_pass_check_config() {
    let fixture = |name: &str| format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let cfg = TempFile::new(
        "good-keys.toml",
        &format!(
            "[auth]\njwt_rs256_public_key_file = {:?}\njwt_es256_public_key_file = {:?}\n",
            fixture("rs256-public.pem"),
            fixture("es256-public.pem")
        ),
    );
    let (out, text) = check_config(cfg.path());
    assert!(out.status.success(), "{text}");
    assert!(text.contains(": ok"), "{text}");
}

#[test]
fn duplicate_api_key_is_reported_with_both_lines() {
    let cfg = TempFile::new(
        "duplicate-key.toml",
        r#"[[auth.api_keys]]
key = "tenant-a-viewer-key-0001"
user_id = "a-viewer"
tenant = "fleet_a"
role = "viewer"

[[auth.api_keys]]
key = "tenant-b-service-key-001"
user_id = "b-service"
tenant = "fleet_b"
role = "service"

[[auth.api_keys]]
key = "tenant-a-viewer-key-0001"
user_id = "b-admin"
tenant = "fleet_b"
role = "admin"
"#,
    );
    let (out, text) = check_config(cfg.path());
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("api key listed twice: lines 2 and 14"),
        "{text}"
    );
    let (out, text) = serve(cfg.path());
    assert!(!out.status.success(), "serve started: {text}");
    assert!(text.contains("lines 2 and 14"), "{text}");
}

#[test]
fn every_semantic_error_is_reported_each_on_its_own_line() {
    let cfg = TempFile::new(
        "three-errors.toml",
        "[limits]\nmax_connections = 0\nhandshake_timeout_ms = 0\n\n[history]\nmax_events = 50000000\n",
    );
    let (out, text) = check_config(cfg.path());
    assert!(!out.status.success(), "{text}");
    for key in [
        "limits.max_connections ",
        "limits.handshake_timeout_ms",
        "history.max_events",
    ] {
        let lines = text.lines().filter(|l| l.contains(key)).count();
        assert_eq!(lines, 1, "{key} not on exactly one line of:\n{text}");
    }
    assert!(text.contains("3 error(s)"), "{text}");
}

#[test]
fn device_key_without_vehicles_is_a_warning_only() {
    let cfg = TempFile::new(
        "device-warning.toml",
        r#"[[auth.api_keys]]
key = "device-without-vehicles-1"
user_id = "truck"
tenant = "fleet_a"
role = "device"
"#,
    );
    let (out, text) = check_config(cfg.path());
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("warning:") && text.contains("no vehicles") && text.contains(": ok"),
        "{text}"
    );
}

#[test]
fn toml_errors_name_their_line() {
    let cfg = TempFile::new("unknown-key.toml", "[limits]\n\nmax_frame = 3\n");
    let (out, text) = check_config(cfg.path());
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("line 3") && text.contains("max_frame"),
        "{text}"
    );
}
