//! Test bed: real valkey-server / redis-server processes with the module loaded, a real SeaweedFS
//! (started by scripts/s3.sh, shared by all tests, one bucket per test), and a fault-injecting proxy.
#![allow(dead_code)]

pub mod aws;
pub mod checker;
pub mod cluster;
pub mod fixtures;
pub mod http;
pub mod index;
pub mod proxy;
pub mod resp;
pub mod s3;
pub mod s3front;
pub mod server;
pub mod sigv4;
pub mod tls;

pub use fixtures::*;
pub use s3::*;
pub use server::*;
