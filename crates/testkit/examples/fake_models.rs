//! The fake model API on its own, for trying an agent by hand against a daemon:
//! `cargo run -p torpor-testkit --example fake_models -- 127.0.0.1:9100 ANTHROPIC_KEY OPENAI_KEY`,
//! then point the daemon's `[models.*] base_url` at it. A message containing TORPOR-TASK makes
//! the model write /root/work/hello.py and run it (Claude Code's Write and Bash tools, or
//! Codex's shell); anything else is echoed with the conversation's first message.

use anyhow::{Context, Result};
use serde_json::json;
use torpor_testkit::{FakeModels, ToolScript};

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, anthropic_key, openai_key] = args.as_slice() else {
        anyhow::bail!("usage: fake_models LISTEN_ADDR ANTHROPIC_KEY OPENAI_KEY");
    };
    let listener = std::net::TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    let models = FakeModels::start(listener, anthropic_key, openai_key)?;
    models.set_tool_script(ToolScript {
        trigger: "TORPOR-TASK".into(),
        steps: vec![
            ("Write".into(), json!({"file_path": "/root/work/hello.py", "content": "print('hello')\n"})),
            ("Bash".into(), json!({"command": "cd /root/work && python3 hello.py > out.txt", "description": "Run it"})),
        ],
        shell: vec![
            "printf \"print('hello')\\n\" > /root/work/hello.py".into(),
            "cd /root/work && python3 hello.py > out.txt".into(),
        ],
        done: "Wrote hello.py and ran it.".into(),
    });
    eprintln!("fake model API on http://{listen}");
    let mut seen = 0;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let requests = models.requests();
        for r in &requests[seen..] {
            eprintln!("{} {}", r.path, serde_json::to_string(&r.body).unwrap_or_default());
        }
        seen = requests.len();
    }
}
