//! `aws` provider tests: ids, error types, signing, and the provider and its credential
//! chain against a scripted in-process HTTP server (Secrets Manager, STS, the container
//! endpoint and IMDS shapes; moto checks real signatures in `tests/tests/store_aws.rs`).
//! Every error is checked for values, keys and tokens.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use super::{chain::parse_time, *};

const VALUE: &str = "aws-unit-secret-value-6f1d";
const KEY: &str = "aws-unit-secret-access-key-2b8c";
const TOKEN: &str = "aws-unit-session-token-9e4a";
const ECHO: &str = "aws-unit-echoed-input-3c7f";

fn assert_clean(e: &SecretError) {
    let text = format!("{e} {e:?}");
    for s in [VALUE, KEY, TOKEN, ECHO] {
        assert!(!text.contains(s), "error shows a secret: {text}");
    }
}

#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
}

fn reply(status: u16, body: impl Into<Vec<u8>>) -> Reply {
    Reply {
        status,
        headers: Vec::new(),
        body: body.into(),
    }
}

type Handler = Arc<dyn Fn(&Req, usize) -> Reply + Send + Sync>;

/// A scripted HTTP/1.1 server: one reply per connection from `h(request, n)` (n counts
/// requests from 0). Returns its base URL and the requests it saw.
async fn serve(h: Handler) -> (String, Arc<Mutex<Vec<Req>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (seen2, n) = (Arc::clone(&seen), Arc::new(AtomicUsize::new(0)));
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (h, seen, n) = (Arc::clone(&h), Arc::clone(&seen2), Arc::clone(&n));
            tokio::spawn(async move {
                let mut raw = Vec::new();
                let mut buf = [0u8; 8192];
                let head_end = loop {
                    if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => raw.extend_from_slice(&buf[..k]),
                    }
                };
                let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
                let mut lines = head.lines();
                let mut first = lines.next().unwrap_or("").split_whitespace();
                let method = first.next().unwrap_or("").to_owned();
                let path = first.next().unwrap_or("").to_owned();
                let headers: HashMap<String, String> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect();
                let len: usize = headers
                    .get("content-length")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                while raw.len() < head_end + len {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => raw.extend_from_slice(&buf[..k]),
                    }
                }
                let req = Req {
                    method,
                    path,
                    headers,
                    body: raw[head_end..head_end + len].to_vec(),
                };
                let i = n.fetch_add(1, Ordering::SeqCst);
                let r = h(&req, i);
                seen.lock().unwrap().push(req);
                if r.status == 0 {
                    // Hang (the client's timeout ends it).
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return;
                }
                let mut out = format!("HTTP/1.1 {} X\r\nConnection: close\r\n", r.status);
                for (k, v) in &r.headers {
                    out.push_str(&format!("{k}: {v}\r\n"));
                }
                out.push_str(&format!("Content-Length: {}\r\n\r\n", r.body.len()));
                let _ = sock.write_all(out.as_bytes()).await;
                let _ = sock.write_all(&r.body).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    (base, seen)
}

fn cfg(endpoint: Option<&str>) -> AwsProviderConfig {
    AwsProviderConfig {
        region: Some("eu-west-1".into()),
        endpoint: endpoint.map(str::to_owned),
        timeout: Duration::from_secs(2),
        ..AwsProviderConfig::default()
    }
}

/// An environment with fixed keys, instance metadata off, no files.
fn env_keys(extra: &[(&str, &str)]) -> AwsEnv {
    let mut v = vec![
        ("AWS_ACCESS_KEY_ID", "AKIDUNITTEST"),
        ("AWS_SECRET_ACCESS_KEY", KEY),
        ("AWS_SESSION_TOKEN", TOKEN),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ];
    v.extend_from_slice(extra);
    AwsEnv::from_pairs(&v)
}

fn sm_json(body: serde_json::Value) -> Reply {
    Reply {
        status: 200,
        headers: vec![("Content-Type", JSON_11.into())],
        body: body.to_string().into_bytes(),
    }
}

fn aws_error(status: u16, t: &str) -> Reply {
    Reply {
        status,
        headers: vec![("Content-Type", JSON_11.into())],
        body: serde_json::json!({"__type": format!("com.amazonaws.secretsmanager#{t}"), "message": format!("bad input {ECHO}")})
            .to_string()
            .into_bytes(),
    }
}

// ---- ids and helpers -----------------------------------------------------------------

#[test]
fn ids() {
    let r = parse_id("db/creds").unwrap();
    assert_eq!(
        (r.secret_id, r.version_stage, r.version_id, r.field),
        ("db/creds", None, None, None)
    );
    let r = parse_id("db/creds#password").unwrap();
    assert_eq!((r.secret_id, r.field), ("db/creds", Some("password")));
    let r = parse_id("db/creds?versionStage=AWSPREVIOUS#/a/b").unwrap();
    assert_eq!(r.version_stage.as_deref(), Some("AWSPREVIOUS"));
    assert_eq!(r.field, Some("/a/b"));
    let r = parse_id("arn:aws:secretsmanager:eu-west-2:123456789012:secret:db-AbCdEf?VersionId=v1&versionstage=S#x.y").unwrap();
    assert_eq!(
        r.secret_id,
        "arn:aws:secretsmanager:eu-west-2:123456789012:secret:db-AbCdEf"
    );
    assert_eq!(
        (r.version_id.as_deref(), r.version_stage.as_deref()),
        (Some("v1"), Some("S"))
    );
    assert_eq!(
        parse_id("db#").unwrap().field,
        None,
        "an empty field is none"
    );
    for bad in [
        "",
        "#password",
        "?versionStage=X",
        "db?stage=X",
        "db?versionStage=",
        "db?versionId=a&versionId=b",
    ] {
        assert!(parse_id(bad).is_err(), "{bad:?}");
    }
    assert_eq!(
        arn_region("arn:aws:secretsmanager:eu-west-2:123456789012:secret:db-AbCdEf"),
        Some("eu-west-2")
    );
    assert_eq!(arn_region("arn:aws:s3:::bucket"), None);
    assert_eq!(arn_region("db/creds"), None);
    assert_eq!(dns_suffix("cn-north-1"), "amazonaws.com.cn");
    assert_eq!(dns_suffix("us-gov-west-1"), "amazonaws.com");
    assert!(valid_region("ap-southeast-2") && !valid_region("a.b") && !valid_region(""));
}

#[test]
fn error_types_and_xml() {
    assert_eq!(
        clean_type("com.amazonaws.secretsmanager#ResourceNotFoundException").as_deref(),
        Some("ResourceNotFoundException")
    );
    assert_eq!(
        clean_type("AccessDeniedException:http://internal.amazon.com/coral/").as_deref(),
        Some("AccessDeniedException")
    );
    assert_eq!(clean_type("not a <type>"), None);
    assert_eq!(clean_type(&"A".repeat(65)), None);
    let xml = b"<ErrorResponse><Error><Code>SignatureDoesNotMatch</Code><Message>m &amp; &lt;x&gt; &#65;&#x42;</Message></Error></ErrorResponse>";
    assert_eq!(
        xml_text(xml, "Code").unwrap().as_str(),
        "SignatureDoesNotMatch"
    );
    assert_eq!(xml_text(xml, "Message").unwrap().as_str(), "m & <x> AB");
    assert!(xml_text(xml, "Missing").is_none());
    assert!(xml_text(b"<A>&bogus</A>", "A").is_none());
    let mut h = HeaderMap::new();
    h.insert(
        "x-amzn-errortype",
        HeaderValue::from_static("ThrottlingException:x"),
    );
    assert_eq!(error_type(&h, b"").as_deref(), Some("ThrottlingException"));
    let h = HeaderMap::new();
    assert_eq!(
        error_type(
            &h,
            br#"{"__type":"x#InvalidRequestException","message":"m"}"#
        )
        .as_deref(),
        Some("InvalidRequestException")
    );
    assert_eq!(error_type(&h, br#"{"code":"Foo"}"#).as_deref(), Some("Foo"));
    assert_eq!(
        error_type(&h, xml).as_deref(),
        Some("SignatureDoesNotMatch")
    );
    assert_eq!(error_type(&h, b"<html>oops</html>"), None);
    assert!(parse_time("2026-12-01T15:00:00Z").is_some());
    assert!(parse_time("2026-12-01T15:00:00.123+01:00").is_some());
    assert!(parse_time("yesterday").is_none());
}

#[test]
fn signing_covers_the_target_the_token_and_the_host() {
    let creds = chain::AwsCredentials {
        access_key_id: "AKIDEXAMPLE".into(),
        secret_access_key: Secret::from(KEY.to_owned()),
        session_token: Some(Secret::from(TOKEN.to_owned())),
        expiration: None,
        source: "test".into(),
        renewable: false,
    };
    let url = reqwest::Url::parse("https://secretsmanager.eu-west-1.amazonaws.com/").unwrap();
    let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_440_938_160);
    let h = sign_headers(
        "POST",
        &url,
        &[("content-type", JSON_11), ("x-amz-target", TARGET)],
        b"{}",
        Scope {
            region: "eu-west-1",
            service: SERVICE,
        },
        &creds,
        time,
    )
    .unwrap();
    let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    assert_eq!(get("x-amz-date").unwrap(), "20150830T123600Z");
    let auth = get("authorization").unwrap();
    assert!(auth.is_sensitive());
    let auth = auth.to_str().unwrap();
    assert!(
        auth.starts_with(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/eu-west-1/secretsmanager/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date;x-amz-security-token;x-amz-target, Signature="
        ),
        "{auth}"
    );
    assert_eq!(get("x-amz-security-token").unwrap(), TOKEN);
    // Deterministic: the same input signs the same.
    let again = sign_headers(
        "POST",
        &url,
        &[("content-type", JSON_11), ("x-amz-target", TARGET)],
        b"{}",
        Scope {
            region: "eu-west-1",
            service: SERVICE,
        },
        &creds,
        time,
    )
    .unwrap();
    assert_eq!(h, again);
    assert!(!format!("{creds:?}").contains(KEY));
}

// ---- the provider --------------------------------------------------------------------

#[tokio::test]
async fn secret_string_fields_binary_and_the_request() {
    let (base, seen) = serve(Arc::new(|req: &Req, _| {
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        match body["SecretId"].as_str().unwrap() {
            "json" => sm_json(serde_json::json!({
                "ARN": "arn", "Name": "json", "VersionId": "v",
                "SecretString": format!(r#"{{"user":"u","pw":"{VALUE}","n":{{"port":5432}},"a/b":"slash"}}"#),
                "VersionStages": ["AWSCURRENT"], "CreatedDate": 1.5e9,
            })),
            "bin" => sm_json(serde_json::json!({
                "SecretBinary": base64::engine::general_purpose::STANDARD.encode(b"\x00bin\xff"),
            })),
            _ => aws_error(400, "ResourceNotFoundException"),
        }
    }))
    .await;
    let p = AwsProvider::with_env("aws", &cfg(Some(&base)), env_keys(&[])).unwrap();
    let v = p.get("json").await.unwrap().value;
    assert!(v.expose_str().unwrap().contains(VALUE));
    assert_eq!(
        p.get("json#pw").await.unwrap().value.expose(),
        VALUE.as_bytes()
    );
    assert_eq!(
        p.get("json#/pw").await.unwrap().value.expose(),
        VALUE.as_bytes()
    );
    assert_eq!(p.get("json#n.port").await.unwrap().value.expose(), b"5432");
    assert_eq!(p.get("json#/a~1b").await.unwrap().value.expose(), b"slash");
    assert_eq!(p.get("bin").await.unwrap().value.expose(), b"\x00bin\xff");
    let e = p.get("json#nope").await.unwrap_err();
    assert!(
        matches!(e, SecretError::BadReply { .. }) && e.to_string().contains("`nope`"),
        "{e}"
    );
    let e = p.get("bin#x").await.unwrap_err();
    assert!(e.to_string().contains("not JSON"), "{e}");
    assert_clean(&e);

    let _ = p
        .get("json?versionStage=AWSPREVIOUS&versionId=v-1#pw")
        .await;
    let reqs = seen.lock().unwrap().clone();
    let r = &reqs[0];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/"));
    assert_eq!(r.headers["x-amz-target"], "secretsmanager.GetSecretValue");
    assert_eq!(r.headers["content-type"], "application/x-amz-json-1.1");
    assert_eq!(r.headers["x-amz-security-token"], TOKEN);
    assert!(r.headers["authorization"].contains("/eu-west-1/secretsmanager/aws4_request"));
    let body: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(body, serde_json::json!({"SecretId": "json"}));
    let body: serde_json::Value = serde_json::from_slice(&reqs.last().unwrap().body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"SecretId": "json", "VersionStage": "AWSPREVIOUS", "VersionId": "v-1"})
    );
}

#[tokio::test]
async fn errors_are_typed_by_aws_error_type_and_status() {
    let (base, _) = serve(Arc::new(|req: &Req, _| {
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        match body["SecretId"].as_str().unwrap() {
            "missing" => aws_error(400, "ResourceNotFoundException"),
            "denied" => aws_error(400, "AccessDeniedException"),
            "unknown-key" => aws_error(400, "UnrecognizedClientException"),
            "throttled" => aws_error(400, "ThrottlingException"),
            "invalid" => aws_error(400, "InvalidParameterException"),
            "decrypt" => aws_error(400, "DecryptionFailure"),
            "header" => Reply {
                status: 400,
                headers: vec![(
                    "x-amzn-ErrorType",
                    "ResourceNotFoundException:http://x/".into(),
                )],
                body: Vec::new(),
            },
            "xml403" => reply(
                403,
                "<ErrorResponse><Error><Code>SignatureDoesNotMatch</Code></Error></ErrorResponse>",
            ),
            "html500" => reply(500, format!("<html>{ECHO}</html>")),
            "html502" => reply(502, "<html>bad gateway</html>"),
            "teapot" => reply(418, ECHO),
            "moved" => Reply {
                status: 301,
                headers: vec![("Location", "http://elsewhere/".into())],
                body: Vec::new(),
            },
            "truncated" => reply(200, format!(r#"{{"SecretString":"{VALUE}"#)),
            "empty-json" => sm_json(serde_json::json!({"Name": "x"})),
            "bad-base64" => sm_json(serde_json::json!({"SecretBinary": "%%%"})),
            "huge" => reply(200, vec![b' '; MAX_BODY + 1]),
            "slow" => reply(0, ""),
            _ => reply(404, ""),
        }
    }))
    .await;
    let p = AwsProvider::with_env("aws", &cfg(Some(&base)), env_keys(&[])).unwrap();
    for (id, kind, needle) in [
        ("missing#pw", "not_found", "`missing#pw` not found"),
        ("header", "not_found", "not found"),
        ("denied", "denied", "AccessDeniedException"),
        ("unknown-key", "denied", "UnrecognizedClientException"),
        ("xml403", "denied", "SignatureDoesNotMatch (HTTP status 403"),
        ("throttled", "unreachable", "ThrottlingException"),
        ("html500", "unreachable", "HTTP status 500"),
        ("html502", "unreachable", "502"),
        (
            "invalid",
            "bad_reply",
            "InvalidParameterException (HTTP status 400",
        ),
        ("decrypt", "bad_reply", "DecryptionFailure"),
        ("teapot", "bad_reply", "418"),
        ("moved", "bad_reply", "redirects are not followed"),
        ("truncated", "bad_reply", "not JSON"),
        (
            "empty-json",
            "bad_reply",
            "neither SecretString nor SecretBinary",
        ),
        ("bad-base64", "bad_reply", "not base64"),
        ("huge", "bad_reply", "larger than"),
        ("slow", "timeout", "timed out"),
        ("x?nope=1", "bad_id", "unknown parameter `nope`"),
    ] {
        let e = p.get(id).await.unwrap_err();
        assert_eq!(e.kind(), kind, "{id}: {e}");
        assert!(e.to_string().contains(needle), "{id}: {e}");
        assert!(e.to_string().starts_with("aws"), "{id}: {e}");
        assert_clean(&e);
    }
}

#[tokio::test]
async fn region_and_endpoint_resolution() {
    // No region anywhere: the id cannot be used.
    let mut c = cfg(Some("http://127.0.0.1:9/"));
    c.region = None;
    let p = AwsProvider::with_env("aws", &c, env_keys(&[])).unwrap();
    assert_eq!(p.region("x", "db").unwrap_err().kind(), "bad_id");
    assert_eq!(
        p.region("x", "arn:aws:secretsmanager:ca-central-1:1:secret:x")
            .unwrap(),
        "ca-central-1"
    );
    let p =
        AwsProvider::with_env("aws", &c, env_keys(&[("AWS_DEFAULT_REGION", "us-west-2")])).unwrap();
    assert_eq!(p.region("x", "db").unwrap(), "us-west-2");
    let p = AwsProvider::with_env(
        "aws",
        &c,
        env_keys(&[
            ("AWS_REGION", "eu-north-1"),
            ("AWS_DEFAULT_REGION", "us-west-2"),
        ]),
    )
    .unwrap();
    assert_eq!(p.region("x", "db").unwrap(), "eu-north-1");
    let p = AwsProvider::with_env("aws", &c, env_keys(&[("AWS_REGION", "Not A Region")])).unwrap();
    assert!(
        p.region("x", "db")
            .unwrap_err()
            .to_string()
            .contains("AWS_REGION")
    );

    let c = cfg(None);
    let p = AwsProvider::with_env("aws", &c, env_keys(&[])).unwrap();
    assert_eq!(
        p.endpoint("x", "eu-west-1").unwrap().as_str(),
        "https://secretsmanager.eu-west-1.amazonaws.com/"
    );
    assert_eq!(
        p.endpoint("x", "cn-north-1").unwrap().as_str(),
        "https://secretsmanager.cn-north-1.amazonaws.com.cn/"
    );
    let p = AwsProvider::with_env(
        "aws",
        &c,
        env_keys(&[
            ("AWS_ENDPOINT_URL", "http://general:1"),
            ("AWS_ENDPOINT_URL_SECRETS_MANAGER", "http://sm:2"),
        ]),
    )
    .unwrap();
    assert_eq!(
        p.endpoint("x", "eu-west-1").unwrap().as_str(),
        "http://sm:2/"
    );
    let p =
        AwsProvider::with_env("aws", &c, env_keys(&[("AWS_ENDPOINT_URL", "nonsense")])).unwrap();
    assert_eq!(p.endpoint("x", "eu-west-1").unwrap_err().kind(), "bad_id");
}

/// `get_many` reads each secret (and version) once for all its fields.
#[tokio::test]
async fn get_many_reads_each_secret_once() {
    let (base, seen) = serve(Arc::new(|req: &Req, _| {
        let body: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
        let stage = body["VersionStage"].as_str().unwrap_or("AWSCURRENT");
        sm_json(serde_json::json!({
            "SecretString": format!(r#"{{"user":"{}","pw":"{stage}"}}"#, body["SecretId"].as_str().unwrap())
        }))
    }))
    .await;
    let p = AwsProvider::with_env("aws", &cfg(Some(&base)), env_keys(&[])).unwrap();
    let ids = [
        "a#user",
        "a#pw",
        "b#user",
        "a?versionStage=AWSPREVIOUS#pw",
        "a#/pw",
    ];
    let got = p.get_many(&ids).await.unwrap();
    let got: Vec<&str> = got.iter().map(|f| f.value.expose_str().unwrap()).collect();
    assert_eq!(got, ["a", "AWSCURRENT", "b", "AWSPREVIOUS", "AWSCURRENT"]);
    assert_eq!(seen.lock().unwrap().len(), 3, "a, b, a@AWSPREVIOUS");
    let e = p.get_many(&["a#user", "a#missing"]).await.unwrap_err();
    assert_eq!(e.kind(), "bad_reply");
}

/// Fixed keys in the configuration are used as they are: no chain, no retry.
#[tokio::test]
async fn configured_keys_are_used_without_the_chain() {
    let (base, seen) = serve(Arc::new(|_: &Req, _| {
        aws_error(400, "UnrecognizedClientException")
    }))
    .await;
    let mut c = cfg(Some(&base));
    c.access_key_id = Some("AKIDCONFIGURED".into());
    c.secret_access_key = Some(Secret::from(KEY.to_owned()));
    // The environment has other keys: not used.
    let p = AwsProvider::with_env("aws", &c, env_keys(&[])).unwrap();
    let e = p.get("db").await.unwrap_err();
    assert_eq!(e.kind(), "denied");
    let reqs = seen.lock().unwrap().clone();
    assert_eq!(reqs.len(), 1, "not retried");
    assert!(reqs[0].headers["authorization"].contains("Credential=AKIDCONFIGURED/"));
    assert!(!reqs[0].headers.contains_key("x-amz-security-token"));
}

// ---- the credential chain ------------------------------------------------------------

fn chain(env: AwsEnv) -> Chain {
    let tls = crate::tls::client_config(crate::tls::TlsOptions {
        verify: crate::tls::Verify::Full,
        ca_file: None,
        with_system_roots: false,
        client_cert: None,
    })
    .unwrap();
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured((*tls).clone())
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    Chain::new(env, None, None, http, &tls, Duration::from_secs(2)).unwrap()
}

fn chain_err(c: Result<Arc<chain::AwsCredentials>, chain::ChainError>) -> chain::ChainError {
    let e = c.unwrap_err();
    for s in [KEY, TOKEN, VALUE] {
        assert!(!e.reason.contains(s), "{}", e.reason);
    }
    e
}

#[tokio::test]
async fn chain_environment_profiles_and_nothing() {
    let c = chain(env_keys(&[]));
    let creds = c.credentials().await.unwrap();
    assert_eq!(
        (creds.source.as_str(), creds.access_key_id.as_str()),
        ("environment", "AKIDUNITTEST")
    );
    assert_eq!(
        creds.session_token.as_ref().unwrap().expose(),
        TOKEN.as_bytes()
    );
    assert!(!format!("{creds:?}").contains(KEY));

    let e = chain_err(
        chain(AwsEnv::from_pairs(&[("AWS_ACCESS_KEY_ID", "AKID")]))
            .credentials()
            .await,
    );
    assert_eq!(e.kind, chain::Failure::Denied);
    assert!(e.reason.contains("together"), "{}", e.reason);

    // Nothing set up, instance metadata off.
    let e = chain_err(
        chain(AwsEnv::from_pairs(&[("AWS_EC2_METADATA_DISABLED", "TRUE")]))
            .credentials()
            .await,
    );
    assert_eq!(e.kind, chain::Failure::Denied);
    assert!(
        e.reason.contains("no AWS credentials found"),
        "{}",
        e.reason
    );

    let dir = tempfile::tempdir().unwrap();
    let creds_file = dir.path().join("credentials");
    let config_file = dir.path().join("config");
    std::fs::write(
        &creds_file,
        format!("[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = {KEY}\n[dev]\naws_access_key_id=AKIDDEV\naws_secret_access_key={KEY}\naws_session_token={TOKEN}\n"),
    )
    .unwrap();
    std::fs::write(
        &config_file,
        "[profile dev]\nregion = eu-central-1\n[profile assumer]\nrole_arn = arn:aws:iam::1:role/r\nsource_profile = dev\n[profile settings-only]\nregion = sa-east-1\n",
    )
    .unwrap();
    let files = |extra: &[(&str, &str)]| {
        let mut v = vec![
            ("AWS_SHARED_CREDENTIALS_FILE", creds_file.to_str().unwrap()),
            ("AWS_CONFIG_FILE", config_file.to_str().unwrap()),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ];
        v.extend_from_slice(extra);
        AwsEnv::from_pairs(&v)
    };
    let c = chain(files(&[]));
    assert_eq!(c.credentials().await.unwrap().access_key_id, "AKIDDEFAULT");
    let c = chain(files(&[("AWS_PROFILE", "dev")]));
    let creds = c.credentials().await.unwrap();
    assert_eq!(
        (creds.access_key_id.as_str(), creds.source.as_str()),
        ("AKIDDEV", "profile dev")
    );
    assert!(creds.session_token.is_some() && creds.renewable);
    assert_eq!(
        c.region().unwrap(),
        ("eu-central-1".into(), "profile dev".into())
    );
    let e = chain_err(chain(files(&[("AWS_PROFILE", "nope")])).credentials().await);
    assert!(
        e.reason.contains("profile nope not found in"),
        "{}",
        e.reason
    );
    let e = chain_err(
        chain(files(&[("AWS_PROFILE", "assumer")]))
            .credentials()
            .await,
    );
    assert!(
        e.reason.contains("source_profile") && e.reason.contains("not supported"),
        "{}",
        e.reason
    );
    // A profile with settings only: the next sources, here none.
    let e = chain_err(
        chain(files(&[("AWS_PROFILE", "settings-only")]))
            .credentials()
            .await,
    );
    assert!(
        e.reason.contains("no AWS credentials found"),
        "{}",
        e.reason
    );
    // The environment comes first.
    let c = chain(files(&[
        ("AWS_PROFILE", "dev"),
        ("AWS_ACCESS_KEY_ID", "AKIDENV"),
        ("AWS_SECRET_ACCESS_KEY", KEY),
    ]));
    assert_eq!(c.credentials().await.unwrap().access_key_id, "AKIDENV");
}

fn creds_reply(n: usize, lifetime: Duration) -> Reply {
    let exp = time::OffsetDateTime::from(SystemTime::now() + lifetime)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    reply(
        200,
        serde_json::json!({
            "Code": "Success",
            "AccessKeyId": format!("ASIATEMP{n}"),
            "SecretAccessKey": KEY,
            "Token": TOKEN,
            "Expiration": exp,
        })
        .to_string(),
    )
}

#[tokio::test]
async fn container_endpoint_cache_refresh_and_fallback() {
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let f = Arc::clone(&failing);
    let (base, seen) = serve(Arc::new(move |req: &Req, n| {
        if req.headers.get("authorization").map(String::as_str) != Some("tok-file") {
            return reply(401, "");
        }
        if f.load(Ordering::SeqCst) {
            return reply(500, "");
        }
        creds_reply(n, Duration::from_secs(4))
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "tok-file\n").unwrap();
    let uri = format!("{base}/v2/credentials");
    let env = AwsEnv::from_pairs(&[
        ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri),
        (
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
            token_file.to_str().unwrap(),
        ),
        (
            "AWS_CONTAINER_AUTHORIZATION_TOKEN",
            "ignored-when-the-file-is-set",
        ),
    ]);
    let c = chain(env);
    let first = c.credentials().await.unwrap();
    assert_eq!(
        (first.access_key_id.as_str(), first.source.as_str()),
        ("ASIATEMP0", "container endpoint")
    );
    assert!(first.expiration.is_some() && first.renewable);
    assert_eq!(
        c.credentials().await.unwrap().access_key_id,
        "ASIATEMP0",
        "cached"
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
    // Half of the four seconds: refreshed.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(c.credentials().await.unwrap().access_key_id, "ASIATEMP1");
    // The endpoint fails while the current ones are still valid: they are used.
    failing.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(c.credentials().await.unwrap().access_key_id, "ASIATEMP1");
    // Once they expired, the failure is the answer.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let e = chain_err(c.credentials().await);
    assert_eq!(e.kind, chain::Failure::Unreachable);
    assert!(
        e.reason.contains("container endpoint: HTTP status 500"),
        "{}",
        e.reason
    );
    // invalidate drops cached ones.
    failing.store(false, Ordering::SeqCst);
    let n = c.credentials().await.unwrap().access_key_id.clone();
    c.invalidate().await;
    assert_ne!(c.credentials().await.unwrap().access_key_id, n);

    // A wrong token: denied.
    let c = chain(AwsEnv::from_pairs(&[
        ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri),
        ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "wrong"),
    ]));
    assert_eq!(
        chain_err(c.credentials().await).kind,
        chain::Failure::Denied
    );
    // Plain http to anything but loopback or the agents is refused before connecting.
    for bad in [
        "http://10.1.2.3/creds",
        "http://example.com/creds",
        "ftp://127.0.0.1/",
    ] {
        let c = chain(AwsEnv::from_pairs(&[(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            bad,
        )]));
        let e = chain_err(c.credentials().await);
        assert!(
            e.reason.contains("AWS_CONTAINER_CREDENTIALS_FULL_URI"),
            "{bad}: {}",
            e.reason
        );
    }
}

#[tokio::test]
async fn instance_metadata_v2() {
    let (base, seen) = serve(Arc::new(|req: &Req, n| {
        let token_ok = req
            .headers
            .get("x-aws-ec2-metadata-token")
            .map(String::as_str)
            == Some("imds-tok");
        match (req.method.as_str(), req.path.as_str()) {
            ("PUT", "/latest/api/token")
                if req
                    .headers
                    .contains_key("x-aws-ec2-metadata-token-ttl-seconds") =>
            {
                reply(200, "imds-tok")
            }
            ("GET", "/latest/meta-data/iam/security-credentials/") if token_ok => {
                reply(200, "role-a\n")
            }
            ("GET", "/latest/meta-data/iam/security-credentials/role-a") if token_ok => {
                creds_reply(n, Duration::from_secs(3600))
            }
            _ => reply(401, ""),
        }
    }))
    .await;
    let c = chain(AwsEnv::from_pairs(&[(
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        &base,
    )]));
    let creds = c.credentials().await.unwrap();
    assert_eq!(creds.source, "instance metadata");
    assert_eq!(creds.access_key_id, "ASIATEMP2");
    let paths: Vec<String> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(paths.len(), 3, "{paths:?}");

    // Nothing listening: a short failure, named.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = chain(AwsEnv::from_pairs(&[(
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        &format!("http://127.0.0.1:{port}"),
    )]));
    let started = std::time::Instant::now();
    let e = chain_err(c.credentials().await);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(e.kind, chain::Failure::Unreachable);
    assert!(
        e.reason.contains("instance metadata failed"),
        "{}",
        e.reason
    );
}

#[tokio::test]
async fn web_identity_through_sts() {
    let (base, seen) = serve(Arc::new(|req: &Req, _| {
        let form: HashMap<String, String> =
            form_urlencoded::parse(&req.body).into_owned().collect();
        if form.get("WebIdentityToken").map(String::as_str) != Some("jwt-token") {
            return reply(
                400,
                "<ErrorResponse><Error><Type>Sender</Type><Code>InvalidIdentityToken</Code><Message>no</Message></Error></ErrorResponse>",
            );
        }
        assert_eq!(form["Action"], "AssumeRoleWithWebIdentity");
        assert_eq!(form["RoleArn"], "arn:aws:iam::1:role/web");
        reply(
            200,
            format!(
                "<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult><Credentials>\
                 <SessionToken>{TOKEN}</SessionToken><SecretAccessKey>{KEY}&amp;</SecretAccessKey>\
                 <Expiration>2099-01-01T00:00:00Z</Expiration><AccessKeyId>ASIAWEB</AccessKeyId>\
                 </Credentials></AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>"
            ),
        )
    }))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("token");
    std::fs::write(&tok, "jwt-token\n").unwrap();
    let env = |file: &str| {
        AwsEnv::from_pairs(&[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", file),
            ("AWS_ROLE_ARN", "arn:aws:iam::1:role/web"),
            ("AWS_ROLE_SESSION_NAME", "sess"),
            ("AWS_ENDPOINT_URL_STS", &base),
        ])
    };
    let c = chain(env(tok.to_str().unwrap()));
    let creds = c.credentials().await.unwrap();
    assert_eq!(
        (creds.access_key_id.as_str(), creds.source.as_str()),
        ("ASIAWEB", "web identity")
    );
    assert_eq!(
        creds.secret_access_key.expose(),
        format!("{KEY}&").as_bytes()
    );
    let form: HashMap<String, String> = form_urlencoded::parse(&seen.lock().unwrap()[0].body)
        .into_owned()
        .collect();
    assert_eq!(form["RoleSessionName"], "sess");
    std::fs::write(&tok, "other-token").unwrap();
    c.invalidate().await;
    let e = chain_err(c.credentials().await);
    assert_eq!(e.kind, chain::Failure::Denied);
    assert!(e.reason.contains("InvalidIdentityToken"), "{}", e.reason);
    let e = chain_err(chain(env("/nonexistent/token")).credentials().await);
    assert!(
        e.reason.contains("cannot read the token file"),
        "{}",
        e.reason
    );
}

/// Renewable credentials that AWS calls expired are fetched again, and the call
/// retried once.
#[tokio::test]
async fn expired_renewable_credentials_are_renewed_and_retried_once() {
    let (creds_base, creds_seen) = serve(Arc::new(|_: &Req, n| {
        creds_reply(n, Duration::from_secs(3600))
    }))
    .await;
    let (sm_base, sm_seen) = serve(Arc::new(|req: &Req, _| {
        if req.headers["authorization"].contains("ASIATEMP0") {
            aws_error(400, "ExpiredTokenException")
        } else {
            sm_json(serde_json::json!({"SecretString": VALUE}))
        }
    }))
    .await;
    let uri = format!("{creds_base}/creds");
    let env = AwsEnv::from_pairs(&[("AWS_CONTAINER_CREDENTIALS_FULL_URI", &uri)]);
    let p = AwsProvider::with_env("aws", &cfg(Some(&sm_base)), env).unwrap();
    assert_eq!(p.get("db").await.unwrap().value.expose(), VALUE.as_bytes());
    assert_eq!(creds_seen.lock().unwrap().len(), 2);
    assert_eq!(sm_seen.lock().unwrap().len(), 2);
}
