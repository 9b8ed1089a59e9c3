//! `connector::http::sigv4` against a real verifier: botocore, the signer of the AWS CLI
//! and boto3.
//!
//! For each request, botocore signs it as an application would (dummy keys, a dummy
//! session token), the broker's signer re-signs that request with the real keys, and
//! the result must equal what botocore produces when it signs the original request
//! with the real keys at the same instant. Skipped (with a note on stderr) where
//! `python3 -c 'import botocore'` fails.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, UNIX_EPOCH};

use broker::connector::http::sigv4::{self, AwsKeys, Payload};
use broker::secret::Secret;
use serde_json::{Value, json};

const REAL_KEY_ID: &str = "AKIAIOSFODNN7EXAMPLE";
const REAL_SECRET: &str = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
const REAL_TOKEN: &str =
    "IQoJb3JpZ2luX2VjEXAMPLE//////////wEaCXVzLWVhc3QtMSJHMEUCIQD+token/with+base64==";
/// 2024-02-29T23:59:59Z.
const WHEN_SECS: u64 = 1_709_251_199;
const WHEN: &str = "20240229T235959Z";

/// Signs each request twice with botocore: with the application's dummy credentials,
/// then with the real ones. Prints a JSON list of `{app: [[name, value]...], real: ...}`.
const BOTOCORE: &str = r#"
import datetime, json, sys
from unittest import mock
import botocore.auth
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

def sign(spec, key_id, secret, token):
    request = AWSRequest(method=spec["method"], url=spec["url"],
                         data=spec["body"].encode(), headers=dict(spec["headers"]))
    signer_class = S3SigV4Auth if spec["service"] == "s3" else SigV4Auth
    when = datetime.datetime.strptime(spec["when"], "%Y%m%dT%H%M%SZ").replace(
        tzinfo=datetime.timezone.utc)
    if hasattr(botocore.auth, "get_current_datetime"):
        clock = mock.patch.object(botocore.auth, "get_current_datetime", return_value=when)
    else:
        # Older botocore (Debian's 1.29) reads datetime.datetime.utcnow().
        class Frozen(datetime.datetime):
            @classmethod
            def utcnow(cls):
                return when.replace(tzinfo=None)
        clock = mock.patch.object(botocore.auth.datetime, "datetime", Frozen)
    with clock:
        signer_class(Credentials(key_id, secret, token), spec["service"], spec["region"]).add_auth(request)
    return list(request.headers.items())

out = []
for spec in json.load(sys.stdin):
    app = sign(spec, "AKIDAPPDUMMY", "app-dummy-secret", spec["app_token"])
    real = sign(spec, spec["key_id"], spec["secret"], spec["token"])
    out.append({"app": app, "real": real})
json.dump(out, sys.stdout)
"#;

fn botocore_available() -> bool {
    Command::new("/usr/bin/python3")
        .args(["-c", "import botocore"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn botocore(specs: &Value) -> Vec<Value> {
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", BOTOCORE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(specs.to_string().as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "botocore helper failed");
    serde_json::from_slice::<Value>(&output.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn header<'a>(headers: &'a Value, name: &str) -> Option<&'a str> {
    headers
        .as_array()
        .unwrap()
        .iter()
        .find(|pair| pair[0].as_str().unwrap().eq_ignore_ascii_case(name))
        .map(|pair| pair[1].as_str().unwrap())
}

/// `(method, url as sent, headers, body, service, region, with a session token)`.
type Case = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static str,
    &'static str,
    &'static str,
    bool,
);

const CASES: &[Case] = &[
    // S3 upload: key with a space, a '+', an empty segment; user metadata; a User-Agent
    // botocore does not sign.
    (
        "PUT",
        "http://examplebucket.s3.eu-west-3.amazonaws.com/photos//my%20photo%2Bv2.jpg",
        &[
            ("Content-Type", "image/jpeg"),
            ("x-amz-meta-note", "a   b"),
            ("User-Agent", "app/1.0"),
        ],
        "jpeg bytes",
        "s3",
        "eu-west-3",
        true,
    ),
    // S3 list: a query to sort and keep encoded, a non-ASCII key prefix.
    (
        "GET",
        "http://examplebucket.s3.amazonaws.com/?prefix=%E2%82%AC%20x&list-type=2&delimiter=%2F",
        &[],
        "",
        "s3",
        "us-east-1",
        false,
    ),
    // S3 sub-resource without a value, a key that would be normalised elsewhere.
    (
        "GET",
        "http://examplebucket.s3.amazonaws.com/a/./b/../c?acl",
        &[],
        "",
        "s3",
        "us-east-1",
        true,
    ),
    // STS with a form body.
    (
        "POST",
        "http://sts.amazonaws.com/",
        &[(
            "Content-Type",
            "application/x-www-form-urlencoded; charset=utf-8",
        )],
        "Action=GetCallerIdentity&Version=2011-06-15",
        "sts",
        "us-east-1",
        true,
    ),
    // DynamoDB JSON.
    (
        "POST",
        "http://dynamodb.eu-central-1.amazonaws.com/",
        &[
            ("Content-Type", "application/x-amz-json-1.0"),
            ("X-Amz-Target", "DynamoDB_20120810.ListTables"),
        ],
        "{}",
        "dynamodb",
        "eu-central-1",
        false,
    ),
    // API Gateway: the path encoded again, dot segments and empty segments removed.
    (
        "GET",
        "http://abc123.execute-api.eu-west-1.amazonaws.com/prod//items/./a%20b%2Fc/%C3%A9?x=%C3%A9&a=1",
        &[("Accept", "application/json")],
        "",
        "execute-api",
        "eu-west-1",
        true,
    ),
];

#[test]
fn sigv4_matches_botocore() {
    if !botocore_available() {
        // CI (and `cargo xtask test`) installs python3-botocore: there, missing is a failure.
        assert!(
            std::env::var("BROKER_REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
            "/usr/bin/python3 cannot import botocore (cargo xtask setup installs python3-botocore)"
        );
        eprintln!("sigv4_matches_botocore: SKIPPED, /usr/bin/python3 cannot import botocore");
        return;
    }
    let specs: Vec<Value> = CASES
        .iter()
        .map(|(method, url, headers, body, service, region, token)| {
            json!({
                "method": method, "url": url, "headers": headers, "body": body,
                "service": service, "region": region, "when": WHEN,
                "key_id": REAL_KEY_ID, "secret": REAL_SECRET,
                "token": token.then_some(REAL_TOKEN),
                "app_token": token.then_some("app-dummy-session-token"),
            })
        })
        .collect();
    let signed = botocore(&Value::Array(specs));
    assert_eq!(signed.len(), CASES.len());

    for (case, result) in CASES.iter().zip(&signed) {
        let (method, url, _, body, _, _, token) = *case;
        // The request as the application sends it, signed by botocore with dummy keys.
        let mut builder = http::Request::builder().method(method).uri(url);
        for pair in result["app"].as_array().unwrap() {
            builder = builder.header(pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
        }
        let (mut parts, ()) = builder.body(()).unwrap().into_parts();
        let app_authorization = parts.headers["authorization"].to_str().unwrap().to_owned();
        assert!(
            app_authorization.contains("Credential=AKIDAPPDUMMY/"),
            "{app_authorization}"
        );
        let scope = sigv4::scope_from_authorization(&app_authorization).expect("scope");
        let keys = AwsKeys {
            access_key_id: REAL_KEY_ID.to_owned(),
            secret_access_key: Secret::from_str_value(REAL_SECRET),
            session_token: token.then(|| Secret::from_str_value(REAL_TOKEN)),
        };
        let when = UNIX_EPOCH + Duration::from_secs(WHEN_SECS);
        // Both ways of giving the payload: the body itself, and the hash the
        // application declared (S3 only: other services send none).
        let mut payloads = vec![Payload::Bytes(body.as_bytes())];
        if let Some(declared) = sigv4::declared_payload(&parts.headers).unwrap() {
            payloads.push(declared);
        }
        let original = parts.headers.clone();
        for payload in payloads {
            parts.headers = original.clone();
            sigv4::sign(&mut parts, payload, &keys, &scope, when).unwrap();
            let real = &result["real"];
            for name in [
                "authorization",
                "x-amz-date",
                "x-amz-security-token",
                "x-amz-content-sha256",
            ] {
                assert_eq!(
                    parts.headers.get(name).map(|v| v.to_str().unwrap()),
                    header(real, name),
                    "{method} {url}: {name}"
                );
            }
        }
    }
}
