//! `torpor template build|list|rm`: the file format and the build are `torpor_template`'s; this
//! is the command line and its output.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use torpor_api::{NetworkMode, NetworkPolicy, Template};
use torpor_template::Origin;

#[derive(Subcommand)]
pub enum TemplateCommand {
    /// Build template NAME from a template file (format: docs/templates.md), or build one of the
    /// templates shipped with Torpor (`coder`) when no file is given.
    Build {
        /// Template name: 1-40 of a-z, 0-9 and -.
        name: String,
        /// The template file (TOML); `source` paths in it are relative to it. Default: the shipped
        /// template called NAME.
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// A CA certificate (PEM) the build VM and the template's sandboxes trust, for a
        /// TLS-intercepting proxy between the host and the package registries (repeatable).
        #[arg(long = "ca-cert", value_name = "PEM")]
        ca_certs: Vec<PathBuf>,
    },
    /// List templates.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a template no sandbox uses.
    Rm { name: String },
}

pub async fn run(cmd: TemplateCommand, url: &str, key_file: Option<&std::path::Path>) -> Result<()> {
    let client = crate::client::connect(url, key_file)?;
    match cmd {
        TemplateCommand::Build { name, file, ca_certs } => {
            let origin = match file {
                Some(file) => Origin::from_file(&file)?,
                None => Origin::shipped(&name)?,
            };
            let bar = Bar::new();
            let result = torpor_template::build(&client, &name, &origin, &ca_certs, &bar).await;
            bar.0.finish_and_clear();
            let t = result?;
            println!(
                "template {} built: {} vCPU, {} MiB, running: {}",
                t.name,
                t.vcpus,
                t.memory_mib,
                t.processes.join(", ")
            );
            Ok(())
        }
        TemplateCommand::List { json } => {
            let templates = client.templates().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&templates)?);
            } else {
                println!(
                    "{:<16} {:>5} {:>7} {:>9}  {:<16} {:<28} NETWORK",
                    "NAME", "VCPUS", "MEMORY", "SIZE", "BUILT", "RUNNING"
                );
                for t in templates {
                    println!(
                        "{:<16} {:>5} {:>6}M {:>9}  {:<16} {:<28} {}",
                        t.name,
                        t.vcpus,
                        t.memory_mib,
                        human_bytes(t.size_bytes),
                        t.created_at.format("%Y-%m-%d %H:%M"),
                        running(&t),
                        describe_policy(&t.network)
                    );
                }
            }
            Ok(())
        }
        TemplateCommand::Rm { name } => {
            client.delete_template(&name).await?;
            println!("template {name} removed");
            Ok(())
        }
    }
}

/// The build's progress as a bar with the running step.
struct Bar(ProgressBar);

impl Bar {
    fn new() -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{spinner} [{pos}/{len}] [{elapsed_precise}] {wide_msg}")
                .expect("valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        Self(bar)
    }
}

impl torpor_template::Progress for Bar {
    fn steps(&self, total: u64) {
        self.0.set_length(total);
    }
    fn step(&self, what: &str) {
        self.0.set_message(what.to_owned());
    }
    fn done(&self, steps: u64) {
        self.0.inc(steps);
    }
}

/// What a sandbox from `t` has running at create: `torpor-guest, chromium; agent claude-code`.
fn running(t: &Template) -> String {
    let mut text = t.processes.join(", ");
    if let Some(agent) = &t.agent {
        text.push_str(&format!("; agent {}", agent.adapter));
    }
    text
}

/// `1.4 GiB`, `310 MiB`.
fn human_bytes(n: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    let mib = n as f64 / MIB;
    if mib >= 1024.0 {
        format!("{:.1} GiB", mib / 1024.0)
    } else {
        format!("{mib:.0} MiB")
    }
}

/// `allowlist: github.com, 10.0.0.0/8:443` in one line.
fn describe_policy(p: &NetworkPolicy) -> String {
    let mode = match p.mode {
        NetworkMode::DenyAll => "deny-all",
        NetworkMode::Allowlist => "allowlist",
        NetworkMode::Open => "open",
    };
    let rules: Vec<&str> = p.allow_domains.iter().chain(&p.allow_cidrs).map(String::as_str).collect();
    if rules.is_empty() {
        mode.to_owned()
    } else {
        format!("{mode}: {}", rules.join(", "))
    }
}
