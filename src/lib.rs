//! tcptap: a transparent TCP proxy with a traffic tap.

pub mod tap;
