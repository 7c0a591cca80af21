//! Asynchronous example functions (`#[udf(async)]`, ABI 2.3): HTTP from SQL.
//!
//! * `http_get(url)` — the body of a `GET` as text. An error names the URL when the request
//!   fails, the status is not 2xx, the body is over [`MAX_BODY`] bytes or not UTF-8, or the
//!   request takes longer than [`TIMEOUT`].
//! * `http_get_json(url, pointer)` — the value at a JSON pointer (RFC 6901, e.g. `/city/name`)
//!   in the JSON body: a string as itself, any other value as JSON text, NULL when the pointer
//!   finds nothing. The same limits; a body that is not JSON is an error.
//! * `http_status(url)` — the HTTP status code of a `GET` (NULL for a NULL url): the vectorised
//!   form (`#[udf(async, vectorized)]`), one call per 64 rows, whose requests it sends at once.
//!
//! A temporary failure (a refused or reset connection, a request past [`TIMEOUT`], HTTP 429, 502,
//! 503 or 504) is [`Retryable`]: the host starts the call again when the function has retries
//! (`#retries=N` from SQL); every other failure fails the query at once.
//!
//! Plain HTTP only (this example is built without TLS). The host decides how many requests
//! are in flight (64 by default, `#max_in_flight=N` from SQL) and how long a call may take
//! (`#call_timeout=`); [`TIMEOUT`] is this library's own bound per request.
//!
//! ```sql
//! CREATE FUNCTION http_get LANGUAGE plugin AS 'libudf_plugin_http.so#http_get#max_in_flight=128';
//! SELECT id, http_get_json('http://127.0.0.1:8080/users/' || id, '/name') FROM t;
//! ```
#![forbid(unsafe_code)]

use std::time::Duration;

use udf_abi::{Retryable, udf};

/// The largest body a function reads, in bytes.
pub const MAX_BODY: usize = 1 << 20;
/// The longest a request may take, connection included.
pub const TIMEOUT: Duration = Duration::from_secs(10);

thread_local! {
    /// One client (and connection pool) per thread of the library's runtime: dropped when the
    /// runtime's threads end, at unload, so nothing outlives the library.
    static CLIENT: Result<reqwest::Client, String> = reqwest::Client::builder()
        .timeout(TIMEOUT)
        .no_proxy()
        .build()
        .map_err(|e| format!("cannot make an HTTP client: {e}"));
}

fn client() -> Result<reqwest::Client, Error> {
    CLIENT.with(Clone::clone).map_err(Error::Fatal)
}

/// Why a request failed: for good, or for now (the host may retry it).
#[derive(Debug)]
enum Error {
    Fatal(String),
    Temporary(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Fatal(message) => f.write_str(message),
            Error::Temporary(message) => write!(f, "{}", Retryable(message)),
        }
    }
}

/// A failed request, temporary when retrying may help.
fn request_error(url: &str, e: &reqwest::Error) -> Error {
    let message = format!("GET {url}: {e}");
    if e.is_connect() || e.is_timeout() {
        Error::Temporary(message)
    } else {
        Error::Fatal(message)
    }
}

/// The body of a successful `GET url`, at most [`MAX_BODY`] bytes.
async fn fetch(url: &str) -> Result<Vec<u8>, Error> {
    let mut response = client()?
        .get(url)
        .send()
        .await
        .map_err(|e| request_error(url, &e))?;
    let status = response.status();
    if !status.is_success() {
        let message = format!("GET {url}: HTTP {status}");
        return Err(match status.as_u16() {
            429 | 502 | 503 | 504 => Error::Temporary(message),
            _ => Error::Fatal(message),
        });
    }
    if let Some(len) = response.content_length()
        && len > MAX_BODY as u64
    {
        return Err(Error::Fatal(format!(
            "GET {url}: a body of {len} bytes, over the {MAX_BODY}-byte limit"
        )));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| request_error(url, &e))? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(Error::Fatal(format!(
                "GET {url}: the body is over the {MAX_BODY}-byte limit"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `http_get(url)`: the body of `GET url` as text.
#[udf(async, volatility = "volatile")]
async fn http_get(url: &str) -> Result<String, Error> {
    let body = fetch(url).await?;
    String::from_utf8(body)
        .map_err(|e| Error::Fatal(format!("GET {url}: the body is not UTF-8: {e}")))
}

/// `http_get_json(url, pointer)`: the value at `pointer` in the JSON body of `GET url`.
#[udf(async, volatility = "volatile")]
async fn http_get_json(url: &str, pointer: &str) -> Result<Option<String>, Error> {
    let body = fetch(url).await?;
    let json: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| Error::Fatal(format!("GET {url}: not JSON: {e}")))?;
    Ok(json.pointer(pointer).map(|value| match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }))
}

/// `http_status(url)`: the status code of `GET url`, over a whole column per call.
#[udf(async, vectorized, volatility = "volatile", chunk_rows = 64)]
async fn http_status(
    urls: &udf_abi::arrow_array::StringArray,
) -> Result<udf_abi::arrow_array::Int32Array, Error> {
    let client = client()?;
    let requests = urls.iter().map(|url| {
        let client = client.clone();
        async move {
            let Some(url) = url else {
                return Ok(None);
            };
            let response = client
                .get(url)
                .send()
                .await
                .map_err(|e| request_error(url, &e))?;
            Ok(Some(i32::from(response.status().as_u16())))
        }
    });
    let statuses = futures::future::join_all(requests).await;
    let statuses: Vec<Option<i32>> = statuses.into_iter().collect::<Result<_, Error>>()?;
    Ok(statuses.into())
}
