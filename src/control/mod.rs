//! The control socket of `archip up`: the protocol, the server the `up` process runs, and the
//! blocking client the other commands use.

pub mod client;
pub mod protocol;
pub mod server;
