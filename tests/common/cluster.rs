//! Cluster test bed: a real Valkey Cluster on loopback (3 primaries, 3 replicas), the module loaded on
//! every node with AOF on, slots assigned with ADDSLOTSRANGE and the nodes joined with MEET/REPLICATE
//! (no external tool), killed on drop. Plus the cluster-mode flow layout, a cluster client, the
//! per-slot index naming, and a checker for "every flow live with all its events or archived and
//! readable with exactly its events, no index entry outside its owner".

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use redis::cluster_routing::get_slot;
use redis::ConnectionLike;

use super::*;

/// Slot ranges of the three primaries.
pub const RANGES: [(u16, u16); 3] = [(0, 5460), (5461, 10922), (10923, 16383)];

/// The index-key the bed configures; the index of slot S is `slot_index_key(S)`.
pub const INDEX_KEY: &str = "archived:flows";

/// The flow layout in cluster mode: every per-flow key carries the id as hash tag, the engine-wide
/// indexes are absent (status and last update come from the end of the event log).
pub fn layout_args() -> Vec<String> {
    [
        ("events-key", "$prefix:flow:{$id}:events"),
        ("snapshot-key", "$prefix:flow:{$id}:snapshot:val"),
        ("seq-key", "$prefix:flow:{$id}:snapshot:seq"),
        ("labels-key", "$prefix:flow:{$id}:idx:labels"),
        ("status-key", ""),
        ("status-set-key", ""),
        ("label-set-key", ""),
        ("label-values-key", ""),
        ("lease-key", "$prefix:archive:lease:{$id}"),
        ("index-key", INDEX_KEY),
    ]
    .iter()
    .flat_map(|(k, v)| [k.to_string(), v.to_string()])
    .collect()
}

/// The smallest non-negative integer whose decimal text hashes to `slot`: the hash tag of the slot's
/// index (`<index-key>:{N}`), as docs/CLUSTER.md documents.
pub fn slot_tag(slot: u16) -> u32 {
    static TABLE: std::sync::OnceLock<Vec<u32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = vec![u32::MAX; 16384];
        let mut missing = 16384;
        let mut n = 0u32;
        while missing > 0 {
            let s = get_slot(n.to_string().as_bytes()) as usize;
            if table[s] == u32::MAX {
                table[s] = n;
                missing -= 1;
            }
            n += 1;
        }
        table
    })[slot as usize]
}

pub fn slot_index_key(slot: u16) -> String {
    format!("{INDEX_KEY}:{{{}}}", slot_tag(slot))
}

pub fn slot_of(id: &str) -> u16 {
    get_slot(id.as_bytes())
}

/// The keys of a flow in the cluster layout.
pub fn tagged_keys(id: &str) -> [String; 4] {
    ["events", "snapshot:val", "snapshot:seq", "idx:labels"]
        .map(|s| format!("argyll:flow:{{{id}}}:{s}"))
}

/// A flow of the tests: what was written, so the checker can compare.
#[derive(Clone, Debug)]
pub struct TFlow {
    pub id: String,
    pub status: &'static str,
    pub last_ms: i64,
    pub events: usize,
}

impl TFlow {
    /// A completed flow of at least 5 events: without a status index (the cluster layout) a flow is
    /// terminal by its log's end, the engine's `flow_completed`, `flow_deactivated` (events 3 and 4).
    pub fn done(id: impl Into<String>, events: usize) -> TFlow {
        TFlow {
            id: id.into(),
            status: "completed",
            last_ms: LONG_AGO,
            events: events.max(5),
        }
    }

    pub fn eligible(&self) -> bool {
        self.status != "active" && self.last_ms == LONG_AGO
    }

    fn spec(&self) -> FlowSpec<'_> {
        FlowSpec {
            id: &self.id,
            status: self.status,
            last_ms: self.last_ms,
            events: self.events,
            labels: &[("tenant", "acme")],
            compact_events: false,
            snapshot: Snapshot::None,
        }
    }

    /// The engine's state of the flow, what FLOWARCHIVE.GET answers while it is live.
    pub fn state(&self) -> String {
        state_json(&self.spec())
    }

    pub fn event_list(&self) -> Vec<String> {
        events_of(&self.spec())
    }

    /// Writes the flow's keys (all in the id's slot) through any connection, cluster or not: its
    /// event log and labels, no snapshot (as the engine writes most flows).
    pub fn write(&self, c: &mut impl ConnectionLike) {
        let [events, _, _, labels] = tagged_keys(&self.id);
        redis::cmd("RPUSH")
            .arg(&events)
            .arg(self.event_list())
            .query::<()>(c)
            .unwrap();
        redis::cmd("HSET")
            .arg(&labels)
            .arg("tenant")
            .arg("acme")
            .query::<()>(c)
            .unwrap();
    }
}

/// The node options of a cluster member whose cluster bus listens on `bus`. Its node timeout is long
/// enough that a node the test leaves running is not taken for failed on a busy machine (at 1.5 s, a
/// primary was failed over in the middle of a sweep while two test runs shared the two cores); a
/// node the test kills is still replaced within seconds.
fn node_opts(flavor: Flavor, module_args: &[String], server_args: &[&str], bus: u16) -> ServerOpts {
    let bus = bus.to_string();
    let mut extra = vec![
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-port",
        &bus,
        "--cluster-node-timeout",
        "5000",
        "--cluster-replica-validity-factor",
        "0",
        "--cluster-allow-replica-migration",
        "no",
        "--appendonly",
        "yes",
        "--enable-module-command",
        "yes",
    ];
    extra.extend_from_slice(server_args);
    ServerOpts {
        flavor,
        module_args: module_args.to_vec(),
        extra: extra.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
    }
}

/// A running cluster. `nodes[0..3]` start as the primaries of `RANGES`, `nodes[3 + i]` as the
/// replica of `nodes[i]`; failovers change that, `role` and `owner` tell the truth.
pub struct Cluster {
    pub nodes: Vec<Server>,
    pub ids: Vec<String>,
    /// The cluster bus port of each node.
    pub bus: Vec<u16>,
    pub flavor: Flavor,
}

impl Cluster {
    /// Six nodes with `module_args` (S3 and the cluster layout), slots assigned, replicas attached,
    /// `cluster_state:ok` everywhere.
    pub fn start(flavor: Flavor, module_args: &[String]) -> Cluster {
        Cluster::start_with(flavor, module_args, &[])
    }

    /// [`Cluster::start`] with more server options on every node (e.g. `--cluster-databases 4`).
    pub fn start_with(flavor: Flavor, module_args: &[String], server_args: &[&str]) -> Cluster {
        let bus: Vec<u16> = (0..6).map(|_| stable_free_port()).collect();
        let nodes: Vec<Server> = bus
            .iter()
            .map(|&b| Server::start(node_opts(flavor, module_args, server_args, b)))
            .collect();
        let ids: Vec<String> = nodes
            .iter()
            .map(|n| cmd(&mut n.conn(), &["CLUSTER", "MYID"]).unwrap())
            .collect();
        let cluster = Cluster {
            nodes,
            ids,
            bus,
            flavor,
        };
        for (i, (start, end)) in RANGES.iter().enumerate() {
            cluster
                .on::<()>(
                    i,
                    &[
                        "CLUSTER",
                        "ADDSLOTSRANGE",
                        &start.to_string(),
                        &end.to_string(),
                    ],
                )
                .unwrap();
        }
        for j in 1..6 {
            let bus = cluster.bus[j];
            cluster
                .on::<()>(
                    0,
                    &[
                        "CLUSTER",
                        "MEET",
                        "127.0.0.1",
                        &cluster.nodes[j].port.to_string(),
                        &bus.to_string(),
                    ],
                )
                .unwrap();
        }
        wait_for(
            "every node knows six nodes",
            Duration::from_secs(30),
            || {
                (0..6).all(|i| {
                    cluster
                        .on::<String>(i, &["CLUSTER", "NODES"])
                        .map(|s| s.lines().count() == 6)
                        .unwrap_or(false)
                })
            },
        );
        for r in 3..6 {
            let primary = cluster.ids[r - 3].clone();
            // The replica must have learnt the primary's role from gossip first.
            wait_for(
                "the replica accepts REPLICATE",
                Duration::from_secs(30),
                || {
                    cluster
                        .on::<()>(r, &["CLUSTER", "REPLICATE", &primary])
                        .is_ok()
                },
            );
        }
        cluster.wait_full();
        cluster
    }

    /// Waits until the cluster is healthy and every range has one replica, in every node's view.
    pub fn wait_full(&self) {
        wait_for("a replica for every range", Duration::from_secs(60), || {
            (0..self.nodes.len()).all(|i| {
                self.slot_map(i)
                    .iter()
                    .all(|(_, _, replicas)| replicas.len() == 1)
            })
        });
        self.wait_healthy(Duration::from_secs(60));
    }

    pub fn conn(&self, i: usize) -> redis::Connection {
        self.nodes[i].conn()
    }

    /// One command on node `i`.
    pub fn on<T: redis::FromRedisValue>(&self, i: usize, args: &[&str]) -> redis::RedisResult<T> {
        cmd(&mut self.conn(i), args)
    }

    pub fn alive(&mut self, i: usize) -> bool {
        self.nodes[i].alive()
    }

    /// A cluster client seeded with every live node.
    pub fn client(&mut self) -> redis::cluster::ClusterConnection {
        let live: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.alive(i)).collect();
        let seeds: Vec<String> = live
            .into_iter()
            .map(|i| format!("redis://127.0.0.1:{}/", self.nodes[i].port))
            .collect();
        redis::cluster::ClusterClientBuilder::new(seeds)
            .response_timeout(Duration::from_secs(60))
            .retries(20)
            .build()
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Index of the node listening on `port`.
    fn by_port(&self, port: u16) -> Option<usize> {
        self.nodes.iter().position(|n| n.port == port)
    }

    /// slot range -> (primary, replicas) by node index, as the live node `asker` sees it.
    pub fn slot_map(&self, asker: usize) -> Vec<((u16, u16), usize, Vec<usize>)> {
        let slots: Vec<redis::Value> = self.on(asker, &["CLUSTER", "SLOTS"]).unwrap();
        slots
            .iter()
            .map(|range| {
                let redis::Value::Array(parts) = range else {
                    panic!("CLUSTER SLOTS: {range:?}")
                };
                let int = |v: &redis::Value| redis::from_redis_value::<i64>(v).unwrap();
                let port = |v: &redis::Value| {
                    let redis::Value::Array(node) = v else {
                        panic!("node {v:?}")
                    };
                    self.by_port(int(&node[1]) as u16).unwrap()
                };
                (
                    (int(&parts[0]) as u16, int(&parts[1]) as u16),
                    port(&parts[2]),
                    parts[3..].iter().map(port).collect(),
                )
            })
            .collect()
    }

    /// Some live node that is a primary with slots.
    pub fn any_live(&mut self) -> usize {
        (0..self.nodes.len()).find(|&i| self.alive(i)).unwrap()
    }

    /// The node serving `slot` as primary.
    pub fn owner(&mut self, slot: u16) -> usize {
        let asker = self.any_live();
        self.slot_map(asker)
            .into_iter()
            .find(|((a, b), _, _)| (*a..=*b).contains(&slot))
            .map(|(_, p, _)| p)
            .unwrap_or_else(|| panic!("slot {slot} not served"))
    }

    /// The primaries serving slots, by node index.
    pub fn primaries(&mut self) -> Vec<usize> {
        let asker = self.any_live();
        let set: BTreeSet<usize> = self
            .slot_map(asker)
            .into_iter()
            .map(|(_, p, _)| p)
            .collect();
        set.into_iter().collect()
    }

    /// Some node other than `i` (for provoking -MOVED).
    pub fn other_than(&mut self, i: usize) -> usize {
        self.primaries().into_iter().find(|&p| p != i).unwrap()
    }

    /// How many -MOVED replies node `i` has sent (INFO errorstats).
    pub fn moved(&self, i: usize) -> i64 {
        let info: String = self.on(i, &["INFO", "errorstats"]).unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("errorstat_MOVED:count="))
            .map(|n| n.trim().parse().unwrap())
            .unwrap_or(0)
    }

    pub fn moved_total(&mut self) -> i64 {
        let live: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.alive(i)).collect();
        live.into_iter().map(|i| self.moved(i)).sum()
    }

    /// Waits until every live node reports `cluster_state:ok`, every range has a primary that all live
    /// nodes agree on, and every live replica's link to its primary is up.
    pub fn wait_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            match self.health() {
                Ok(()) => return,
                Err(why) if Instant::now() > deadline => panic!("cluster not healthy: {why}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Whether node `i` answers PING (a killed or stopped node does not).
    fn answers(&self, i: usize) -> bool {
        let url = format!("redis://127.0.0.1:{}/", self.nodes[i].port);
        redis::Client::open(url)
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .and_then(|mut c| cmd::<String>(&mut c, &["PING"]))
            .is_ok()
    }

    fn health(&self) -> Result<(), String> {
        let live: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.answers(i)).collect();
        let mut views = BTreeSet::new();
        for &i in &live {
            let info: String = self
                .on(i, &["CLUSTER", "INFO"])
                .map_err(|e| e.to_string())?;
            if !info.contains("cluster_state:ok") {
                return Err(format!("node {i}: {info}"));
            }
            let map: Vec<((u16, u16), usize)> = self
                .slot_map(i)
                .into_iter()
                .map(|(r, p, _)| (r, p))
                .collect();
            views.insert(format!("{map:?}"));
            let repl: String = self.on(i, &["INFO", "replication"]).unwrap();
            if repl.contains("role:slave") && !repl.contains("master_link_status:up") {
                return Err(format!("node {i} replication: {repl}"));
            }
        }
        if views.len() != 1 {
            return Err(format!("nodes disagree on the slot map: {views:?}"));
        }
        Ok(())
    }

    /// FLOWARCHIVE.SWEEP on node `i`, as a field map.
    pub fn sweep(
        &self,
        i: usize,
        args: &[&str],
    ) -> redis::RedisResult<std::collections::HashMap<String, redis::Value>> {
        sweep(&mut self.conn(i), args)
    }

    /// Waits until no live node runs a sweep.
    pub fn wait_sweeps_done(&mut self, timeout: Duration) {
        let live: Vec<usize> = (0..self.nodes.len()).filter(|&i| self.alive(i)).collect();
        wait_for("sweeps to finish", timeout, || {
            live.iter()
                .all(|&i| info_field(&mut self.conn(i), "sweep_running") == 0)
        });
    }

    /// The cron script pointed at node `i`: (exit code, stdout, stderr).
    pub fn cron(&self, i: usize) -> (i32, String, String) {
        self.cron_with(i, &[])
    }

    /// [`Cluster::cron`] with more environment (e.g. FLOWARCHIVE_USER).
    pub fn cron_with(&self, i: usize, env: &[(&str, &str)]) -> (i32, String, String) {
        let out = std::process::Command::new("python3")
            .arg(root().join("scripts/flowarchive-sweep"))
            .env("FLOWARCHIVE_PORT", self.nodes[i].port.to_string())
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Waits until every primary's replicas have acknowledged all it has written (replication is
    /// asynchronous: a primary killed before would take its last writes with it).
    pub fn wait_replicated(&mut self) {
        let asker = self.any_live();
        for (_, p, replicas) in self.slot_map(asker) {
            let wanted = replicas.len().to_string();
            let acked: i64 = cmd(&mut self.conn(p), &["WAIT", &wanted, "60000"]).unwrap();
            assert_eq!(acked, replicas.len() as i64, "node {p}'s replicas in 60 s");
        }
    }

    /// Every primary's replicas hold exactly its data (after WAIT).
    pub fn assert_replicas_equal(&mut self) {
        let asker = self.any_live();
        for (_, p, replicas) in self.slot_map(asker) {
            let mut pc = self.conn(p);
            let _: i64 = cmd(&mut pc, &["WAIT", &replicas.len().to_string(), "10000"]).unwrap();
            let primary = dump_all(&mut pc);
            for r in replicas {
                let mut rc = self.conn(r);
                // A replica answers -MOVED for its slots unless the connection reads from replicas.
                cmd::<()>(&mut rc, &["READONLY"]).unwrap();
                wait_for("the replica to catch up", Duration::from_secs(10), || {
                    dump_all(&mut rc) == primary
                });
            }
        }
    }

    /// Slots of the range served by node `i` that hold at least one of `flows`.
    pub fn slots_with_flows(&mut self, i: usize, flows: &[TFlow]) -> Vec<u16> {
        let mut out: Vec<u16> = flows
            .iter()
            .map(|f| slot_of(&f.id))
            .filter(|&s| self.owner(s) == i)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        out.sort();
        out
    }

    /// Moves `slots` from primary `from` to primary `to`: CLUSTER MIGRATESLOTS (atomic slot migration)
    /// when the server has it, else the classic IMPORTING/MIGRATING + MIGRATE + SETSLOT NODE resharding.
    pub fn move_slots(&mut self, slots: &[u16], from: usize, to: usize) {
        if self.has_migrateslots(from) {
            let texts: Vec<String> = slots.iter().map(u16::to_string).collect();
            let mut args = vec!["CLUSTER", "MIGRATESLOTS", "SLOTSRANGE"];
            for s in &texts {
                args.extend([s.as_str(), s.as_str()]);
            }
            args.extend(["NODE", self.ids[to].as_str()]);
            self.on::<()>(from, &args).unwrap();
            for &s in slots {
                wait_for("the slot to move", Duration::from_secs(60), || {
                    self.owner(s) == to
                });
            }
        } else {
            for &s in slots {
                self.classic_move(s, from, to);
            }
        }
        self.wait_healthy(Duration::from_secs(60));
    }

    pub fn has_migrateslots(&self, i: usize) -> bool {
        let info: Vec<redis::Value> = self
            .on(i, &["COMMAND", "INFO", "CLUSTER|MIGRATESLOTS"])
            .unwrap();
        !matches!(info.first(), None | Some(redis::Value::Nil))
    }

    fn classic_move(&mut self, slot: u16, from: usize, to: usize) {
        let s = slot.to_string();
        self.on::<()>(
            to,
            &["CLUSTER", "SETSLOT", &s, "IMPORTING", &self.ids[from]],
        )
        .unwrap();
        self.on::<()>(
            from,
            &["CLUSTER", "SETSLOT", &s, "MIGRATING", &self.ids[to]],
        )
        .unwrap();
        let port = self.nodes[to].port.to_string();
        loop {
            let keys: Vec<String> = self
                .on(from, &["CLUSTER", "GETKEYSINSLOT", &s, "100"])
                .unwrap();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", &port, "", "0", "10000", "KEYS"];
            args.extend(keys.iter().map(String::as_str));
            self.on::<()>(from, &args).unwrap();
        }
        for i in [to, from] {
            self.on::<()>(i, &["CLUSTER", "SETSLOT", &s, "NODE", &self.ids[to]])
                .unwrap();
        }
        for i in 0..self.nodes.len() {
            if i != to && i != from && self.alive(i) {
                let _ = self.on::<()>(i, &["CLUSTER", "SETSLOT", &s, "NODE", &self.ids[to]]);
            }
        }
    }

    /// The index hashes on node `i` (its local keys) with their fields.
    pub fn index_entries(&self, i: usize) -> BTreeMap<String, BTreeSet<String>> {
        let mut c = self.conn(i);
        let keys: Vec<String> = cmd(&mut c, &["KEYS", &format!("{INDEX_KEY}*")]).unwrap();
        keys.into_iter()
            .map(|k| {
                let fields: Vec<String> = cmd(&mut c, &["HKEYS", &k]).unwrap();
                (k, fields.into_iter().collect())
            })
            .collect()
    }

    /// The checker. Every flow of `flows` is either live with exactly its events and snapshot and no
    /// index entry, or archived (index entry, no live key) and readable through FLOWARCHIVE.GET EVENTS
    /// with exactly its events and snapshot; every index hash sits on the primary that owns its slot
    /// and is named for that slot, and holds only flows of that slot. Answers the archived ids.
    pub fn check(&mut self, flows: &[TFlow]) -> BTreeSet<String> {
        let mut client = self.client();
        let mut indexed: BTreeMap<String, usize> = BTreeMap::new();
        let asker = self.any_live();
        let mut served: BTreeMap<usize, Vec<(u16, u16)>> = BTreeMap::new();
        for (range, p, _) in self.slot_map(asker) {
            served.entry(p).or_default().push(range);
        }
        for (p, ranges) in served {
            for (key, fields) in self.index_entries(p) {
                let slot = get_slot(key.as_bytes());
                assert!(
                    ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot)),
                    "index hash {key} (slot {slot}) on node {p}, which serves {ranges:?}"
                );
                assert_eq!(key, slot_index_key(slot), "index hash name for slot {slot}");
                for f in fields {
                    assert_eq!(
                        slot_of(&f),
                        slot,
                        "index entry {f} in {key} is outside its slot"
                    );
                    assert!(indexed.insert(f.clone(), p).is_none(), "{f} indexed twice");
                }
            }
        }
        let mut archived = BTreeSet::new();
        for f in flows {
            let live: i64 = redis::cmd("EXISTS")
                .arg(&tagged_keys(&f.id)[0])
                .query(&mut client)
                .unwrap();
            let (state, events): (String, Vec<String>) = redis::cmd("FLOWARCHIVE.GET")
                .arg(&f.id)
                .arg("EVENTS")
                .query(&mut client)
                .unwrap_or_else(|e| panic!("GET {} EVENTS: {e}", f.id));
            assert_eq!(events, f.event_list(), "events of {}", f.id);
            if live == 1 {
                assert!(!indexed.contains_key(&f.id), "{} live and indexed", f.id);
                assert_eq!(state, f.state(), "live state of {}", f.id);
                let [events, _, _, labels] = tagged_keys(&f.id);
                for k in [events, labels] {
                    let n: i64 = redis::cmd("EXISTS").arg(&k).query(&mut client).unwrap();
                    assert_eq!(n, 1, "{k} of live flow {}", f.id);
                }
            } else {
                assert!(indexed.contains_key(&f.id), "{} gone but not indexed", f.id);
                let live = f.state();
                let want = format!("{},\"archived\":true}}", &live[..live.len() - 1]);
                assert_eq!(state, want, "archived state of {}", f.id);
                for k in tagged_keys(&f.id) {
                    let n: i64 = redis::cmd("EXISTS").arg(&k).query(&mut client).unwrap();
                    assert_eq!(n, 0, "{k} of archived flow {}", f.id);
                }
                archived.insert(f.id.clone());
            }
        }
        let known: BTreeSet<&String> = flows.iter().map(|f| &f.id).collect();
        for id in indexed.keys() {
            assert!(known.contains(id), "unknown flow {id} indexed");
        }
        archived
    }
}

/// The quick variant by default; FLOWARCHIVE_CHAOS=long for the long one.
pub fn long_chaos() -> bool {
    std::env::var("FLOWARCHIVE_CHAOS").as_deref() == Ok("long")
}
