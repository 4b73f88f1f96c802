//! `torpor sandbox network …` and the egress flags of `sandbox create`.

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use torpor_api::{NetworkMode, NetworkPolicy};

use crate::client::Client;

/// Egress policy flags. With none given, the template's default applies (else deny-all).
#[derive(Args, Debug, Clone, Default)]
pub struct PolicyArgs {
    /// deny-all (nothing leaves the sandbox), allowlist (only --allow-domain and --allow-cidr)
    /// or open (any public address). Default: allowlist when an --allow-… flag is given.
    #[arg(long = "network", value_name = "MODE", value_parser = ["deny-all", "allowlist", "open"])]
    pub mode: Option<String>,
    /// A name the sandbox may resolve and connect to; `*.example.com` allows every name below
    /// example.com (repeatable).
    #[arg(long = "allow-domain", value_name = "NAME")]
    pub allow_domains: Vec<String>,
    /// An IPv4 network the sandbox may reach, with an optional port or range: 203.0.113.0/24,
    /// 10.0.0.5:5432, 10.0.0.0/8:8000-8100 (repeatable). Overrides the always-blocked ranges.
    #[arg(long = "allow-cidr", value_name = "CIDR[:PORTS]")]
    pub allow_cidrs: Vec<String>,
}

impl PolicyArgs {
    /// `None` when no flag was given.
    pub fn policy(self) -> Result<Option<NetworkPolicy>> {
        let mode = match self.mode {
            Some(m) => serde_json::from_value(serde_json::Value::String(m)).context("network mode")?,
            None if self.allow_domains.is_empty() && self.allow_cidrs.is_empty() => return Ok(None),
            None => NetworkMode::Allowlist,
        };
        Ok(Some(NetworkPolicy { mode, allow_domains: self.allow_domains, allow_cidrs: self.allow_cidrs }))
    }
}

#[derive(Subcommand)]
pub enum NetworkCommand {
    /// Show a sandbox's egress policy and the addresses its resolver has let it reach.
    Get {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Replace a sandbox's egress policy (the whole policy). In force when this returns; open
    /// connections it denies are cut.
    Set {
        id: String,
        #[command(flatten)]
        policy: PolicyArgs,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(cmd: NetworkCommand, client: &Client) -> Result<()> {
    let (status, json) = match cmd {
        NetworkCommand::Get { id, json } => (client.network(&id).await?, json),
        NetworkCommand::Set { id, policy, json } => {
            let policy = policy.policy()?.unwrap_or_default();
            (client.set_network(&id, &policy).await?, json)
        }
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    let mode = serde_json::to_value(status.policy.mode)?;
    println!("mode:      {}", mode.as_str().unwrap_or("?"));
    println!("domains:   {}", list(&status.policy.allow_domains));
    println!("cidrs:     {}", list(&status.policy.allow_cidrs));
    println!("enforced:  {}", if status.enforced { "yes" } else { "no (applies when the sandbox starts)" });
    if !status.resolved.is_empty() {
        println!("resolved:");
        for r in &status.resolved {
            println!("  {:<15}  {:>5} s  {}", r.address, r.expires_in_secs, r.names.join(", "));
        }
    }
    Ok(())
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(", ")
    }
}
