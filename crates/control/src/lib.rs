//! The Torpor control plane: sandbox lifecycle over the engine and network crates, durable state
//! in SQLite, and the REST API.

pub mod api;
pub mod background;
pub mod config;
pub mod error;
pub mod files;
pub mod github;
pub mod guest;
pub mod guest_api;
pub mod identity;
pub mod manager;
pub mod model;
pub mod proxy;
pub mod relay;
pub mod server;
pub mod store;
