//! Egress policy, end to end: real sandboxes reaching a lab internet (torpor-testkit) through their
//! namespace's firewall and resolver. Everything is checked from inside the guest, with the
//! tools an agent would use (curl, ping, python).

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, Options};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

// curl's exit codes: what failed tells a refused name from a reset from a hang.
const CURL_OK: i64 = 0;
const CURL_NO_NAME: i64 = 6;
const CURL_NO_CONNECT: i64 = 7;

async fn lab_daemon() -> Daemon {
    Daemon::start_with(Options { internet_ttl: Some(2), ..Default::default() }).await
}

/// (exit code, stdout and stderr together) of a shell script in the guest.
async fn sh(d: &Daemon, id: &str, script: &str) -> (i64, String) {
    let (code, out, err) = d.exec(id, &["sh", "-c", script]).await;
    let text = format!("{}{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
    (code.expect("the script was not killed by a signal"), text)
}

/// `curl` with a connect timeout far above the time a reset or refusal takes: a rejected
/// connection exits 7 at once, a silently dropped one would exit 28.
async fn curl(d: &Daemon, id: &str, url: &str) -> (i64, String) {
    sh(d, id, &format!("curl -sS --connect-timeout 5 -m 10 {url}")).await
}

async fn expect_curl(d: &Daemon, id: &str, url: &str, code: i64, what: &str) -> String {
    let (got, out) = curl(d, id, url).await;
    assert_eq!(got, code, "{what}: curl {url} exited {got}: {out}");
    out
}

/// A DNS query from the guest (python, so the image needs no dig): prints `rcode=N answers=M`
/// and exits 0 when any answer came back, prints the error and exits 1 when none did.
const DNS_QUERY: &str = r#"
import random, socket, struct, sys
server, name, transport = sys.argv[1], sys.argv[2], sys.argv[3]
q = struct.pack(">HHHHHH", random.randint(0, 65535), 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
try:
    if transport == "tcp":
        s = socket.create_connection((server, 53), timeout=3)
        s.sendall(struct.pack(">H", len(q)) + q)
        data = s.recv(4096)[2:]
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.connect((server, 53))
        s.send(q)
        data = s.recv(4096)
except Exception as e:
    print("error %s: %s" % (type(e).__name__, e))
    sys.exit(1)
print("rcode=%d answers=%d" % (data[3] & 0xF, struct.unpack(">H", data[6:8])[0]))
"#;

/// (answered, what happened) of a DNS query from the guest to `server` over `transport`.
async fn dns(d: &Daemon, id: &str, server: &str, name: &str, transport: &str) -> (bool, String) {
    let (code, out) = sh(d, id, &format!("python3 /tmp/dnsq.py {server} {name} {transport}")).await;
    (code == 0, out)
}

async fn set_policy(d: &Daemon, id: &str, policy: Value) -> Value {
    let (status, body) = d.call(Method::PUT, &format!("/v1/sandboxes/{id}/network"), Some(policy)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

fn allowlist(domains: &[&str]) -> Value {
    json!({ "mode": "allowlist", "allow_domains": domains })
}

#[tokio::test]
async fn allowlist_is_enforced_below_the_guest_and_follows_changes() {
    let mut d = lab_daemon().await;
    let lab = d.internet.as_ref().unwrap();
    let (allowed, api, evil, moved) = (lab.addr(10), lab.addr(11), lab.addr(12), lab.addr(13));
    let rogue = lab.rogue_dns();
    lab.set_records(&[("allowed.test", allowed), ("api.allowed.test", api), ("evil.test", evil)]).unwrap();

    let policy = allowlist(&["allowed.test", "*.allowed.test"]);
    let sandbox = d.create(json!({ "network": policy, "idle_timeout_secs": 0 })).await;
    let id = sandbox["id"].as_str().unwrap().to_owned();
    let upload = d.request(Method::PUT, &format!("/v1/sandboxes/{id}/files?path=/tmp/dnsq.py")).body(DNS_QUERY);
    assert!(upload.send().await.unwrap().status().is_success());
    let (status, net) = d.call(Method::GET, &format!("/v1/sandboxes/{id}/network"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!((net["mode"].as_str(), net["enforced"].as_bool()), (Some("allowlist"), Some(true)), "{net}");

    // Allowed names, exact and wildcard.
    let body = expect_curl(&d, &id, "http://allowed.test/", CURL_OK, "allowed name").await;
    assert_eq!(body.trim(), format!("hello from {allowed}"));
    let body = expect_curl(&d, &id, "http://api.allowed.test/", CURL_OK, "wildcard name").await;
    assert_eq!(body.trim(), format!("hello from {api}"));
    let (_, net) = d.call(Method::GET, &format!("/v1/sandboxes/{id}/network"), None).await;
    let resolved: Vec<&str> =
        net["resolved"].as_array().unwrap().iter().map(|r| r["address"].as_str().unwrap()).collect();
    assert!(resolved.contains(&allowed.to_string().as_str()), "{net}");

    // A name outside the policy does not resolve; its address and one never resolved are reset.
    expect_curl(&d, &id, "http://evil.test/", CURL_NO_NAME, "denied name").await;
    let (answered, out) = dns(&d, &id, "192.168.240.1", "evil.test", "udp").await;
    assert!(
        answered && out.contains("rcode=3 answers=0"),
        "the sandbox resolver must answer NXDOMAIN for evil.test: {out}"
    );
    let (answered, out) = dns(&d, &id, "192.168.240.1", "allowed.test", "tcp").await;
    assert!(answered && out.contains("rcode=0 answers=1"), "the sandbox resolver answers over TCP too: {out}");
    expect_curl(&d, &id, &format!("http://{evil}/"), CURL_NO_CONNECT, "literal denied address").await;
    expect_curl(&d, &id, &format!("http://{moved}/"), CURL_NO_CONNECT, "address never resolved").await;

    // Other resolvers, over UDP and TCP, get nothing; ICMP and IPv6 to evil fail.
    let (answered, out) = dns(&d, &id, &rogue.to_string(), "allowed.test", "udp").await;
    // An ICMP "administratively prohibited" comes back: no answer, and no waiting for one.
    assert!(
        !answered && out.contains("No route to host"),
        "the rogue resolver over UDP must be refused at once: {out}"
    );
    let (answered, out) = dns(&d, &id, &rogue.to_string(), "allowed.test", "tcp").await;
    assert!(
        !answered && out.contains("ConnectionRefused"),
        "the rogue resolver over TCP must be refused at once: {out}"
    );
    let (code, out) = sh(&d, &id, &format!("ping -c 1 -W 2 {evil}")).await;
    assert_ne!(code, 0, "ping to evil answered: {out}");
    let (code, _) = sh(&d, &id, &format!("ping -c 1 -W 2 {allowed}")).await;
    assert_eq!(code, 0, "ping to a resolved allowed address must work (the check above is not vacuous)");
    let (code, out) = sh(&d, &id, "curl -sS -6 --connect-timeout 3 http://[2001:db8::12]/").await;
    assert_ne!(code, 0, "IPv6 went through: {out}");

    // The metadata address, the host's own services and other sandboxes are out of reach.
    expect_curl(&d, &id, "http://169.254.169.254/latest/meta-data/", CURL_NO_CONNECT, "metadata").await;
    let host_service = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = host_service.local_addr().unwrap().port();
    for host_ip in host_addresses() {
        assert!(std::net::TcpStream::connect((host_ip, port)).is_ok(), "the host service must answer the host");
        expect_curl(&d, &id, &format!("http://{host_ip}:{port}/"), CURL_NO_CONNECT, "host address").await;
    }
    expect_curl(&d, &id, "http://192.168.240.1:22/", CURL_NO_CONNECT, "the namespace's own address").await;
    let other = d.create(json!({ "idle_timeout_secs": 0 })).await;
    let other_supervisor = other["network"]["host_address"].as_str().unwrap().to_owned();
    expect_curl(&d, &id, &format!("http://{other_supervisor}/"), CURL_NO_CONNECT, "another sandbox").await;

    // Root in the guest changes nothing: a spoofed source is dropped, a rogue resolv.conf
    // reaches no resolver.
    let (code, out) = sh(
        &d,
        &id,
        &format!(
            "ip addr add 192.168.240.9/24 dev eth0 && curl -sS --connect-timeout 3 --interface 192.168.240.9 http://{allowed}/; \
             r=$?; ip addr del 192.168.240.9/24 dev eth0; exit $r"
        ),
    )
    .await;
    assert_ne!(code, 0, "a spoofed source address got through: {out}");
    let (code, out) = sh(
        &d,
        &id,
        &format!(
            "cp /etc/resolv.conf /tmp/r && echo nameserver {rogue} > /etc/resolv.conf && \
             curl -sS --connect-timeout 5 http://evil.test/; r=$?; cp /tmp/r /etc/resolv.conf; exit $r"
        ),
    )
    .await;
    assert_ne!(code, 0, "the guest reached evil.test through its own resolver: {out}");

    // Runtime changes take effect by the time PUT returns.
    let t0 = Instant::now();
    set_policy(&d, &id, allowlist(&["allowed.test", "*.allowed.test", "evil.test"])).await;
    let body = expect_curl(&d, &id, "http://evil.test/", CURL_OK, "evil.test once allowed").await;
    println!("allow evil.test → first successful request: {} ms", t0.elapsed().as_millis());
    assert_eq!(body.trim(), format!("hello from {evil}"));

    let t0 = Instant::now();
    set_policy(&d, &id, allowlist(&["evil.test"])).await;
    expect_curl(&d, &id, "http://allowed.test/", CURL_NO_NAME, "allowed.test once removed").await;
    expect_curl(&d, &id, &format!("http://{allowed}/"), CURL_NO_CONNECT, "its resolved address once removed").await;
    println!("remove allowed.test → refused: {} ms", t0.elapsed().as_millis());
    expect_curl(&d, &id, "http://evil.test/", CURL_OK, "evil.test still allowed").await;

    set_policy(&d, &id, json!({ "mode": "open" })).await;
    expect_curl(&d, &id, &format!("http://{moved}/"), CURL_OK, "any public address when open").await;
    expect_curl(&d, &id, "http://169.254.169.254/", CURL_NO_CONNECT, "metadata when open").await;
    let (answered, out) = dns(&d, &id, &rogue.to_string(), "allowed.test", "udp").await;
    assert!(!answered, "other resolvers stay closed when open: {out}");

    set_policy(&d, &id, json!({ "mode": "deny-all" })).await;
    expect_curl(&d, &id, "http://evil.test/", CURL_NO_NAME, "deny-all resolves nothing").await;
    expect_curl(&d, &id, &format!("http://{moved}/"), CURL_NO_CONNECT, "deny-all connects nowhere").await;

    set_policy(&d, &id, json!({ "mode": "allowlist", "allow_cidrs": [format!("{moved}/32:80")] })).await;
    expect_curl(&d, &id, &format!("http://{moved}/"), CURL_OK, "a CIDR with a port").await;
    let (code, _) = sh(&d, &id, &format!("ping -c 1 -W 2 {moved}")).await;
    assert_ne!(code, 0, "a port rule must not open ICMP");

    // Kept across pause and resume.
    set_policy(&d, &id, allowlist(&["allowed.test", "*.allowed.test"])).await;
    let (status, body) = d.call(Method::POST, &format!("/v1/sandboxes/{id}/pause"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, body) = d.call(Method::POST, &format!("/v1/sandboxes/{id}/resume"), None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    expect_curl(&d, &id, "http://allowed.test/", CURL_OK, "allowed after resume").await;
    expect_curl(&d, &id, "http://evil.test/", CURL_NO_NAME, "denied name after resume").await;
    expect_curl(&d, &id, &format!("http://{evil}/"), CURL_NO_CONNECT, "denied address after resume").await;

    // And across a daemon restart (the resolver is the daemon's).
    d.kill_server();
    d.spawn().await;
    expect_curl(&d, &id, "http://allowed.test/", CURL_OK, "allowed after a daemon restart").await;
    expect_curl(&d, &id, "http://evil.test/", CURL_NO_NAME, "denied name after a daemon restart").await;
    expect_curl(&d, &id, &format!("http://{evil}/"), CURL_NO_CONNECT, "denied address after a daemon restart").await;

    // allowed.test moves (TTL 2 s): the sandbox follows it to the new address.
    let lab = d.internet.as_ref().unwrap();
    lab.set_records(&[("allowed.test", moved), ("api.allowed.test", api), ("evil.test", evil)]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = curl(&d, &id, "http://allowed.test/").await;
        if code == CURL_OK && body.trim() == format!("hello from {moved}") {
            break;
        }
        assert!(Instant::now() < deadline, "allowed.test did not move to {moved} within 30 s: {code} {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    for sb in [&id, other["id"].as_str().unwrap()] {
        let (status, _) = d.call(Method::DELETE, &format!("/v1/sandboxes/{sb}"), None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        common::assert_nothing_left(&d, sb, false);
    }
}

#[tokio::test]
async fn a_policy_change_cuts_open_connections_it_denies() {
    let d = lab_daemon().await;
    let lab = d.internet.as_ref().unwrap();
    lab.set_records(&[("allowed.test", lab.addr(10)), ("other.test", lab.addr(11))]).unwrap();
    let sandbox =
        d.create(json!({ "network": allowlist(&["allowed.test", "other.test"]), "idle_timeout_secs": 0 })).await;
    let id = sandbox["id"].as_str().unwrap().to_owned();

    // Two long-lived connections to the echo port; each logs until its connection fails.
    let script = r#"
import socket, sys, time
host, log = sys.argv[1], sys.argv[2]
s = socket.create_connection((host, 7), timeout=5)
open(log, "a").write("connected\n")
while True:
    try:
        s.sendall(b"ping\n")
        if not s.recv(100):
            raise ConnectionError("closed by peer")
    except Exception as e:
        open(log, "a").write("error %s %s\n" % (type(e).__name__, e))
        break
    time.sleep(0.05)
"#;
    let resp = d
        .request(Method::PUT, &format!("/v1/sandboxes/{id}/files?path=/tmp/hold.py"))
        .body(script)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap_or_default());
    let (code, out) = sh(
        &d,
        &id,
        "for h in allowed other; do nohup python3 /tmp/hold.py $h.test /tmp/$h.log >/dev/null 2>&1 & done; true",
    )
    .await;
    assert_eq!(code, 0, "{out}");
    wait_for_log(&d, &id, "/tmp/allowed.log", "connected").await;
    wait_for_log(&d, &id, "/tmp/other.log", "connected").await;

    let t0 = Instant::now();
    set_policy(&d, &id, allowlist(&["other.test"])).await;
    let log = wait_for_log(&d, &id, "/tmp/allowed.log", "error").await;
    println!("deny allowed.test → its open connection failed in the guest: {} ms", t0.elapsed().as_millis());
    assert!(log.contains("ConnectionResetError"), "the cut connection must see a reset: {log}");
    let (_, other_log) = sh(&d, &id, "cat /tmp/other.log").await;
    assert!(!other_log.contains("error"), "a connection the new policy allows was cut: {other_log}");
}

async fn wait_for_log(d: &Daemon, id: &str, path: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, log) = sh(d, id, &format!("cat {path} 2>/dev/null")).await;
        if log.contains(needle) {
            return log;
        }
        assert!(Instant::now() < deadline, "{path} never said {needle:?}: {log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// This host's IPv4 addresses outside loopback.
fn host_addresses() -> Vec<std::net::Ipv4Addr> {
    let out = std::process::Command::new("ip").args(["-o", "-4", "addr", "show"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(3)?.split('/').next()?.parse().ok())
        .filter(|ip: &std::net::Ipv4Addr| !ip.is_loopback())
        .collect()
}

#[tokio::test]
async fn bad_policies_are_refused_with_a_clear_error() {
    let d = Daemon::start().await;
    for (policy, needle) in [
        (json!({ "mode": "allowlist", "allow_domains": ["exa mple.com"] }), "invalid domain"),
        (json!({ "mode": "allowlist", "allow_cidrs": ["10.0.0.0/33"] }), "invalid CIDR"),
        (json!({ "mode": "deny-all", "allow_domains": ["a.test"] }), "deny-all"),
        (json!({ "mode": "sideways" }), "mode"),
        (json!({ "mode": "open", "allow_everything": true }), "allow_everything"),
    ] {
        let (status, body) = d.call(Method::POST, "/v1/sandboxes", Some(json!({ "network": policy }))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{policy}: {body}");
        assert!(body.to_string().contains(needle), "{policy}: {body}");
    }
    assert!(d.list_ids().await.is_empty(), "a refused create must leave nothing");
    let (status, _) = d.call(Method::PUT, "/v1/sandboxes/sb-aaaaaaaaaa/network", Some(json!({ "mode": "open" }))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Opens connections from the guest as fast as it can and holds them: prints how many were
/// established and how many refused. `host port seconds pace_ms`.
const FLOOD: &str = r#"
import socket, sys, time
host, port, seconds, pace = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]) / 1000
held, refused, other = [], 0, 0
end = time.time() + seconds
while time.time() < end:
    s = socket.socket()
    s.settimeout(3)
    try:
        s.connect((host, port))
        held.append(s)
    except ConnectionRefusedError:
        refused += 1
        s.close()
    except OSError:
        other += 1
        s.close()
    time.sleep(pace)
if len(sys.argv) > 5:
    time.sleep(float(sys.argv[5]))
    # How many the far end has closed meanwhile (idle ones past its timeout).
    closed = 0
    for s in held:
        s.setblocking(False)
        try:
            closed += s.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    print("closed=%d" % closed)
print("held=%d refused=%d other=%d" % (len(held), refused, other))
"#;

fn counts(out: &str) -> (u64, u64) {
    let field = |key: &str| -> u64 {
        out.split_whitespace().find_map(|w| w.strip_prefix(key)?.parse().ok()).unwrap_or_else(|| panic!("{out}"))
    };
    (field("held="), field("refused="))
}

/// A guest opening connections without end: to its API endpoint and resolver (descriptors in
/// the daemon) and out through its egress (entries in the conntrack tables). Each is capped in
/// the kernel; the daemon keeps answering and other sandboxes keep working.
#[tokio::test]
async fn connection_floods_from_a_guest_are_capped() {
    let d = lab_daemon().await;
    let lab = d.internet.as_ref().unwrap();
    let target = lab.addr(10);
    let flood = d.create(json!({ "network": { "mode": "open" }, "idle_timeout_secs": 0 })).await;
    let other = d.create(json!({ "idle_timeout_secs": 0 })).await;
    let (id, other) = (flood["id"].as_str().unwrap().to_owned(), other["id"].as_str().unwrap().to_owned());
    let upload = d.request(Method::PUT, &format!("/v1/sandboxes/{id}/files?path=/tmp/flood.py")).body(FLOOD);
    assert!(upload.send().await.unwrap().status().is_success());

    // Its API endpoint: at most 64 held, the rest reset; idle ones closed by the daemon.
    let (code, out) = sh(&d, &id, "python3 /tmp/flood.py 192.168.240.1 7070 4 0 14").await;
    assert_eq!(code, 0, "{out}");
    let (held, refused) = counts(&out);
    assert!(held <= 64 && refused > 0, "guest API connections: {out}");
    assert!(out.contains(&format!("closed={held}")), "idle connections must be closed by the daemon: {out}");
    let health = reqwest::get(format!("{}/v1/health", d.url)).await.unwrap();
    assert!(health.status().is_success());
    let (code, out) = sh(&d, &other, "curl -s -o /dev/null -w '%{http_code}' $TORPOR_URL/v1/health").await;
    assert_eq!((code, out.as_str()), (0, "200"), "another sandbox's API");

    // Its resolver over TCP: at most 16.
    let (code, out) = sh(&d, &id, "python3 /tmp/flood.py 192.168.240.1 53 3 0").await;
    assert_eq!(code, 0, "{out}");
    let (held, refused) = counts(&out);
    assert!(held <= 16 && refused > 0, "resolver connections: {out}");

    // Out through its egress: a burst of 500, then 50 a second, never more than 1024 open.
    let (code, out) = sh(&d, &id, &format!("ulimit -n 8192; python3 /tmp/flood.py {target} 7 30 5")).await;
    assert_eq!(code, 0, "{out}");
    let (held, refused) = counts(&out);
    assert!(held <= 1024 && refused > 0, "egress connections: {out}");
    let (code, _) = sh(&d, &other, "true").await;
    assert_eq!(code, 0);
}
