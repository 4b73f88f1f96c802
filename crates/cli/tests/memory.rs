//! A VM's memory over a long run: QEMU's own memory must stop growing below its cgroup's limit
//! however much new code the guest runs, and a VM killed for memory anyway says so.

mod common;

use std::time::{Duration, Instant};

use common::{sh, Daemon};
use serde_json::json;

/// Starts processes (new code for TCG to translate) forever, counting rounds in /tmp/rounds.
const CHURN: &str = "nohup sh -c 'n=0; while true; do for i in $(seq 20); do /bin/true; done; \
    python3 -c \"import json, random; print(json.dumps([random.random() for _ in range(2000)]))\" >/dev/null; \
    git --version >/dev/null; curl --version >/dev/null; n=$((n+1)); echo $n > /tmp/rounds; done' >/dev/null 2>&1 &";

fn anon_mib(pid: u64) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:")?.split_whitespace().next()?.parse::<u64>().ok())
        .map(|k| k / 1024)
}

fn memory_cgroup(id: &str) -> std::path::PathBuf {
    let v1 = std::path::Path::new("/sys/fs/cgroup/memory/torpor").join(format!("torpor-{id}"));
    if v1.exists() {
        v1
    } else {
        std::path::Path::new("/sys/fs/cgroup/torpor").join(format!("torpor-{id}"))
    }
}

/// With QEMU's own default, TCG's code cache (1 GiB) outgrew a 512 MiB sandbox's limit within
/// a minute of this work and the VM was killed.
#[tokio::test]
async fn churning_code_for_minutes_stays_under_the_memory_limit() {
    let d = Daemon::start().await;
    let sandbox = d.create(json!({ "idle_timeout_secs": 0 })).await;
    let id = sandbox["id"].as_str().unwrap().to_owned();
    let pid = sandbox["pid"].as_u64().unwrap();
    let limit_mib = sandbox["limits"]["memory_bytes"].as_u64().unwrap() >> 20;
    let ram_mib = sandbox["memory_mib"].as_u64().unwrap();
    sh(&d, &id, CHURN).await;

    // Rounds, not seconds: the same work however fast this host is today.
    let mut peak = 0;
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let Some(anon) = anon_mib(pid) else { panic!("the VM died: {}", d.get(&id).await) };
        peak = peak.max(anon);
        let rounds: u64 = sh(&d, &id, "cat /tmp/rounds 2>/dev/null || echo 0").await.parse().unwrap();
        if rounds >= 60 {
            break;
        }
        assert!(Instant::now() < deadline, "only {rounds} rounds in 15 minutes");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let sandbox = d.get(&id).await;
    assert_eq!(sandbox["state"], "running", "{sandbox}");
    // QEMU's own memory (anonymous: heap and code cache) fits beside the guest's RAM.
    assert!(
        peak + ram_mib <= limit_mib,
        "QEMU's own memory peaked at {peak} MiB; with {ram_mib} MiB of RAM the limit is {limit_mib} MiB"
    );
    let oom = std::fs::read_to_string(memory_cgroup(&id).join("memory.oom_control"))
        .or_else(|_| std::fs::read_to_string(memory_cgroup(&id).join("memory.events")))
        .unwrap();
    assert!(oom.lines().any(|l| l == "oom_kill 0"), "{oom}");
}

/// The cgroup's limit is lowered under the running VM so the out-of-memory killer must act:
/// the sandbox then reads `failed` with that reason, not a bare "killed by signal 9".
#[tokio::test]
async fn a_vm_killed_for_memory_says_so() {
    let d = Daemon::start().await;
    let sandbox = d.create(json!({ "idle_timeout_secs": 0 })).await;
    let id = sandbox["id"].as_str().unwrap().to_owned();
    let pid = sandbox["pid"].as_u64().unwrap();
    let anon = anon_mib(pid).unwrap();
    let limit = (anon + 16) << 20;
    let cgroup = memory_cgroup(&id);
    let file = if cgroup.join("memory.limit_in_bytes").exists() { "memory.limit_in_bytes" } else { "memory.max" };
    std::fs::write(cgroup.join(file), limit.to_string()).unwrap();
    sh(&d, &id, CHURN).await;
    let failed = d.wait_for_state(&id, "failed", Duration::from_secs(300)).await;
    let reason = failed["reason"].as_str().unwrap();
    let expected = format!("killed by the out-of-memory killer (memory limit {} MiB)", limit >> 20);
    assert!(reason.starts_with(&expected), "{reason}");
    let (status, _) = d.call(reqwest::Method::DELETE, &format!("/v1/sandboxes/{id}"), None).await;
    assert!(status.is_success());
    common::assert_nothing_left(&d, &id, false);
}
