//! The CLI's connection to the daemon: the typed client, with the API key found the CLI's way.

use anyhow::Result;
pub use torpor_client::Client;

/// A client for the daemon at `base`, with `api_key` or else the key the daemon keeps in its
/// data directory (readable by root).
pub fn connect(base: &str, api_key: Option<String>) -> Result<Client> {
    let api_key = match api_key {
        Some(k) => k,
        None => torpor_client::read_default_api_key()?,
    };
    Ok(Client::new(base, api_key))
}
