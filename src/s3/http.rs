//! One HTTP agent — one pool of kept-alive connections — for the whole server, shared by FLOW, GET
//! and the sweep workers. Building an agent per request opened a new TCP (and TLS) connection every
//! time. The agent is rebuilt when the endpoint or the TLS settings change (`tls-ca-file`, or the
//! file's content as seen by its size and modification time); requests already holding the old agent
//! finish on it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::SystemTime;

use super::{fail, FailureKind, StoreError};
use crate::sync::lock;

/// Idle connections kept per host: more than the largest worker pool would hold at once is waste.
const IDLE_PER_HOST: usize = 32;

#[derive(Clone, PartialEq)]
struct Key {
    /// Scheme, host and port of the endpoint.
    origin: String,
    ca_file: String,
    ca_stamp: Option<(SystemTime, u64)>,
}

static AGENT: Mutex<Option<(Key, ureq::Agent)>> = Mutex::new(None);
static BUILT: AtomicU64 = AtomicU64::new(0);

/// Agents (connection pools) built since load.
pub fn pools_built() -> u64 {
    BUILT.load(Ordering::Relaxed)
}

fn stamp(path: &str) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// The shared agent for `endpoint` (a URL) with `ca_file` trusted besides the system roots. Called on
/// worker threads (a new agent reads the trust store).
pub fn agent(endpoint: &url::Url, ca_file: &str) -> Result<ureq::Agent, StoreError> {
    let key = Key {
        origin: endpoint.origin().ascii_serialization(),
        ca_file: ca_file.to_string(),
        ca_stamp: (!ca_file.is_empty()).then(|| stamp(ca_file)).flatten(),
    };
    let mut slot = lock(&AGENT);
    if let Some((k, agent)) = slot.as_ref() {
        if *k == key {
            return Ok(agent.clone());
        }
    }
    let mut builder = ureq::AgentBuilder::new()
        .redirects(0)
        .max_idle_connections(4 * IDLE_PER_HOST)
        .max_idle_connections_per_host(IDLE_PER_HOST);
    // A plain-HTTP endpoint needs no trust store (reading it takes milliseconds).
    if endpoint.scheme() == "https" {
        let tls = super::tls::client_config(ca_file).map_err(|e| fail(FailureKind::Config, e))?;
        builder = builder.tls_config(tls);
    }
    let agent = builder.build();
    BUILT.fetch_add(1, Ordering::Relaxed);
    *slot = Some((key, agent.clone()));
    Ok(agent)
}
