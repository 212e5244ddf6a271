//! The chain and the pin: which provider configs and environment choose, and what `current` serves.

use super::providers::{ContainerAuth, IMDS_DEFAULT};
use super::*;

fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
    move |name| {
        pairs
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

fn cfg(pin: Option<Source>, key: &str) -> CredentialConfig {
    CredentialConfig {
        pin,
        access_key: key.into(),
        secret_key: Hidden(if key.is_empty() { "" } else { "s3cr3t" }.into()),
        region: "eu-west-3".into(),
        tls_ca_file: String::new(),
        warn: |_| {},
    }
}

fn source(c: &Chosen) -> &'static str {
    c.provider().source().name()
}

#[test]
fn the_chain_is_in_the_order_of_the_sources() {
    assert_eq!(CHAIN.map(|(s, _)| s), Source::ALL);
    for s in Source::ALL {
        assert_eq!(Source::parse_pin(s.name()), Ok(Some(s)));
    }
    assert_eq!(Source::parse_pin("AUTO"), Ok(None));
    assert!(Source::parse_pin("instance").is_err());
}

#[test]
fn the_chain_takes_the_first_configured_source() {
    let everything = env_of(&[
        ("AWS_ACCESS_KEY_ID", "AKENV"),
        ("AWS_SECRET_ACCESS_KEY", "env-secret"),
        ("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/token"),
        ("AWS_ROLE_ARN", "arn:aws:iam::1:role/r"),
        (
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "/v2/credentials/x",
        ),
    ]);
    assert_eq!(
        source(&choose(&cfg(None, "AKCFG"), &everything).unwrap()),
        "config"
    );
    assert_eq!(source(&choose(&cfg(None, ""), &everything).unwrap()), "env");
    let web = choose(&cfg(Some(Source::WebIdentity), "AKCFG"), &everything).unwrap();
    assert_eq!(
        web,
        Chosen::WebIdentity(WebIdentity {
            token_file: "/var/run/token".into(),
            role_arn: "arn:aws:iam::1:role/r".into(),
            session: format!("flowarchive-{}", std::process::id()),
            sts: "https://sts.eu-west-3.amazonaws.com".into(),
        })
    );
    let container = choose(&cfg(Some(Source::Container), ""), &everything).unwrap();
    assert_eq!(
        container,
        Chosen::Container(Container {
            url: "http://169.254.170.2/v2/credentials/x".into(),
            auth: ContainerAuth::None
        })
    );
    // Nothing configured: IMDSv2 at its default address, unless disabled.
    let imds = choose(&cfg(None, ""), &env_of(&[])).unwrap();
    assert_eq!(
        imds,
        Chosen::Imds(Imds {
            endpoint: IMDS_DEFAULT.into()
        })
    );
    let off = env_of(&[("AWS_EC2_METADATA_DISABLED", "TRUE")]);
    let e = choose(&cfg(None, ""), &off).unwrap_err();
    assert_eq!(e.kind, FailureKind::Credentials);
    assert!(e.message.contains("no S3 credentials"), "{e}");
    let e = choose(&cfg(Some(Source::Imds), ""), &off).unwrap_err();
    assert_eq!(
        e.message,
        "credentials imds: AWS_EC2_METADATA_DISABLED is true"
    );
    // A pinned source that is not configured is an error naming what is missing.
    let e = choose(&cfg(Some(Source::Env), "AKCFG"), &env_of(&[])).unwrap_err();
    assert!(e.message.contains("AWS_ACCESS_KEY_ID"), "{e}");
    let e = choose(&cfg(Some(Source::Config), ""), &everything).unwrap_err();
    assert!(e.message.contains("flowarchive.access-key"), "{e}");
    // Half configured: an error even unpinned.
    let half = env_of(&[("AWS_ACCESS_KEY_ID", "AKENV")]);
    let e = choose(&cfg(None, ""), &half).unwrap_err();
    assert_eq!(
        e.message,
        "credentials env: AWS_SECRET_ACCESS_KEY is not set"
    );
}

#[test]
fn a_container_full_uri_and_its_token_file() {
    let env = env_of(&[
        ("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1:9/c"),
        ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "tok"),
        ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", "/run/token"),
    ]);
    assert_eq!(
        choose(&cfg(None, ""), &env).unwrap(),
        Chosen::Container(Container {
            url: "http://127.0.0.1:9/c".into(),
            auth: ContainerAuth::File("/run/token".into())
        })
    );
    let far = env_of(&[("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://10.0.0.1/c")]);
    assert!(choose(&cfg(None, ""), &far).is_err());
}

#[test]
fn long_term_keys_are_served_as_they_are() {
    let env = env_of(&[
        ("AWS_ACCESS_KEY_ID", " AKENV "),
        ("AWS_SECRET_ACCESS_KEY", "env-secret"),
        ("AWS_SESSION_TOKEN", "session"),
    ]);
    let c = current_with(&cfg(None, ""), &env, Duration::from_secs(1)).unwrap();
    assert_eq!(
        (c.key_id.as_str(), c.token.as_deref(), c.expires_ms),
        ("AKENV", Some("session"), None)
    );
    assert_eq!(c.source, Source::Env);
    let c = current_with(&cfg(None, "AKCFG"), &env, Duration::from_secs(1)).unwrap();
    assert_eq!((c.key_id.as_str(), c.source), ("AKCFG", Source::Config));
}

#[test]
fn an_unreachable_source_is_a_counted_error_naming_it() {
    // Port 1 on loopback refuses at once.
    let env = env_of(&[("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.0.1:1")]);
    let failures = CACHE.failures();
    let errors: Vec<StoreError> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| s.spawn(|| current_with(&cfg(None, ""), &env, Duration::from_secs(1))))
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap().unwrap_err())
            .collect()
    });
    for e in &errors {
        assert_eq!(e.kind, FailureKind::Credentials);
        assert!(
            e.message
                .starts_with("S3 credentials from imds: IMDSv2 session token failed"),
            "{e}"
        );
    }
    let fetched = CACHE.failures() - failures;
    assert!((1..=4).contains(&fetched), "{fetched}");
}
