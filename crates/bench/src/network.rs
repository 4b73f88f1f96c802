//! `torpor bench network`: what the egress policy costs. Connection setup and bulk throughput
//! from a sandbox to a host it may reach, under `open` and `allowlist` side by side, and how
//! fast the sandbox resolver answers.
//!
//! Self-contained: it starts a lab internet (torpor-testkit, never routed off this machine) and a
//! private daemon whose resolver forwards to the lab's DNS server, so the numbers do not depend
//! on this host's real network.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use reqwest::Method;
use serde::Deserialize;
use torpor_api::{CreateSandbox, ExecEvent, ExecRequest, NetworkMode, NetworkPolicy, Sandbox};

use crate::common::percentile;
use crate::daemon::BenchDaemon;
use torpor_client::Client;

/// The lab's address block: 198.18.LAB.0/24 (test daemons use 0–63).
const LAB: u8 = 100;
const POOL: &str = "10.199.0.0/16";
const TARGET: &str = "bench.test";

/// Runs in the guest; prints one JSON object.
const PROBE: &str = r#"
import json, random, socket, struct, sys, time
name, connects, bulk_bytes, bulk_runs, dns_n, prefix, upstream = sys.argv[1:8]
connects, bulk_bytes, bulk_runs, dns_n = int(connects), int(bulk_bytes), int(bulk_runs), int(dns_n)
ip = socket.gethostbyname(name)

def ms(t):
    return (time.perf_counter() - t) * 1e3

connect = []
for _ in range(connects):
    t = time.perf_counter()
    s = socket.create_connection((ip, 80))
    connect.append(ms(t))
    s.close()

bulk = []
for _ in range(bulk_runs):
    s = socket.create_connection((ip, 80))
    s.sendall(("GET /bytes/%d HTTP/1.0\r\n\r\n" % bulk_bytes).encode())
    t, got = time.perf_counter(), 0
    while True:
        b = s.recv(1 << 20)
        if not b:
            break
        got += len(b)
    bulk.append(got / (time.perf_counter() - t) / 2**20)
    s.close()

def query(server, qname):
    packet = struct.pack(">HHHHHH", random.randint(0, 65535), 0x0100, 1, 0, 0, 0)
    packet += b"".join(bytes([len(l)]) + l.encode() for l in qname.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(3)
    t = time.perf_counter()
    s.sendto(packet, (server, 53))
    data, _ = s.recvfrom(4096)
    took = ms(t)
    s.close()
    return took, data[3] & 0xF

resolver = "192.168.240.1"
dns = {
    "cached": [query(resolver, name)[0] for _ in range(dns_n)],
    "first": [query(resolver, "%s%d.%s" % (prefix, i, name))[0] for i in range(dns_n)],
    "refused": [query(resolver, "nothing-%d.example" % i)[0] for i in range(dns_n)],
    "direct": [query(upstream, name)[0] for _ in range(dns_n)],
}
print(json.dumps({"connect": connect, "bulk": bulk, "dns": dns}))
"#;

#[derive(Deserialize)]
struct Probe {
    connect: Vec<f64>,
    bulk: Vec<f64>,
    dns: DnsProbe,
    /// `PUT …/network` round trips: the policy is in force when each returns.
    #[serde(default)]
    policy_change: Vec<f64>,
}

/// Replaces the policy 20 times, alternating between the sandbox's own and a narrower one.
async fn policy_changes(client: &Client, id: &str, req: &CreateSandbox) -> Result<Vec<f64>> {
    let wide = req.network.clone().unwrap_or_default();
    let narrow = NetworkPolicy { allow_domains: vec![TARGET.into()], ..wide.clone() };
    let mut samples = Vec::new();
    for i in 0..20 {
        let policy = if i % 2 == 0 { &narrow } else { &wide };
        let t = Instant::now();
        let _: serde_json::Value =
            client.json(Method::PUT, &format!("/v1/sandboxes/{id}/network"), Some(policy)).await?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(samples)
}

#[derive(Deserialize)]
struct DnsProbe {
    cached: Vec<f64>,
    first: Vec<f64>,
    refused: Vec<f64>,
    direct: Vec<f64>,
}

pub struct Params {
    pub connects: usize,
    pub bulk_mib: u64,
    pub bulk_runs: usize,
    pub dns_queries: usize,
    pub json: bool,
}

pub async fn run(p: Params) -> Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("torpor bench network needs root: it builds a lab network and runs its own daemon");
    }
    if p.connects == 0 || p.bulk_runs == 0 || !(1..=200).contains(&p.dns_queries) {
        bail!("--connects and --bulk-runs must be at least 1, --dns-queries between 1 and 200");
    }
    eprintln!("==> lab internet 198.18.{LAB}.0/24 and a private daemon (pool {POOL})");
    let lab = torpor_testkit::Internet::start(LAB, 60)?;
    let target = lab.addr(10);
    let mut records: Vec<(String, std::net::Ipv4Addr)> = vec![(TARGET.into(), target)];
    for prefix in ["o", "a"] {
        // Each its own address, so every first lookup also adds a new element to the set.
        records.extend((0..p.dns_queries).map(|i| (format!("{prefix}{i}.{TARGET}"), lab.addr(20 + (i % 200) as u8))));
    }
    let refs: Vec<(&str, std::net::Ipv4Addr)> = records.iter().map(|(n, ip)| (n.as_str(), *ip)).collect();
    lab.set_records(&refs)?;
    let (daemon, client) = BenchDaemon::start(Some(lab.dns_server()), POOL, "").await?;

    let direct_dns = format!("{}/32:53", lab.dns_server());
    let policies = [
        (
            "open",
            "o",
            NetworkPolicy { mode: NetworkMode::Open, allow_domains: vec![], allow_cidrs: vec![direct_dns.clone()] },
        ),
        (
            "allowlist",
            "a",
            NetworkPolicy {
                mode: NetworkMode::Allowlist,
                allow_domains: vec![TARGET.into(), format!("*.{TARGET}")],
                allow_cidrs: vec![direct_dns],
            },
        ),
    ];
    let mut results = Vec::new();
    for (label, prefix, policy) in policies {
        eprintln!(
            "==> {label}: create, then {} connects, {} × {} MiB, {} DNS queries of each kind",
            p.connects, p.bulk_runs, p.bulk_mib, p.dns_queries
        );
        let req = CreateSandbox { idle_timeout_secs: Some(0), network: Some(policy), ..Default::default() };
        let sandbox: Sandbox = client
            .json(Method::POST, "/v1/sandboxes", Some(&req))
            .await
            .with_context(|| format!("creating the {label} sandbox:\n{}", daemon.log()))?;
        let mut probe = probe(&client, &sandbox.id, &p, prefix, lab.dns_server()).await;
        if let (Ok(result), "allowlist") = (&mut probe, label) {
            result.policy_change = policy_changes(&client, &sandbox.id, &req).await?;
        }
        let _ = client.send(client.request(Method::DELETE, &format!("/v1/sandboxes/{}", sandbox.id))).await;
        results.push((label, sandbox.accelerator, probe?));
    }
    drop(daemon);
    drop(lab);

    if p.json {
        let out: serde_json::Value = results
            .iter()
            .map(|(label, _, r)| {
                (
                    label.to_string(),
                    serde_json::json!({
                        "connect_ms": r.connect, "bulk_mib_s": r.bulk,
                        "dns_cached_ms": r.dns.cached, "dns_first_ms": r.dns.first,
                        "dns_refused_ms": r.dns.refused, "dns_direct_ms": r.dns.direct,
                        "policy_change_ms": r.policy_change,
                    }),
                )
            })
            .collect::<serde_json::Map<_, _>>()
            .into();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let (open, allow) = (&results[0].2, &results[1].2);
    println!("\ntorpor bench network ({} guests; lab host on a veth; ratio = allowlist / open)", results[0].1);
    println!("{:<44} {:>16} {:>16} {:>7}", "", "open", "allowlist", "ratio");
    let row = |what: &str, a: &[f64], b: &[f64]| {
        let (a50, b50) = (percentile(a, 50.0), percentile(b, 50.0));
        println!(
            "{what:<44} {:>16} {:>16} {:>7.2}",
            format!("{a50:.2} / {:.2}", percentile(a, 95.0)),
            format!("{b50:.2} / {:.2}", percentile(b, 95.0)),
            b50 / a50
        );
    };
    row("TCP connect, ms (p50 / p95)", &open.connect, &allow.connect);
    let (ob, ab) = (percentile(&open.bulk, 50.0), percentile(&allow.bulk, 50.0));
    println!(
        "{:<44} {:>16.1} {:>16.1} {:>7.2}",
        format!("bulk HTTP {} MiB, MiB/s (median)", p.bulk_mib),
        ob,
        ab,
        ab / ob
    );
    row("DNS via sandbox resolver, cached, ms", &open.dns.cached, &allow.dns.cached);
    row("DNS via sandbox resolver, first lookup, ms", &open.dns.first, &allow.dns.first);
    row("DNS via sandbox resolver, name refused, ms", &open.dns.refused, &allow.dns.refused);
    row("DNS straight to the upstream (baseline), ms", &open.dns.direct, &allow.dns.direct);
    println!(
        "{:<44} {:>16} {:>16}",
        "policy change in force (PUT …/network), ms",
        "-",
        format!("{:.1} / {:.1}", percentile(&allow.policy_change, 50.0), percentile(&allow.policy_change, 95.0))
    );
    println!("\nfirst lookup = upstream query, plus the nftables set update under allowlist; refused = answered");
    println!("locally with NXDOMAIN under allowlist, forwarded (and refused upstream) under open.");
    Ok(())
}

async fn probe(client: &Client, id: &str, p: &Params, prefix: &str, upstream: std::net::Ipv4Addr) -> Result<Probe> {
    let argv = [
        "python3",
        "-c",
        PROBE,
        TARGET,
        &p.connects.to_string(),
        &(p.bulk_mib << 20).to_string(),
        &p.bulk_runs.to_string(),
        &p.dns_queries.to_string(),
        prefix,
        &upstream.to_string(),
    ];
    let req = ExecRequest { argv: argv.iter().map(|s| s.to_string()).collect(), ..Default::default() };
    let torpor_client::ExecOutput { stdout: out, stderr: err, exit } = client.exec(id, &req).await?;
    if !matches!(exit, ExecEvent::Exit { code: Some(0), .. }) {
        bail!("the probe failed in the guest ({exit:?}): {}", String::from_utf8_lossy(&err));
    }
    serde_json::from_slice(&out).with_context(|| format!("probe output: {}", String::from_utf8_lossy(&out)))
}
