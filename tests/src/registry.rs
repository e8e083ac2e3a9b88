//! A Confluent Schema Registry stand-in that also registers: `POST
//! /subjects/<subject>/versions` with `{"schema": "..."}` answers `{"id": N}` (one id
//! per distinct schema text, as the real registry's global ids; the same schema
//! again, in any subject, gets the same id), and `GET /schemas/ids/<id>` serves every
//! schema registered so far. Optional HTTP basic auth (401 otherwise). Every
//! registration is recorded for the test to inspect.

use base64::Engine as _;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One `POST /subjects/<subject>/versions` the stub answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub subject: String,
    pub schema: String,
    pub id: u32,
}

#[derive(Default)]
struct State {
    ids: HashMap<String, u32>,
    schemas: HashMap<u32, String>,
    registrations: Vec<Registration>,
}

/// A running stub: its base URL and what was registered.
#[derive(Clone)]
pub struct RegisteringRegistry {
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl RegisteringRegistry {
    pub fn registrations(&self) -> Vec<Registration> {
        self.state
            .lock()
            .map(|s| s.registrations.clone())
            .unwrap_or_default()
    }
}

/// Starts the stub; ids are handed out from `first_id` up.
pub async fn registering_registry(
    first_id: u32,
    credentials: Option<(&str, &str)>,
) -> anyhow::Result<RegisteringRegistry> {
    let expected: Option<String> = credentials.map(|(u, p)| {
        format!(
            "authorization: basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
        .to_ascii_lowercase()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let state = Arc::new(Mutex::new(State::default()));
    let shared = state.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let (state, expected) = (shared.clone(), expected.clone());
            tokio::spawn(async move {
                let Some((head, body)) = read_request(&mut sock).await else {
                    return;
                };
                let mut words = head.split_whitespace();
                let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
                let authorized = expected.as_ref().is_none_or(|want| {
                    head.lines().any(|l| l.trim().to_ascii_lowercase() == *want)
                });
                let (status, reply) = if !authorized {
                    ("401 Unauthorized", error(401, "Unauthorized"))
                } else {
                    answer(&state, first_id, method, path, &body)
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/vnd.schemaregistry.v1+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reply}",
                    reply.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    });
    Ok(RegisteringRegistry { url, state })
}

fn error(code: u32, message: &str) -> String {
    serde_json::json!({ "error_code": code, "message": message }).to_string()
}

fn answer(
    state: &Mutex<State>,
    first_id: u32,
    method: &str,
    path: &str,
    body: &[u8],
) -> (&'static str, String) {
    let Ok(mut s) = state.lock() else {
        return ("500 Internal Server Error", error(500, "poisoned"));
    };
    if method == "GET" {
        let id = path
            .strip_prefix("/schemas/ids/")
            .and_then(|i| i.parse::<u32>().ok());
        return match id.and_then(|i| s.schemas.get(&i)) {
            Some(schema) => (
                "200 OK",
                serde_json::json!({ "schema": schema }).to_string(),
            ),
            None => ("404 Not Found", error(40403, "Schema not found")),
        };
    }
    let subject = path
        .strip_prefix("/subjects/")
        .and_then(|p| p.strip_suffix("/versions"));
    let schema = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("schema")?.as_str().map(str::to_string));
    let (Some(subject), Some(schema), "POST") = (subject, schema, method) else {
        return ("422 Unprocessable Entity", error(42201, "Invalid schema"));
    };
    if apache_avro_parses(&schema).is_err() {
        return ("422 Unprocessable Entity", error(42201, "Invalid schema"));
    }
    let next = first_id + u32::try_from(s.ids.len()).unwrap_or(0);
    let id = *s.ids.entry(schema.clone()).or_insert(next);
    s.schemas.insert(id, schema.clone());
    s.registrations.push(Registration {
        subject: subject.to_string(),
        schema,
        id,
    });
    ("200 OK", serde_json::json!({ "id": id }).to_string())
}

fn apache_avro_parses(schema: &str) -> anyhow::Result<()> {
    tally_schemas::apache_avro::Schema::parse_str(schema)?;
    Ok(())
}

/// The request head (text) and body (`content-length` bytes).
async fn read_request(sock: &mut tokio::net::TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match sock.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    Some((head, buf[head_end..head_end + length].to_vec()))
}
