//! The `tcptap` command: parse flags, load the config, run the proxy, map the outcome to an exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tcptap::tap::TapError;
use tcptap::{Config, Exit, Overrides, Server, SetupError};

/// A transparent TCP proxy with a traffic tap.
///
/// With no arguments, reads ./proxy.toml. `--listen` and `--upstream` proxy one route without a
/// config file (or replace the routes of `--config FILE`). Log level: RUST_LOG (default info).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Config file (default: ./proxy.toml, unless --listen/--upstream are given).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:6380 or [::1]:6380 (needs --upstream).
    #[arg(short, long, value_name = "ADDR", requires = "upstream")]
    listen: Option<String>,
    /// Where to forward, HOST:PORT (needs --listen).
    #[arg(short, long, value_name = "HOST:PORT", requires = "listen")]
    upstream: Option<String>,
    /// Write the live conversation log to FILE, or to stdout with "-".
    #[arg(long, value_name = "FILE|-")]
    tap_log: Option<String>,
    /// Write a pcap capture (Wireshark, tshark) to FILE, or to stdout with "-" (to pipe into
    /// `wireshark -k -i -`).
    #[arg(long, value_name = "FILE|-")]
    tap_pcap: Option<String>,
    /// Number of event loops (a number or "auto").
    #[arg(long, value_name = "N|auto")]
    workers: Option<String>,
    /// After events, poll again without sleeping for up to this long (e.g. "50us") before
    /// waiting: less latency, for CPU spent polling while traffic flows. Off by default.
    #[arg(long, value_name = "DURATION|off")]
    busy_poll: Option<String>,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
}

fn overrides(args: &Args) -> Overrides {
    Overrides {
        listen: args.listen.clone(),
        upstream: args.upstream.clone(),
        tap_log: args.tap_log.clone(),
        tap_pcap: args.tap_pcap.clone(),
        workers: args.workers.clone(),
        busy_poll: args.busy_poll.clone(),
    }
}

/// The config file in use, if any (what SIGHUP re-reads).
fn config_path(args: &Args) -> Option<PathBuf> {
    match (&args.config, &args.listen) {
        (Some(path), _) => Some(path.clone()),
        (None, Some(_)) => None,
        (None, None) => Some(PathBuf::from("proxy.toml")),
    }
}

fn load(args: &Args) -> Result<Config, String> {
    let overrides = overrides(args);
    let config = match (&args.config, &args.listen) {
        (Some(path), _) => Config::load(path, &overrides),
        (None, Some(_)) => Config::from_overrides(&overrides),
        (None, None) => {
            let default = PathBuf::from("proxy.toml");
            if !default.exists() {
                return Err(
                    "no configuration: ./proxy.toml not found; pass --config FILE, \
                            or --listen ADDR --upstream HOST:PORT"
                        .to_string(),
                );
            }
            Config::load(&default, &overrides)
        }
    };
    config.map_err(|e| error_chain(&e))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}

/// Raises the soft open-file limit to the hard limit: each proxied connection needs two descriptors,
/// and the common soft default of 1024 would cap a proxy at ~500 connections.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let old = lim.rlim_cur;
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                log::debug!("open-file limit raised from {old} to {}", lim.rlim_max);
            }
        }
    }
}

/// A write past `RLIMIT_FSIZE` (a tap file or the access log growing past `ulimit -f`) raises
/// SIGXFSZ, which by default kills the process, and every connection with it. Ignored, the write
/// fails with `EFBIG` instead, and the sink counts it as a write error.
fn ignore_sigxfsz() {
    // SAFETY: setting a standard signal's disposition to SIG_IGN, before any thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

fn main() -> ExitCode {
    ignore_sigxfsz();
    let args = Args::parse();
    tcptap::logging::init();
    let (code, fatal) = match run(&args) {
        Ok(code) => (code, None),
        Err((code, message)) => (code, Some(message)),
    };
    // Lines still queued for a stderr that is not being read get a moment, not forever; a fatal
    // error comes after them.
    tcptap::logging::flush(Duration::from_secs(2));
    if let Some(message) = fatal {
        eprintln!("tcptap: {message}");
    }
    code
}

/// The exit code, or the exit code and the message of a fatal error.
fn run(args: &Args) -> Result<ExitCode, (ExitCode, String)> {
    let config = load(args).map_err(|e| (ExitCode::from(2), e))?;
    if args.check_config {
        let problems = config.preflight();
        if !problems.is_empty() {
            return Err((ExitCode::from(2), problems.join("\ntcptap: ")));
        }
        println!(
            "{}: configuration OK ({} route{})",
            config.origin,
            config.routes.len(),
            if config.routes.len() == 1 { "" } else { "s" }
        );
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(note) = config.overridden_note() {
        log::info!("{note}");
    }
    if !config.own_taps_kept.is_empty() {
        log::warn!(
            "--tap-log / --tap-pcap set the [tap] table; route(s) {} keep their own [route.tap] \
             (an empty one is a tap turned off) and are not captured by the flag",
            config
                .own_taps_kept
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // A pcap on stdout is binary: into a pipe or a file, never onto a terminal.
    // SAFETY: isatty only inspects the descriptor.
    let pcap_to_stdout = (config.routes.iter().filter_map(|r| r.tap.as_ref()))
        .filter_map(|t| t.pcap.as_ref())
        .any(|p| p.path == std::path::Path::new(tcptap::config::PCAP_STDOUT));
    if pcap_to_stdout && unsafe { libc::isatty(1) } == 1 {
        return Err((
            ExitCode::from(2),
            "the pcap goes to stdout (\"-\"), which is a terminal: pipe it (`| wireshark -k -i -`, \
             `| tshark -r -`) or redirect it to a file"
                .to_string(),
        ));
    }
    raise_fd_limit();
    // A setup error names where the config set what failed, as config errors do.
    let names: Vec<String> = config.routes.iter().map(|r| r.name.clone()).collect();
    let own_taps = config.own_taps.clone();
    let origin = config.origin.clone();
    let key = |e: &SetupError| -> Option<String> {
        match e {
            SetupError::Socket { route, .. }
            | SetupError::Bind { route, .. }
            | SetupError::Listen { route, .. } => Some(match args.listen {
                Some(_) => "--listen".to_string(),
                None => format!("route[{}].listen", names.iter().position(|n| n == route)?),
            }),
            SetupError::Admin(_) => Some("admin.listen".to_string()),
            SetupError::AccessLog { .. } => Some("access_log.path".to_string()),
            SetupError::Tap { route, source } => {
                let (what, flag) = match source {
                    TapError::Log { .. } => ("log", &args.tap_log),
                    TapError::Pcap { .. } => ("pcap", &args.tap_pcap),
                    _ => return None,
                };
                Some(match names.iter().position(|n| n == route) {
                    Some(i) if own_taps.contains(route) => format!("route[{i}].tap.{what}"),
                    _ if flag.is_some() => format!("--tap-{what}"),
                    _ => format!("tap.{what}"),
                })
            }
            _ => None,
        }
    };
    let mut server = Server::bind(config).map_err(|e| {
        let message = match key(&e) {
            // A flag is not in a file.
            Some(key) if key.starts_with("--") => format!("`{key}`: {}", error_chain(&e)),
            Some(key) => format!("{origin}: `{key}`: {}", error_chain(&e)),
            None => error_chain(&e),
        };
        (ExitCode::from(2), message)
    })?;
    if let Some(path) = config_path(args) {
        server.set_reload_source(path, overrides(args));
    }
    server
        .handle_signals()
        .map_err(|e| (ExitCode::FAILURE, error_chain(&e)))?;
    match server.run() {
        Ok(Exit::Graceful) => Ok(ExitCode::SUCCESS),
        Ok(Exit::Immediate) => Ok(ExitCode::from(130)),
        Err(e) => Err((ExitCode::FAILURE, format!("event loop failed: {e}"))),
    }
}
