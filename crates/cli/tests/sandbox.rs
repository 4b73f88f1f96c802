//! A real sandbox, end to end through the public API and the CLI.

mod common;

use common::*;
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread")]
async fn debian_sandbox_runs_commands_and_moves_files() {
    let d = Daemon::start().await;
    let sb = d.create(json!({ "env": { "GREETING": "hi" } })).await;
    let id = sb["id"].as_str().unwrap();
    assert_eq!(sb["template"], "base");
    assert_eq!((sb["vcpus"].as_u64(), sb["memory_mib"].as_u64()), (Some(1), Some(512)));

    // A Debian machine.
    let (code, out, _) = d.exec(id, &["cat", "/etc/os-release"]).await;
    assert_eq!(code, Some(0));
    assert!(String::from_utf8_lossy(&out).contains("ID=debian"), "{}", String::from_utf8_lossy(&out));

    // Default env from create, per-exec env, cwd and user.
    let (_, out, _) = d
        .exec_req(id, json!({ "argv": ["sh", "-c", "echo $GREETING $X $(pwd) $(id -un)"], "env": {"X": "y"}, "cwd": "/tmp", "user": "nobody" }))
        .await;
    assert_eq!(String::from_utf8_lossy(&out).trim(), "hi y /tmp nobody");

    // A failing command's exit code and stderr arrive.
    let (code, out, err) = d.exec(id, &["sh", "-c", "echo to-out; echo to-err >&2; exit 7"]).await;
    assert_eq!((code, out.as_slice(), err.as_slice()), (Some(7), &b"to-out\n"[..], &b"to-err\n"[..]));

    // 1 MiB of random bytes in, byte-identical out.
    let data: Vec<u8> = (0..1 << 20).map(|_| rand::random::<u8>()).collect();
    let resp = d
        .request(Method::PUT, &format!("/v1/sandboxes/{id}/files?path=/root/data/random.bin&mode=600"))
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "{}", resp.text().await.unwrap());
    let (_, out, _) =
        d.exec(id, &["sh", "-c", "sha256sum /root/data/random.bin; stat -c %a /root/data/random.bin"]).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with(&sha256(&data)), "{out}");
    assert!(out.ends_with("600\n"), "{out}");
    let resp =
        d.request(Method::GET, &format!("/v1/sandboxes/{id}/files?path=/root/data/random.bin")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-torpor-mode"], "600");
    assert!(resp.bytes().await.unwrap() == data, "downloaded bytes differ");
    // A setuid, world-writable file in the guest: only its permission bits leave the daemon.
    let (code, _, _) = d.exec(id, &["sh", "-c", "cp /bin/true /tmp/suid && chmod 6777 /tmp/suid"]).await;
    assert_eq!(code, Some(0));
    let resp = d.request(Method::GET, &format!("/v1/sandboxes/{id}/files?path=/tmp/suid")).send().await.unwrap();
    assert_eq!(resp.headers()["x-torpor-mode"], "777");

    // 10 MiB of output streams without loss.
    let script = "import sys; sys.stdout.buffer.write(bytes(range(256)) * 40960)";
    let (code, out, _) = d.exec(id, &["python3", "-c", script]).await;
    assert_eq!(code, Some(0));
    let expected: Vec<u8> = (0..=255u8).cycle().take(256 * 40960).collect();
    assert_eq!(out.len(), expected.len());
    assert!(out == expected, "10 MiB stream corrupted");

    // The guest reports itself.
    let (status, info) = d.call(Method::GET, &format!("/v1/sandboxes/{id}/info"), None).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info["hostname"], id);
    assert!(info["kernel"].as_str().unwrap().contains("cloud-amd64"), "{info}");
    let mem = info["mem_total_bytes"].as_u64().unwrap();
    assert!(mem > 256 << 20 && mem <= 512 << 20, "guest sees {mem} bytes of memory, asked for 512 MiB");

    // A running exec can be signalled by the id its `started` event carries.
    let resp = d
        .request(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
        .json(&json!({ "argv": ["sleep", "600"] }))
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let first = futures::StreamExt::next(&mut stream).await.unwrap().unwrap();
    let started: serde_json::Value = serde_json::from_slice(first.split(|b| *b == b'\n').next().unwrap()).unwrap();
    assert_eq!(started["type"], "started", "{started}");
    let exec_id = started["exec_id"].as_str().unwrap();
    let (status, _) =
        d.call(Method::POST, &format!("/v1/sandboxes/{id}/execs/{exec_id}/signal"), Some(json!({"signal": 15}))).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let mut rest = Vec::new();
    while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
        rest.extend_from_slice(&chunk.unwrap());
    }
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains(r#""type":"exit","code":null,"signal":15"#), "{rest}");

    // A timeout kills the command and says so.
    let resp = d
        .request(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
        .json(&json!({ "argv": ["sleep", "600"], "timeout_secs": 1 }))
        .send()
        .await
        .unwrap();
    let body = resp.text().await.unwrap();
    assert!(body.contains(r#""signal":9,"timed_out":true"#), "{body}");

    // Files whose size the kernel does not know (procfs says 0) still arrive whole.
    let resp = d.request(Method::GET, &format!("/v1/sandboxes/{id}/files?path=/proc/cpuinfo")).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(String::from_utf8_lossy(&resp.bytes().await.unwrap()).contains("processor"), "empty /proc/cpuinfo");
    // A directory is not a file name.
    let resp = d.request(Method::PUT, &format!("/v1/sandboxes/{id}/files?path=/tmp/")).body("x").send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);

    // Stop with an exec still streaming: the guest must still power off cleanly, not be killed.
    let held = d
        .request(Method::POST, &format!("/v1/sandboxes/{id}/exec"))
        .json(&json!({ "argv": ["sleep", "600"] }))
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), StatusCode::OK);

    // Stop: clean power-off, nothing running, disk kept; exec then refuses with 409.
    let (status, stopped) = d.call(Method::POST, &format!("/v1/sandboxes/{id}/stop"), None).await;
    assert_eq!(status, StatusCode::OK, "{stopped}");
    assert_eq!(stopped["state"], "stopped");
    assert!(!d.server_log().contains("did not power off cleanly"), "stop was not clean:\n{}", d.server_log());
    drop(held);
    assert_nothing_left(&d, id, true);
    let (status, err) =
        d.call(Method::POST, &format!("/v1/sandboxes/{id}/exec"), Some(json!({"argv": ["true"]}))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("stopped"), "{err}");
    let (status, _) = d.call(Method::POST, &format!("/v1/sandboxes/{id}/stop"), None).await;
    assert_eq!(status, StatusCode::CONFLICT);

    // rm: nothing at all left; a second rm is a 404.
    let (status, _) = d.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert_nothing_left(&d, id, false);
    let (status, _) = d.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(d.list_ids().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_create_exec_cp_stop_rm() {
    let d = Daemon::start().await;
    let out = d.cli(&["sandbox", "create", "--vcpus", "1", "--memory", "384", "--env", "A=b"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let id = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(torpor_api::is_valid_sandbox_id(&id), "{id}");

    // exec mirrors the exit code and output, and forwards stdin.
    let out = d.cli(&["sandbox", "exec", &id, "--", "sh", "-c", "tr a-z A-Z; echo $A >&2; exit 42"], b"hello stdin");
    assert_eq!(out.status.code(), Some(42));
    assert_eq!(out.stdout, b"HELLO STDIN");
    assert_eq!(out.stderr, b"b\n");

    // Megabytes through stdin while output flows back: neither direction may stall the other.
    let input: Vec<u8> = (0..6 << 20).map(|_| rand::random::<u8>()).collect();
    let out = d.cli(&["sandbox", "exec", &id, "--", "cat"], &input);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input, "stdin echoed back differently");

    // cp both ways, docker-style.
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("up.txt");
    std::fs::write(&local, b"round trip\n").unwrap();
    let out = d.cli(&["sandbox", "cp", local.to_str().unwrap(), &format!("{id}:/srv/")], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let back = dir.path().join("back.txt");
    let out = d.cli(&["sandbox", "cp", &format!("{id}:/srv/up.txt"), back.to_str().unwrap()], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&back).unwrap(), b"round trip\n");

    // A relative guest path is refused with a clear message.
    let out = d.cli(&["sandbox", "cp", local.to_str().unwrap(), &format!("{id}:relative/path")], b"");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("must be absolute"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // get --json is the API's JSON.
    let out = d.cli(&["sandbox", "get", &id, "--json"], b"");
    let sb: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (sb["id"].as_str(), sb["memory_mib"].as_u64(), sb["state"].as_str()),
        (Some(id.as_str()), Some(384), Some("running"))
    );

    let out = d.cli(&["sandbox", "stop", &id], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = d.cli(&["sandbox", "exec", &id, "--", "true"], b"");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is stopped"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = d.cli(&["sandbox", "rm", &id], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_nothing_left(&d, &id, false);
}

#[tokio::test(flavor = "multi_thread")]
async fn four_sandboxes_at_once_are_isolated() {
    let d = Daemon::start().await;
    let creates = (0..4).map(|_| d.create(json!({})));
    let sandboxes = futures::future::join_all(creates).await;
    let ids: Vec<String> = sandboxes.iter().map(|s| s["id"].as_str().unwrap().to_owned()).collect();
    let addrs: Vec<String> =
        sandboxes.iter().map(|s| s["network"]["host_address"].as_str().unwrap().to_owned()).collect();
    let mut unique = addrs.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 4, "host addresses must be unique: {addrs:?}");

    for (i, id) in ids.iter().enumerate() {
        // Each has its own disk: a file written in one is absent from the next.
        let marker = format!("/root/marker-{i}");
        let (code, _, _) = d.exec(id, &["touch", &marker]).await;
        assert_eq!(code, Some(0));
        let next = &ids[(i + 1) % 4];
        let (code, _, _) = d.exec(next, &["test", "-e", &marker]).await;
        assert_eq!(code, Some(1), "{marker} leaked from {id} into {next}");

        // And cannot reach another sandbox's supervisor, nor the host side of its own link.
        let other = &addrs[(i + 1) % 4];
        let own_host = format!(
            "{}:50051",
            addrs[i]
                .split(':')
                .next()
                .unwrap()
                .rsplit_once('.')
                .map(|(a, b)| format!("{a}.{}", b.parse::<u8>().unwrap() - 1))
                .unwrap()
        );
        for target in [other.clone(), own_host] {
            let (host, port) = target.split_once(':').unwrap();
            let probe = format!(
                "import socket,sys\ns=socket.socket(); s.settimeout(3)\ntry:\n s.connect(('{host}',{port})); print('connected')\nexcept Exception as e:\n print('blocked', type(e).__name__)"
            );
            let (_, out, _) = d.exec(id, &["python3", "-c", &probe]).await;
            let out = String::from_utf8_lossy(&out);
            assert!(out.starts_with("blocked"), "{id} reached {target}: {out}");
        }
    }
    for id in &ids {
        let (status, _) = d.call(Method::DELETE, &format!("/v1/sandboxes/{id}"), None).await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert_nothing_left(&d, id, false);
    }
}

#[tokio::test]
async fn cli_exec_never_loses_the_exit_status() {
    // The client is still sending (stdin, then its end) when the command has already exited,
    // so the server finishes with unread input: it must close the WebSocket cleanly, or a reset
    // could reach the client before the exit event and fail a command that succeeded.
    let d = Daemon::start().await;
    let sandbox = d.create(serde_json::json!({ "idle_timeout_secs": 0 })).await;
    let id = sandbox["id"].as_str().unwrap();
    let input = vec![b'x'; 256 * 1024];
    let mut failures = Vec::new();
    for run in 0..40 {
        let out = d.cli(&["sandbox", "exec", id, "--", "true"], &input);
        if out.status.code() != Some(0) {
            failures.push(format!("run {run}: {:?} {}", out.status, String::from_utf8_lossy(&out.stderr)));
        }
    }
    assert!(failures.is_empty(), "{} of 40 execs lost their exit status:\n{}", failures.len(), failures.join("\n"));
}
