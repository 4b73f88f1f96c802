//! Pause and resume: state that survives, wake on use, auto-pause, and faults in the middle.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const SERVER: &str = r#"
import hashlib, os, socket
data = bytearray(os.urandom(32 << 20))
digest = hashlib.sha256(data).hexdigest()
open('/root/digest', 'w').write(digest)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', 8080))
s.listen()
open('/root/server.pid', 'w').write(str(os.getpid()))
while True:
    c, _ = s.accept()
    c.sendall(hashlib.sha256(data).hexdigest().encode())
    c.close()
"#;

const CHECK: &str = r#"
kill -0 "$(cat /root/server.pid)" && echo alive
python3 -c "import socket; s = socket.create_connection(('127.0.0.1', 8080)); print(s.recv(100).decode())"
cat /root/digest; echo
cat /root/note
date +%s.%N
"#;

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

async fn post(d: &Daemon, id: &str, action: &str) -> (StatusCode, Value) {
    d.call(Method::POST, &format!("/v1/sandboxes/{id}/{action}"), None).await
}

async fn usage(d: &Daemon, id: &str) -> Value {
    let (status, u) = d.call(Method::GET, &format!("/v1/sandboxes/{id}/usage"), None).await;
    assert_eq!(status, StatusCode::OK, "{u}");
    u
}

/// Starts a process holding 32 MiB of random data and serving its hash over TCP.
async fn start_server(d: &Daemon, id: &str) {
    let (code, _, err) = d.exec(id, &["sh", "-c", &format!("cat > /root/server.py <<'EOF'\n{SERVER}\nEOF\necho 'written before the first pause' > /root/note\nnohup python3 /root/server.py >/dev/null 2>&1 &\nfor i in $(seq 600); do [ -s /root/server.pid ] && exit 0; sleep 0.1; done; exit 1")]).await;
    assert_eq!(code, Some(0), "server did not start: {}", String::from_utf8_lossy(&err));
}

#[tokio::test(flavor = "multi_thread")]
async fn twenty_pause_resume_cycles_keep_processes_memory_files_and_clock() {
    let d = Daemon::start().await;
    let id = d.create(json!({ "idle_timeout_secs": 0 })).await["id"].as_str().unwrap().to_owned();
    start_server(&d, &id).await;
    let pid_before = d.exec(&id, &["cat", "/root/server.pid"]).await.1;

    for cycle in 1..=20 {
        let (status, paused) = post(&d, &id, "pause").await;
        assert_eq!(status, StatusCode::OK, "cycle {cycle}: {paused}");
        assert_eq!(paused["state"], "paused");
        assert!(paused["pid"].is_null());
        // A paused sandbox has no process at all.
        assert!(vm_pids(&id).is_empty(), "cycle {cycle}: VM process still there while paused");

        // Alternate an explicit resume with waking on use.
        if cycle % 2 == 0 {
            let (status, resumed) = post(&d, &id, "resume").await;
            assert_eq!(status, StatusCode::OK, "cycle {cycle}: {resumed}");
            assert_eq!(resumed["state"], "running");
        }
        let before = unix_now();
        let (code, out, err) = d.exec(&id, &["sh", "-c", CHECK]).await;
        let after = unix_now();
        assert_eq!(code, Some(0), "cycle {cycle}: {}", String::from_utf8_lossy(&err));
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "alive", "cycle {cycle}: the process started before the first pause is gone");
        assert_eq!(lines[1], lines[2], "cycle {cycle}: the process's memory changed");
        assert_eq!(lines[3], "written before the first pause", "cycle {cycle}");
        let guest_time: f64 = lines[4].parse().unwrap();
        assert!(
            guest_time > before - 1.0 && guest_time < after + 1.0,
            "cycle {cycle}: guest clock {guest_time} vs host {before}..{after}"
        );
    }
    assert_eq!(d.exec(&id, &["cat", "/root/server.pid"]).await.1, pid_before, "server was restarted");
    let u = usage(&d, &id).await;
    assert_eq!(u["resumes"], 20, "{u}");
    assert!(u["running_seconds"].as_f64().unwrap() > 0.0 && u["paused_byte_seconds"].as_f64().unwrap() > 0.0, "{u}");
    assert_eq!(u["vcpu_seconds"], u["running_seconds"], "{u}");
    let (status, _) = d.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_nothing_left(&d, &id, false);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_on_a_paused_sandbox_cause_one_resume() {
    let d = Daemon::start().await;
    let id = d.create(json!({ "idle_timeout_secs": 0 })).await["id"].as_str().unwrap().to_owned();
    assert_eq!(post(&d, &id, "pause").await.0, StatusCode::OK);
    let u = usage(&d, &id).await;
    assert!(u["paused_bytes"].as_u64().unwrap() > 0, "{u}");

    let execs = (0..8).map(|i| {
        let d = &d;
        let id = id.clone();
        async move { d.exec(&id, &["echo", &format!("hello {i}")]).await }
    });
    for (i, (code, out, _)) in futures::future::join_all(execs).await.into_iter().enumerate() {
        assert_eq!((code, String::from_utf8(out).unwrap()), (Some(0), format!("hello {i}\n")));
    }
    assert_eq!(usage(&d, &id).await["resumes"], 1);
    assert_eq!(d.get(&id).await["state"], "running");
}

#[tokio::test(flavor = "multi_thread")]
async fn illegal_transitions_answer_409_with_the_state_and_start_cold_boots() {
    let d = Daemon::start().await;
    let id = d.create(json!({ "idle_timeout_secs": 0 })).await["id"].as_str().unwrap().to_owned();
    let (code, _, _) = d.exec(&id, &["sh", "-c", "echo kept > /root/kept && sync"]).await;
    assert_eq!(code, Some(0));

    let (status, err) = post(&d, &id, "resume").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(err["error"]["message"].as_str().unwrap().contains("is running"), "{err}");
    assert_eq!(post(&d, &id, "pause").await.0, StatusCode::OK);
    let (status, err) = post(&d, &id, "pause").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(err["error"]["message"].as_str().unwrap().contains("is paused"), "{err}");

    // A paused sandbox can be stopped: its snapshot goes, its disk stays.
    let (status, stopped) = post(&d, &id, "stop").await;
    assert_eq!((status, stopped["state"].as_str()), (StatusCode::OK, Some("stopped")), "{stopped}");
    assert!(!d.sandbox_dir(&id).join("mem.ram").exists());
    for action in ["resume", "pause", "connect"] {
        let (status, err) = post(&d, &id, action).await;
        assert_eq!(status, StatusCode::CONFLICT, "{action}: {err}");
        assert!(err["error"]["message"].as_str().unwrap().contains("is stopped"), "{action}: {err}");
    }
    let (status, started) = post(&d, &id, "start").await;
    assert_eq!((status, started["state"].as_str()), (StatusCode::OK, Some("running")), "{started}");
    assert_eq!(d.exec(&id, &["cat", "/root/kept"]).await.1, b"kept\n");
    let (status, _) = post(&d, &id, "start").await;
    assert_eq!(status, StatusCode::CONFLICT);
    // connect on a running sandbox is a no-op.
    assert_eq!(post(&d, &id, "connect").await.1["state"], "running");
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_or_truncated_snapshots_are_refused_and_stay_paused() {
    let d = Daemon::start().await;
    let id = d.create(json!({ "idle_timeout_secs": 0 })).await["id"].as_str().unwrap().to_owned();
    assert_eq!(post(&d, &id, "pause").await.0, StatusCode::OK);
    let state = d.sandbox_dir(&id).join("state.bin");
    let original = std::fs::read(&state).unwrap();

    let mut flipped = original.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0xff;
    for (bad, expect) in [(flipped, "checksum"), (original[..original.len() / 2].to_vec(), "truncated")] {
        std::fs::write(&state, &bad).unwrap();
        let (status, err) = post(&d, &id, "resume").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{err}");
        assert!(err["error"]["message"].as_str().unwrap().contains(expect), "{err}");
        assert_eq!(d.get(&id).await["state"], "paused");
        assert!(vm_pids(&id).is_empty());
    }
    // With the real snapshot back, the same sandbox resumes.
    std::fs::write(&state, &original).unwrap();
    assert_eq!(post(&d, &id, "resume").await.1["state"], "running");
    assert_eq!(d.exec(&id, &["true"]).await.0, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_snapshot_that_cannot_be_written_fails_the_pause_and_the_sandbox_runs_on() {
    let d = Daemon::start().await;
    let id = d.create(json!({ "idle_timeout_secs": 0 })).await["id"].as_str().unwrap().to_owned();
    start_server(&d, &id).await;
    // Where the state stream goes, a directory: the write fails as it would on a full disk.
    let blocker = d.sandbox_dir(&id).join("state.bin.partial");
    std::fs::create_dir(&blocker).unwrap();
    let (status, err) = post(&d, &id, "pause").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("keeps running"), "{err}");
    assert_eq!(d.get(&id).await["state"], "running");
    let (code, out, _) = d.exec(&id, &["sh", "-c", "kill -0 $(cat /root/server.pid) && echo alive"]).await;
    assert_eq!((code, String::from_utf8(out).unwrap()), (Some(0), "alive\n".to_owned()));
    assert!(!d.sandbox_dir(&id).join("snapshot.json").exists());

    std::fs::remove_dir(&blocker).unwrap();
    assert_eq!(post(&d, &id, "pause").await.1["state"], "paused");
    assert_eq!(post(&d, &id, "resume").await.1["state"], "running");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_sandboxes_pause_and_busy_ones_do_not() {
    let d = Daemon::start().await;
    let id = d.create(json!({ "idle_timeout_secs": 2 })).await["id"].as_str().unwrap().to_owned();
    assert_eq!(d.get(&id).await["idle_timeout_secs"], 2);
    d.wait_for_state(&id, "paused", Duration::from_secs(30)).await;
    assert!(vm_pids(&id).is_empty());

    // An exec running longer than the timeout keeps it awake (the exec wakes it first).
    let (code, _, _) = d.exec(&id, &["sleep", "5"]).await;
    assert_eq!(code, Some(0));
    assert_eq!(usage(&d, &id).await["resumes"], 1);
    d.wait_for_state(&id, "paused", Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn killing_the_daemon_mid_pause_or_mid_resume_loses_nothing() {
    let mut d = Daemon::start().await;
    let id = d.create(json!({ "idle_timeout_secs": 0 })).await["id"].as_str().unwrap().to_owned();
    start_server(&d, &id).await;

    for action in ["pause", "resume"] {
        let request = d.request(Method::POST, &format!("/v1/sandboxes/{id}/{action}")).send();
        let in_flight = tokio::spawn(request);
        // Kill as soon as the operation is visibly under way (or already done).
        let transient = if action == "pause" { "pausing" } else { "resuming" };
        let target = if action == "pause" { "paused" } else { "running" };
        loop {
            let state = d.get(&id).await;
            if state["state"] == transient || state["state"] == target {
                break;
            }
        }
        d.kill_server();
        let _ = in_flight.await;
        d.spawn().await;
        let state = d.get(&id).await;
        let s = state["state"].as_str().unwrap();
        assert!(s == "paused" || s == "running", "after a kill mid-{action}: {state}");
        // Either way the sandbox works, with its process and memory.
        let (code, out, _) = d.exec(&id, &["sh", "-c", CHECK]).await;
        let out = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!((code, lines[0]), (Some(0), "alive"), "after a kill mid-{action}: {out}");
        assert_eq!(lines[1], lines[2]);
        if action == "pause" {
            // Set up the resume round: paused again, cleanly.
            assert_eq!(post(&d, &id, "pause").await.1["state"], "paused");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_vm_killed_while_resuming_keeps_disk_and_a_retry_works() {
    let d = Daemon::start().await;
    let id = d.create(json!({ "idle_timeout_secs": 0 })).await["id"].as_str().unwrap().to_owned();
    let (code, _, _) = d.exec(&id, &["sh", "-c", "echo kept > /root/kept && sync"]).await;
    assert_eq!(code, Some(0));
    assert_eq!(post(&d, &id, "pause").await.0, StatusCode::OK);

    let request = d.request(Method::POST, &format!("/v1/sandboxes/{id}/resume")).send();
    let in_flight = tokio::spawn(request);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let killed = loop {
        if let Some(pid) = vm_pids(&id).first() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*pid as i32), nix::sys::signal::Signal::SIGKILL);
            break true;
        }
        if in_flight.is_finished() || std::time::Instant::now() > deadline {
            break false;
        }
    };
    assert!(killed, "never saw the resuming VM process");
    let _ = in_flight.await;
    // Running if the kill came after the resume finished (then the monitor fails it shortly).
    let mut state = d.get(&id).await;
    if state["state"] == "running" {
        state = d.wait_for_state(&id, "failed", Duration::from_secs(10)).await;
    }
    let retry = match state["state"].as_str().unwrap() {
        "paused" => "resume",
        "failed" => {
            assert!(!state["reason"].as_str().unwrap().is_empty());
            "start"
        }
        other => panic!("unexpected state {other}: {state}"),
    };
    let (status, after) = post(&d, &id, retry).await;
    assert_eq!((status, after["state"].as_str()), (StatusCode::OK, Some("running")), "{retry}: {after}");
    assert_eq!(d.exec(&id, &["cat", "/root/kept"]).await.1, b"kept\n");
}
