//! moto's AWS server (PyPI `moto[server]`, pinned in [`crate::clients::PIP_PACKAGES`],
//! installed by `cargo xtask setup` into `target/clients/python`): a real AWS Secrets
//! Manager, IAM and STS API on a loopback port, **with SigV4 checking on**.
//!
//! moto checks signatures once `INITIAL_NO_AUTH_ACTION_COUNT` requests have been
//! served; it is started with a count of 3, exactly what [`Moto::start`] spends creating
//! an IAM user `broker` (allowed everything) and its access key. Every later request,
//! the broker's included, must be signed with that key (or with temporary credentials
//! moto's STS issued): a wrong secret key gets `SignatureDoesNotMatch`.
//!
//! moto runs behind a small WSGI wrapper that counts requests by `X-Amz-Target` (see
//! [`Moto::calls`]). Set-up and rotation go through boto3 (it comes with moto), one
//! `python3` per call, signed with the IAM user's key. The server is killed on drop.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{clients, free_port, http_get, wait_port};

/// The region everything is created in.
pub const REGION: &str = "us-east-1";

/// moto's server with per-`X-Amz-Target` request counts at `/_test/counts`.
const LAUNCHER: &str = r#"
import json, sys, threading
from collections import Counter
from werkzeug.serving import run_simple
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app

counts = Counter()
lock = threading.Lock()
moto_app = DomainDispatcherApplication(create_backend_app)

def app(environ, start_response):
    if environ.get("PATH_INFO") == "/_test/counts":
        with lock:
            body = json.dumps(counts).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    with lock:
        counts[environ.get("HTTP_X_AMZ_TARGET") or "other"] += 1
    return moto_app(environ, start_response)

run_simple("127.0.0.1", int(sys.argv[1]), app, threaded=True, request_handler=MotoRequestHandler)
"#;

/// Clients for the scripts of [`Moto::boto`]: `sm`, `iam`, `sts`.
const PRELUDE: &str = r#"
import base64, json, sys
import boto3
kw = dict(endpoint_url=sys.argv[1], region_name=sys.argv[2], aws_access_key_id=sys.argv[3], aws_secret_access_key=sys.argv[4])
sm = boto3.client("secretsmanager", **kw)
iam = boto3.client("iam", **kw)
sts = boto3.client("sts", **kw)
args = sys.argv[5:]
"#;

/// Temporary credentials from moto's STS.
#[derive(Debug, Clone)]
pub struct TempCreds {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
}

/// A running moto server with an IAM user's key.
pub struct Moto {
    pub addr: SocketAddr,
    /// The IAM user `broker`'s access key id and secret access key.
    pub access_key_id: String,
    pub secret_access_key: String,
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Whether moto is installed (`cargo xtask setup`).
    #[must_use]
    pub fn installed() -> bool {
        clients::python_deps().join("moto").is_dir()
    }

    /// Start moto on a free loopback port and create the IAM user and its key.
    ///
    /// # Panics
    /// When moto is not installed, does not start, or the set-up fails.
    #[must_use]
    pub fn start() -> Self {
        assert!(
            Self::installed(),
            "moto is not installed in {}: run `cargo xtask setup`",
            clients::python_deps().display()
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("moto.log");
        let port = free_port();
        let out = std::fs::File::create(&log).expect("moto log");
        let child = Command::new(clients::PYTHON)
            .arg("-c")
            .arg(LAUNCHER)
            .arg(port.to_string())
            .env("PYTHONPATH", clients::python_deps())
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "3")
            // No AWS settings of the machine leak into moto.
            .env_remove("AWS_ACCESS_KEY_ID")
            .env_remove("AWS_SECRET_ACCESS_KEY")
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("spawn moto");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let mut m = Self {
            addr,
            access_key_id: String::new(),
            secret_access_key: String::new(),
            child,
            log,
            _dir: dir,
        };
        wait_port(addr, Duration::from_secs(60));
        // The three unauthenticated actions: user, policy, key.
        let out = m.boto_as(
            "AKIAIOSFODNN7EXAMPLE",
            "bootstrap",
            r#"
iam.create_user(UserName="broker")
iam.put_user_policy(UserName="broker", PolicyName="all", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
k = iam.create_access_key(UserName="broker")["AccessKey"]
print(k["AccessKeyId"], k["SecretAccessKey"])
"#,
            &[],
        );
        let mut parts = out.split_whitespace();
        m.access_key_id = parts.next().expect("access key id").to_owned();
        m.secret_access_key = parts.next().expect("secret access key").to_owned();
        m
    }

    /// `http://127.0.0.1:PORT`, for `endpoint:` or `AWS_ENDPOINT_URL`.
    #[must_use]
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// moto's own log (requests, tracebacks).
    #[must_use]
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Run a boto3 script (after [`PRELUDE`]: `sm`, `iam`, `sts`, `args`) signed with
    /// the IAM user's key; its stdout.
    ///
    /// # Panics
    /// When the script fails.
    #[must_use]
    pub fn boto(&self, script: &str, args: &[&str]) -> String {
        self.boto_as(&self.access_key_id, &self.secret_access_key, script, args)
    }

    fn boto_as(&self, key_id: &str, secret: &str, script: &str, args: &[&str]) -> String {
        let out = Command::new(clients::PYTHON)
            .arg("-c")
            .arg(format!("{PRELUDE}\n{script}"))
            .arg(self.endpoint())
            .arg(REGION)
            .arg(key_id)
            .arg(secret)
            .args(args)
            .env("PYTHONPATH", clients::python_deps())
            .env_remove("AWS_PROFILE")
            .env("AWS_CONFIG_FILE", "/dev/null")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .stdin(Stdio::null())
            .output()
            .expect("spawn python3 (boto3)");
        assert!(
            out.status.success(),
            "boto3 script failed: {}\nmoto log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_text()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Create a secret holding a string; its ARN.
    #[must_use]
    pub fn create_secret_string(&self, name: &str, value: &str) -> String {
        self.boto(
            r#"print(sm.create_secret(Name=args[0], SecretString=args[1])["ARN"])"#,
            &[name, value],
        )
        .trim()
        .to_owned()
    }

    /// Create a secret holding bytes (`SecretBinary`).
    pub fn create_secret_binary(&self, name: &str, value: &[u8]) {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(value);
        let _ = self.boto(
            r#"sm.create_secret(Name=args[0], SecretBinary=base64.b64decode(args[1]))"#,
            &[name, &b64],
        );
    }

    /// A new version of a string secret (`PutSecretValue`): it becomes `AWSCURRENT`,
    /// the old one `AWSPREVIOUS`.
    pub fn put_secret_string(&self, name: &str, value: &str) {
        let _ = self.boto(
            r#"sm.put_secret_value(SecretId=args[0], SecretString=args[1])"#,
            &[name, value],
        );
    }

    /// Temporary credentials: a role `broker-role` (created on first use, allowed
    /// everything) assumed through STS. moto checks their session token.
    #[must_use]
    pub fn assume_role(&self) -> TempCreds {
        let out = self.boto(
            r#"
try:
    iam.create_role(RoleName="broker-role", AssumeRolePolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}]}))
    iam.put_role_policy(RoleName="broker-role", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
except iam.exceptions.EntityAlreadyExistsException:
    pass
c = sts.assume_role(RoleArn="arn:aws:iam::123456789012:role/broker-role", RoleSessionName="broker-test")["Credentials"]
print(c["AccessKeyId"], c["SecretAccessKey"], c["SessionToken"])
"#,
            &[],
        );
        let mut p = out.split_whitespace();
        TempCreds {
            access_key_id: p.next().expect("key id").to_owned(),
            secret_access_key: p.next().expect("secret").to_owned(),
            session_token: p.next().expect("token").to_owned(),
        }
    }

    /// Requests moto received with `X-Amz-Target: target`
    /// (e.g. `secretsmanager.GetSecretValue`).
    #[must_use]
    pub fn calls(&self, target: &str) -> usize {
        let (status, body) = http_get(self.addr, "/_test/counts").expect("moto counts");
        assert_eq!(status, 200, "{body}");
        let counts: HashMap<String, usize> = serde_json::from_str(&body).expect("counts JSON");
        counts.get(target).copied().unwrap_or(0)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
