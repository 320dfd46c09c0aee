//! tcptap: a transparent TCP proxy with a traffic tap.

pub mod orig_dst;
pub mod proxy_protocol;
pub mod tap;
