//! The command line as a user types it: the shipped config, flags, and clear errors for bad input.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Command, Output};

use common::*;

fn run(args: &[&str], cwd: &Path) -> Output {
    Command::new(binary())
        .args(args)
        .current_dir(cwd)
        .env("RUST_LOG", "info")
        .output()
        .expect("run tcptap")
}

fn shipped_config() -> String {
    format!("{}/proxy.toml", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn shipped_config_is_valid() {
    let dir = TempDir::new("cli");
    let out = run(&["--config", &shipped_config(), "--check-config"], &dir.0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
}

#[test]
fn shipped_config_proxies_with_cli_route() {
    // Every setting of the shipped file, with its route replaced by flags (no fixed ports in tests).
    let echo = Upstream::echo();
    let proxy = Proxy::start(
        &[
            "--config",
            &shipped_config(),
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &echo.addr.to_string(),
        ],
        1,
    );
    let mut c = connect(proxy.addr());
    c.write_all(b"shipped").unwrap();
    assert_eq!(read_n(&mut c, 7, PROMPT).unwrap(), b"shipped");
}

#[test]
fn help_and_version() {
    let dir = TempDir::new("cli");
    let out = run(&["--help"], &dir.0);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--upstream",
        "--config",
        "--check-config",
        "--tap-log",
        "--tap-pcap",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
    let out = run(&["--version"], &dir.0);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn no_config_in_cwd_is_a_clear_error() {
    let dir = TempDir::new("cli");
    let out = run(&[], &dir.0);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("proxy.toml") && err.contains("--listen"),
        "{err}"
    );
}

#[test]
fn default_config_file_is_read_from_cwd() {
    let dir = TempDir::new("cli");
    let echo = Upstream::echo();
    write_file(
        &dir.path("proxy.toml"),
        &one_route("127.0.0.1:0", echo.addr, ""),
    );
    let out = run(&["--check-config"], &dir.0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("proxy.toml"));
}

#[test]
fn bad_configs_name_file_key_and_problem() {
    let dir = TempDir::new("cli");
    let up = "upstream = \"127.0.0.1:9\"";
    let cases: &[(&str, &str, &[&str])] = &[
        ("unknown.toml", "colour = \"blue\"\n", &["colour"]),
        (
            "addr.toml",
            "[[route]]\nlisten = \"127.0.0.1\"\nupstream = \"127.0.0.1:9\"\n",
            &["route[0].listen", "127.0.0.1"],
        ),
        (
            "dur.toml",
            &format!("idle_timeout = \"forever\"\n[[route]]\nlisten = \"127.0.0.1:0\"\n{up}\n"),
            &["idle_timeout", "forever"],
        ),
        (
            "zero.toml",
            &format!("buffer_size = 0\n[[route]]\nlisten = \"127.0.0.1:0\"\n{up}\n"),
            &["buffer_size"],
        ),
        (
            "type.toml",
            &format!("max_connections = \"many\"\n[[route]]\nlisten = \"127.0.0.1:0\"\n{up}\n"),
            &["max_connections"],
        ),
        ("syntax.toml", "[[route]\nlisten = \n", &["line"]),
        (
            "upstream.toml",
            "[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"no-such-host.invalid:80\"\n",
            &["route[0].upstream", "no-such-host.invalid"],
        ),
        (
            "loop.toml",
            &format!(
                "[[route]]\nlisten = \"127.0.0.1:{port}\"\nupstream = \"localhost:{port}\"\n",
                port = free_port()
            ),
            &["route[0].upstream", "own listen address", "loop"],
        ),
    ];
    for (name, text, needles) in cases {
        let path = dir.path(name);
        write_file(&path, text);
        for extra in [&[][..], &["--check-config"][..]] {
            let mut args = vec!["--config", path.to_str().unwrap()];
            args.extend_from_slice(extra);
            let out = run(&args, &dir.0);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{name}: {err}");
            assert!(
                err.contains(name),
                "{name}: error does not name the file: {err}"
            );
            for n in *needles {
                assert!(err.contains(n), "{name}: error lacks {n:?}: {err}");
            }
        }
    }
    let out = run(
        &["--config", dir.path("missing.toml").to_str().unwrap()],
        &dir.0,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.toml"));
}

#[test]
fn port_in_use_is_a_clear_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = TempDir::new("cli");
    let out = run(&["--listen", &addr, "--upstream", "127.0.0.1:9"], &dir.0);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&addr) && err.to_lowercase().contains("in use") && err.contains("`--listen`"),
        "{err}"
    );
}

/// Errors found only when starting (a busy port, an access log that cannot be opened, a busy
/// admin port) name the file and the key, as errors in the file do.
#[test]
fn startup_errors_name_the_file_and_the_key() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = TempDir::new("cli");
    let route =
        |listen: &str| format!("[[route]]\nlisten = \"{listen}\"\nupstream = \"127.0.0.1:9\"\n");
    let cases = [
        (
            format!("{}{}", route("127.0.0.1:0"), route(&addr.to_string())),
            "`route[1].listen`: route `route1`: cannot listen on",
        ),
        (
            format!(
                "[access_log]\npath = \"/nonexistent/a.log\"\n{}",
                route("127.0.0.1:0")
            ),
            "`access_log.path`: access log /nonexistent/a.log: cannot open: No such file",
        ),
        (
            format!("[admin]\nlisten = \"{addr}\"\n{}", route("127.0.0.1:0")),
            "`admin.listen`:",
        ),
        (
            format!(
                "[tap]\npcap = \"/nonexistent/t.pcap\"\n{}",
                route("127.0.0.1:0")
            ),
            "`tap.pcap`: route `route0`: cannot start the tap: cannot open pcap file \
             /nonexistent/t.pcap: No such file",
        ),
        (
            format!(
                "[tap]\npcap = \"t.pcap\"\n{}{}[route.tap]\nlog = \"/nonexistent/t.log\"\n",
                route("127.0.0.1:0"),
                route("127.0.0.1:0")
            ),
            "`route[1].tap.log`: route `route1`: cannot start the tap: cannot open tap log \
             /nonexistent/t.log: No such file",
        ),
    ];
    for (text, needle) in cases {
        let path = dir.path("start.toml");
        std::fs::write(&path, &text).unwrap();
        let out = run(&["--config", path.to_str().unwrap()], &dir.0);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(&format!("start.toml: {needle}")), "{err}");
    }
    // A flag is named as such, with no file.
    let out = run(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
            "--tap-pcap",
            "/nonexistent/t.pcap",
        ],
        &dir.0,
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("tcptap: `--tap-pcap`: route `cli`: cannot start the tap"),
        "{err}"
    );
}

#[test]
fn listen_without_upstream_is_rejected() {
    let dir = TempDir::new("cli");
    let out = run(&["--listen", "127.0.0.1:0"], &dir.0);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--upstream"));
}

/// A proxy whose upstream is its own listener would open connections to itself until it can
/// serve nothing: refused before it starts.
#[test]
fn an_upstream_that_is_the_listen_address_is_rejected() {
    let dir = TempDir::new("cli");
    let addr = format!("127.0.0.1:{}", free_port());
    let out = run(
        &["--listen", &addr, "--upstream", &addr, "--check-config"],
        &dir.0,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("--upstream") && err.contains("own listen address"),
        "{err}"
    );
}

/// `--check-config` is a pre-deploy gate: besides the file, it checks what would make the start
/// fail, an address not of this host and a file that cannot be written, and touches nothing.
#[test]
fn check_config_finds_what_would_fail_at_start() {
    let dir = TempDir::new("cli");
    let missing = dir.path("no-such-dir");
    let route = |name: &str, listen: &str, tap: &str| {
        format!(
            "[[route]]\nname = \"{name}\"\nlisten = \"{listen}\"\nupstream = \"127.0.0.1:9\"\n{tap}"
        )
    };
    let bad = format!(
        "[access_log]\npath = \"{}/access.log\"\n{}{}",
        missing.display(),
        route(
            "far",
            "192.0.2.1:0",
            &format!("[route.tap]\npcap = \"{}/x.pcap\"\n", missing.display())
        ),
        route("near", "127.0.0.1:0", "")
    );
    let bad = format!(
        "{bad}{}",
        route(
            "dir",
            "127.0.0.1:0",
            &format!("[route.tap]\npcap = \"{}\"\n", dir.0.display())
        )
    );
    write_file(&dir.path("bad.toml"), &bad);
    let out = run(&["--config", "bad.toml", "--check-config"], &dir.0);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
    for needle in [
        "bad.toml: route `far`: listen: 192.0.2.1 is not an address of this host",
        "bad.toml: route `far`: tap pcap: cannot write",
        "x.pcap",
        "bad.toml: access_log.path: cannot write",
        "bad.toml: route `dir`: tap pcap: cannot write",
        "it is a directory",
    ] {
        assert!(err.contains(needle), "{needle:?} not in {err}");
    }
    assert!(!err.contains("route `near`"), "{err}");
    // Writable places pass, and are left as they were.
    let good = format!(
        "[access_log]\npath = \"{}\"\n{}",
        dir.path("access.log").display(),
        route(
            "near",
            "127.0.0.1:0",
            &format!("[route.tap]\npcap = \"{}\"\n", dir.path("x.pcap").display())
        )
    );
    write_file(&dir.path("good.toml"), &good);
    let out = run(&["--config", "good.toml", "--check-config"], &dir.0);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!dir.path("x.pcap").exists() && !dir.path("access.log").exists());
}

/// A port below `net.ipv4.ip_unprivileged_port_start` needs CAP_NET_BIND_SERVICE: without it
/// `--check-config` says so (run as `nobody` when the tests run as root).
#[test]
fn check_config_finds_a_privileged_port_without_the_capability() {
    let start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024);
    if start <= 1 {
        eprintln!(
            "skipped: every port is unprivileged here (ip_unprivileged_port_start = {start})"
        );
        return;
    }
    let port = start - 1;
    let dir = TempDir::new("cli-priv");
    let path = dir.path("priv.toml");
    write_file(
        &path,
        &format!("[[route]]\nlisten = \"127.0.0.1:{port}\"\nupstream = \"127.0.0.1:9\"\n"),
    );
    // Readable by `nobody`.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let args = ["--config", path.to_str().unwrap(), "--check-config"];
    // SAFETY: geteuid has no preconditions.
    let out = if unsafe { libc::geteuid() } == 0 {
        // A copy `nobody` can run wherever the build lives (a home directory may be closed).
        let copy = dir.path("tcptap");
        std::fs::copy(binary(), &copy).unwrap();
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&copy)
            .args(args)
            .current_dir("/")
            .output()
            .expect("run setpriv (util-linux)")
    } else {
        run(&args, &dir.0)
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("port {port} is privileged")) && err.contains("CAP_NET_BIND_SERVICE"),
        "{err}"
    );
}
