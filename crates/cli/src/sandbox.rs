//! `torpor sandbox …`.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::Subcommand;
use reqwest::Method;
use torpor_api::{CreateSandbox, Sandbox};

use crate::network::{NetworkCommand, PolicyArgs};

#[derive(Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox and wait until it is ready; prints its id.
    Create {
        #[arg(long, default_value = "base")]
        template: String,
        /// Virtual CPUs (default from the daemon's config: 1).
        #[arg(long)]
        vcpus: Option<u32>,
        /// Memory in MiB (default from the daemon's config: 512).
        #[arg(long)]
        memory: Option<u32>,
        /// Default environment for every command in the sandbox, as KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Pause after this many seconds without activity (default 300; 0 = never).
        #[arg(long, value_name = "SECS")]
        idle_timeout: Option<u64>,
        /// Boot the base image from scratch instead of restoring the base template snapshot.
        #[arg(long)]
        cold_boot: bool,
        /// A static secret from the daemon's config to hand the sandbox, by name (repeatable);
        /// the template's if none is given.
        #[arg(long = "secret", value_name = "NAME")]
        secret: Vec<String>,
        /// Disk quota in MiB: the most host disk the sandbox's writes may take (default from the
        /// daemon's config: 4096); past it, writes fail in the guest with an I/O error.
        #[arg(long, value_name = "MIB")]
        disk: Option<u32>,
        #[command(flatten)]
        network: PolicyArgs,
        #[command(flatten)]
        grants: crate::grants::GrantArgs,
        /// Print the whole sandbox as JSON instead of its id.
        #[arg(long)]
        json: bool,
    },
    /// List sandboxes.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one sandbox.
    Get {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Run a command in a sandbox, streaming its output; exits with the command's exit code
    /// (128+N if killed by signal N, 124 on timeout). Stdin is forwarded.
    Exec {
        id: String,
        /// Extra environment, KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Working directory in the guest (absolute).
        #[arg(long)]
        cwd: Option<String>,
        /// User to run as (name or uid); default root.
        #[arg(long, short = 'u')]
        user: Option<String>,
        /// Kill the command after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true, num_args = 1..)]
        command: Vec<String>,
    },
    /// Copy a file between the host and a sandbox; one side is `ID:/absolute/path`.
    Cp { src: String, dst: String },
    /// Power a sandbox off cleanly; its disk is kept (a paused sandbox loses its memory snapshot).
    Stop { id: String },
    /// Snapshot a running sandbox to disk and end its VM: it then costs no CPU and no memory.
    Pause { id: String },
    /// Bring a paused sandbox back exactly as it was.
    Resume { id: String },
    /// Make sure a sandbox runs: resume it if paused (what every exec and cp does on its own).
    Connect { id: String },
    /// Cold-boot a stopped or failed sandbox from its disk.
    Start { id: String },
    /// Show the conversations of a sandbox's agent, or stop the run in progress in one.
    Agent {
        id: String,
        /// Stop this conversation's run in progress (as the listing names it).
        #[arg(long, value_name = "CONVERSATION")]
        cancel: Option<String>,
    },
    /// Show what a sandbox has used: running time, vCPU and memory seconds, bytes stored paused.
    Usage {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Show or replace a sandbox's egress policy.
    #[command(subcommand)]
    Network(NetworkCommand),
    /// Remove a sandbox and everything it owns.
    Rm { id: String },
}

pub fn parse_env(pairs: &[String]) -> Result<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    for pair in pairs {
        let Some((k, v)) = pair.split_once('=') else { bail!("--env expects KEY=VALUE, got {pair:?}") };
        env.insert(k.to_owned(), v.to_owned());
    }
    Ok(env)
}

pub async fn run(cmd: SandboxCommand, url: &str, key_file: Option<&std::path::Path>) -> Result<ExitCode> {
    let client = crate::client::connect(url, key_file)?;
    match cmd {
        SandboxCommand::Create {
            template,
            vcpus,
            memory,
            env,
            idle_timeout,
            cold_boot,
            secret,
            disk,
            network,
            grants,
            json,
        } => {
            let req = CreateSandbox {
                github: grants.github()?,
                models: grants.models(),
                agent: grants.agent.agent(),
                template: Some(template),
                vcpus,
                memory_mib: memory,
                env: parse_env(&env)?,
                idle_timeout_secs: idle_timeout,
                cold_boot,
                network: network.policy()?,
                disk_mib: disk,
                secrets: (!secret.is_empty()).then_some(secret),
            };
            let sandbox = client.create_sandbox(&req).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sandbox)?);
            } else {
                println!("{}", sandbox.id);
            }
        }
        SandboxCommand::List { json } => {
            let sandboxes = client.sandboxes().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&sandboxes)?);
            } else {
                println!("{:<14} {:<9} {:>5} {:>8}  {:<20} REASON", "ID", "STATE", "VCPUS", "MEMORY", "CREATED");
                for s in sandboxes {
                    println!(
                        "{:<14} {:<9} {:>5} {:>7}M  {:<20} {}",
                        s.id,
                        s.state.as_str(),
                        s.vcpus,
                        s.memory_mib,
                        s.created_at.format("%Y-%m-%d %H:%M:%S"),
                        s.reason.unwrap_or_default()
                    );
                }
            }
        }
        SandboxCommand::Get { id, json } => {
            let s = client.sandbox(&id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_sandbox(&s);
            }
        }
        SandboxCommand::Exec { id, env, cwd, user, timeout, command } => {
            let req = torpor_api::ExecRequest {
                argv: command,
                env: parse_env(&env)?,
                cwd,
                user,
                stdin: None,
                timeout_secs: timeout,
            };
            return crate::exec::interactive(&client, &id, &req).await;
        }
        SandboxCommand::Cp { src, dst } => crate::cp::run(&client, &src, &dst).await?,
        SandboxCommand::Stop { id } => {
            let s = client.stop(&id).await?;
            println!("{} {}", s.id, s.state);
        }
        SandboxCommand::Pause { id } => print_state(&client.pause(&id).await?),
        SandboxCommand::Resume { id } => print_state(&client.resume(&id).await?),
        SandboxCommand::Connect { id } => print_state(&client.connect(&id).await?),
        SandboxCommand::Start { id } => print_state(&client.start(&id).await?),
        SandboxCommand::Agent { id, cancel: Some(conversation) } => {
            let body = serde_json::json!({ "conversation": conversation });
            let answer: serde_json::Value =
                client.json(Method::POST, &format!("/v1/sandboxes/{id}/agent/cancel"), Some(&body)).await?;
            if answer["cancelled"] == true {
                println!("cancelled the run of {conversation}");
            } else {
                println!("{conversation} had no run in progress");
            }
        }
        SandboxCommand::Agent { id, cancel: None } => {
            let status = client.agent(&id).await?;
            println!("{:<40} {:>6} {:<6} SESSION", "CONVERSATION", "TURNS", "BUSY");
            for c in status.conversations {
                println!(
                    "{:<40} {:>6} {:<6} {}",
                    c.conversation,
                    c.turns,
                    if c.busy { "yes" } else { "no" },
                    c.session
                );
            }
        }
        SandboxCommand::Usage { id, json } => {
            let u = client.usage(&id).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&u)?);
            } else {
                println!("running:        {:.1} s", u.running_seconds);
                println!("vcpu:           {:.1} vCPU·s", u.vcpu_seconds);
                println!("memory:         {:.1} GiB·s", u.memory_gib_seconds);
                println!("paused storage: {} bytes now, {:.0} byte·s in total", u.paused_bytes, u.paused_byte_seconds);
                println!("on disk:        {} bytes", u.storage_bytes);
                println!("resumes:        {}", u.resumes);
                let budget = u.model_token_budget.map(|b| format!(" of a {b} budget")).unwrap_or_default();
                println!(
                    "model proxy:    {} requests, {} input + {} output tokens{budget}",
                    u.model_requests, u.model_input_tokens, u.model_output_tokens
                );
            }
        }
        SandboxCommand::Network(cmd) => crate::network::run(cmd, &client).await?,
        SandboxCommand::Rm { id } => {
            client.delete_sandbox(&id).await?;
            println!("{id} removed");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_state(s: &Sandbox) {
    println!("{} {}", s.id, s.state);
}

fn print_sandbox(s: &Sandbox) {
    println!("id:          {}", s.id);
    println!("state:       {}", s.state);
    if let Some(reason) = &s.reason {
        println!("reason:      {reason}");
    }
    println!("template:    {}", s.template);
    println!("vcpus:       {}", s.vcpus);
    println!("memory:      {} MiB", s.memory_mib);
    println!("accelerator: {}", s.accelerator);
    println!(
        "idle pause:  {}",
        if s.idle_timeout_secs == 0 { "never".to_owned() } else { format!("after {} s", s.idle_timeout_secs) }
    );
    if let Some(pid) = s.pid {
        println!("vm pid:      {pid}");
    }
    println!("guest ip:    {}", s.network.guest_ip);
    if let Some(addr) = &s.network.host_address {
        println!("supervisor:  {addr}");
    }
    if !s.env_keys.is_empty() {
        println!("env:         {}", s.env_keys.join(", "));
    }
    println!("created:     {}", s.created_at.to_rfc3339());
}

#[cfg(test)]
mod tests {
    #[test]
    fn env_pairs() {
        let env = super::parse_env(&["A=1".into(), "B=x=y".into()]).unwrap();
        assert_eq!(env["A"], "1");
        assert_eq!(env["B"], "x=y");
        assert!(super::parse_env(&["NOEQUALS".into()]).is_err());
    }
}
