//! The relay, end to end: messages on HTTP, Telegram and Slack channels reach the agent in a
//! real sandbox (waking it when paused), replies come back the way the message came, and
//! duplicates, bursts, bad signatures and sandboxes that cannot wake are handled. Telegram and
//! Slack are local fakes (torpor-testkit) that check what the real APIs check.

mod common;

use std::time::{Duration, Instant};

use common::channel::{create_channel, done, pause, send};
use common::{private_file, wait_for, Daemon, Options};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use torpor_testkit::{slack_signature, FakeSlack, FakeTelegram};

#[tokio::test]
async fn http_channel_wakes_its_sandbox_continues_the_conversation_and_streams() {
    let d = Daemon::start().await;
    create_channel(&d, json!({"name": "web", "kind": "http", "agent": {"adapter": "echo"}, "idle_timeout_secs": 0}))
        .await;

    // The first message makes the conversation's sandbox.
    let (status, events) = send(&d, "web", json!({"conversation": "c1", "text": "hello"})).await;
    assert_eq!(status, StatusCode::OK);
    let first = done(&events);
    assert_eq!(
        (first["text"].as_str(), first["turn"].as_u64(), first["woke"].as_bool()),
        (Some("echo: hello"), Some(1), Some(false))
    );
    let sandbox = first["sandbox"].as_str().unwrap().to_owned();

    // Paused, it wakes for the next message, and the agent's conversation goes on.
    pause(&d, &sandbox).await;
    let (_, events) = send(&d, "web", json!({"conversation": "c1", "text": "again"})).await;
    assert_eq!(events[0].0, "waking", "{events:?}");
    let second = done(&events);
    assert_eq!(
        (second["text"].as_str(), second["turn"].as_u64(), second["woke"].as_bool()),
        (Some("echo: again"), Some(2), Some(true))
    );
    assert_eq!(second["session"], first["session"], "the same agent session");
    assert_eq!(second["sandbox"], sandbox.as_str());
    // Another conversation gets a sandbox of its own.
    let (_, events) = send(&d, "web", json!({"conversation": "c2", "text": "x"})).await;
    assert_ne!(done(&events)["sandbox"], sandbox.as_str());

    // An idempotency key is delivered once.
    let (status, _) = send(&d, "web", json!({"conversation": "c1", "text": "once", "idempotency_key": "k-1"})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body) = send(&d, "web", json!({"conversation": "c1", "text": "once", "idempotency_key": "k-1"})).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body:?}");

    // The `command` adapter: a program's partial output streams as it is written.
    let script = r#"read line; for i in 1 2 3; do echo "{\"type\":\"text\",\"text\":\"part$i \"}"; sleep 0.4; done; echo '{"type":"tool","name":"grep","detail":"pattern"}'; echo '{"type":"done","session":"cmd-1"}'"#;
    create_channel(
        &d,
        json!({"name": "cmd", "kind": "http", "sandbox": sandbox, "agent": {"adapter": "command", "command": ["sh", "-c", script]}}),
    )
    .await;
    let (_, events) = send(&d, "cmd", json!({"text": "go"})).await;
    let texts: Vec<&(String, Value, Instant)> = events.iter().filter(|e| e.0 == "text").collect();
    assert_eq!(texts.len(), 3, "{events:?}");
    let spread = texts[2].2 - texts[0].2;
    assert!(spread >= Duration::from_millis(600), "parts arrived together ({spread:?}): the reply was buffered");
    assert!(events.iter().any(|e| e.0 == "tool" && e.1["name"] == "grep"));
    let end = done(&events);
    assert_eq!((end["text"].as_str(), end["session"].as_str()), (Some("part1 part2 part3 "), Some("cmd-1")));

    // The claude-code adapter, against a stand-in `claude` that speaks its stream-JSON: the
    // prompt arrives on stdin (a leading `-` is no option), the session is resumed next time.
    let fake_claude = r#"#!/bin/sh
prompt=$(cat)
session=new
while [ $# -gt 0 ]; do [ "$1" = --resume ] && session="resumed $2"; shift; done
echo '{"type":"system","subtype":"init","session_id":"fake-session-1"}'
printf '{"type":"stream_event","event":{"type":"content_block_delta","delta":{"type":"text_delta","text":"%s, "}}}
' "$session"
printf '{"type":"assistant","message":{"content":[{"type":"tool_use","name":"Bash","input":{"command":"ls"}}]}}
'
printf '{"type":"result","subtype":"success","is_error":false,"result":"%s, %s","session_id":"fake-session-1"}
' "$session" "$prompt"
"#;
    let upload =
        d.request(Method::PUT, &format!("/v1/sandboxes/{sandbox}/files?path=/usr/local/bin/fake-claude&mode=755"));
    assert!(upload.body(fake_claude).send().await.unwrap().status().is_success());
    create_channel(
        &d,
        json!({"name": "claude", "kind": "http", "sandbox": sandbox,
               "agent": {"adapter": "claude-code", "command": ["/usr/local/bin/fake-claude"]}}),
    )
    .await;
    let (_, events) = send(&d, "claude", json!({"text": "--help me"})).await;
    let end = done(&events);
    assert_eq!(
        (end["text"].as_str(), end["session"].as_str()),
        (Some("new, --help me"), Some("fake-session-1")),
        "{events:?}"
    );
    assert!(events.iter().any(|e| e.0 == "tool" && e.1["name"] == "Bash"), "{events:?}");
    let (_, events) = send(&d, "claude", json!({"text": "again"})).await;
    assert_eq!(done(&events)["text"], "resumed fake-session-1, again");

    // A channel makes at most its max_conversations sandboxes.
    create_channel(&d, json!({"name": "capped", "kind": "http", "agent": {"adapter": "echo"}, "max_conversations": 1}))
        .await;
    assert_eq!(done(&send(&d, "capped", json!({"conversation": "one", "text": "x"})).await.1)["text"], "echo: x");
    let (_, events) = send(&d, "capped", json!({"conversation": "two", "text": "x"})).await;
    let last = events.last().unwrap();
    assert!(last.0 == "error" && last.1["message"].as_str().unwrap().contains("already has its 1"), "{events:?}");

    // A run can be watched and stopped: its message then gets an error reply.
    create_channel(
        &d,
        json!({"name": "stuck", "kind": "http", "sandbox": sandbox,
               "agent": {"adapter": "command", "command": ["sh", "-c", "read line; sleep 600"]}}),
    )
    .await;
    let pending = tokio::spawn({
        let (url, key) = (d.url.clone(), d.api_key.clone());
        async move {
            reqwest::Client::new()
                .post(format!("{url}/v1/channels/stuck/messages"))
                .bearer_auth(key)
                .json(&json!({"conversation": "long", "text": "think hard"}))
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        }
    });
    let mut busy = false;
    for _ in 0..200 {
        let (_, status) = d.call(Method::GET, &format!("/v1/sandboxes/{sandbox}/agent"), None).await;
        if status["conversations"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["conversation"] == "stuck/long" && c["busy"] == true)
        {
            busy = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(busy, "the run never showed as busy");
    let (_, status) = d.call(Method::GET, &format!("/v1/sandboxes/{sandbox}/agent"), None).await;
    let first = status["conversations"].as_array().unwrap().iter().find(|c| c["conversation"] == "web/c1").cloned();
    assert_eq!(first.map(|c| c["turns"].clone()), Some(json!(3)), "{status}");
    let (_, answer) = d
        .call(
            Method::POST,
            &format!("/v1/sandboxes/{sandbox}/agent/cancel"),
            Some(json!({"conversation": "stuck/long"})),
        )
        .await;
    assert_eq!(answer["cancelled"], true);
    let reply =
        tokio::time::timeout(Duration::from_secs(20), pending).await.expect("the cancelled run never ended").unwrap();
    assert!(reply.contains("event: error") && reply.contains("signal"), "{reply}");

    // The CLI streams the reply, and lists the channels.
    let out = d.cli(&["channel", "send", "web", "from the cli", "--conversation", "c1"], b"");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "echo: from the cli");
    let out = d.cli(&["channel", "list"], b"");
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(listing.contains("web") && listing.contains("/v1/channels/cmd/messages"), "{listing}");

    // Bad input.
    for (body, want) in [
        (json!({"text": ""}), StatusCode::BAD_REQUEST),
        (json!({"text": "x", "conversation": ""}), StatusCode::BAD_REQUEST),
        (json!({"txt": "x"}), StatusCode::BAD_REQUEST),
    ] {
        assert_eq!(send(&d, "web", body.clone()).await.0, want, "{body}");
    }
    assert_eq!(send(&d, "nope", json!({"text": "x"})).await.0, StatusCode::NOT_FOUND);
    let (status, body) = d.call(Method::POST, "/v1/channels", Some(json!({"name": "web", "kind": "http"}))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (status, body) = d
        .call(
            Method::POST,
            "/v1/channels",
            Some(json!({"name": "t", "kind": "telegram", "agent": {"adapter": "echo"}})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = d
        .call(Method::POST, "/v1/channels", Some(json!({"name": "a", "kind": "http", "agent": {"adapter": "gpt"}})))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn a_sandbox_that_cannot_wake_gets_an_error_reply_not_silence() {
    let d = Daemon::start().await;
    let sandbox = d.create(json!({"idle_timeout_secs": 0})).await;
    let id = sandbox["id"].as_str().unwrap().to_owned();
    create_channel(&d, json!({"name": "web", "kind": "http", "sandbox": id, "agent": {"adapter": "echo"}})).await;
    pause(&d, &id).await;
    // Its snapshot is gone: the resume cannot succeed.
    std::fs::remove_file(d.sandbox_dir(&id).join("state.bin")).unwrap();
    let (_, events) = send(&d, "web", json!({"text": "are you there?"})).await;
    let last = events.last().unwrap();
    assert_eq!(last.0, "error", "{events:?}");
    assert!(last.1["message"].as_str().unwrap().contains("could not be woken up"), "{:?}", last.1);
}

struct Chat {
    d: Daemon,
    _secrets: tempfile::TempDir,
}

/// A daemon whose Telegram and Slack replies go to the fakes, with the secrets they need.
async fn chat_daemon(telegram: &FakeTelegram, slack: &FakeSlack) -> Chat {
    let secrets = tempfile::tempdir().unwrap();
    let config = format!(
        "telegram_api_url = \"{}\"\nslack_api_url = \"{}\"\n\
         [secrets.TG_TOKEN]\nfile = \"{}\"\n[secrets.TG_HOOK]\nfile = \"{}\"\n\
         [secrets.SLACK_TOKEN]\nfile = \"{}\"\n[secrets.SLACK_SIGNING]\nfile = \"{}\"\n",
        telegram.url,
        slack.url,
        private_file(secrets.path(), "tg-token", "123:bot-token").display(),
        private_file(secrets.path(), "tg-hook", "hook-secret").display(),
        private_file(secrets.path(), "slack-token", "xoxb-test").display(),
        private_file(secrets.path(), "slack-signing", "signing-secret").display(),
    );
    let d = Daemon::start_with(Options { extra_config: config, ..Default::default() }).await;
    Chat { d, _secrets: secrets }
}

async fn telegram_update(
    d: &Daemon,
    secret: &str,
    update_id: i64,
    chat: i64,
    message_id: i64,
    text: &str,
) -> StatusCode {
    telegram_update_to(d, "tg", secret, update_id, chat, message_id, text).await
}

async fn telegram_update_to(
    d: &Daemon,
    channel: &str,
    secret: &str,
    update_id: i64,
    chat: i64,
    message_id: i64,
    text: &str,
) -> StatusCode {
    let update = json!({"update_id": update_id, "message": {"message_id": message_id, "date": 0,
        "chat": {"id": chat, "type": "private"}, "from": {"id": 7, "is_bot": false, "first_name": "U"}, "text": text}});
    reqwest::Client::new()
        .post(format!("{}/v1/hooks/telegram/{channel}", d.url))
        .header("X-Telegram-Bot-Api-Secret-Token", secret)
        .json(&update)
        .send()
        .await
        .unwrap()
        .status()
}

#[tokio::test]
async fn telegram_wakes_a_paused_sandbox_answers_once_and_in_order() {
    let telegram = FakeTelegram::start("123:bot-token").await.unwrap();
    let slack = FakeSlack::start("xoxb-test").await.unwrap();
    let chat = chat_daemon(&telegram, &slack).await;
    let d = &chat.d;
    create_channel(
        d,
        json!({"name": "tg", "kind": "telegram", "agent": {"adapter": "echo"}, "idle_timeout_secs": 0,
               "telegram": {"bot_token": "TG_TOKEN", "webhook_secret": "TG_HOOK"}}),
    )
    .await;
    // Updates without the webhook secret are refused.
    assert_eq!(telegram_update(d, "wrong", 1, 42, 100, "hi").await, StatusCode::UNAUTHORIZED);

    assert_eq!(telegram_update(d, "hook-secret", 1, 42, 100, "hi").await, StatusCode::OK);
    wait_for("the first reply", Duration::from_secs(60), || telegram.messages().len() == 1).await;
    let reply = &telegram.messages()[0];
    assert_eq!((reply.chat_id, reply.reply_to, reply.text.as_str()), (42, Some(100), "echo: hi"));

    // A redelivered update is answered once: the next one's reply is the only new message.
    assert_eq!(telegram_update(d, "hook-secret", 1, 42, 100, "hi").await, StatusCode::OK);
    assert_eq!(telegram_update(d, "hook-secret", 2, 42, 101, "next").await, StatusCode::OK);
    wait_for("the second reply", Duration::from_secs(30), || telegram.messages().len() >= 2).await;
    let texts: Vec<String> = telegram.messages().iter().map(|m| m.text.clone()).collect();
    assert_eq!(texts, ["echo: hi", "echo: next"]);

    // Paused; a burst of 20 arrives while it wakes; all are answered, in order, and a 429 from
    // Telegram on the way is waited out.
    let sandboxes = d.list_ids().await;
    assert_eq!(sandboxes.len(), 1);
    pause(d, &sandboxes[0]).await;
    telegram.refuse_next(1);
    for i in 0..20 {
        assert_eq!(telegram_update(d, "hook-secret", 10 + i, 42, 200 + i, &format!("m{i}")).await, StatusCode::OK);
    }
    wait_for("20 replies", Duration::from_secs(120), || telegram.messages().len() >= 22).await;
    let burst: Vec<String> = telegram.messages()[2..].iter().map(|m| m.text.clone()).collect();
    let expected: Vec<String> = (0..20).map(|i| format!("echo: m{i}")).collect();
    assert_eq!(burst, expected);
    assert_eq!(telegram.refused(), 1);
    let replied_to: Vec<Option<i64>> = telegram.messages()[2..].iter().map(|m| m.reply_to).collect();
    assert_eq!(replied_to, (200..220).map(Some).collect::<Vec<_>>());
}

async fn slack_event(d: &Daemon, secret: &str, timestamp: i64, body: &Value) -> reqwest::Response {
    let raw = serde_json::to_vec(body).unwrap();
    let ts = timestamp.to_string();
    reqwest::Client::new()
        .post(format!("{}/v1/hooks/slack/sl", d.url))
        .header("X-Slack-Request-Timestamp", &ts)
        .header("X-Slack-Signature", slack_signature(secret, &ts, &raw))
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap()
}

fn message_event(event_id: &str, ts: &str, text: &str) -> Value {
    json!({"type": "event_callback", "event_id": event_id, "team_id": "T1",
           "event": {"type": "message", "channel": "C1", "user": "U1", "text": text, "ts": ts}})
}

#[tokio::test]
async fn slack_events_are_verified_answered_in_their_thread_and_deduplicated() {
    let telegram = FakeTelegram::start("123:bot-token").await.unwrap();
    let slack = FakeSlack::start("xoxb-test").await.unwrap();
    let chat = chat_daemon(&telegram, &slack).await;
    let d = &chat.d;
    create_channel(
        d,
        json!({"name": "sl", "kind": "slack", "agent": {"adapter": "echo"}, "idle_timeout_secs": 0,
               "slack": {"bot_token": "SLACK_TOKEN", "signing_secret": "SLACK_SIGNING"}}),
    )
    .await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;

    // URL verification, then signatures: wrong secret, stale timestamp, none at all.
    let resp = slack_event(d, "signing-secret", now, &json!({"type": "url_verification", "challenge": "abc"})).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.json::<Value>().await.unwrap()["challenge"], "abc");
    let event = message_event("Ev1", "1700000001.000100", "hello slack");
    assert_eq!(slack_event(d, "not-the-secret", now, &event).await.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(slack_event(d, "signing-secret", now - 600, &event).await.status(), StatusCode::UNAUTHORIZED);
    let unsigned =
        reqwest::Client::new().post(format!("{}/v1/hooks/slack/sl", d.url)).json(&event).send().await.unwrap();
    assert_eq!(unsigned.status(), StatusCode::UNAUTHORIZED);
    assert!(slack.posts().is_empty());

    // A message is acknowledged at once and answered in its thread.
    let started = Instant::now();
    assert_eq!(slack_event(d, "signing-secret", now, &event).await.status(), StatusCode::OK);
    let acked = started.elapsed();
    wait_for("the Slack reply", Duration::from_secs(60), || !slack.posts().is_empty()).await;
    let post = &slack.posts()[0];
    assert!(post.at - started > acked, "the event must be acknowledged before the reply is posted");
    assert_eq!(
        (post.channel.as_str(), post.thread_ts.as_deref(), post.text.as_str()),
        ("C1", Some("1700000001.000100"), "echo: hello slack")
    );

    // Slack's retry of the same event, and a bot's message, get no reply; the next one does,
    // through a 429 from Slack.
    assert_eq!(slack_event(d, "signing-secret", now, &event).await.status(), StatusCode::OK);
    // The bot's message is in the thread of the next one: the same queue, so a reply to it
    // would come first.
    let mut from_bot = message_event("Ev2", "1700000002.000100", "I am a bot");
    from_bot["event"]["bot_id"] = json!("B1");
    from_bot["event"]["thread_ts"] = json!("1700000003.000100");
    assert_eq!(slack_event(d, "signing-secret", now, &from_bot).await.status(), StatusCode::OK);
    slack.refuse_next(1);
    let next = message_event("Ev3", "1700000003.000100", "and again");
    assert_eq!(slack_event(d, "signing-secret", now, &next).await.status(), StatusCode::OK);
    wait_for("the second Slack reply", Duration::from_secs(60), || slack.posts().len() >= 2).await;
    let texts: Vec<String> = slack.posts().iter().map(|p| p.text.clone()).collect();
    assert_eq!(texts, ["echo: hello slack", "echo: and again"]);
}

#[tokio::test]
async fn a_message_taken_before_the_daemon_stopped_is_answered_after_it_starts() {
    let telegram = FakeTelegram::start("123:bot-token").await.unwrap();
    let slack = FakeSlack::start("xoxb-test").await.unwrap();
    let mut chat = chat_daemon(&telegram, &slack).await;
    let slow = r#"read line; sleep 2; t=$(echo "$line" | sed 's/.*"text":"\([^"]*\)".*/\1/'); echo "{\"type\":\"text\",\"text\":\"slow: $t\"}""#;
    create_channel(
        &chat.d,
        json!({"name": "tg", "kind": "telegram", "idle_timeout_secs": 0,
               "agent": {"adapter": "command", "command": ["sh", "-c", slow]},
               "telegram": {"bot_token": "TG_TOKEN", "webhook_secret": "TG_HOOK"}}),
    )
    .await;
    assert_eq!(telegram_update(&chat.d, "hook-secret", 1, 42, 100, "take your time").await, StatusCode::OK);
    // Acknowledged to Telegram; the agent is at work when the daemon dies.
    let mut running = false;
    for _ in 0..600 {
        let (_, list) = chat.d.call(Method::GET, "/v1/sandboxes", None).await;
        if list["sandboxes"].as_array().is_some_and(|s| s.len() == 1 && s[0]["state"] == "running") {
            running = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(running, "no sandbox came up for the message");
    chat.d.kill_server();
    assert!(telegram.messages().is_empty(), "the reply went out before the daemon was killed");
    chat.d.spawn().await;
    wait_for("the reply after the restart", Duration::from_secs(60), || !telegram.messages().is_empty()).await;
    let replies: Vec<String> = telegram.messages().iter().map(|m| m.text.clone()).collect();
    assert_eq!(replies, ["slow: take your time"]);
    assert!(chat.d.server_log().contains("taken before the daemon stopped"));
    // Once the daemon has recorded it answered, another restart does not deliver it again.
    // (Killed between the reply and that record, it would: at least once.)
    wait_for("the answer to be recorded", Duration::from_secs(10), || {
        chat.d.server_log().contains("relayed message answered")
    })
    .await;
    chat.d.kill_server();
    chat.d.spawn().await;
    assert_eq!(telegram_update(&chat.d, "hook-secret", 2, 42, 101, "and now?").await, StatusCode::OK);
    wait_for("the next reply", Duration::from_secs(60), || {
        telegram.messages().iter().any(|m| m.text == "slow: and now?")
    })
    .await;
    let replies: Vec<String> = telegram.messages().iter().map(|m| m.text.clone()).collect();
    assert_eq!(replies, ["slow: take your time", "slow: and now?"], "one reply per message");

    // A reply that streams in slowly appears at once and is edited as it grows.
    let parts = r#"read line; for i in 1 2 3; do echo "{\"type\":\"text\",\"text\":\"part$i \"}"; sleep 1.2; done"#;
    create_channel(
        &chat.d,
        json!({"name": "tgs", "kind": "telegram", "idle_timeout_secs": 0,
               "agent": {"adapter": "command", "command": ["sh", "-c", parts]},
               "telegram": {"bot_token": "TG_TOKEN", "webhook_secret": "TG_HOOK"}}),
    )
    .await;
    assert_eq!(telegram_update_to(&chat.d, "tgs", "hook-secret", 3, 43, 300, "stream").await, StatusCode::OK);
    wait_for("the streamed reply", Duration::from_secs(60), || {
        telegram.messages().iter().any(|m| m.chat_id == 43 && m.text == "part1 part2 part3")
    })
    .await;
    let streamed: Vec<_> = telegram.messages().into_iter().filter(|m| m.chat_id == 43).collect();
    assert_eq!(streamed.len(), 1, "one message, edited: {streamed:?}");
    assert!(streamed[0].edits >= 1, "the reply was not edited as it grew: {streamed:?}");
}

/// A hostile or stuck agent, and many first messages at once: each bounded, none spilling over.
#[tokio::test]
async fn hung_agents_and_bursts_of_conversations_are_bounded() {
    let d =
        Daemon::start_with(Options { extra_config: "agent_timeout_secs = 10\n".into(), ..Default::default() }).await;
    let host = d.create(json!({ "idle_timeout_secs": 0 })).await;
    let host = host["id"].as_str().unwrap().to_owned();

    // An agent that never answers: the message ends with an error after the deadline.
    let hang = json!({"adapter": "command", "command": ["sh", "-c", "read line; sleep 1000"]});
    create_channel(&d, json!({"name": "hang", "kind": "http", "sandbox": host, "agent": hang})).await;
    let (status, events) = send(&d, "hang", json!({"text": "anyone?"})).await;
    assert_eq!(status, StatusCode::OK);
    let last = events.last().unwrap();
    assert_eq!(last.0, "error", "{events:?}");
    assert!(last.1["message"].as_str().unwrap().contains("did not finish within 10 s"), "{events:?}");

    // Its conversation fills with waiting messages: past 20 it is refused, and other channels
    // are not affected.
    let mut waiting = Vec::new();
    for i in 0..20 {
        let req = d.request(Method::POST, "/v1/channels/hang/messages").json(&json!({"text": format!("m{i}")}));
        waiting.push(tokio::spawn(req.send()));
    }
    // Taken (the reply's headers are sent once a message is queued); the next is over the cap
    // while the first still waits on its agent.
    wait_until_taken(&mut waiting).await;
    let (status, body) = send(&d, "hang", json!({"text": "one more"})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body:?}");
    create_channel(&d, json!({"name": "echo", "kind": "http", "sandbox": host, "agent": {"adapter": "echo"}})).await;
    let (status, events) = send(&d, "echo", json!({"text": "hi"})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(done(&events)["text"], "echo: hi");

    // Five first messages at once to a channel allowed two conversations: exactly two
    // sandboxes are made, the others are told why.
    create_channel(
        &d,
        json!({"name": "two", "kind": "http", "agent": {"adapter": "echo"}, "max_conversations": 2, "idle_timeout_secs": 0}),
    )
    .await;
    let before = d.list_ids().await.len();
    let sends: Vec<_> =
        (0..5).map(|i| send(&d, "two", json!({"conversation": format!("c{i}"), "text": "x"}))).collect();
    let results = futures::future::join_all(sends).await;
    let answered = results.iter().filter(|(_, events)| events.last().is_some_and(|e| e.0 == "done")).count();
    let refused = results
        .iter()
        .filter(|(_, events)| {
            events.last().is_some_and(|e| e.1.to_string().contains("already has its 2 conversations"))
        })
        .count();
    assert_eq!((answered, refused), (2, 3), "{results:?}");
    assert_eq!(d.list_ids().await.len(), before + 2);
}

/// Until every message sent is taken: an HTTP channel answers with its headers once a message
/// is queued. The replies are then dropped (their clients went away).
async fn wait_until_taken(sent: &mut [tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>]) {
    for task in sent.iter_mut() {
        let resp = tokio::time::timeout(Duration::from_secs(60), task).await.expect("a message was not taken");
        assert_eq!(resp.unwrap().unwrap().status(), StatusCode::OK);
    }
}
