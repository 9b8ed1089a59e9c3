//! The AWS credential sources the `aws` provider's chain reads besides files and the
//! environment, on one loopback test server (plain std threads, a small HTTP/1.1
//! parser). Each follows the documented API:
//!
//! * the ECS / EKS **container credentials endpoint**
//!   (<https://docs.aws.amazon.com/AmazonECS/latest/developerguide/task-iam-roles.html>,
//!   <https://docs.aws.amazon.com/sdkref/latest/guide/feature-container-credentials.html>):
//!   `GET /creds` with `Authorization: TOKEN` (the value of
//!   `AWS_CONTAINER_AUTHORIZATION_TOKEN`), answering `{"AccessKeyId", "SecretAccessKey",
//!   "Token", "Expiration", "RoleArn"}`; a wrong or missing token is 401;
//! * **instance metadata, IMDSv2**
//!   (<https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/configuring-instance-metadata-service.html>):
//!   `PUT /latest/api/token` with `X-aws-ec2-metadata-token-ttl-seconds` gives a session
//!   token; `GET /latest/meta-data/iam/security-credentials/` (with
//!   `X-aws-ec2-metadata-token`) the role name; `GET .../ROLE` the credentials
//!   (`{"Code": "Success", "Type": "AWS-HMAC", ...}`); without the token, 401;
//! * **STS `AssumeRoleWithWebIdentity`**
//!   (<https://docs.aws.amazon.com/STS/latest/APIReference/API_AssumeRoleWithWebIdentity.html>):
//!   `POST /` with a form body (`Action`, `Version`, `RoleArn`, `RoleSessionName`,
//!   `WebIdentityToken`), answering the XML `AssumeRoleWithWebIdentityResponse`; a
//!   wrong token is 400 `InvalidIdentityToken` in an XML `ErrorResponse`.
//!
//! The credentials handed out are the test's (normally temporary credentials from
//! moto's STS, so moto checks them), one set after the other, each with an
//! `Expiration` of now + the server's lifetime. Requests are counted per source.

use std::{
    collections::HashMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, SystemTime},
};

use crate::moto::TempCreds;

/// The role the fake's IMDS reports.
pub const IMDS_ROLE: &str = "broker-instance-role";

struct State {
    creds: Vec<TempCreds>,
    next: AtomicUsize,
    lifetime: Duration,
    container_token: String,
    web_token: String,
    role_arn: String,
    counts: Mutex<HashMap<&'static str, usize>>,
}

/// The running server; it stops when dropped.
pub struct FakeAws {
    pub addr: SocketAddr,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
}

impl FakeAws {
    /// Start on 127.0.0.1 handing out `creds` in turn (each expiring `lifetime` after it
    /// is handed out); `container_token` is the container endpoint's authorization
    /// token, `web_token` the identity token STS accepts for `role_arn`.
    #[must_use]
    pub fn start(
        creds: Vec<TempCreds>,
        lifetime: Duration,
        container_token: &str,
        web_token: &str,
        role_arn: &str,
    ) -> Self {
        assert!(!creds.is_empty(), "credentials to hand out");
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake aws");
        let addr = listener.local_addr().expect("local_addr");
        let state = Arc::new(State {
            creds,
            next: AtomicUsize::new(0),
            lifetime,
            container_token: container_token.to_owned(),
            web_token: web_token.to_owned(),
            role_arn: role_arn.to_owned(),
            counts: Mutex::new(HashMap::new()),
        });
        let stop = Arc::new(AtomicBool::new(false));
        let (st, stp) = (Arc::clone(&state), Arc::clone(&stop));
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stp.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let st = Arc::clone(&st);
                thread::spawn(move || serve(&st, conn));
            }
        });
        Self { addr, state, stop }
    }

    /// `http://127.0.0.1:P`.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests answered so far by `source`: `container`, `imds-token`, `imds-role`,
    /// `imds-creds`, `sts`, or `other`.
    #[must_use]
    pub fn count(&self, source: &str) -> usize {
        self.state
            .counts
            .lock()
            .expect("lock")
            .get(source)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for FakeAws {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

/// One request, then the connection is closed.
fn serve(st: &State, conn: std::net::TcpStream) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
    }
    let len: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
        .min(64 * 1024);
    let mut body = vec![0; len];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let (source, status, ctype, reply) = route(st, &method, &path, &headers, &body);
    *st.counts.lock().expect("lock").entry(source).or_default() += 1;
    let mut conn = conn;
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reply}",
        reply.len()
    );
}

const IMDS_TOKEN: &str = "fake-imds-session-token-5c1e";

fn route(
    st: &State,
    method: &str,
    path: &str,
    headers: &HashMap<String, String>,
    body: &[u8],
) -> (&'static str, &'static str, &'static str, String) {
    const JSON: &str = "application/json";
    const XML: &str = "text/xml";
    const TEXT: &str = "text/plain";
    let imds_ok = headers.get("x-aws-ec2-metadata-token").map(String::as_str) == Some(IMDS_TOKEN);
    let creds_path = "/latest/meta-data/iam/security-credentials/";
    match (method, path) {
        ("GET", "/creds") => {
            if headers.get("authorization") != Some(&st.container_token) {
                return (
                    "container",
                    "401 Unauthorized",
                    JSON,
                    r#"{"message":"bad token"}"#.into(),
                );
            }
            let (c, exp) = next_creds(st);
            let reply = serde_json::json!({
                "AccessKeyId": c.access_key_id,
                "SecretAccessKey": c.secret_access_key,
                "Token": c.session_token,
                "Expiration": exp,
                "RoleArn": st.role_arn,
            });
            ("container", "200 OK", JSON, reply.to_string())
        }
        ("PUT", "/latest/api/token") => {
            if !headers.contains_key("x-aws-ec2-metadata-token-ttl-seconds") {
                return ("imds-token", "400 Bad Request", TEXT, String::new());
            }
            ("imds-token", "200 OK", TEXT, IMDS_TOKEN.into())
        }
        ("GET", p) if p == creds_path => {
            if !imds_ok {
                return ("imds-role", "401 Unauthorized", TEXT, String::new());
            }
            ("imds-role", "200 OK", TEXT, IMDS_ROLE.into())
        }
        ("GET", p) if p.strip_prefix(creds_path) == Some(IMDS_ROLE) => {
            if !imds_ok {
                return ("imds-creds", "401 Unauthorized", TEXT, String::new());
            }
            let (c, exp) = next_creds(st);
            let reply = serde_json::json!({
                "Code": "Success",
                "LastUpdated": rfc3339(SystemTime::now()),
                "Type": "AWS-HMAC",
                "AccessKeyId": c.access_key_id,
                "SecretAccessKey": c.secret_access_key,
                "Token": c.session_token,
                "Expiration": exp,
            });
            ("imds-creds", "200 OK", JSON, reply.to_string())
        }
        ("POST", "/") => {
            let form: HashMap<String, String> = form_pairs(body);
            let get = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
            if get("Action") != "AssumeRoleWithWebIdentity" || get("Version") != "2011-06-15" {
                return ("sts", "400 Bad Request", XML, sts_error("InvalidAction"));
            }
            if get("WebIdentityToken") != st.web_token {
                return (
                    "sts",
                    "400 Bad Request",
                    XML,
                    sts_error("InvalidIdentityToken"),
                );
            }
            if get("RoleArn") != st.role_arn || get("RoleSessionName").is_empty() {
                return ("sts", "403 Forbidden", XML, sts_error("AccessDenied"));
            }
            let (c, exp) = next_creds(st);
            let reply = format!(
                "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
                 <AssumeRoleWithWebIdentityResult>\
                 <SubjectFromWebIdentityToken>system:serviceaccount:default:app</SubjectFromWebIdentityToken>\
                 <AssumedRoleUser><Arn>{arn}/{session}</Arn><AssumedRoleId>AROA:{session}</AssumedRoleId></AssumedRoleUser>\
                 <Credentials><SessionToken>{token}</SessionToken><SecretAccessKey>{secret}</SecretAccessKey>\
                 <Expiration>{exp}</Expiration><AccessKeyId>{id}</AccessKeyId></Credentials>\
                 <Audience>sts.amazonaws.com</Audience></AssumeRoleWithWebIdentityResult>\
                 <ResponseMetadata><RequestId>ad4156e9-bce1-11e2-82e6-6b6efEXAMPLE</RequestId></ResponseMetadata>\
                 </AssumeRoleWithWebIdentityResponse>",
                arn = st.role_arn,
                session = xml_escape(get("RoleSessionName")),
                token = xml_escape(&c.session_token),
                secret = xml_escape(&c.secret_access_key),
                id = c.access_key_id,
            );
            ("sts", "200 OK", XML, reply)
        }
        _ => ("other", "404 Not Found", TEXT, String::new()),
    }
}

fn next_creds(st: &State) -> (TempCreds, String) {
    let i = st.next.fetch_add(1, Ordering::SeqCst) % st.creds.len();
    (
        st.creds[i].clone(),
        rfc3339(SystemTime::now() + st.lifetime),
    )
}

fn sts_error(code: &str) -> String {
    format!(
        "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type>\
         <Code>{code}</Code><Message>rejected by the fake</Message></Error>\
         <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId></ErrorResponse>"
    )
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `application/x-www-form-urlencoded` pairs (`+` is a space, `%XX` decoded).
fn form_pairs(body: &[u8]) -> HashMap<String, String> {
    let text = String::from_utf8_lossy(body);
    let decode = |s: &str| {
        let s = s.replace('+', " ");
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            if b[i] == b'%'
                && i + 2 < b.len()
                && let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    text.split('&')
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

/// `2026-12-01T15:00:00Z`.
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_and_forms() {
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_764_601_200)),
            "2025-12-01T15:00:00Z"
        );
        let f = form_pairs(b"Action=AssumeRoleWithWebIdentity&WebIdentityToken=a%2Bb%3D+c");
        assert_eq!(f["WebIdentityToken"], "a+b= c");
    }
}
