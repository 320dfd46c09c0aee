//! tcptap: a transparent TCP proxy with a traffic tap.
//!
//! A single-threaded `mio` event loop accepts downstream (client) connections, opens one upstream
//! connection for each, and copies bytes both ways through bounded per-direction buffers, unmodified.
//! EOF on one side becomes `shutdown(Write)` on the other once the buffered bytes are written (the
//! other direction keeps flowing); a reset on one side resets the other. When a route has a tap, every
//! chunk read is also handed, without blocking, to a writer thread that renders a live text log and/or
//! a pcap file; when its queue is full, records are dropped and counted, never waited for.
//!
//! # Layout
//! - [`config`]: `proxy.toml` and command-line overrides → checked [`config::Config`].
//! - [`net`]: every socket option (socket2) and the listener/connect helpers; setup errors.
//! - [`event_loop`]: the `Poll`, the slab of pairs, accepting, timers, signals, graceful shutdown.
//! - [`pair`]: one downstream + upstream socket and their two pipes; why a pair closed.
//! - [`pipe`]: one direction's state machine (`OPEN` → `READ-CLOSED` → `WRITE-SHUT`) over any Read/Write.
//! - [`buffer`]: fixed-capacity buffers and the pool that lends them only while bytes are in flight.
//! - [`fd_budget`]: the open-file budget that connections and kernel pipes share.
//! - [`splice`]: the zero-copy path (socket → kernel pipe → socket) for bulk data, and the
//!   `tee(2)` that hands a tap its copy.
//! - [`tap`]: records, the bounded hand-off queue, the writer thread, text and pcap output.
//! - [`stats`]: process-wide counters.
//! - [`logging`]: the process log, written to stderr off the event loops through a bounded queue.
//! - [`proxy_protocol`]: HAProxy PROXY protocol v1/v2 encoder and bounded incremental parser.
//! - [`upstream`]: several upstreams per route: policy, connect retries, health checks, DNS re-resolution.
//! - [`notify`]: `READY=1`, `RELOADING=1`, `STOPPING=1` to systemd (`NOTIFY_SOCKET`).
//! - [`orig_dst`]: the original destination of a redirected connection (`SO_ORIGINAL_DST`), TPROXY.

#![warn(rust_2018_idioms, missing_debug_implementations, missing_docs)]

pub mod access_log;
pub mod admin;
pub mod batch_file;
pub mod buffer;
pub mod config;
pub mod event_loop;
pub mod fd_budget;
pub mod flush;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod notify;
pub mod orig_dst;
pub mod pair;
pub mod pipe;
pub mod proxy_protocol;
pub mod splice;
pub mod stats;
pub mod tap;
pub mod upstream;

pub use config::{Config, ConfigError, Overrides};
pub use event_loop::{Exit, Server, ShutdownHandle};
pub use net::SetupError;
