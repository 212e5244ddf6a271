//! The module inside the server: main-thread hand-off, change watch, server calls, pools, its own
//! heap, ACL and cluster checks.

pub mod acl;
pub mod blocking;
pub mod cluster;
pub mod heap;
mod keyspec;
pub mod mainthread;
pub mod pool;
pub mod reply;
pub mod server;
pub mod watch;
