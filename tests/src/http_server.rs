//! A small HTTP/1.1 server on 127.0.0.1 for the tests of asynchronous functions: latency and
//! failures chosen per request by its path, requests in flight and abandoned requests counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the server saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// Requests read.
    pub requests: AtomicUsize,
    /// Requests being answered now.
    pub in_flight: AtomicUsize,
    /// The most requests answered at once.
    pub max_in_flight: AtomicUsize,
    /// Requests whose client closed the connection before the answer.
    pub abandoned: AtomicUsize,
    /// Requests per `/flaky/KEY`.
    pub attempts: std::sync::Mutex<std::collections::HashMap<String, usize>>,
}

/// A request being answered: counted in flight while it lives.
struct InFlight(Arc<Seen>);

impl InFlight {
    fn new(seen: &Arc<Seen>) -> InFlight {
        seen.requests.fetch_add(1, SeqCst);
        let now = seen.in_flight.fetch_add(1, SeqCst) + 1;
        seen.max_in_flight.fetch_max(now, SeqCst);
        InFlight(Arc::clone(seen))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, SeqCst);
    }
}

/// A small HTTP/1.1 server: one request per connection (`Connection: close`).
///
/// * `/echo/TEXT?delay_ms=N` — `TEXT` after `N` ms (the wait ends early, counted as abandoned,
///   when the client closes the connection);
/// * `/json/ID` — `{"id": ID, "name": "user-ID", "address": {"city": "cID"}, "n": 2*ID}`;
/// * `/status/CODE` — an empty answer with that status;
/// * `/flaky/KEY?fail=N` — 503 to the first `N` requests for `KEY`, then `KEY`;
/// * `/big` — 2 MiB of `x`;
/// * `/bytes` — a body that is not UTF-8.
#[derive(Debug)]
pub struct Server {
    base: String,
    /// What it saw.
    pub seen: Arc<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// Starts the server on a free port of 127.0.0.1 (in the current Tokio runtime).
    pub async fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Seen::default());
        let task = tokio::spawn({
            let seen = Arc::clone(&seen);
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    tokio::spawn(answer(stream, Arc::clone(&seen)));
                }
            }
        });
        Server { base, seen, task }
    }

    /// `http://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(mut stream: TcpStream, seen: Arc<Seen>) {
    let mut request = Vec::new();
    let mut buf = [0u8; 4096];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
        if request.len() > 64 * 1024 {
            return;
        }
    }
    let _in_flight = InFlight::new(&seen);
    let text = String::from_utf8_lossy(&request).into_owned();
    let target = text.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let delay = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("delay_ms="))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if delay > 0 {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(delay)) => {}
            read = stream.read(&mut buf) => {
                if matches!(read, Ok(0) | Err(_)) {
                    seen.abandoned.fetch_add(1, SeqCst);
                    return;
                }
            }
        }
    }
    let (status, body): (&str, Vec<u8>) = if let Some(text) = path.strip_prefix("/echo/") {
        ("200 OK", text.as_bytes().to_vec())
    } else if let Some(id) = path.strip_prefix("/json/") {
        let id: i64 = id.parse().unwrap_or(-1);
        let json = format!(
            r#"{{"id": {id}, "name": "user-{id}", "address": {{"city": "c{id}"}}, "n": {}}}"#,
            id * 2
        );
        ("200 OK", json.into_bytes())
    } else if let Some(key) = path.strip_prefix("/flaky/") {
        let fail = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("fail="))
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(0);
        let attempt = {
            let mut attempts = seen.attempts.lock().unwrap();
            let n = attempts.entry(key.to_string()).or_insert(0);
            *n += 1;
            *n
        };
        if attempt <= fail {
            ("503 Service Unavailable", Vec::new())
        } else {
            ("200 OK", key.as_bytes().to_vec())
        }
    } else if let Some(code) = path.strip_prefix("/status/") {
        match code {
            "404" => ("404 Not Found", Vec::new()),
            "503" => ("503 Service Unavailable", Vec::new()),
            _ => ("500 Internal Server Error", Vec::new()),
        }
    } else if path == "/big" {
        ("200 OK", vec![b'x'; 2 << 20])
    } else if path == "/bytes" {
        ("200 OK", vec![b'a', 0xff, 0xfe, b'b'])
    } else {
        ("404 Not Found", Vec::new())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if stream.write_all(head.as_bytes()).await.is_ok() {
        stream.write_all(&body).await.ok();
    }
    stream.shutdown().await.ok();
}
