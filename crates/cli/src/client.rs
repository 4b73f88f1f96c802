//! The CLI's connection to the daemon: the typed client, with the API key found the CLI's way.

use anyhow::Result;
pub use torpor_client::Client;

/// A client for the daemon at `base`, with the key in `key_file`, else `$TORPOR_API_KEY`, else
/// the one the daemon keeps in its data directory (readable by root).
pub fn connect(base: &str, key_file: Option<&std::path::Path>) -> Result<Client> {
    Ok(Client::new(base, torpor_client::find_api_key(key_file)?))
}
