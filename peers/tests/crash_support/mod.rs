//! Helpers of the crash test: the model of volume contents, the peer processes, and the
//! workload.

pub mod image;
pub mod procs;
pub mod workload;
