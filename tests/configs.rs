//! Module configs, loading and the compatibility subset on Valkey 8.0 and Redis 7.0.

mod common;

use common::*;

#[test]
fn configs_validate_and_keep_the_old_value() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    assert_eq!(config(&mut c, "flowarchive.retention"), "30d");
    assert_eq!(config(&mut c, "flowarchive.key-prefix"), "argyll");
    assert_eq!(config(&mut c, "flowarchive.index-key"), "archived:flows");
    assert_eq!(
        config(&mut c, "flowarchive.events-key"),
        "$prefix:flow:$id:events"
    );
    assert_eq!(config(&mut c, "flowarchive.bucket"), s3.name());
    assert_eq!(config(&mut c, "flowarchive.verify"), "auto");

    let cases = [
        ("flowarchive.retention", "30 days", "needs a unit"),
        ("flowarchive.retention", "12", "needs a unit"),
        ("flowarchive.endpoint", "ftp://x", "http"),
        (
            "flowarchive.endpoint",
            "http://user:pa55w0rd@127.0.0.1:1",
            "must not carry credentials",
        ),
        ("flowarchive.bucket", "Bad_Bucket", "bucket must be"),
        ("flowarchive.prefix", "/lead", "must not start"),
        (
            "flowarchive.events-key",
            "$prefix:events",
            "must contain $id",
        ),
        (
            "flowarchive.status-set-key",
            "$prefix:$nope",
            "unknown placeholder",
        ),
        ("flowarchive.concurrency", "0", ""),
        ("flowarchive.verify", "never", ""),
        ("flowarchive.path-style", "maybe", ""),
    ];
    for (name, bad, reason) in cases {
        let before = config(&mut c, name);
        let e = config_set(&mut c, name, bad).unwrap_err().to_string();
        assert!(e.contains(reason), "{name}={bad}: {e}");
        assert!(!e.contains("pa55w0rd"), "{name}: {e}");
        assert_eq!(config(&mut c, name), before, "{name} kept");
    }
    config_set(&mut c, "flowarchive.retention", "90s").unwrap();
    assert_eq!(config(&mut c, "flowarchive.retention"), "90s");
    config_set(&mut c, "flowarchive.verify", "put-response").unwrap();
    assert_eq!(config(&mut c, "flowarchive.verify"), "put-response");
    config_set(&mut c, "flowarchive.status-key", "").unwrap();
    config_set(
        &mut c,
        "flowarchive.events-key",
        "$prefix:{flow:$id}:events",
    )
    .unwrap();
    assert_eq!(
        config(&mut c, "flowarchive.events-key"),
        "$prefix:{flow:$id}:events"
    );
}

#[test]
fn the_secret_is_never_shown() {
    let s3 = S3::new_bucket();
    let srv = Server::start(ServerOpts::new(&s3));
    let mut c = srv.conn();
    assert_eq!(config(&mut c, "flowarchive.secret-key"), "");
    let all: Vec<String> = cmd(&mut c, &["CONFIG", "GET", "flowarchive.*"]).unwrap();
    assert!(!all.iter().any(|v| v.contains(S3_SECRET)));
    let info: String = cmd(&mut c, &["INFO", "everything"]).unwrap();
    assert!(!info.contains(S3_SECRET));
    let modules: redis::Value = cmd(&mut c, &["MODULE", "LIST"]).unwrap();
    assert!(!format!("{modules:?}").contains(S3_SECRET));
    config_set(&mut c, "flowarchive.secret-key", "another-secret-value").unwrap();
    assert_eq!(config(&mut c, "flowarchive.secret-key"), "");
    assert!(!srv.log().contains(S3_SECRET) && !srv.log().contains("another-secret-value"));
}

#[test]
fn a_layout_of_another_engine_is_a_configuration_change() {
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.module_args.extend(
        [
            "key-prefix",
            "eng",
            "events-key",
            "$prefix:{$id}:log",
            "snapshot-key",
            "$prefix:{$id}:state",
            "seq-key",
            "",
            "labels-key",
            "",
            "index-key",
            "eng:{$id}:archived",
            "retention",
            "1h",
            // This engine keeps its state current in its snapshot: served as stored.
            "state",
            "snapshot",
        ]
        .into_iter()
        .chain(NO_STATUS_INDEX)
        .map(String::from),
    );
    let srv = Server::start(opts);
    let mut c = srv.conn();
    cmd::<()>(&mut c, &["RPUSH", "eng:{j1}:log", "{\"e\":1}", "{\"e\":2}"]).unwrap();
    cmd::<()>(
        &mut c,
        &[
            "SET",
            "eng:{j1}:state",
            "{\"status\":\"failed\",\"last_updated\":\"2020-01-01T00:00:00Z\"}",
        ],
    )
    .unwrap();
    cmd::<()>(
        &mut c,
        &[
            "SET",
            "eng:{j2}:state",
            "{\"status\":\"running\",\"last_updated\":\"2020-01-01T00:00:00Z\"}",
        ],
    )
    .unwrap();
    cmd::<()>(&mut c, &["RPUSH", "eng:{j2}:log", "{\"e\":1}"]).unwrap();
    let r = archive(&mut c, "j1").unwrap();
    let loc: String = redis::from_redis_value(&r["location"]).unwrap();
    assert_eq!(
        cmd::<String>(&mut c, &["HGET", "eng:{j1}:archived", "j1"]).unwrap(),
        loc
    );
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", "eng:{j1}:log", "eng:{j1}:state"]).unwrap(),
        0
    );
    let e = archive(&mut c, "j2").unwrap_err().to_string();
    assert!(e.contains("not terminal"), "{e}");
}

fn compat_round_trip(flavor: Flavor) {
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.flavor = flavor;
    let srv = Server::start(opts);
    let mut c = srv.conn();
    let modules: redis::Value = cmd(&mut c, &["MODULE", "LIST"]).unwrap();
    assert!(
        format!("{modules:?}").contains("flowarchive"),
        "{flavor:?}: {modules:?}"
    );
    assert_eq!(config(&mut c, "flowarchive.retention"), "30d");
    assert!(config_set(&mut c, "flowarchive.retention", "soon").is_err());
    write_flow(&mut c, &FlowSpec::done("compat"));
    let r = archive(&mut c, "compat").unwrap();
    let events: i64 = redis::from_redis_value(&r["events"]).unwrap();
    assert_eq!(events, 5);
    let lines = gunzip(&s3.get("flows/compat.jsonl.gz").unwrap());
    assert_eq!(lines.lines().count(), 7);
    assert_eq!(
        cmd::<i64>(&mut c, &["EXISTS", "argyll:flow:compat:events"]).unwrap(),
        0
    );
}

#[test]
fn compat_valkey_8_0() {
    compat_round_trip(Flavor::Valkey8);
}

#[test]
fn compat_redis_7_0() {
    compat_round_trip(Flavor::Redis7);
}

/// A reply as one line: arrays in brackets, strings and integers as they are.
fn show(v: &redis::Value) -> String {
    match v {
        redis::Value::Array(items) | redis::Value::Set(items) => {
            format!("[{}]", items.iter().map(show).collect::<Vec<_>>().join(" "))
        }
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        redis::Value::Int(n) => n.to_string(),
        redis::Value::Nil => "nil".into(),
        other => format!("{other:?}"),
    }
}

/// `COMMAND INFO` of the commands, as declared with them (src/commands.rs), on every server: flags,
/// first/last/step, the `@flowarchive` category where the server has module categories (Redis 7.0
/// has none, and says so in the log), and the key specs: the flow id of FLOW and GET as a routing-only
/// key (`not_key`, so `COMMAND GETKEYS` finds none), no key for SWEEP, and one keyword-led group per
/// access for the ACL stand-in, with the rights the server's ACL asks of each.
#[test]
fn commands_declare_their_key_specs_flags_and_category_on_every_server() {
    let id_key = "[[flags [RO not_key] begin_search [type index spec [index 1]] find_keys [type range spec [lastkey 0 keystep 1 limit 0]]]]";
    let group = |flags: &str, keyword: &str| {
        format!("[flags [{flags}] begin_search [type keyword spec [keyword {keyword} startfrom 1]] find_keys [type keynum spec [keynumidx 0 firstkey 1 keystep 1]]]")
    };
    let standin = format!(
        "[{} {} {}]",
        group("RO access", "READ"),
        group("RW access delete", "REMOVE"),
        group("RW access insert", "ADD")
    );
    for flavor in [Flavor::Valkey9, Flavor::Valkey8, Flavor::Redis7] {
        let s3 = S3::new_bucket();
        let mut opts = ServerOpts::new(&s3);
        opts.flavor = flavor;
        let srv = Server::start(opts);
        let mut c = srv.conn();
        let category = match flavor {
            Flavor::Redis7 => "[]",
            _ => "[@flowarchive]",
        };
        let expected = [
            ("flowarchive.flow", "[write module noscript] 1 1 1", id_key),
            ("flowarchive.get", "[readonly module] 1 1 1", id_key),
            ("flowarchive.sweep", "[write module noscript] 0 0 0", "[]"),
            (
                "flowarchive.aclcheck",
                "[module no_mandatory_keys movablekeys] 0 0 0",
                standin.as_str(),
            ),
        ];
        for (name, flags_and_range, specs) in expected {
            let info: Vec<redis::Value> = cmd(&mut c, &["COMMAND", "INFO", name]).unwrap();
            assert_eq!(
                show(&info[0]),
                format!("[{name} -1 {flags_and_range} {category} [] {specs} []]"),
                "{flavor:?}: COMMAND INFO {name}"
            );
            let docs: redis::Value = cmd(&mut c, &["COMMAND", "DOCS", name]).unwrap();
            assert!(show(&docs).contains("summary"), "{flavor:?}: {name} docs");
        }
        for name in ["flowarchive.flow", "flowarchive.get"] {
            let e = err_text(cmd::<Vec<String>>(
                &mut c,
                &["COMMAND", "GETKEYS", name, "abc"],
            ));
            assert!(e.contains("no key arguments"), "{flavor:?}: {name}: {e}");
        }
        let keys: Vec<String> = cmd(
            &mut c,
            &[
                "COMMAND",
                "GETKEYS",
                "flowarchive.aclcheck",
                "ADD",
                "1",
                "a",
                "READ",
                "1",
                "r",
                "REMOVE",
                "2",
                "d1",
                "d2",
            ],
        )
        .unwrap();
        assert_eq!(keys, ["r", "d1", "d2", "a"], "{flavor:?}");

        let cats = cmd::<Vec<String>>(&mut c, &["ACL", "CAT", "flowarchive"]);
        let lacking = srv
            .log()
            .contains("puts no module command in a module's own ACL category");
        if flavor == Flavor::Redis7 {
            assert!(err_text(cats).contains("Unknown category"), "{flavor:?}");
            assert!(lacking, "{flavor:?}: {}", srv.log());
            continue;
        }
        assert!(!lacking, "{flavor:?}");
        if flavor == Flavor::Valkey8 {
            // Valkey 8.0's `ACL CAT <category>` lists no command of a module's category (its `COMMAND
            // INFO` above shows the category, and `+@flowarchive` grants it).
            continue;
        }
        let mut cats: Vec<String> = cats
            .unwrap()
            .into_iter()
            .map(|s| s.to_lowercase())
            .collect();
        cats.sort();
        // With the stand-in through which the module's ACL checks take an archive's keys together.
        assert_eq!(
            cats,
            [
                "flowarchive.aclcheck",
                "flowarchive.flow",
                "flowarchive.get",
                "flowarchive.sweep"
            ],
            "{flavor:?}"
        );
    }
}

/// docs/OPERATIONS.md, Load it: after `MODULE UNLOAD flowarchive` the module loads again in the same
/// server, twice over, and works: a flow is archived and read back. The server keeps the ACL category
/// an earlier load added; on Valkey 8 and 9 the reloaded commands are in it again, so `+@flowarchive`
/// grants all four to a user given it after the reload and to one given it before the unload.
#[test]
fn the_module_loads_again_after_unload_with_its_commands_in_their_category() {
    for flavor in [Flavor::Valkey9, Flavor::Valkey8, Flavor::Redis7] {
        let s3 = S3::new_bucket();
        let mut opts = ServerOpts::new(&s3);
        opts.flavor = flavor;
        opts.extra = vec!["--enable-module-command".into(), "yes".into()];
        let srv = Server::start(opts.clone());
        let mut c = srv.conn();
        let categories = flavor != Flavor::Redis7;
        let grant = |c: &mut redis::Connection, user: &str| {
            cmd::<()>(
                c,
                &[
                    "ACL",
                    "SETUSER",
                    user,
                    "on",
                    "nopass",
                    "+@flowarchive",
                    "~*",
                ],
            )
            .unwrap();
        };
        if categories {
            grant(&mut c, "before");
        }
        let path = module_path();
        let mut load = vec!["MODULE", "LOAD", path.to_str().unwrap()];
        load.extend(opts.module_args.iter().map(String::as_str));
        for round in 1..=2 {
            cmd::<()>(&mut c, &["MODULE", "UNLOAD", "flowarchive"]).unwrap();
            let gone = err_text(cmd::<String>(&mut c, &["FLOWARCHIVE.GET", "x"]));
            assert!(gone.to_lowercase().contains("unknown command"), "{gone}");
            if let Err(e) = cmd::<()>(&mut c, &load) {
                panic!(
                    "{flavor:?}: load {round} after an unload: {e}\n{}",
                    srv.log()
                );
            }
        }

        let spec = FlowSpec::done("reloaded");
        write_flow(&mut c, &spec);
        let r = archive(&mut c, "reloaded").unwrap();
        assert_eq!(int(&r["events"]), 5, "{flavor:?}");
        assert_eq!(
            cmd::<i64>(&mut c, &["EXISTS", "argyll:flow:reloaded:events"]).unwrap(),
            0,
            "{flavor:?}"
        );
        let state = archived_state(&state_json(&spec));
        assert_eq!(
            get(&mut c, "reloaded").unwrap().as_deref(),
            Some(state.as_str())
        );
        // A load after an unload is a first load: its index-key is no change of the last load's.
        cmd::<()>(&mut c, &["MODULE", "UNLOAD", "flowarchive"]).unwrap();
        let mut other = load.clone();
        other.extend(["index-key", "other:flows"]);
        cmd::<()>(&mut c, &other).unwrap();
        assert_eq!(config(&mut c, "flowarchive.index-key"), "other:flows");
        assert_eq!(
            config(&mut c, "flowarchive.index-read-keys"),
            "",
            "{flavor:?}"
        );
        cmd::<()>(&mut c, &["MODULE", "UNLOAD", "flowarchive"]).unwrap();
        cmd::<()>(&mut c, &load).unwrap();

        let log = srv.log();
        if !categories {
            assert!(
                log.contains("puts no module command in a module's own ACL category"),
                "{flavor:?}: {log}"
            );
            continue;
        }
        assert!(
            log.contains("left from an earlier load"),
            "{flavor:?}: {log}"
        );
        let mut listed: Vec<String> = cmd(
            &mut c,
            &["COMMAND", "LIST", "FILTERBY", "ACLCAT", "flowarchive"],
        )
        .unwrap();
        listed.sort();
        assert_eq!(
            listed,
            [
                "flowarchive.aclcheck",
                "flowarchive.flow",
                "flowarchive.get",
                "flowarchive.sweep"
            ],
            "{flavor:?}"
        );
        grant(&mut c, "after");
        for user in ["after", "before"] {
            let mut u = srv.conn();
            cmd::<()>(&mut u, &["AUTH", user, "x"]).unwrap();
            assert_eq!(
                get(&mut u, "reloaded").unwrap().as_deref(),
                Some(state.as_str()),
                "{flavor:?}: {user}"
            );
            let standin = err_text(cmd::<()>(&mut u, &["FLOWARCHIVE.ACLCHECK"]));
            assert!(
                standin.contains("not for clients"),
                "{flavor:?}: {user}: {standin}"
            );
            let other = err_text(cmd::<String>(&mut u, &["GET", "k"]));
            assert!(other.contains("NOPERM"), "{flavor:?}: {user}: {other}");
        }
    }
}

/// README, Configuration: a size takes the server's units in the config file and by CONFIG SET; as a load
/// argument it is a plain integer, and a unit stops the load instead of loading another value.
/// The second module of examples/foreign_category.rs (`FOREIGN.HELLO` in `@flowarchive`), built by
/// `cargo test` beside the test binaries: `<target>/<profile>/examples`, next to this binary's `deps`.
fn foreign_module() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = profile.join("examples/libforeign_category.so");
    assert!(
        path.exists(),
        "{} missing: `cargo test` builds it (a run limited by --test does not: `cargo build --examples`)",
        path.display()
    );
    path
}

/// The commands in `@flowarchive`, sorted (`ACL CAT flowarchive` lists no module command on Valkey
/// 8.0).
fn category(c: &mut redis::Connection) -> Vec<String> {
    let mut listed: Vec<String> =
        cmd(c, &["COMMAND", "LIST", "FILTERBY", "ACLCAT", "flowarchive"]).unwrap();
    listed.sort();
    listed
}

const OWN_COMMANDS: [&str; 4] = [
    "flowarchive.aclcheck",
    "flowarchive.flow",
    "flowarchive.get",
    "flowarchive.sweep",
];

/// The refusal flowarchive logs when another module's command holds its category.
const SHARED_CATEGORY: &str = "flowarchive: the ACL category flowarchive exists and holds commands of another module (foreign.hello)";

/// `+@flowarchive` must grant the module's commands and nothing else, so the module does not load
/// where another module's command is in that category: loaded after such a module at startup, the
/// server does not start and the log says why; loaded at runtime (`MODULE LOAD`) into a server
/// where a module joined the category an earlier load left, the load is refused with the same line
/// and the server keeps serving, the other module's command alone in the category. Once that module
/// is gone the module loads, takes its category back and archives. In the reverse order (flowarchive
/// first) the other module cannot add the category, and flowarchive's commands stay its only ones.
fn a_foreign_command_in_the_category_refuses_the_load(flavor: Flavor) {
    let foreign = foreign_module();
    let foreign = foreign.to_str().unwrap();
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.flavor = flavor;
    opts.extra = vec!["--enable-module-command".into(), "yes".into()];

    // At startup, the other module first (from the config file, read before the command line).
    let dir = root().join("target/test-servers").join(unique("conf"));
    std::fs::create_dir_all(&dir).unwrap();
    let conf = dir.join("foreign-first.conf");
    std::fs::write(&conf, format!("loadmodule {foreign}\n")).unwrap();
    let log = Server::start_failing_with_config_file(opts.clone(), &conf);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(log.contains(SHARED_CATEGORY), "{flavor:?}: {log}");

    // At runtime: the category an earlier load left, joined by the other module.
    let srv = Server::start(opts.clone());
    let mut c = srv.conn();
    let path = module_path();
    let mut load = vec!["MODULE", "LOAD", path.to_str().unwrap()];
    load.extend(opts.module_args.iter().map(String::as_str));
    cmd::<()>(&mut c, &["MODULE", "UNLOAD", "flowarchive"]).unwrap();
    cmd::<()>(&mut c, &["MODULE", "LOAD", foreign, "join"]).unwrap();
    assert_eq!(category(&mut c), ["foreign.hello"], "{flavor:?}");
    let refused = err_text(cmd::<()>(&mut c, &load));
    assert!(refused.contains("Error loading"), "{flavor:?}: {refused}");
    assert!(srv.log().contains(SHARED_CATEGORY), "{flavor:?}");
    assert_eq!(cmd::<String>(&mut c, &["PING"]).unwrap(), "PONG");
    assert_eq!(
        cmd::<String>(&mut c, &["FOREIGN.HELLO"]).unwrap(),
        "hello",
        "{flavor:?}"
    );
    let gone = err_text(cmd::<String>(&mut c, &["FLOWARCHIVE.GET", "x"]));
    assert!(gone.to_lowercase().contains("unknown command"), "{gone}");
    assert_eq!(category(&mut c), ["foreign.hello"], "{flavor:?}");

    // The other module gone, the category is empty again: the module loads and works.
    cmd::<()>(&mut c, &["MODULE", "UNLOAD", "foreigncat"]).unwrap();
    cmd::<()>(&mut c, &load).unwrap_or_else(|e| panic!("{flavor:?}: {e}\n{}", srv.log()));
    assert_eq!(category(&mut c), OWN_COMMANDS, "{flavor:?}");
    write_flow(&mut c, &FlowSpec::done("after"));
    assert_eq!(int(&archive(&mut c, "after").unwrap()["events"]), 5);

    // The reverse order: the category is flowarchive's, the other module cannot add it.
    let refused = err_text(cmd::<()>(&mut c, &["MODULE", "LOAD", foreign]));
    assert!(refused.contains("Error loading"), "{flavor:?}: {refused}");
    assert!(
        srv.log()
            .contains("foreign_category: could not put FOREIGN.HELLO in @flowarchive"),
        "{flavor:?}"
    );
    assert_eq!(category(&mut c), OWN_COMMANDS, "{flavor:?}");
    assert!(get(&mut c, "after").unwrap().is_some());
}

#[test]
fn a_foreign_command_in_the_category_refuses_the_load_on_valkey_9_1() {
    a_foreign_command_in_the_category_refuses_the_load(Flavor::Valkey9);
}

#[test]
fn a_foreign_command_in_the_category_refuses_the_load_on_valkey_8_0() {
    a_foreign_command_in_the_category_refuses_the_load(Flavor::Valkey8);
}

/// Redis 7.0 has no `RedisModule_AddACLCategory`: no module can have a category of its own there, so
/// the attack cannot be made (the other module does not load) and flowarchive, whose commands are in
/// no category there, loads beside it.
#[test]
fn no_module_can_take_the_category_on_redis_7_0() {
    let foreign = foreign_module();
    let s3 = S3::new_bucket();
    let mut opts = ServerOpts::new(&s3);
    opts.flavor = Flavor::Redis7;
    opts.extra = vec!["--enable-module-command".into(), "yes".into()];
    let srv = Server::start(opts);
    let mut c = srv.conn();
    let refused = err_text(cmd::<()>(
        &mut c,
        &["MODULE", "LOAD", foreign.to_str().unwrap()],
    ));
    assert!(refused.contains("Error loading"), "{refused}");
    assert!(srv
        .log()
        .contains("foreign_category: this server has no module ACL categories"));
    write_flow(&mut c, &FlowSpec::done("beside"));
    assert_eq!(int(&archive(&mut c, "beside").unwrap()["events"]), 5);
}

#[test]
fn sizes_take_units_in_the_config_file_and_plain_integers_as_load_arguments() {
    for flavor in [Flavor::Valkey9, Flavor::Valkey8, Flavor::Redis7] {
        let s3 = S3::new_bucket();
        let dir = root().join("target/test-servers").join(unique("units"));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("server.conf");
        std::fs::write(&conf, "flowarchive.read-max-bytes 1mb\n").unwrap();
        let mut opts = ServerOpts::new(&s3);
        opts.flavor = flavor;
        let srv = Server::start_with_config_file(opts.clone(), &conf);
        let mut c = srv.conn();
        assert_eq!(config(&mut c, "flowarchive.read-max-bytes"), "1048576");
        config_set(&mut c, "flowarchive.read-max-bytes", "2mb").unwrap();
        assert_eq!(config(&mut c, "flowarchive.read-max-bytes"), "2097152");
        drop(srv);

        opts.module_args
            .extend(["read-max-bytes", "1mb"].map(String::from));
        let log = Server::start_failing(opts.clone());
        assert!(log.contains("invalid digit found in string"), "{log}");
        opts.module_args.pop();
        opts.module_args.push("1048576".into());
        let srv = Server::start(opts);
        assert_eq!(
            config(&mut srv.conn(), "flowarchive.read-max-bytes"),
            "1048576"
        );
    }
}

/// Settings are a snapshot rebuilt after every change: a CONFIG SET of each kind of config (integer,
/// flag, choice, text) applies to the very next command, on every supported server.
#[test]
fn every_kind_of_config_change_applies_at_once() {
    for flavor in [Flavor::Valkey9, Flavor::Valkey8, Flavor::Redis7] {
        let s3 = S3::new_bucket();
        let mut opts = ServerOpts::new(&s3);
        opts.flavor = flavor;
        let srv = Server::start(opts);
        let mut c = srv.conn();
        let spec = FlowSpec {
            events: 400,
            ..FlowSpec::done("sized")
        };
        write_flow(&mut c, &spec);
        let what = format!("{flavor:?}");
        // Integer: the read cap.
        config_set(&mut c, "flowarchive.read-max-bytes", "65536").unwrap();
        let e = err_text(get(&mut c, "sized"));
        assert!(e.contains("larger than read-max-bytes"), "{what}: {e}");
        config_set(&mut c, "flowarchive.read-max-bytes", "67108864").unwrap();
        assert!(get(&mut c, "sized").unwrap().is_some(), "{what}");
        // Text: the retention.
        config_set(&mut c, "flowarchive.retention", "36500d").unwrap();
        let e = err_text(archive(&mut c, "sized"));
        assert!(e.contains("not idle long enough"), "{what}: {e}");
        config_set(&mut c, "flowarchive.retention", "1h").unwrap();
        // Flag: path-style off sends the request to a host the store does not know.
        config_set(&mut c, "flowarchive.path-style", "no").unwrap();
        assert!(archive(&mut c, "sized").is_err(), "{what}");
        config_set(&mut c, "flowarchive.path-style", "yes").unwrap();
        // Choice: the state answered.
        config_set(&mut c, "flowarchive.state", "snapshot").unwrap();
        assert_eq!(
            get(&mut c, "sized").unwrap(),
            None,
            "{what}: no snapshot, no flow"
        );
        config_set(&mut c, "flowarchive.state", "fold").unwrap();
        archive(&mut c, "sized").unwrap();
        assert!(get(&mut c, "sized").unwrap().is_some(), "{what}");
    }
}
