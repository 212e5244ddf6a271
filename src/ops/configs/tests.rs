use redis_module::configuration::EnumConfigurationValue;
use redis_module::RedisError;

use super::*;

#[test]
fn durations() {
    assert_eq!(parse_duration_ms("30d"), Ok(30 * 86_400_000));
    assert_eq!(parse_duration_ms("12h"), Ok(12 * 3_600_000));
    assert_eq!(parse_duration_ms("15m"), Ok(900_000));
    assert_eq!(parse_duration_ms("90s"), Ok(90_000));
    assert_eq!(parse_duration_ms("500ms"), Ok(500));
    assert_eq!(parse_duration_ms("0s"), Ok(0));
    for bad in [
        "",
        "30",
        "d",
        "-1d",
        "1.5h",
        "30 days",
        "99999999999999999999d",
        "40000d",
    ] {
        assert!(parse_duration_ms(bad).is_err(), "{bad}");
    }
}

#[test]
fn validators() {
    assert!(endpoint("").is_ok());
    assert!(endpoint("http://127.0.0.1:8333").is_ok());
    assert!(endpoint("https://s3.eu-west-1.amazonaws.com").is_ok());
    assert!(endpoint("ftp://x").is_err());
    assert!(endpoint("not a url").is_err());
    assert!(endpoint("http://h/?x=1").is_err());
    for with_userinfo in [
        "http://user:pa55w0rd@h:8333",
        "https://user@h",
        "http://:pa55w0rd@h",
    ] {
        let e = endpoint(with_userinfo).unwrap_err();
        assert!(e.contains("must not carry credentials"), "{e}");
        assert!(!e.contains("pa55w0rd"), "{e}");
    }
    assert!(bucket("flows-archive.1").is_ok());
    assert!(bucket("").is_ok());
    assert!(bucket("Upper").is_err());
    assert!(bucket("ab").is_err());
    assert!(object_prefix("a/b").is_ok());
    assert!(object_prefix("").is_ok());
    for bad in ["/a", "a/", "a//b", "a/../b", "."] {
        assert!(object_prefix(bad).is_err(), "{bad}");
    }
    assert!(flow_key("$prefix:flow:$id:events").is_ok());
    assert!(flow_key("").is_err());
    assert!(flow_key("$prefix:events").is_err());
    assert!(opt_flow_key("").is_ok());
    assert!(status_set("$prefix:idx:status:$status").is_ok());
    assert!(status_set("$prefix:idx:status").is_err());
    assert!(index_key("archived:{flow:$id}").is_ok());
    assert!(index_key("archived:$status").is_err());
    assert_eq!(VerifyMode::try_from(1).ok(), Some(VerifyMode::PutResponse));
    assert_eq!(VerifyMode::try_from(2).ok(), Some(VerifyMode::Auto));
    assert_eq!(i32::from(VerifyMode::Auto), 2);
    assert!(VerifyMode::try_from(3).is_err());
    let refusal = |e: RedisError| e.to_string();
    assert_eq!(
        VerifyMode::try_from(3).map_err(refusal).err().as_deref(),
        Some("verify must be head, put-response or auto")
    );
    assert_eq!(
        VerifyMode::Head.get_options(),
        (
            vec!["head".to_string(), "put-response".into(), "auto".into()],
            vec![0, 1, 2]
        )
    );
    assert_eq!(
        IndexFormat::try_from(-1).map_err(refusal).err().as_deref(),
        Some("index-format must be hash or compact")
    );
    assert_eq!(
        IndexFormat::Compact.get_options(),
        (vec!["hash".to_string(), "compact".to_string()], vec![0, 1])
    );
    assert_eq!(i32::from(IndexFormat::Compact), 1);
    assert!(statuses("completed,failed").is_ok() && statuses(" , ").is_err());
    assert!(region("us-east-1").is_ok() && region("").is_err());
}

#[test]
fn secret_files_are_read_trimmed_and_errors_never_show_the_content() {
    let dir = std::env::temp_dir().join(format!("flowarchive-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, content: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        p.to_str().unwrap().to_string()
    };
    assert_eq!(
        read_secret_file(&file("ok", b"  s3cr3t-v4lue\n")).as_deref(),
        Ok("s3cr3t-v4lue")
    );
    let missing = dir.join("missing").to_str().unwrap().to_string();
    let e = read_secret_file(&missing).unwrap_err();
    assert!(e.contains(&missing) && e.contains("cannot be read"), "{e}");
    let e = read_secret_file(&file("blank", b" \n\t\n")).unwrap_err();
    assert!(e.contains("is empty"), "{e}");
    let e = read_secret_file(&file("big", "s3cr3t-v4lue ".repeat(400).as_bytes())).unwrap_err();
    assert!(
        e.contains("larger than 4096 bytes") && !e.contains("s3cr3t"),
        "{e}"
    );
    let e = read_secret_file(&file("binary", b"s3cr3t-v4lue\xff")).unwrap_err();
    assert!(e.contains("cannot be read") && !e.contains("s3cr3t"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
