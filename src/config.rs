//! Configuration: `proxy.toml` → [`RawConfig`] (serde, unknown keys rejected) → [`Config`] (typed, checked).
//!
//! # How values are chosen
//! 1. Built-in defaults (listed on each field of [`Config`] and in the shipped `proxy.toml`).
//! 2. The config file, when there is one (`--config FILE`, or `./proxy.toml` when no route is given on
//!    the command line).
//! 3. Command-line flags (`--listen`/`--upstream` replace the file's routes with one route; `--tap-log`,
//!    `--tap-pcap` set the global tap).
//!
//! Every error names where the config came from (file path or `command line`), the key, and the problem.
//! Upstream host names are resolved here, once, so the event loop never blocks on DNS; with
//! `resolve_interval` the `upstream::Resolver` thread resolves them again.

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::access_log::Format as AccessLogFormat;
use crate::tap::{LogTarget, PcapTarget, TapConfig, WriterPriority};
use crate::upstream::{HealthCheck, Policy, UpstreamSpec, UpstreamTarget};

/// Default per-direction buffer size.
pub const DEFAULT_BUFFER_SIZE: usize = 64 * 1024;

/// Default kernel pipe capacity per direction on the splice path: each `splice(2)` call moves up
/// to this much (256 KiB takes 1.2-1.9x the CPU per byte, 64 KiB, the kernel's default, more).
pub const DEFAULT_SPLICE_PIPE_SIZE: usize = 1024 * 1024;
/// Default `splice_memory_limit`: what the kernel lets an unprivileged user hold in pipes
/// (`/proc/sys/fs/pipe-user-pages-soft`, 16384 pages).
pub const DEFAULT_SPLICE_MEMORY_LIMIT: usize = 64 << 20;
/// Default tap queue budget.
pub const DEFAULT_TAP_QUEUE: usize = 16 * 1024 * 1024;

/// Something wrong with the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{origin}: cannot read the config file: {source}")]
    Read {
        /// The path.
        origin: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong type.
    #[error("{origin}: {message}")]
    Parse {
        /// The path.
        origin: String,
        /// The TOML parser's message, which names the key and the line.
        message: String,
    },
    /// A value is well-formed TOML but not acceptable.
    #[error("{origin}: `{key}`: {reason}")]
    Invalid {
        /// The path, or `command line`.
        origin: String,
        /// Dotted key, e.g. `route[0].listen`.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// `proxy.toml` as written. Every field is optional; [`Config::from_raw`] fills defaults and checks.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    buffer_size: Option<Size>,
    max_connections: Option<usize>,
    connect_timeout: Option<String>,
    idle_timeout: Option<String>,
    defer_accept: Option<String>,
    drain_timeout: Option<String>,
    listen_backlog: Option<i32>,
    splice: Option<bool>,
    splice_pipe_size: Option<Size>,
    splice_memory_limit: Option<Size>,
    workers: Option<Workers>,
    busy_poll: Option<String>,
    socket: Option<RawSocket>,
    tap: Option<RawTap>,
    admin: Option<RawAdmin>,
    access_log: Option<RawAccessLog>,
    #[serde(default)]
    route: Vec<RawRoute>,
}

/// `[admin]`: the HTTP endpoint for metrics, health and the connection list.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
}

/// `[access_log]`: one line per finished connection.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAccessLog {
    path: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSocket {
    nodelay: Option<bool>,
    keepalive: Option<Toggle>,
    keepalive_interval: Option<String>,
    recv_buffer_size: Option<Size>,
    send_buffer_size: Option<Size>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTap {
    log: Option<String>,
    pcap: Option<String>,
    pcap_rotate_size: Option<Size>,
    pcap_max_files: Option<u32>,
    pcap_direct_io: Option<bool>,
    snaplen: Option<Size>,
    queue_size: Option<Size>,
    writer_priority: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<String>,
    listen: Option<String>,
    upstream: Option<String>,
    upstreams: Option<Vec<String>>,
    policy: Option<String>,
    connect_attempts: Option<usize>,
    health_check: Option<RawHealthCheck>,
    resolve_interval: Option<String>,
    max_connections: Option<usize>,
    connect_timeout: Option<String>,
    idle_timeout: Option<String>,
    defer_accept: Option<String>,
    tap: Option<RawTap>,
    transparent: Option<bool>,
    allowed_destinations: Option<Vec<String>>,
    send_proxy_protocol: Option<String>,
    accept_proxy_protocol: Option<bool>,
    proxy_protocol_timeout: Option<String>,
}

/// `[route.health_check]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, expecting = "a table (`[route.health_check]`)")]
struct RawHealthCheck {
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<u32>,
    fall: Option<u32>,
}

/// A byte size: an integer, or a string such as `"64 KiB"`, `"16MiB"`, `"512"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "expected a size: a number of bytes, or a string such as \"64 KiB\""
)]
enum Size {
    Bytes(u64),
    Text(String),
}

/// `workers = 2` or `workers = "auto"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged, expecting = "expected a number of workers, or \"auto\"")]
enum Workers {
    Count(usize),
    Text(String),
}

/// `keepalive = false` or `keepalive = "60s"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "expected false, true, or a duration such as \"60s\""
)]
enum Toggle {
    Flag(bool),
    Text(String),
}

/// TCP keepalive settings applied to both sockets of a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe (`TCP_KEEPIDLE`).
    pub idle: Duration,
    /// Time between probes (`TCP_KEEPINTVL`).
    pub interval: Duration,
}

/// Socket options applied to every proxied socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketOptions {
    /// `TCP_NODELAY` on both sockets (default on: a proxy must not add Nagle delays).
    pub nodelay: bool,
    /// `SO_KEEPALIVE` with these timings, or off (default off).
    pub keepalive: Option<Keepalive>,
    /// `SO_RCVBUF`, or the kernel's default.
    pub recv_buffer_size: Option<usize>,
    /// `SO_SNDBUF`, or the kernel's default.
    pub send_buffer_size: Option<usize>,
}

/// One listener and where its connections go.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Name used in logs (default `route0`, `route1`, ...).
    pub name: String,
    /// Address to listen on (port 0 picks a free port; the log says which).
    pub listen: SocketAddr,
    /// The upstream as written (host name or address; `upstreams` joined by `, `), for logs.
    pub upstream_name: String,
    /// The resolved upstream addresses (of every entry of `upstreams`, each once), tried in order
    /// when a connect is refused.
    pub upstream: Vec<SocketAddr>,
    /// The upstreams one by one, with policy, connect attempts, health check and re-resolution.
    pub upstream_set: UpstreamSpec,
    /// Connections this route may hold at once (default: the global limit).
    pub max_connections: usize,
    /// The route sets `max_connections` itself; else it follows the global limit, which a
    /// reload does not change.
    pub own_max_connections: bool,
    /// Time allowed for the upstream connect.
    pub connect_timeout: Duration,
    /// Close a pair after this long without a byte in either direction (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// `TCP_DEFER_ACCEPT` on the listener: the kernel hands a connection over once its client
    /// has sent something, or after about this long (whole seconds) when it sends nothing.
    pub defer_accept: Option<Duration>,
    /// Tap for this route (its own `[route.tap]`, else the global `[tap]`), if any.
    pub tap: Option<TapConfig>,
    /// `upstream = "original-destination"`: connect to each connection's original destination
    /// (`SO_ORIGINAL_DST` after an iptables REDIRECT, or the local address with `transparent`).
    pub original_destination: bool,
    /// TPROXY listener (`IP_TRANSPARENT`): the accepted socket's local address is the original
    /// destination.
    pub transparent: bool,
    /// With `original_destination`, the destinations allowed (empty: any but the proxy itself).
    pub allowed_destinations: Vec<DestinationRule>,
    /// Prefix the upstream stream with a PROXY protocol header of this version.
    pub send_proxy_protocol: Option<ProxyProtocolVersion>,
    /// Expect a PROXY protocol header (v1 or v2) from each client before anything else.
    pub accept_proxy_protocol: bool,
    /// Time a client has to send its PROXY protocol header.
    pub proxy_protocol_timeout: Duration,
}

/// What `upstream = "original-destination"` is spelled as.
pub const ORIGINAL_DESTINATION: &str = "original-destination";

/// Where `pcap = "-"` (`--tap-pcap -`) writes: standard output.
pub const PCAP_STDOUT: &str = "/dev/stdout";

pub use crate::proxy_protocol::Version as ProxyProtocolVersion;

/// An `allowed_destinations` entry: a network, and optionally a port (`"10.0.0.0/8"`,
/// `"127.0.0.1/32:8000"`, `"[fd00::]/8:443"`, `"10.1.2.3"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DestinationRule {
    /// Network address.
    pub network: IpAddr,
    /// Prefix length in bits.
    pub prefix: u8,
    /// Port, or any.
    pub port: Option<u16>,
}

impl DestinationRule {
    /// Parses one entry; the error says what is wrong.
    pub fn parse(text: &str) -> Result<DestinationRule, String> {
        let t = text.trim();
        let bad = || {
            format!(
                "{t:?} is not a network like \"10.0.0.0/8\", \"10.1.2.3/32:443\" or \"[fd00::]/8:443\""
            )
        };
        let (net_part, port) = if let Some(rest) = t.strip_prefix('[') {
            // "[fd00::]/8:443", "[fd00::/8]:443", "[::1]"
            let (inside, after) = rest.split_once(']').ok_or_else(bad)?;
            let (len, port) = match after.split_once(':') {
                Some((l, p)) => (l, Some(p)),
                None => (after, None),
            };
            (format!("{inside}{len}"), port)
        } else {
            match t.rsplit_once(':') {
                Some((n, p)) if !n.contains(':') => (n.to_string(), Some(p)),
                _ => (t.to_string(), None),
            }
        };
        let port = match port {
            Some(p) => Some(p.parse::<u16>().map_err(|_| bad())?),
            None => None,
        };
        let (addr, prefix) = match net_part.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (net_part.as_str(), None),
        };
        let network: IpAddr = addr.parse().map_err(|_| bad())?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(l) => l.parse::<u8>().ok().filter(|&l| l <= max).ok_or_else(bad)?,
            None => max,
        };
        Ok(DestinationRule {
            network,
            prefix,
            port,
        })
    }

    /// True when `addr` is inside the network (and has the port, if one is set).
    pub fn matches(&self, addr: SocketAddr) -> bool {
        if self.port.is_some_and(|p| p != addr.port()) {
            return false;
        }
        let ip = match addr.ip() {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// The transparent-mode and PROXY protocol keys of a route.
struct RouteModes {
    transparent: bool,
    allowed_destinations: Vec<DestinationRule>,
    send_proxy_protocol: Option<ProxyProtocolVersion>,
    accept_proxy_protocol: bool,
    proxy_protocol_timeout: Duration,
}

impl RouteModes {
    fn plain() -> RouteModes {
        RouteModes {
            transparent: false,
            allowed_destinations: Vec::new(),
            send_proxy_protocol: None,
            accept_proxy_protocol: false,
            proxy_protocol_timeout: Duration::from_secs(3),
        }
    }

    fn from_raw(
        ctx: &Ctx<'_>,
        key: &dyn Fn(&str) -> String,
        r: &RawRoute,
        orig: bool,
    ) -> Result<RouteModes, ConfigError> {
        let mut allowed = Vec::new();
        for (j, text) in r.allowed_destinations.iter().flatten().enumerate() {
            allowed.push(
                DestinationRule::parse(text)
                    .map_err(|e| ctx.invalid(key(&format!("allowed_destinations[{j}]")), e))?,
            );
        }
        if !allowed.is_empty() && !orig {
            return Err(ctx.invalid(
                key("allowed_destinations"),
                format!("only applies with upstream = \"{ORIGINAL_DESTINATION}\""),
            ));
        }
        let send_proxy_protocol = match r.send_proxy_protocol.as_deref() {
            None => None,
            Some("v1") => Some(ProxyProtocolVersion::V1),
            Some("v2") => Some(ProxyProtocolVersion::V2),
            Some(other) => {
                return Err(ctx.invalid(
                    key("send_proxy_protocol"),
                    format!("{other:?} is not \"v1\" or \"v2\""),
                ));
            }
        };
        Ok(RouteModes {
            transparent: r.transparent.unwrap_or(false),
            allowed_destinations: allowed,
            send_proxy_protocol,
            accept_proxy_protocol: r.accept_proxy_protocol.unwrap_or(false),
            proxy_protocol_timeout: match &r.proxy_protocol_timeout {
                Some(t) => ctx.positive_duration(&key("proxy_protocol_timeout"), t)?,
                None => Duration::from_secs(3),
            },
        })
    }
}

/// Where and how the access log is written (`[access_log]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    /// The file, created if missing and appended to; reopened on SIGUSR1.
    pub path: PathBuf,
    /// Line format (default JSON).
    pub format: AccessLogFormat,
}

/// The checked configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the config came from, for messages.
    pub origin: String,
    /// Capacity of each per-direction buffer (default 64 KiB). Memory per connection is bounded by twice this.
    pub buffer_size: NonZeroUsize,
    /// Connections held at once over all routes (default 10000).
    pub max_connections: usize,
    /// Time allowed for graceful shutdown before remaining pairs are reset (default 30s).
    pub drain_timeout: Duration,
    /// `listen(2)` backlog (default 1024).
    pub listen_backlog: i32,
    /// Number of event loops (default 1).
    pub workers: NonZeroUsize,
    /// How long an event loop that just had events polls again without sleeping before it
    /// waits in the kernel (default off).
    pub busy_poll: Option<Duration>,
    /// Keys the file sets to something other than a command-line flag that overrides them:
    /// `(key, flag)`. Said at startup, and at each reload (which keeps the flags).
    pub overridden: Vec<(&'static str, &'static str)>,
    /// Move bulk data with `splice(2)` through a kernel pipe (default on).
    pub splice: bool,
    /// Capacity of each direction's kernel pipe on the splice path (default 1 MiB).
    pub splice_pipe_size: usize,
    /// Kernel pipe capacity that spliced directions may hold together, over all workers
    /// (default 64 MiB); past it, directions copy.
    pub splice_memory_limit: usize,
    /// Socket options for proxied sockets.
    pub socket: SocketOptions,
    /// The routes; at least one.
    pub routes: Vec<Route>,
    /// Address of the admin HTTP endpoint (`[admin] listen`), off unless set.
    pub admin: Option<SocketAddr>,
    /// The access log (`[access_log]`), off unless set.
    pub access_log: Option<AccessLogConfig>,
    /// Routes with a `[route.tap]` of their own, which `--tap-log` / `--tap-pcap` (setting the
    /// global `[tap]`) do not change; empty unless one of those flags is given.
    pub own_taps_kept: Vec<String>,
    /// Routes with a `[route.tap]` of their own (for messages that name where a tap is set).
    pub own_taps: Vec<String>,
}

/// Overrides given on the command line.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`: with `upstream`, replaces the file's routes.
    pub listen: Option<String>,
    /// `--upstream`.
    pub upstream: Option<String>,
    /// `--tap-log FILE|-`.
    pub tap_log: Option<String>,
    /// `--tap-pcap FILE`.
    pub tap_pcap: Option<String>,
    /// `--workers N|auto`.
    pub workers: Option<String>,
    /// `--busy-poll DURATION|off`.
    pub busy_poll: Option<String>,
}

/// The longest duration any setting takes.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The longest `defer_accept`. A deferred client holds an entry of the listener's SYN queue
/// (bounded by `listen_backlog`) until it sends or the delay ends; nginx and haproxy use 1 s.
pub const MAX_DEFER_ACCEPT: Duration = Duration::from_secs(60);

struct Ctx<'a> {
    origin: &'a str,
}

impl Ctx<'_> {
    fn invalid(&self, key: impl fmt::Display, reason: impl fmt::Display) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_string(),
            key: key.to_string(),
            reason: reason.to_string(),
        }
    }

    fn duration(&self, key: &str, text: &str) -> Result<Duration, ConfigError> {
        let d = humantime::parse_duration(text.trim()).map_err(|e| {
            self.invalid(
                key,
                format!("{text:?} is not a duration ({e}); write e.g. \"500ms\", \"5s\", \"2m\""),
            )
        })?;
        // Deadlines are `Instant + duration`: keep far from where that overflows.
        if d > MAX_DURATION {
            return Err(self.invalid(key, format!("{text:?} is longer than 100 years")));
        }
        Ok(d)
    }

    fn positive_duration(&self, key: &str, text: &str) -> Result<Duration, ConfigError> {
        let d = self.duration(key, text)?;
        if d.is_zero() {
            return Err(self.invalid(key, "must be greater than zero"));
        }
        Ok(d)
    }

    /// `"off"` or `"0s"` disables.
    fn optional_duration(&self, key: &str, text: &str) -> Result<Option<Duration>, ConfigError> {
        if text.trim().eq_ignore_ascii_case("off") {
            return Ok(None);
        }
        let d = self.duration(key, text)?;
        Ok((!d.is_zero()).then_some(d))
    }

    /// `defer_accept`: `"off"` or `"0s"` disables; otherwise whole seconds (rounded up), at
    /// most [`MAX_DEFER_ACCEPT`].
    fn defer_accept(&self, key: &str, text: &str) -> Result<Option<Duration>, ConfigError> {
        let Some(d) = self.optional_duration(key, text)? else {
            return Ok(None);
        };
        if d > MAX_DEFER_ACCEPT {
            return Err(self.invalid(
                key,
                format!(
                    "{text:?} is longer than {}",
                    humantime::format_duration(MAX_DEFER_ACCEPT)
                ),
            ));
        }
        // The kernel counts whole seconds: say what it will do.
        Ok(Some(Duration::from_secs(
            d.as_secs() + u64::from(d.subsec_nanos() > 0),
        )))
    }

    fn size(&self, key: &str, size: &Size) -> Result<u64, ConfigError> {
        match size {
            Size::Bytes(n) => Ok(*n),
            Size::Text(t) => parse_size(t).ok_or_else(|| {
                self.invalid(
                    key,
                    format!("{t:?} is not a size; write e.g. 65536, \"64 KiB\", \"16 MiB\""),
                )
            }),
        }
    }

    fn usize_size(&self, key: &str, size: &Size) -> Result<usize, ConfigError> {
        let n = self.size(key, size)?;
        usize::try_from(n).map_err(|_| self.invalid(key, "too large"))
    }
}

/// Writes a size as [`parse_size`] reads it, in the largest binary unit that divides it.
pub fn format_size(n: u64) -> String {
    for (unit, shift) in [("GiB", 30), ("MiB", 20), ("KiB", 10)] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{} {unit}", n >> shift);
        }
    }
    format!("{n} B")
}

/// Parses `"64 KiB"`, `"16MiB"`, `"1G"`, `"512"`, `"512 B"` (binary multiples).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
}

fn resolve(ctx: &Ctx<'_>, key: &str, text: &str) -> Result<Vec<SocketAddr>, ConfigError> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    if !text.contains(':') {
        return Err(ctx.invalid(key, format!("{text:?} has no port; write host:port")));
    }
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| ctx.invalid(key, format!("cannot resolve {text:?}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(ctx.invalid(key, format!("{text:?} resolved to no address")));
    }
    Ok(addrs)
}

/// `upstream` or `upstreams` (exactly one of them), as written.
fn upstream_names(
    ctx: &Ctx<'_>,
    key: &dyn Fn(&str) -> String,
    r: &RawRoute,
) -> Result<Vec<String>, ConfigError> {
    let list = match (&r.upstream, &r.upstreams) {
        (Some(one), None) => return Ok(vec![one.clone()]),
        (None, None) => return Err(ctx.invalid(key("upstream"), "missing")),
        (Some(_), Some(_)) => {
            return Err(ctx.invalid(
                key("upstreams"),
                "set either upstream or upstreams, not both",
            ));
        }
        (None, Some(list)) => list,
    };
    if list.is_empty() {
        return Err(ctx.invalid(key("upstreams"), "must list at least one upstream"));
    }
    for (j, name) in list.iter().enumerate() {
        if name == ORIGINAL_DESTINATION {
            return Err(ctx.invalid(
                key(&format!("upstreams[{j}]")),
                format!("write upstream = \"{ORIGINAL_DESTINATION}\" (a single upstream)"),
            ));
        }
        if list[..j].contains(name) {
            return Err(ctx.invalid(
                key(&format!("upstreams[{j}]")),
                format!("{name:?} is listed twice"),
            ));
        }
    }
    Ok(list.clone())
}

/// Resolves the upstreams and checks `policy`, `connect_attempts`, `[health_check]` and
/// `resolve_interval`, none of which apply to an `original-destination` route.
fn upstream_spec(
    ctx: &Ctx<'_>,
    key: &dyn Fn(&str) -> String,
    r: &RawRoute,
    names: &[String],
    orig: bool,
) -> Result<UpstreamSpec, ConfigError> {
    if orig {
        let set = [
            ("policy", r.policy.is_some()),
            ("connect_attempts", r.connect_attempts.is_some()),
            ("health_check", r.health_check.is_some()),
            ("resolve_interval", r.resolve_interval.is_some()),
        ];
        if let Some((k, _)) = set.iter().find(|(_, is_set)| *is_set) {
            return Err(ctx.invalid(
                key(k),
                format!("does not apply with upstream = \"{ORIGINAL_DESTINATION}\""),
            ));
        }
        return Ok(UpstreamSpec::default());
    }
    let mut targets = Vec::with_capacity(names.len());
    for (j, name) in names.iter().enumerate() {
        let name_key = match r.upstreams {
            Some(_) => key(&format!("upstreams[{j}]")),
            None => key("upstream"),
        };
        targets.push(UpstreamTarget {
            name: name.clone(),
            addrs: resolve(ctx, &name_key, name)?,
        });
    }
    let policy = match r.policy.as_deref() {
        None => Policy::default(),
        Some(p) => Policy::from_name(p).ok_or_else(|| {
            ctx.invalid(
                key("policy"),
                format!("{p:?} is not a policy; write \"round_robin\", \"least_connections\" or \"first\""),
            )
        })?,
    };
    let mut spec = UpstreamSpec {
        targets,
        policy,
        ..UpstreamSpec::default()
    };
    spec.connect_attempts = match r.connect_attempts {
        None => None,
        Some(0) => return Err(ctx.invalid(key("connect_attempts"), "must be at least 1")),
        Some(n) => Some(n),
    };
    if let Some(h) = &r.health_check {
        spec.health_check = Some(health_check(ctx, &key("health_check"), h)?);
    }
    if let Some(t) = &r.resolve_interval {
        spec.resolve_interval = ctx.optional_duration(&key("resolve_interval"), t)?;
    }
    Ok(spec)
}

fn health_check(
    ctx: &Ctx<'_>,
    prefix: &str,
    raw: &RawHealthCheck,
) -> Result<HealthCheck, ConfigError> {
    let mut h = HealthCheck::default();
    if let Some(t) = &raw.interval {
        h.interval = ctx.positive_duration(&format!("{prefix}.interval"), t)?;
    }
    if let Some(t) = &raw.timeout {
        h.timeout = ctx.positive_duration(&format!("{prefix}.timeout"), t)?;
    }
    if h.timeout > h.interval {
        return Err(ctx.invalid(
            format!("{prefix}.timeout"),
            format!(
                "{:?}{} is longer than the interval ({:?}); a probe must end before the next",
                h.timeout,
                if raw.timeout.is_none() {
                    " (the default)"
                } else {
                    ""
                },
                h.interval
            ),
        ));
    }
    for (k, value, slot) in [
        ("rise", raw.rise, &mut h.rise),
        ("fall", raw.fall, &mut h.fall),
    ] {
        match value {
            Some(0) => return Err(ctx.invalid(format!("{prefix}.{k}"), "must be at least 1")),
            Some(n) => *slot = n,
            None => {}
        }
    }
    Ok(h)
}

fn listen_addr(ctx: &Ctx<'_>, key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse::<SocketAddr>().map_err(|_| {
        ctx.invalid(
            key,
            format!("{text:?} is not an IP address with a port (e.g. \"127.0.0.1:8080\", \"[::1]:8080\")"),
        )
    })
}

/// The longest `busy_poll`: a loop polls that long after every event, a health probe's included.
const MAX_BUSY_POLL: Duration = Duration::from_secs(1);

fn busy_poll(ctx: &Ctx<'_>, key: &str, text: &str) -> Result<Option<Duration>, ConfigError> {
    let d = ctx.optional_duration(key, text)?;
    if d.is_some_and(|d| d > MAX_BUSY_POLL) {
        return Err(ctx.invalid(
            key,
            format!(
                "{text:?} is longer than 1s; the loop polls that long after every event (a \
                 health probe's too): write microseconds, e.g. \"50us\""
            ),
        ));
    }
    Ok(d)
}

fn workers(ctx: &Ctx<'_>, key: &str, w: &Workers) -> Result<NonZeroUsize, ConfigError> {
    match w {
        Workers::Count(n) => {
            NonZeroUsize::new(*n).ok_or_else(|| ctx.invalid(key, "must be at least 1"))
        }
        Workers::Text(t) if t.trim() == "auto" => {
            Ok(std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN))
        }
        Workers::Text(t) => match t.trim().parse::<usize>().ok().and_then(NonZeroUsize::new) {
            Some(n) => Ok(n),
            None => Err(ctx.invalid(key, format!("{t:?} is not a positive number or \"auto\""))),
        },
    }
}

/// Checks `[admin]` (its address must not be a route's) and `[access_log]`.
/// Whether a connection to `dst` reaches a listener bound to `listen`: the same address, or,
/// for a wildcard listener, its port on a loopback address (or the wildcard itself, which
/// connect(2) takes for loopback). Other addresses of this host are not known here.
fn reaches(listen: SocketAddr, dst: SocketAddr) -> bool {
    listen.port() != 0
        && listen.port() == dst.port()
        && listen.is_ipv4() == dst.is_ipv4()
        && (listen.ip() == dst.ip()
            || (listen.ip().is_unspecified()
                && (dst.ip().is_loopback() || dst.ip().is_unspecified())))
}

/// Refuses routes whose upstreams lead back to themselves, directly (the upstream is the
/// route's own listen address) or through other routes: each connection would open another
/// through tcptap, until descriptors or `max_connections` run out and nothing is served.
/// Routes that feed one another without a cycle (one route's upstream is another's listener,
/// to tap a hop) are fine.
fn check_route_loops(ctx: &Ctx<'_>, from_cli: bool, routes: &[Route]) -> Result<(), ConfigError> {
    // next[i]: the routes that route i's upstreams reach.
    let next: Vec<Vec<usize>> = routes
        .iter()
        .map(|r| {
            (0..routes.len())
                .filter(|&j| r.upstream.iter().any(|&u| reaches(routes[j].listen, u)))
                .collect()
        })
        .collect();
    for start in 0..routes.len() {
        // Depth-first from `start`, looking for a way back to it.
        let mut seen = vec![false; routes.len()];
        let mut path: Vec<(usize, usize)> = vec![(start, 0)];
        while let Some(&mut (at, ref mut k)) = path.last_mut() {
            let Some(&to) = next[at].get(*k) else {
                path.pop();
                continue;
            };
            *k += 1;
            if to == start {
                let r = &routes[start];
                let hop = &routes[at];
                let dst = hop
                    .upstream
                    .iter()
                    .find(|&&u| reaches(r.listen, u))
                    .expect("an edge has an address");
                let key = if from_cli {
                    "--upstream".to_string()
                } else {
                    format!("route[{at}].upstream")
                };
                let why = if at == start {
                    format!("{dst} is this route's own listen address")
                } else {
                    format!(
                        "{dst} is the listen address of route `{}`, whose upstreams lead back \
                         to this one",
                        r.name
                    )
                };
                return Err(ctx.invalid(
                    key,
                    format!("{why}: every connection would come back to tcptap, in a loop"),
                ));
            }
            if !seen[to] {
                seen[to] = true;
                path.push((to, 0));
            }
        }
    }
    Ok(())
}

fn ops_sections(
    ctx: &Ctx<'_>,
    admin: Option<&RawAdmin>,
    access_log: Option<&RawAccessLog>,
    routes: &[Route],
) -> Result<(Option<SocketAddr>, Option<AccessLogConfig>), ConfigError> {
    let admin = match admin {
        Some(a) => {
            let text = a
                .listen
                .as_deref()
                .ok_or_else(|| ctx.invalid("admin.listen", "missing"))?;
            let addr = listen_addr(ctx, "admin.listen", text)?;
            if let Some(i) = routes
                .iter()
                .position(|r| r.listen == addr && addr.port() != 0)
            {
                return Err(ctx.invalid(
                    "admin.listen",
                    format!("{addr} is already the listen address of route[{i}]"),
                ));
            }
            Some(addr)
        }
        None => None,
    };
    let access_log = match access_log {
        Some(l) => {
            let path = match l.path.as_deref() {
                None => return Err(ctx.invalid("access_log.path", "missing")),
                Some(p) if p.trim().is_empty() => {
                    return Err(ctx.invalid("access_log.path", "must not be empty"));
                }
                Some(p) => PathBuf::from(p),
            };
            let format = match l.format.as_deref() {
                None => AccessLogFormat::Json,
                Some(f) => AccessLogFormat::from_name(f).ok_or_else(|| {
                    ctx.invalid(
                        "access_log.format",
                        format!("{f:?} is not a format; write \"json\" or \"text\""),
                    )
                })?,
            };
            // A tap writing the same file would interleave its output with the access lines.
            for (i, r) in routes.iter().enumerate() {
                let files = r.tap.iter().flat_map(TapConfig::files);
                if let Some((key, _)) = files
                    .into_iter()
                    .find(|(_, p)| crate::tap::same_file(p, &path))
                {
                    return Err(ctx.invalid(
                        "access_log.path",
                        format!(
                            "{} is also the tap {key} of route[{i}] (`{}`): use another file",
                            path.display(),
                            r.name
                        ),
                    ));
                }
            }
            Some(AccessLogConfig { path, format })
        }
        None => None,
    };
    Ok((admin, access_log))
}

fn tap(ctx: &Ctx<'_>, prefix: &str, raw: &RawTap) -> Result<Option<TapConfig>, ConfigError> {
    // "off" (the documented default) is no output, not a file of that name ("./off" is one).
    fn output(o: &Option<String>) -> Option<&str> {
        (o.as_deref()).filter(|p| !p.trim().eq_ignore_ascii_case("off"))
    }
    let (raw_log, raw_pcap) = (output(&raw.log), output(&raw.pcap));
    let log = raw_log.map(|l| {
        if l == "-" {
            LogTarget::Stdout
        } else {
            LogTarget::File(PathBuf::from(l))
        }
    });
    // "off" (the documented default) is the key left out.
    let off = |s: &Option<Size>| -> bool {
        matches!(s, Some(Size::Text(t)) if t.trim().eq_ignore_ascii_case("off"))
    };
    let pcap_rotate_size = raw
        .pcap_rotate_size
        .as_ref()
        .filter(|_| !off(&raw.pcap_rotate_size));
    let raw_snaplen = raw.snaplen.as_ref().filter(|_| !off(&raw.snaplen));
    let rotate_bytes = match pcap_rotate_size {
        Some(s) => {
            let n = ctx.size(&format!("{prefix}.pcap_rotate_size"), s)?;
            if n < 4096 {
                return Err(ctx.invalid(
                    format!("{prefix}.pcap_rotate_size"),
                    "must be at least 4 KiB",
                ));
            }
            Some(n)
        }
        None => None,
    };
    let max_files = raw.pcap_max_files.unwrap_or(10);
    if max_files == 0 {
        return Err(ctx.invalid(format!("{prefix}.pcap_max_files"), "must be at least 1"));
    }
    if raw_pcap.is_none()
        && (pcap_rotate_size.is_some()
            || raw.pcap_max_files.is_some()
            || raw.pcap_direct_io.is_some())
    {
        return Err(ctx.invalid(
            format!("{prefix}.pcap"),
            "pcap_rotate_size/pcap_max_files/pcap_direct_io are set but no pcap file is",
        ));
    }
    let to_stdout = raw_pcap.is_some_and(|p| p.trim() == "-");
    if to_stdout && rotate_bytes.is_some() {
        return Err(ctx.invalid(
            format!("{prefix}.pcap_rotate_size"),
            "rotation needs a file; the pcap goes to stdout (\"-\")",
        ));
    }
    let pcap = raw_pcap.map(|p| PcapTarget {
        // "-": stdout, to pipe the capture into `wireshark -k -i -` or `tshark -r -`.
        path: PathBuf::from(if to_stdout { PCAP_STDOUT } else { p }),
        rotate_bytes,
        max_files,
        direct_io: raw.pcap_direct_io.unwrap_or(true),
    });
    let snaplen = match raw_snaplen {
        Some(s) => Some(ctx.size(&format!("{prefix}.snaplen"), s)?),
        None => None,
    };
    let queue_bytes = match &raw.queue_size {
        Some(s) => {
            let n = ctx.usize_size(&format!("{prefix}.queue_size"), s)?;
            if n < 4096 {
                return Err(ctx.invalid(format!("{prefix}.queue_size"), "must be at least 4 KiB"));
            }
            n
        }
        None => DEFAULT_TAP_QUEUE,
    };
    let writer_priority = match raw.writer_priority.as_deref() {
        None | Some("low") => WriterPriority::Low,
        Some("normal") => WriterPriority::Normal,
        Some(other) => {
            return Err(ctx.invalid(
                format!("{prefix}.writer_priority"),
                format!("expected \"low\" or \"normal\", got {other:?}"),
            ));
        }
    };
    if log.is_none() && pcap.is_none() {
        // The global [tap] may hold settings for --tap-log / --tap-pcap to use. A [route.tap]
        // replaces [tap] for its route, so settings without an output there would be ignored.
        let set = [
            ("snaplen", raw_snaplen.is_some()),
            ("queue_size", raw.queue_size.is_some()),
            ("writer_priority", raw.writer_priority.is_some()),
        ];
        if let Some((key, _)) = set.iter().find(|(_, set)| *set).filter(|_| prefix != "tap") {
            return Err(ctx.invalid(
                format!("{prefix}.{key}"),
                format!(
                    "is set but neither `{prefix}.log` nor `{prefix}.pcap` is: a [route.tap] \
                     replaces [tap] for its route, so it names its own outputs (an empty \
                     [route.tap] turns the tap off for the route)"
                ),
            ));
        }
        return Ok(None);
    }
    Ok(Some(TapConfig {
        log,
        pcap,
        snaplen,
        queue_bytes,
        writer_priority,
    }))
}

/// Route names must differ (they label metrics and logs), and two taps with different settings
/// must not write the same file (each would truncate and interleave the other's output).
fn check_route_names_and_taps(
    ctx: &Ctx<'_>,
    routes: &[Route],
    raw: &[RawRoute],
    (log_flag, pcap_flag): (bool, bool),
) -> Result<(), ConfigError> {
    // What set route i's tap `log` or `pcap`: its own [route.tap], else the global [tap] or
    // the flag that replaced that key.
    let tap_key = |i: usize, key: &str| match raw.get(i).and_then(|r| r.tap.as_ref()) {
        Some(_) => format!("route[{i}].tap.{key}"),
        None if key == "log" && log_flag => "--tap-log".to_string(),
        None if key == "pcap" && pcap_flag => "--tap-pcap".to_string(),
        None => format!("tap.{key}"),
    };
    for (i, r) in routes.iter().enumerate() {
        if let Some(j) = routes[..i].iter().position(|o| o.name == r.name) {
            return Err(ctx.invalid(
                format!("route[{i}].name"),
                format!(
                    "{:?} is already the name of route[{j}]; route names label logs and metrics, \
                     so they must differ",
                    r.name
                ),
            ));
        }
        let Some(tc) = &r.tap else { continue };
        // One stdout: the text log and a pcap cannot share it.
        if tc
            .pcap
            .as_ref()
            .is_some_and(|p| p.path == Path::new(PCAP_STDOUT))
        {
            let log_on_stdout = (routes.iter().enumerate()).find(|(_, o)| {
                o.tap
                    .as_ref()
                    .is_some_and(|t| t.log == Some(LogTarget::Stdout))
            });
            if let Some((j, _)) = log_on_stdout {
                return Err(ctx.invalid(
                    tap_key(i, "pcap"),
                    format!(
                        "\"-\" (stdout) is also where the text log goes (`{}`): write one of \
                         them to a file",
                        tap_key(j, "log")
                    ),
                ));
            }
        }
        if let (Some(LogTarget::File(l)), Some(p)) = (&tc.log, &tc.pcap) {
            if crate::tap::same_file(l, &p.path) {
                return Err(ctx.invalid(
                    tap_key(i, "pcap"),
                    format!(
                        "{} is also the text log (`{}`): use two files",
                        p.path.display(),
                        tap_key(i, "log")
                    ),
                ));
            }
        }
        for (j, o) in routes[..i].iter().enumerate() {
            let Some(oc) = o.tap.as_ref().filter(|oc| *oc != tc) else {
                continue;
            };
            if let Some((key, other_key, path)) = tc.shared_file(oc) {
                return Err(ctx.invalid(
                    tap_key(i, key),
                    format!(
                        "{} is also written by `{}` (route[{j}]), a tap with other settings; \
                         routes can share a tap file only by sharing the whole tap (the same \
                         settings, the path spelled the same)",
                        path.display(),
                        tap_key(j, other_key)
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl Config {
    /// Parses and checks a config held in a string. `origin` names it in errors.
    pub fn from_toml_str(
        text: &str,
        origin: &str,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let parse_error = |message: String| ConfigError::Parse {
            origin: origin.to_string(),
            message,
        };
        let de = toml::Deserializer::parse(text)
            .map_err(|e| parse_error(e.to_string().trim_end().to_string()))?;
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let message = e.into_inner().to_string().trim_end().to_string();
            parse_error(type_error_message(&key, message))
        })?;
        Config::from_raw(raw, origin, overrides)
    }

    /// Reads, parses and checks a config file.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            origin: origin.clone(),
            source,
        })?;
        Config::from_toml_str(&text, &origin, overrides)
    }

    /// Checks a parsed config, fills defaults, applies command-line overrides and resolves upstreams.
    pub fn from_raw(
        mut raw: RawConfig,
        origin: &str,
        ov: &Overrides,
    ) -> Result<Config, ConfigError> {
        let file_ctx = Ctx { origin };
        let cli_ctx = Ctx {
            origin: "command line",
        };

        let buffer_size = match &raw.buffer_size {
            Some(s) => file_ctx.usize_size("buffer_size", s)?,
            None => DEFAULT_BUFFER_SIZE,
        };
        let buffer_size = NonZeroUsize::new(buffer_size)
            .filter(|n| n.get() >= 1024)
            .ok_or_else(|| file_ctx.invalid("buffer_size", "must be at least 1 KiB"))?;
        if buffer_size.get() > 64 << 20 {
            return Err(file_ctx.invalid("buffer_size", "must be at most 64 MiB"));
        }
        let splice_pipe_size = match &raw.splice_pipe_size {
            Some(s) => file_ctx.usize_size("splice_pipe_size", s)?,
            None => DEFAULT_SPLICE_PIPE_SIZE,
        };
        if !(4096..=64 << 20).contains(&splice_pipe_size) {
            return Err(file_ctx.invalid("splice_pipe_size", "must be between 4 KiB and 64 MiB"));
        }
        let splice_memory_limit = match &raw.splice_memory_limit {
            Some(s) => file_ctx.usize_size("splice_memory_limit", s)?,
            None => DEFAULT_SPLICE_MEMORY_LIMIT,
        };
        let one_pipe = crate::splice::pipe_cost(splice_pipe_size);
        if splice_memory_limit < one_pipe {
            return Err(file_ctx.invalid(
                "splice_memory_limit",
                format!(
                    "must hold at least one pipe of splice_pipe_size ({}), or no direction \
                     could splice (`splice = false` copies always)",
                    format_size(one_pipe as u64)
                ),
            ));
        }
        let max_connections = raw.max_connections.unwrap_or(10_000);
        if max_connections == 0 {
            return Err(file_ctx.invalid("max_connections", "must be at least 1"));
        }
        let connect_timeout = match &raw.connect_timeout {
            Some(t) => file_ctx.positive_duration("connect_timeout", t)?,
            None => Duration::from_secs(5),
        };
        let idle_timeout = match &raw.idle_timeout {
            Some(t) => file_ctx.optional_duration("idle_timeout", t)?,
            None => Some(Duration::from_secs(600)),
        };
        let defer_accept = match &raw.defer_accept {
            Some(t) => file_ctx.defer_accept("defer_accept", t)?,
            None => None,
        };
        let drain_timeout = match &raw.drain_timeout {
            Some(t) => file_ctx.duration("drain_timeout", t)?,
            None => Duration::from_secs(30),
        };
        let listen_backlog = raw.listen_backlog.unwrap_or(1024);
        if listen_backlog <= 0 {
            return Err(file_ctx.invalid("listen_backlog", "must be at least 1"));
        }
        // What the flags hide of the file (a file value that does not parse differs too).
        let mut overridden = Vec::new();
        let workers = match (&ov.workers, &raw.workers) {
            (Some(w), file) => {
                let n = workers(&cli_ctx, "--workers", &Workers::Text(w.clone()))?;
                if file
                    .as_ref()
                    .is_some_and(|f| workers(&file_ctx, "workers", f).ok() != Some(n))
                {
                    overridden.push(("workers", "--workers"));
                }
                n
            }
            (None, Some(w)) => workers(&file_ctx, "workers", w)?,
            (None, None) => NonZeroUsize::MIN,
        };
        let busy_poll = match (&ov.busy_poll, &raw.busy_poll) {
            (Some(t), file) => {
                let d = busy_poll(&cli_ctx, "--busy-poll", t)?;
                if file
                    .as_ref()
                    .is_some_and(|f| busy_poll(&file_ctx, "busy_poll", f).ok() != Some(d))
                {
                    overridden.push(("busy_poll", "--busy-poll"));
                }
                d
            }
            (None, Some(t)) => busy_poll(&file_ctx, "busy_poll", t)?,
            (None, None) => None,
        };
        let file_tap = raw.tap.as_ref();
        for (flag, file, names) in [
            (
                &ov.tap_log,
                file_tap.and_then(|t| t.log.as_ref()),
                ("tap.log", "--tap-log"),
            ),
            (
                &ov.tap_pcap,
                file_tap.and_then(|t| t.pcap.as_ref()),
                ("tap.pcap", "--tap-pcap"),
            ),
        ] {
            if flag.as_ref().is_some_and(|f| file.is_some_and(|v| v != f)) {
                overridden.push(names);
            }
        }
        if ov.listen.is_some() && !raw.route.is_empty() {
            overridden.push(("[[route]]", "--listen/--upstream"));
        }

        let rs = raw.socket.take().unwrap_or_default();
        let keepalive = match &rs.keepalive {
            None | Some(Toggle::Flag(false)) => None,
            Some(Toggle::Flag(true)) => Some(Duration::from_secs(60)),
            Some(Toggle::Text(t)) => file_ctx.optional_duration("socket.keepalive", t)?,
        };
        // Linux takes TCP_KEEPIDLE and TCP_KEEPINTVL in whole seconds, from 1 up to 32767: a
        // fraction is rounded up (as `defer_accept` is), and under a second is an error here
        // rather than an EINVAL when the first socket is made.
        let keepalive_secs = |key: &str, d: Duration| {
            let whole = Duration::from_secs(d.as_secs() + u64::from(d.subsec_nanos() > 0));
            if d < Duration::from_secs(1) {
                Err(file_ctx.invalid(
                    key,
                    "must be at least 1s (the kernel counts it in whole seconds)",
                ))
            } else if whole > Duration::from_secs(32_767) {
                Err(file_ctx.invalid(key, "must be at most 32767s (about 9 hours)"))
            } else {
                Ok(whole)
            }
        };
        let keepalive = match keepalive {
            Some(idle) => Some(Keepalive {
                idle: keepalive_secs("socket.keepalive", idle)?,
                interval: match &rs.keepalive_interval {
                    Some(t) => keepalive_secs(
                        "socket.keepalive_interval",
                        file_ctx.positive_duration("socket.keepalive_interval", t)?,
                    )?,
                    None => Duration::from_secs(10),
                },
            }),
            None => None,
        };
        let socket = SocketOptions {
            nodelay: rs.nodelay.unwrap_or(true),
            keepalive,
            recv_buffer_size: match &rs.recv_buffer_size {
                Some(s) => Some(file_ctx.usize_size("socket.recv_buffer_size", s)?),
                None => None,
            },
            send_buffer_size: match &rs.send_buffer_size {
                Some(s) => Some(file_ctx.usize_size("socket.send_buffer_size", s)?),
                None => None,
            },
        };

        // The global tap: the file's [tap], with --tap-log / --tap-pcap on top.
        // The flags only set paths, which `tap` does not check (the check of files shared
        // between taps names the flags): every error here is about a key of the file (or of
        // the command line, when there is no file: then `file_ctx` says so).
        let mut raw_tap = raw.tap.take().unwrap_or_default();
        if let Some(l) = &ov.tap_log {
            raw_tap.log = Some(l.clone());
        }
        if let Some(p) = &ov.tap_pcap {
            raw_tap.pcap = Some(p.clone());
        }
        let global_tap = tap(&file_ctx, "tap", &raw_tap)?;

        let mut routes = Vec::new();
        let mut own_taps_kept = Vec::new();
        let mut own_taps = Vec::new();
        match (&ov.listen, &ov.upstream) {
            (Some(listen), Some(upstream)) => {
                let orig = upstream == ORIGINAL_DESTINATION;
                let modes = RouteModes::plain();
                let upstream_set = if orig {
                    UpstreamSpec::default()
                } else {
                    UpstreamSpec::single(upstream, resolve(&cli_ctx, "--upstream", upstream)?)
                };
                routes.push(Route {
                    name: "cli".to_string(),
                    listen: listen_addr(&cli_ctx, "--listen", listen)?,
                    upstream_name: upstream.clone(),
                    upstream: upstream_set.addresses(),
                    upstream_set,
                    max_connections,
                    own_max_connections: false,
                    connect_timeout,
                    idle_timeout,
                    defer_accept,
                    tap: global_tap.clone(),
                    original_destination: orig,
                    transparent: modes.transparent,
                    allowed_destinations: modes.allowed_destinations,
                    send_proxy_protocol: modes.send_proxy_protocol,
                    accept_proxy_protocol: modes.accept_proxy_protocol,
                    proxy_protocol_timeout: modes.proxy_protocol_timeout,
                });
            }
            (Some(_), None) => return Err(cli_ctx.invalid("--listen", "needs --upstream as well")),
            (None, Some(_)) => return Err(cli_ctx.invalid("--upstream", "needs --listen as well")),
            (None, None) => {
                for (i, r) in raw.route.iter().enumerate() {
                    let key = |k: &str| format!("route[{i}].{k}");
                    let name = r.name.clone().unwrap_or_else(|| format!("route{i}"));
                    let listen = r
                        .listen
                        .as_deref()
                        .ok_or_else(|| file_ctx.invalid(key("listen"), "missing"))?;
                    let upstream_names = upstream_names(&file_ctx, &key, r)?;
                    let route_max = r.max_connections.unwrap_or(max_connections);
                    if route_max == 0 {
                        return Err(file_ctx.invalid(key("max_connections"), "must be at least 1"));
                    }
                    let route_tap = match &r.tap {
                        Some(t) => {
                            own_taps.push(name.clone());
                            if ov.tap_log.is_some() || ov.tap_pcap.is_some() {
                                own_taps_kept.push(name.clone());
                            }
                            tap(&file_ctx, &key("tap"), t)?
                        }
                        None => global_tap.clone(),
                    };
                    let orig = r.upstream.as_deref() == Some(ORIGINAL_DESTINATION);
                    let modes = RouteModes::from_raw(&file_ctx, &key, r, orig)?;
                    let upstream_set = upstream_spec(&file_ctx, &key, r, &upstream_names, orig)?;
                    routes.push(Route {
                        name,
                        listen: listen_addr(&file_ctx, &key("listen"), listen)?,
                        upstream_name: upstream_names.join(", "),
                        upstream: upstream_set.addresses(),
                        upstream_set,
                        original_destination: orig,
                        transparent: modes.transparent,
                        allowed_destinations: modes.allowed_destinations,
                        send_proxy_protocol: modes.send_proxy_protocol,
                        accept_proxy_protocol: modes.accept_proxy_protocol,
                        proxy_protocol_timeout: modes.proxy_protocol_timeout,
                        max_connections: route_max,
                        own_max_connections: r.max_connections.is_some(),
                        connect_timeout: match &r.connect_timeout {
                            Some(t) => file_ctx.positive_duration(&key("connect_timeout"), t)?,
                            None => connect_timeout,
                        },
                        idle_timeout: match &r.idle_timeout {
                            Some(t) => file_ctx.optional_duration(&key("idle_timeout"), t)?,
                            None => idle_timeout,
                        },
                        defer_accept: match &r.defer_accept {
                            Some(t) => file_ctx.defer_accept(&key("defer_accept"), t)?,
                            None => defer_accept,
                        },
                        tap: route_tap,
                    });
                }
            }
        }
        if routes.len() > crate::event_loop::MAX_ROUTES {
            return Err(file_ctx.invalid(
                "route",
                format!(
                    "{} routes; at most {} are supported",
                    routes.len(),
                    crate::event_loop::MAX_ROUTES
                ),
            ));
        }
        if routes.is_empty() {
            return Err(file_ctx.invalid(
                "route",
                "no route: add a [[route]] with listen and upstream, or pass --listen and --upstream",
            ));
        }
        for (i, r) in routes.iter().enumerate() {
            if let Some(j) = routes[..i]
                .iter()
                .position(|o| o.listen == r.listen && r.listen.port() != 0)
            {
                return Err(file_ctx.invalid(
                    format!("route[{i}].listen"),
                    format!("{} is already the listen address of route[{j}]", r.listen),
                ));
            }
        }
        let from_cli = ov.listen.is_some();
        check_route_loops(
            if from_cli { &cli_ctx } else { &file_ctx },
            from_cli,
            &routes,
        )?;
        let flags = (ov.tap_log.is_some(), ov.tap_pcap.is_some());
        check_route_names_and_taps(&file_ctx, &routes, &raw.route, flags)?;
        let (admin, access_log) = ops_sections(
            &file_ctx,
            raw.admin.as_ref(),
            raw.access_log.as_ref(),
            &routes,
        )?;
        Ok(Config {
            origin: origin.to_string(),
            buffer_size,
            max_connections,
            drain_timeout,
            listen_backlog,
            splice: raw.splice.unwrap_or(true),
            splice_pipe_size,
            splice_memory_limit,
            workers,
            busy_poll,
            overridden,
            socket,
            routes,
            admin,
            access_log,
            own_taps_kept,
            own_taps,
        })
    }

    /// What `--check-config` checks beyond the file itself, without changing anything: each
    /// listen address is one of this host's (a route in `transparent` mode excepted), and each
    /// file the proxy would write (tap log and pcap, access log) can be created or written. A
    /// listen port in use is not an error here: the running proxy being checked for holds it.
    /// Returns every problem found, one line each.
    pub fn preflight(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut listen = |what: String, addr: SocketAddr| {
            if let Err(e) = bindable_ip(addr) {
                problems.push(format!(
                    "{}: {what}: {} is not an address of this host: {e}",
                    self.origin,
                    addr.ip()
                ));
            }
            if let Err(e) = may_bind_port(addr.port()) {
                problems.push(format!("{}: {what}: {e}", self.origin));
            }
        };
        for r in &self.routes {
            if !r.transparent {
                listen(format!("route `{}`: listen", r.name), r.listen);
            }
        }
        if let Some(a) = self.admin {
            listen("admin.listen".into(), a);
        }
        let mut files: Vec<(String, &Path)> = Vec::new();
        for r in &self.routes {
            for (key, path) in r.tap.iter().flat_map(TapConfig::files) {
                if !files.iter().any(|(_, p)| *p == path) {
                    files.push((format!("route `{}`: tap {key}", r.name), path));
                }
            }
        }
        if let Some(a) = &self.access_log {
            files.push(("access_log.path".into(), &a.path));
        }
        for (what, path) in files {
            if let Err(e) = writable(path) {
                problems.push(format!(
                    "{}: {what}: cannot write {}: {e}",
                    self.origin,
                    path.display()
                ));
            }
        }
        problems
    }

    /// The file's settings that command-line flags override with other values, if any: said
    /// at startup and at each reload, since a reload keeps the flags.
    pub fn overridden_note(&self) -> Option<String> {
        if self.overridden.is_empty() {
            return None;
        }
        let keys: Vec<String> = (self.overridden.iter())
            .map(|(key, flag)| format!("`{key}` by {flag}"))
            .collect();
        Some(format!(
            "{}: the command line overrides {} (a reload keeps the flags; restart without them \
             to use the file's)",
            self.origin,
            keys.join(", ")
        ))
    }

    /// A config made only of command-line flags (no file).
    pub fn from_overrides(ov: &Overrides) -> Result<Config, ConfigError> {
        Config::from_raw(RawConfig::default(), "command line", ov)
    }
}

/// A value of the wrong type: the TOML parser's message (line, snippet, what serde expected)
/// led by the dotted key, with the expected type in the config's own words.
fn type_error_message(key: &str, message: String) -> String {
    let last = key.rsplit('.').next().unwrap_or(key);
    // Counts that must not be 0 (checked after parsing, "must be at least 1").
    let counts = [
        "max_connections",
        "connect_attempts",
        "listen_backlog",
        "pcap_max_files",
        "rise",
        "fall",
        "workers",
    ];
    let zero = if counts.contains(&last) { "1" } else { "0" };
    let ranges = [
        ("usize", zero, u64::MAX.to_string()),
        ("u64", zero, u64::MAX.to_string()),
        ("u32", zero, u32::MAX.to_string()),
        ("u16", zero, u16::MAX.to_string()),
        ("u8", zero, u8::MAX.to_string()),
        ("i32", "-2147483648", i32::MAX.to_string()),
    ];
    let mut message = ranges.iter().fold(message, |m, (t, min, max)| {
        m.replace(
            &format!("expected {t}"),
            &format!("expected a whole number from {min} to {max}"),
        )
    });
    let duration = last.ends_with("timeout")
        || last.ends_with("interval")
        || ["keepalive", "busy_poll", "defer_accept"].contains(&last);
    if duration && message.contains("expected a string") {
        message.push_str(" (a duration such as \"5s\", \"500ms\" or \"2m\")");
    }
    if last == "route" && message.contains("expected a sequence") {
        message.push_str(" (routes are an array of tables: write [[route]])");
    }
    match key {
        "" | "." => message,
        _ => format!("`{key}`: {message}"),
    }
}

/// Whether a socket can be bound to `addr`'s IP (port 0): the IP is one of this host's.
fn bindable_ip(addr: SocketAddr) -> std::io::Result<()> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    let mut any_port = addr; // keeps an IPv6 scope id (a link-local address needs it)
    any_port.set_port(0);
    socket.bind(&any_port.into())
}

/// Whether this process may listen on `port`: below `net.ipv4.ip_unprivileged_port_start`
/// (1024 unless set otherwise) that takes `CAP_NET_BIND_SERVICE` (root has it).
fn may_bind_port(port: u16) -> Result<(), String> {
    let start: u32 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1024);
    if port == 0 || u32::from(port) >= start {
        return Ok(());
    }
    const CAP_NET_BIND_SERVICE: u32 = 10;
    let effective = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        });
    match effective {
        Some(caps) if caps & (1 << CAP_NET_BIND_SERVICE) == 0 => Err(format!(
            "port {port} is privileged (below net.ipv4.ip_unprivileged_port_start = {start}): \
             run as root, or grant CAP_NET_BIND_SERVICE (systemd: \
             AmbientCapabilities=CAP_NET_BIND_SERVICE)"
        )),
        // Allowed, or unknown: binding will tell.
        _ => Ok(()),
    }
}

/// Whether `path` can be opened for writing, or created, without touching it: an existing file
/// must be writable, a new one needs a writable directory.
pub(crate) fn writable(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let access = |p: &Path| {
        let c = std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: access(2) reads the NUL-terminated path, which outlives the call.
        if unsafe { libc::access(c.as_ptr(), libc::W_OK) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    };
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Err(std::io::Error::other("it is a directory")),
        Ok(_) => access(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            if !std::fs::metadata(dir)?.is_dir() {
                return Err(std::io::Error::other(format!(
                    "{} is not a directory",
                    dir.display()
                )));
            }
            access(dir)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, "test.toml", &Overrides::default())
    }

    fn err(text: &str) -> String {
        parse(text)
            .expect_err("config should be rejected")
            .to_string()
    }

    const MINIMAL: &str = "[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n";

    #[test]
    fn routes_that_lead_back_to_themselves_are_refused() {
        let route = |listen: &str, upstream: &str| {
            format!("[[route]]\nlisten = \"{listen}\"\nupstream = \"{upstream}\"\n")
        };
        let e = err(&route("127.0.0.1:18794", "127.0.0.1:18794"));
        assert!(
            e.contains("test.toml")
                && e.contains("route[0].upstream")
                && e.contains("127.0.0.1:18794 is this route's own listen address"),
            "{e}"
        );
        // A wildcard listener is reached on loopback.
        let e = err(&route("0.0.0.0:18794", "127.0.0.2:18794"));
        assert!(e.contains("route[0].upstream"), "{e}");
        // Through another route, and back.
        let e = err(&format!(
            "{}{}",
            route("127.0.0.1:18001", "127.0.0.1:18002"),
            route("127.0.0.1:18002", "127.0.0.1:18001")
        ));
        assert!(
            e.contains("route[1].upstream")
                && e.contains("127.0.0.1:18001 is the listen address of route `route0`"),
            "{e}"
        );
        // One route feeding another, without a way back; other addresses, families, port 0.
        for ok in [
            format!(
                "{}{}",
                route("127.0.0.1:18001", "127.0.0.1:18002"),
                route("127.0.0.1:18002", "127.0.0.1:9")
            ),
            route("127.0.0.1:18794", "127.0.0.2:18794"),
            route("[::]:18794", "127.0.0.1:18794"),
            route("127.0.0.1:0", "127.0.0.1:0"),
        ] {
            parse(&ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        // The command line says which flag.
        let ov = Overrides {
            listen: Some("127.0.0.1:18794".into()),
            upstream: Some("localhost:18794".into()),
            ..Default::default()
        };
        let e = Config::from_raw(RawConfig::default(), "command line", &ov)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--upstream") && e.contains("own listen address"),
            "{e}"
        );
    }

    #[test]
    fn splice_memory_limit_holds_at_least_one_pipe() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.splice_memory_limit, 64 << 20);
        let c = parse(&format!(
            "splice_pipe_size = \"64 KiB\"\nsplice_memory_limit = \"128 KiB\"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(c.splice_memory_limit, 128 << 10);
        // 100 KiB pipes are 128 KiB ones to the kernel.
        let e = err(&format!(
            "splice_pipe_size = \"100 KiB\"\nsplice_memory_limit = \"100 KiB\"\n{MINIMAL}"
        ));
        assert!(
            e.contains("test.toml") && e.contains("splice_memory_limit") && e.contains("128 KiB"),
            "{e}"
        );
        assert_eq!(format_size(3 << 20), "3 MiB");
        assert_eq!(format_size((1 << 20) + 1), "1048577 B");
        for n in [1, 1024, 5 << 30, 1536] {
            assert_eq!(parse_size(&format_size(n)), Some(n));
        }
    }

    #[test]
    fn splice_pipe_size_is_checked() {
        let c = parse(&format!("splice_pipe_size = \"1 MiB\"\n{MINIMAL}")).unwrap();
        assert_eq!(c.splice_pipe_size, 1 << 20);
        let e = err(&format!("splice_pipe_size = \"1 KiB\"\n{MINIMAL}"));
        assert!(
            e.contains("test.toml") && e.contains("splice_pipe_size"),
            "{e}"
        );
    }

    #[test]
    fn keepalive_times_fit_the_kernel() {
        let with = |s: &str| format!("[socket]\n{s}{MINIMAL}");
        parse(&with("keepalive = \"9h\"\n")).unwrap();
        let e = err(&with("keepalive = \"10h\"\n"));
        assert!(e.contains("socket.keepalive") && e.contains("32767"), "{e}");
        let e = err(&with("keepalive = \"60s\"\nkeepalive_interval = \"10h\"\n"));
        assert!(
            e.contains("socket.keepalive_interval") && e.contains("32767"),
            "{e}"
        );
        // Under a second the kernel refuses (it counts whole seconds): said here, by key.
        let e = err(&with("keepalive = \"500ms\"\n"));
        assert!(
            e.contains("socket.keepalive") && e.contains("at least 1s"),
            "{e}"
        );
        let e = err(&with(
            "keepalive = \"60s\"\nkeepalive_interval = \"100ms\"\n",
        ));
        assert!(
            e.contains("socket.keepalive_interval") && e.contains("at least 1s"),
            "{e}"
        );
        // A fraction is rounded up.
        let c = parse(&with(
            "keepalive = \"1500ms\"\nkeepalive_interval = \"2.5s\"\n",
        ))
        .unwrap();
        let k = c.socket.keepalive.unwrap();
        assert_eq!(
            (k.idle, k.interval),
            (Duration::from_secs(2), Duration::from_secs(3))
        );
    }

    #[test]
    fn durations_are_bounded() {
        let c = parse(&format!("idle_timeout = \"99y\"\n{MINIMAL}")).unwrap();
        assert!(c.routes[0].idle_timeout.unwrap() > Duration::from_secs(98 * 365 * 86400));
        let e = err(&format!("idle_timeout = \"500000000000y\"\n{MINIMAL}"));
        assert!(e.contains("idle_timeout") && e.contains("100 years"), "{e}");
        let e = err(&format!("{MINIMAL}connect_timeout = \"200y\"\n"));
        assert!(
            e.contains("route[0].connect_timeout") && e.contains("100 years"),
            "{e}"
        );
    }

    #[test]
    fn route_names_must_differ() {
        let two = |a: &str, b: &str| {
            format!(
                "[[route]]\n{a}listen = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n\
                 [[route]]\n{b}listen = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n"
            )
        };
        let e = err(&two("name = \"x\"\n", "name = \"x\"\n"));
        assert!(
            e.contains("test.toml") && e.contains("route[1].name") && e.contains("route[0]"),
            "{e}"
        );
        // A default name counts too.
        let e = err(&two("", "name = \"route0\"\n"));
        assert!(
            e.contains("route[1].name") && e.contains("\"route0\""),
            "{e}"
        );
        let c = parse(&two("", "")).unwrap();
        assert_eq!(c.routes[0].name, "route0");
        assert_eq!(c.routes[1].name, "route1");
    }

    #[test]
    fn taps_with_different_settings_must_not_share_a_file() {
        let route = |tap: &str| {
            format!("[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n{tap}")
        };
        let global = "[tap]\npcap = \"cap.pcap\"\n";
        // The same settings share one writer: fine.
        let c = parse(&format!(
            "{global}{}{}",
            route(""),
            route("[route.tap]\npcap = \"cap.pcap\"\n")
        ))
        .unwrap();
        assert_eq!(c.routes[0].tap, c.routes[1].tap);
        // The same file spelled another way would start a second writer on it.
        let e = err(&format!(
            "{global}{}{}",
            route(""),
            route("[route.tap]\npcap = \"./cap.pcap\"\n")
        ));
        assert!(
            e.contains("route[1].tap.pcap") && e.contains("spelled"),
            "{e}"
        );
        // Other settings, same file (however it is spelled): rejected, naming both keys.
        let e = err(&format!(
            "{global}{}{}",
            route(""),
            route("[route.tap]\npcap = \"./cap.pcap\"\nsnaplen = \"1 KiB\"\n")
        ));
        assert!(
            e.contains("test.toml")
                && e.contains("route[1].tap.pcap")
                && e.contains("`tap.pcap` (route[0])")
                && e.contains("cap.pcap"),
            "{e}"
        );
        // A pcap that is another tap's text log.
        let e = err(&format!(
            "{}{}",
            route("[route.tap]\nlog = \"t.out\"\n"),
            route("[route.tap]\npcap = \"t.out\"\n")
        ));
        assert!(
            e.contains("route[1].tap.pcap") && e.contains("route[0].tap.log"),
            "{e}"
        );
        // One tap whose log and pcap are one file.
        let e = err(&format!(
            "[tap]\nlog = \"t.out\"\npcap = \"t.out\"\n{MINIMAL}"
        ));
        assert!(
            e.contains("tap.pcap") && e.contains("also the text log"),
            "{e}"
        );
        // Nor is a character device.
        parse(&format!(
            "[tap]\nlog = \"/dev/null\"\npcap = \"/dev/null\"\n{MINIMAL}"
        ))
        .unwrap();
        // stdout is not a file: two taps may both log there.
        parse(&format!(
            "[tap]\nlog = \"-\"\n{}{}",
            route(""),
            route("[route.tap]\nlog = \"-\"\nsnaplen = \"1 KiB\"\n")
        ))
        .unwrap();
    }

    #[test]
    fn a_tap_file_conflict_from_a_flag_names_the_flag() {
        let ov = |log: &str, pcap: &str| Overrides {
            tap_log: Some(log.into()),
            tap_pcap: Some(pcap.into()),
            ..Overrides::default()
        };
        let e = Config::from_toml_str(MINIMAL, "p.toml", &ov("out.x", "./out.x"))
            .expect_err("one file for both")
            .to_string();
        assert!(
            e.contains("`--tap-pcap`") && e.contains("`--tap-log`"),
            "{e}"
        );
        assert!(!e.contains("tap.pcap"), "{e}");
    }

    /// `pcap = "-"` is stdout; the text log cannot share it, and it cannot rotate.
    #[test]
    fn a_pcap_on_stdout() {
        let c = parse(&format!("[tap]\npcap = \"-\"\n{MINIMAL}")).unwrap();
        let pcap = c.routes[0].tap.as_ref().unwrap().pcap.as_ref().unwrap();
        assert_eq!(pcap.path, Path::new(PCAP_STDOUT));
        let e = err(&format!("[tap]\npcap = \"-\"\nlog = \"-\"\n{MINIMAL}"));
        assert!(
            e.contains("`tap.pcap`") && e.contains("also where the text log goes"),
            "{e}"
        );
        let e = err(&format!(
            "[tap]\npcap = \"-\"\npcap_rotate_size = \"1 MiB\"\n{MINIMAL}"
        ));
        assert!(
            e.contains("`tap.pcap_rotate_size`") && e.contains("stdout"),
            "{e}"
        );
    }

    /// Keys whose default the reference gives as "off" take "off".
    #[test]
    fn off_is_a_value_wherever_it_is_the_default() {
        let c = parse(&format!(
            "idle_timeout = \"off\"\n[socket]\nkeepalive = \"off\"\n\
             [tap]\npcap = \"./cap.pcap\"\npcap_rotate_size = \"off\"\nsnaplen = \"OFF\"\n\
             {MINIMAL}resolve_interval = \"off\"\n"
        ))
        .unwrap();
        let tap = c.routes[0].tap.as_ref().unwrap();
        assert_eq!(tap.snaplen, None);
        assert_eq!(tap.pcap.as_ref().unwrap().rotate_bytes, None);
        assert_eq!(c.routes[0].upstream_set.resolve_interval, None);
        assert_eq!(c.routes[0].idle_timeout, None);
        // "off" with no pcap is the key left out: no complaint.
        parse(&format!(
            "[tap]\nlog = \"-\"\npcap_rotate_size = \"off\"\n{MINIMAL}"
        ))
        .unwrap();
    }

    /// `defer_accept`: off by default; whole seconds, rounded up, since the kernel counts
    /// seconds; a route's own value (`"off"` too) overrides the global one; at most a minute.
    #[test]
    fn defer_accept_rounds_up_to_seconds_and_routes_override_it() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.routes[0].defer_accept, None);
        let c = parse(&format!(
            "defer_accept = \"1500ms\"\n{MINIMAL}{MINIMAL}defer_accept = \"off\"\n\
             {MINIMAL}defer_accept = \"0s\"\n{MINIMAL}defer_accept = \"1ms\"\n"
        ))
        .unwrap();
        let got: Vec<_> = c.routes.iter().map(|r| r.defer_accept).collect();
        let secs = |n| Some(Duration::from_secs(n));
        assert_eq!(got, [secs(2), None, None, secs(1)]);
        assert_eq!(
            parse(&format!("defer_accept = \"1m\"\n{MINIMAL}"))
                .unwrap()
                .routes[0]
                .defer_accept,
            secs(60)
        );
        let e = err(&format!("{MINIMAL}defer_accept = \"61s\"\n"));
        assert!(
            e.contains("`route[0].defer_accept`") && e.contains("longer than 1m"),
            "{e}"
        );
        for key in ["defer_accept", "busy_poll"] {
            let e = err(&format!("{key} = true\n{MINIMAL}"));
            assert!(
                e.contains(&format!("`{key}`")) && e.contains("a duration such as"),
                "{e}"
            );
        }
    }

    #[test]
    fn a_value_of_the_wrong_type_names_its_key_in_the_configs_words() {
        let e = err(&format!("max_connections = \"lots\"\n{MINIMAL}"));
        assert!(
            e.contains("test.toml: `max_connections`:") && e.contains("expected a whole number"),
            "{e}"
        );
        assert!(
            e.contains("line 1"),
            "the parser's line and snippet stay: {e}"
        );
        let e = err(&format!("{MINIMAL}idle_timeout = 600\n"));
        assert!(
            e.contains("`route[0].idle_timeout`:") && e.contains("a duration such as \"5s\""),
            "{e}"
        );
        let e = err(&format!("max_connections = -1\n{MINIMAL}"));
        assert!(e.contains("expected a whole number from 1 to"), "{e}");
        let e = err(&format!("{MINIMAL}connect_attempts = -1\n"));
        assert!(e.contains("expected a whole number from 1 to"), "{e}");
        let e = err(&format!("[tap]\nlog = \"-\"\nsnaplen = -1\n{MINIMAL}"));
        assert!(e.contains("`tap.snaplen`"), "{e}");
        let e = err(&format!("buffer_size = true\n{MINIMAL}"));
        assert!(
            e.contains("`buffer_size`:") && e.contains("expected a size"),
            "{e}"
        );
        assert!(!e.contains("untagged"), "{e}");
        let e = err("[route]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n");
        assert!(
            e.contains("`route`:") && e.contains("write [[route]]"),
            "{e}"
        );
    }

    #[test]
    fn tap_flags_leave_routes_with_their_own_tap_alone_and_name_them() {
        let file = format!(
            "{MINIMAL}[route.tap]\npcap = \"own.pcap\"\n\
             [[route]]\nname = \"off\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n\
             [route.tap]\n\
             [[route]]\nname = \"plain\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\n"
        );
        let flags = Overrides {
            tap_log: Some("-".into()),
            ..Overrides::default()
        };
        let c = Config::from_toml_str(&file, "t.toml", &flags).unwrap();
        let own = c.routes[0].tap.as_ref().expect("its own tap");
        assert_eq!(
            (own.log.as_ref(), own.pcap.as_ref().map(|p| p.path.clone())),
            (None, Some(PathBuf::from("own.pcap")))
        );
        assert_eq!(c.routes[1].tap, None, "a tap turned off stays off");
        assert_eq!(
            c.routes[2].tap.as_ref().unwrap().log,
            Some(LogTarget::Stdout)
        );
        assert_eq!(c.own_taps_kept, ["route0", "off"]);
        let c = Config::from_toml_str(&file, "t.toml", &Overrides::default()).unwrap();
        assert!(c.own_taps_kept.is_empty(), "no flag, nothing to say");
    }

    #[test]
    fn a_route_tap_names_its_outputs() {
        let with = |tap: &str| format!("[tap]\npcap = \"cap.pcap\"\n{MINIMAL}{tap}");
        // An empty [route.tap] turns the tap off for the route, as does "off" for its outputs.
        assert_eq!(parse(&with("[route.tap]\n")).unwrap().routes[0].tap, None);
        let off = parse(&with("[route.tap]\nlog = \"off\"\npcap = \"OFF\"\n")).unwrap();
        assert_eq!(off.routes[0].tap, None);
        let one = parse(&with("[route.tap]\nlog = \"off\"\npcap = \"./off\"\n")).unwrap();
        let tap = one.routes[0].tap.as_ref().unwrap();
        assert_eq!(
            (tap.log.as_ref(), tap.pcap.as_ref().map(|p| p.path.clone())),
            (None, Some("./off".into()))
        );
        // Settings without an output would be ignored: rejected.
        let e = err(&with("[route.tap]\nsnaplen = \"1 KiB\"\n"));
        assert!(
            e.contains("route[0].tap.snaplen") && e.contains("names its own outputs"),
            "{e}"
        );
        // The global [tap] may hold settings for --tap-pcap / --tap-log.
        let c = Config::from_toml_str(
            &format!("[tap]\nsnaplen = \"1 KiB\"\n{MINIMAL}"),
            "test.toml",
            &Overrides {
                tap_pcap: Some("x.pcap".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(c.routes[0].tap.as_ref().unwrap().snaplen, Some(1024));
        assert_eq!(
            parse(&format!("[tap]\nsnaplen = \"1 KiB\"\n{MINIMAL}"))
                .unwrap()
                .routes[0]
                .tap,
            None
        );
    }

    #[test]
    fn an_error_in_the_files_tap_names_the_file_when_flags_add_outputs() {
        let e = Config::from_toml_str(
            &format!("[tap]\nqueue_size = \"1 KiB\"\n{MINIMAL}"),
            "q.toml",
            &Overrides {
                tap_pcap: Some("x.pcap".into()),
                ..Overrides::default()
            },
        )
        .expect_err("queue_size too small")
        .to_string();
        assert!(e.contains("q.toml") && e.contains("tap.queue_size"), "{e}");
        assert!(!e.contains("command line"), "{e}");
    }

    #[test]
    fn tap_writer_priority() {
        let with = |v: &str| format!("[tap]\npcap = \"x.pcap\"\n{v}{MINIMAL}");
        let tap = |c: Config| c.routes[0].tap.clone().expect("a tap").writer_priority;
        assert_eq!(tap(parse(&with("")).unwrap()), WriterPriority::Low);
        assert_eq!(
            tap(parse(&with("writer_priority = \"normal\"\n")).unwrap()),
            WriterPriority::Normal
        );
        let e = err(&with("writer_priority = \"high\"\n"));
        assert!(
            e.contains("test.toml") && e.contains("tap.writer_priority") && e.contains("\"high\""),
            "{e}"
        );
    }

    #[test]
    fn tap_pcap_direct_io() {
        let with = |v: &str| format!("[tap]\n{v}{MINIMAL}");
        let direct = |c: Config| {
            let tap = c.routes[0].tap.clone().expect("a tap");
            tap.pcap.expect("a pcap").direct_io
        };
        assert!(direct(parse(&with("pcap = \"x.pcap\"\n")).unwrap()));
        assert!(!direct(
            parse(&with("pcap = \"x.pcap\"\npcap_direct_io = false\n")).unwrap()
        ));
        let e = err(&with("log = \"-\"\npcap_direct_io = true\n"));
        assert!(
            e.contains("test.toml") && e.contains("tap.pcap") && e.contains("pcap_direct_io"),
            "{e}"
        );
        let e = err(&with("pcap = \"x.pcap\"\npcap_direct_io = \"yes\"\n"));
        assert!(e.contains("pcap_direct_io"), "{e}");
    }

    #[test]
    fn minimal_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.buffer_size.get(), 64 * 1024);
        assert_eq!(c.splice_pipe_size, 1024 * 1024);
        assert_eq!(c.routes.len(), 1);
        let r = &c.routes[0];
        assert_eq!(r.name, "route0");
        assert_eq!(r.connect_timeout, Duration::from_secs(5));
        assert_eq!(r.idle_timeout, Some(Duration::from_secs(600)));
        assert!(c.socket.nodelay);
        assert!(r.tap.is_none());
    }

    #[test]
    fn units_and_overrides() {
        let c = parse(
            "buffer_size = \"16 KiB\"\nidle_timeout = \"off\"\nconnect_timeout = \"250ms\"\n\
             [socket]\nkeepalive = \"30s\"\n\
             [[route]]\nlisten = \"[::1]:0\"\nupstream = \"localhost:9\"\nidle_timeout = \"2m\"\n",
        )
        .unwrap();
        assert_eq!(c.buffer_size.get(), 16 * 1024);
        let r = &c.routes[0];
        assert_eq!(r.connect_timeout, Duration::from_millis(250));
        assert_eq!(r.idle_timeout, Some(Duration::from_secs(120)));
        assert!(r.listen.is_ipv6());
        assert!(!r.upstream.is_empty());
        assert_eq!(c.socket.keepalive.unwrap().idle, Duration::from_secs(30));
    }

    #[test]
    fn flags_that_override_other_file_values_are_noted() {
        let file = format!(
            "workers = 2\nbusy_poll = \"20us\"\n[tap]\nlog = \"file.log\"\npcap = \"same.pcap\"\n\
             {MINIMAL}"
        );
        let flags = Overrides {
            workers: Some("1".into()),
            busy_poll: Some("20us".into()),
            tap_log: Some("flag.log".into()),
            tap_pcap: Some("same.pcap".into()),
            ..Overrides::default()
        };
        let c = Config::from_toml_str(&file, "t.toml", &flags).unwrap();
        // The same value from both is not worth a word.
        assert_eq!(
            c.overridden,
            [("workers", "--workers"), ("tap.log", "--tap-log")]
        );
        assert_eq!(
            c.overridden_note().unwrap(),
            "t.toml: the command line overrides `workers` by --workers, `tap.log` by --tap-log \
             (a reload keeps the flags; restart without them to use the file's)"
        );
        let routes = Overrides {
            listen: Some("127.0.0.1:0".into()),
            upstream: Some("127.0.0.1:9".into()),
            busy_poll: Some("off".into()),
            ..Overrides::default()
        };
        // A file value the flag hides need not parse: it differs.
        let file = format!("busy_poll = \"often\"\n{MINIMAL}");
        let c = Config::from_toml_str(&file, "t.toml", &routes).unwrap();
        assert_eq!(
            c.overridden,
            [
                ("busy_poll", "--busy-poll"),
                ("[[route]]", "--listen/--upstream")
            ]
        );
        let c = Config::from_toml_str(MINIMAL, "t.toml", &Overrides::default()).unwrap();
        assert_eq!(c.overridden_note(), None);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = err("bufer_size = 10\n");
        assert!(e.contains("test.toml") && e.contains("bufer_size"), "{e}");
        let e =
            err("[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:9\"\nupstraem = 1\n");
        assert!(e.contains("upstraem"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let cases = [
            ("buffer_size = 0\n", "buffer_size"),
            ("buffer_size = \"12 parsecs\"\n", "buffer_size"),
            ("connect_timeout = \"soon\"\n", "connect_timeout"),
            ("connect_timeout = \"0s\"\n", "connect_timeout"),
            ("max_connections = 0\n", "max_connections"),
            ("workers = 0\n", "workers"),
        ];
        for (text, key) in cases {
            let e = err(&format!("{text}{MINIMAL}"));
            assert!(e.contains("test.toml") && e.contains(key), "{text}: {e}");
        }
        let e = err("[[route]]\nlisten = \"nowhere\"\nupstream = \"127.0.0.1:9\"\n");
        assert!(
            e.contains("route[0].listen") && e.contains("nowhere"),
            "{e}"
        );
        let e = err("[[route]]\nlisten = \"127.0.0.1:1\"\n");
        assert!(
            e.contains("route[0].upstream") && e.contains("missing"),
            "{e}"
        );
        let e = err("[[route]]\nlisten = \"127.0.0.1:1\"\nupstream = \"127.0.0.1\"\n");
        assert!(e.contains("route[0].upstream") && e.contains("port"), "{e}");
        let e = err("");
        assert!(e.contains("no route"), "{e}");
    }

    #[test]
    fn cli_routes_replace_file_routes() {
        let ov = Overrides {
            listen: Some("127.0.0.1:0".into()),
            upstream: Some("127.0.0.1:7".into()),
            tap_pcap: Some("x.pcap".into()),
            ..Overrides::default()
        };
        let c = Config::from_toml_str(MINIMAL, "test.toml", &ov).unwrap();
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.routes[0].upstream, vec!["127.0.0.1:7".parse().unwrap()]);
        assert!(c.routes[0].tap.as_ref().unwrap().pcap.is_some());
        let bad = Overrides {
            listen: Some("127.0.0.1:0".into()),
            ..Overrides::default()
        };
        let e = Config::from_overrides(&bad).unwrap_err().to_string();
        assert!(
            e.contains("command line") && e.contains("--upstream"),
            "{e}"
        );
    }

    #[test]
    fn busy_poll_is_off_unless_set_and_the_flag_wins() {
        assert_eq!(parse(MINIMAL).unwrap().busy_poll, None);
        for off in ["off", "0s", "0us"] {
            let c = parse(&format!("busy_poll = \"{off}\"\n{MINIMAL}")).unwrap();
            assert_eq!(c.busy_poll, None, "{off}");
        }
        let c = parse(&format!("busy_poll = \"50us\"\n{MINIMAL}")).unwrap();
        assert_eq!(c.busy_poll, Some(Duration::from_micros(50)));
        let e = err(&format!("busy_poll = \"fast\"\n{MINIMAL}"));
        assert!(
            e.contains("`busy_poll`") && e.contains("not a duration"),
            "{e}"
        );
        let c = parse(&format!("busy_poll = \"1s\"\n{MINIMAL}")).unwrap();
        assert_eq!(c.busy_poll, Some(Duration::from_secs(1)));
        let e = err(&format!("busy_poll = \"1001ms\"\n{MINIMAL}"));
        assert!(
            e.contains("`busy_poll`") && e.contains("longer than 1s"),
            "{e}"
        );
        let ov = |v: &str| Overrides {
            busy_poll: Some(v.into()),
            ..Overrides::default()
        };
        let file = format!("busy_poll = \"50us\"\n{MINIMAL}");
        let c = Config::from_toml_str(&file, "test.toml", &ov("1ms")).unwrap();
        assert_eq!(c.busy_poll, Some(Duration::from_millis(1)));
        let c = Config::from_toml_str(&file, "test.toml", &ov("off")).unwrap();
        assert_eq!(c.busy_poll, None);
        let e = Config::from_toml_str(&file, "test.toml", &ov("1 parsec"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("command line") && e.contains("--busy-poll"),
            "{e}"
        );
    }

    #[test]
    fn admin_and_access_log_sections() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!((c.admin, c.access_log), (None, None));
        let c = parse(&format!(
            "[admin]\nlisten = \"127.0.0.1:9901\"\n\
             [access_log]\npath = \"/var/log/tcptap/access.log\"\nformat = \"text\"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(c.admin, Some("127.0.0.1:9901".parse().unwrap()));
        assert_eq!(
            c.access_log,
            Some(AccessLogConfig {
                path: PathBuf::from("/var/log/tcptap/access.log"),
                format: AccessLogFormat::Text,
            })
        );
        let c = parse(&format!("[access_log]\npath = \"a.log\"\n{MINIMAL}")).unwrap();
        assert_eq!(c.access_log.unwrap().format, AccessLogFormat::Json);
    }

    #[test]
    fn admin_and_access_log_errors_are_named() {
        let cases = [
            ("[admin]\n", "admin.listen", "missing"),
            (
                "[admin]\nlisten = \"localhost\"\n",
                "admin.listen",
                "localhost",
            ),
            (
                "[admin]\nlisten = \"127.0.0.1:1\"\nport = 2\n",
                "port",
                "unknown",
            ),
            (
                "[access_log]\nformat = \"json\"\n",
                "access_log.path",
                "missing",
            ),
            ("[access_log]\npath = \" \"\n", "access_log.path", "empty"),
            (
                "[access_log]\npath = \"a.log\"\nformat = \"xml\"\n",
                "access_log.format",
                "xml",
            ),
            (
                "[access_log]\npath = \"a.log\"\nrotate = true\n",
                "rotate",
                "unknown",
            ),
            (
                "[access_log]\npath = \"./cap.pcap\"\n[tap]\npcap = \"cap.pcap\"\n",
                "access_log.path",
                "also the tap pcap of route[0]",
            ),
            (
                "[access_log]\npath = \"t.log\"\n[tap]\nlog = \"t.log\"\n",
                "access_log.path",
                "also the tap log of route[0]",
            ),
        ];
        for (text, key, reason) in cases {
            let e = err(&format!("{text}{MINIMAL}"));
            assert!(
                e.contains("test.toml") && e.contains(key) && e.contains(reason),
                "{text}: {e}"
            );
        }
        let e = err("[admin]\nlisten = \"127.0.0.1:7000\"\n\
             [[route]]\nlisten = \"127.0.0.1:7000\"\nupstream = \"127.0.0.1:9\"\n");
        assert!(e.contains("admin.listen") && e.contains("route[0]"), "{e}");
    }

    #[test]
    fn transparent_and_proxy_protocol_keys() {
        let c = parse(
            "[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"original-destination\"\n\
             allowed_destinations = [\"10.0.0.0/8\", \"127.0.0.1/32:8000\", \"[fd00::]/8:443\"]\n\
             send_proxy_protocol = \"v2\"\naccept_proxy_protocol = true\nproxy_protocol_timeout = \"1s\"\n",
        )
        .unwrap();
        let r = &c.routes[0];
        assert!(r.original_destination && r.upstream.is_empty());
        assert_eq!(r.send_proxy_protocol, Some(ProxyProtocolVersion::V2));
        assert!(r.accept_proxy_protocol);
        assert_eq!(r.proxy_protocol_timeout, Duration::from_secs(1));
        let a = &r.allowed_destinations;
        assert!(a[0].matches("10.9.8.7:1".parse().unwrap()));
        assert!(!a[0].matches("11.0.0.1:1".parse().unwrap()));
        assert!(a[1].matches("127.0.0.1:8000".parse().unwrap()));
        assert!(!a[1].matches("127.0.0.1:8001".parse().unwrap()));
        assert!(a[2].matches("[fd00::5]:443".parse().unwrap()));
        assert!(!a[2].matches("[fe00::5]:443".parse().unwrap()));
        assert!(
            a[0].matches("[::ffff:10.1.1.1]:80".parse().unwrap()),
            "v4-mapped"
        );
        let e = err(
            "[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"original-destination\"\nallowed_destinations = [\"10.0.0.0/33\"]\n",
        );
        assert!(e.contains("route[0].allowed_destinations[0]"), "{e}");
        let e = err(
            "[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\nallowed_destinations = [\"10.0.0.0/8\"]\n",
        );
        assert!(e.contains("original-destination"), "{e}");
        let e = err(
            "[[route]]\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:1\"\nsend_proxy_protocol = \"v3\"\n",
        );
        assert!(e.contains("route[0].send_proxy_protocol"), "{e}");
        assert_eq!(DestinationRule::parse("0.0.0.0/0").unwrap().prefix, 0);
        assert!(
            DestinationRule::parse("0.0.0.0/0")
                .unwrap()
                .matches("1.2.3.4:5".parse().unwrap())
        );
    }

    #[test]
    fn several_upstreams() {
        let c = parse(
            "[[route]]\nlisten = \"127.0.0.1:0\"\nupstreams = [\"127.0.0.1:7001\", \"127.0.0.1:7002\"]\n\
             policy = \"first\"\nresolve_interval = \"30s\"\n\
             [route.health_check]\ninterval = \"5s\"\nrise = 4\n",
        )
        .unwrap();
        let r = &c.routes[0];
        let spec = &r.upstream_set;
        assert_eq!(spec.targets.len(), 2);
        assert_eq!(spec.targets[1].name, "127.0.0.1:7002");
        assert_eq!(spec.policy, Policy::First);
        assert_eq!(spec.connect_attempts, None);
        assert_eq!(
            crate::upstream::UpstreamSet::new("r", spec).connect_attempts(),
            2,
            "min(3, number of addresses)"
        );
        let h = spec.health_check.unwrap();
        assert_eq!(
            (h.interval, h.timeout, h.rise, h.fall),
            (Duration::from_secs(5), Duration::from_secs(1), 4, 3)
        );
        assert_eq!(spec.resolve_interval, Some(Duration::from_secs(30)));
        assert_eq!(
            r.upstream,
            vec![
                "127.0.0.1:7001".parse().unwrap(),
                "127.0.0.1:7002".parse().unwrap()
            ]
        );
        assert_eq!(r.upstream_name, "127.0.0.1:7001, 127.0.0.1:7002");

        // A single `upstream` gets the defaults.
        let c = parse(MINIMAL).unwrap();
        let spec = &c.routes[0].upstream_set;
        assert_eq!(spec.policy, Policy::RoundRobin);
        assert_eq!(
            crate::upstream::UpstreamSet::new("r", spec).connect_attempts(),
            1
        );
        assert_eq!(spec.health_check, None);
        assert_eq!(spec.resolve_interval, None);
        assert_eq!(spec.addresses(), c.routes[0].upstream);
        let c = parse(
            "[[route]]\nlisten = \"127.0.0.1:0\"\nupstreams = [\"127.0.0.1:1\", \"127.0.0.1:2\", \
             \"127.0.0.1:3\", \"127.0.0.1:4\"]\npolicy = \"least_connections\"\nconnect_attempts = 9\n\
             [route.health_check]\n",
        )
        .unwrap();
        let spec = &c.routes[0].upstream_set;
        assert_eq!(spec.policy, Policy::LeastConnections);
        assert_eq!(spec.connect_attempts, Some(9));
        assert_eq!(spec.health_check, Some(HealthCheck::default()));
    }

    #[test]
    fn upstreams_errors_are_named() {
        const ROUTE: &str = "[[route]]\nlisten = \"127.0.0.1:0\"\n";
        const TWO: &str = "upstreams = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n";
        let cases = [
            (
                "upstream = \"127.0.0.1:1\"\nupstreams = [\"127.0.0.1:2\"]\n".to_string(),
                "route[0].upstreams",
                "not both",
            ),
            (
                "upstreams = []\n".to_string(),
                "route[0].upstreams",
                "at least one",
            ),
            (
                "upstreams = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\n".to_string(),
                "route[0].upstreams[1]",
                "twice",
            ),
            (
                "upstreams = [\"original-destination\"]\n".to_string(),
                "route[0].upstreams[0]",
                "single",
            ),
            (
                "upstreams = [\"127.0.0.1:1\", \"127.0.0.1\"]\n".to_string(),
                "route[0].upstreams[1]",
                "port",
            ),
            (
                format!("{TWO}policy = \"random\"\n"),
                "route[0].policy",
                "random",
            ),
            (
                format!("{TWO}connect_attempts = 0\n"),
                "route[0].connect_attempts",
                "at least 1",
            ),
            (
                format!("{TWO}resolve_interval = \"often\"\n"),
                "route[0].resolve_interval",
                "not a duration",
            ),
            (
                format!("{TWO}[route.health_check]\ninterval = \"soon\"\n"),
                "route[0].health_check.interval",
                "not a duration",
            ),
            (
                format!("{TWO}[route.health_check]\ntimeout = \"0s\"\n"),
                "route[0].health_check.timeout",
                "greater than zero",
            ),
            (
                format!("{TWO}[route.health_check]\ninterval = \"1s\"\ntimeout = \"2s\"\n"),
                "route[0].health_check.timeout",
                "2s is longer than the interval",
            ),
            (
                format!("{TWO}[route.health_check]\ninterval = \"500ms\"\n"),
                "route[0].health_check.timeout",
                "1s (the default) is longer than the interval (500ms)",
            ),
            (
                format!("{TWO}[route.health_check]\nrise = 0\n"),
                "route[0].health_check.rise",
                "at least 1",
            ),
            (
                format!("{TWO}[route.health_check]\nfall = 0\n"),
                "route[0].health_check.fall",
                "at least 1",
            ),
            (
                format!("{TWO}[route.health_check]\npath = \"/\"\n"),
                "path",
                "unknown",
            ),
            (
                "upstream = \"original-destination\"\npolicy = \"first\"\n".to_string(),
                "route[0].policy",
                "original-destination",
            ),
            (
                "upstream = \"original-destination\"\n[route.health_check]\n".to_string(),
                "route[0].health_check",
                "original-destination",
            ),
        ];
        for (text, key, reason) in cases {
            let e = err(&format!("{ROUTE}{text}"));
            assert!(
                e.contains("test.toml") && e.contains(key) && e.contains(reason),
                "{text}: {e}"
            );
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64 KiB"), Some(65536));
        assert_eq!(parse_size("16MiB"), Some(16 << 20));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("1 G"), Some(1 << 30));
        assert_eq!(parse_size("KiB"), None);
        assert_eq!(parse_size("5 parsecs"), None);
    }
}
