//! The module inside the server: main-thread hand-off, change watch, server calls and key reads, pools, its own
//! heap, ACL and cluster checks, and the commands' registration.

pub mod acl;
pub mod blocking;
pub mod cluster;
pub mod heap;
pub mod key;
pub mod mainthread;
pub mod pool;
pub mod registration;
pub mod reply;
pub mod server;
pub mod watch;
