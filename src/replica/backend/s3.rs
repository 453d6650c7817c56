//! `s3://BUCKET[/PREFIX]`: objects in an S3 bucket (AWS, Garage, MinIO, ...) through the
//! `object_store` crate, at key `PREFIX/NAME`.
//!
//! Guarantees of `put` when it returns Ok: one PUT request was answered 2xx. The request
//! carries the SHA-256 of the body in its SigV4 signature, which the server checks, so
//! the stored bytes are the bytes sent; S3 replaces an object whole, so a reader sees the
//! old object or the new one, never a part. Durability is the server's (AWS: stored
//! redundantly before the answer; Garage: written to its replication factor's quorum).
//!
//! The backend owns one small tokio runtime (2 worker threads); the synchronous methods
//! `block_on` it and may be called from several threads at once, but never from inside a
//! tokio runtime. Retries inside `object_store` are bounded to a few seconds (the caller
//! does its own backoff), with connect and request timeouts, so that every call ends.
//!
//! Error mapping: 404 is NotFound, except a missing bucket; 401, 403, a missing bucket and
//! the S3 error codes for bad credentials are Permanent; everything else (connection
//! refused, timeouts, 5xx, throttling) is Transient.

use super::config::Credentials;
use super::{check_name, keep_listed, split_prefix, Backend, BackendError};
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, RetryConfig};
use std::time::Duration;

/// How to reach one bucket.
#[derive(Clone, Debug)]
pub struct S3Options {
    pub bucket: String,
    /// Key prefix without leading or trailing `/` (each component a valid object name).
    pub prefix: Option<String>,
    /// e.g. `http://127.0.0.1:3900`; `None`: AWS itself. Plain HTTP is allowed only when the
    /// endpoint says `http://`. With an endpoint, requests are path-style.
    pub endpoint: Option<String>,
    /// Default `us-east-1` (Garage's default region is `garage`).
    pub region: Option<String>,
    pub credentials: Credentials,
    /// Timeout of one HTTP request, body included.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
}

impl S3Options {
    pub fn new(bucket: &str, prefix: Option<&str>, credentials: Credentials) -> Self {
        S3Options {
            bucket: bucket.to_string(),
            prefix: prefix.map(str::to_string),
            endpoint: None,
            region: None,
            credentials,
            request_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

pub struct S3Backend {
    store: AmazonS3,
    runtime: tokio::runtime::Runtime,
    prefix: Option<String>,
    desc: String,
}

/// S3 error codes that retrying cannot fix.
const PERMANENT_CODES: &[&str] = &[
    "NoSuchBucket",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidBucketName",
    "AuthorizationHeaderMalformed",
    "InvalidToken",
    "ExpiredToken",
];

/// The message of an error and of all its sources (object_store keeps the server's answer,
/// with its S3 error code, in the sources).
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        let m = x.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = x.source();
    }
    s
}

fn map_err(desc: &str, e: object_store::Error) -> BackendError {
    use object_store::Error as E;
    let text = chain(&e);
    // Some operations (list) wrap the HTTP answer in a Generic error: its text keeps the
    // status and the S3 error code.
    let permanent_code = PERMANENT_CODES.iter().any(|c| text.contains(c))
        || text.contains("status code: 401")
        || text.contains("status code: 403");
    match e {
        E::NotFound { .. } if !permanent_code => BackendError::NotFound,
        E::NotFound { .. } | E::PermissionDenied { .. } | E::Unauthenticated { .. } => {
            BackendError::Permanent(format!("{desc}: {text}"))
        }
        E::InvalidPath { .. }
        | E::NotSupported { .. }
        | E::NotImplemented { .. }
        | E::UnknownConfigurationKey { .. } => BackendError::Permanent(format!("{desc}: {text}")),
        _ if permanent_code => BackendError::Permanent(format!("{desc}: {text}")),
        _ => BackendError::Transient(format!("{desc}: {text}")),
    }
}

impl S3Backend {
    pub fn new(o: &S3Options) -> Result<Self, String> {
        let endpoint = o.endpoint.as_deref().map(|e| e.trim_end_matches('/'));
        let region = o.region.as_deref().unwrap_or("us-east-1");
        let mut client = ClientOptions::new()
            .with_timeout(o.request_timeout)
            .with_connect_timeout(o.connect_timeout);
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&o.bucket)
            .with_region(region)
            .with_access_key_id(&o.credentials.access_key_id)
            .with_secret_access_key(&o.credentials.secret_access_key)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(1),
                    base: 2.0,
                },
                max_retries: 3,
                retry_timeout: Duration::from_secs(5),
            });
        if let Some(t) = &o.credentials.session_token {
            b = b.with_token(t);
        }
        if let Some(ep) = endpoint {
            if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                return Err(format!(
                    "S3 endpoint {ep:?} must start with http:// or https://"
                ));
            }
            client = client.with_allow_http(ep.starts_with("http://"));
            b = b.with_endpoint(ep).with_virtual_hosted_style_request(false);
        }
        let store = b
            .with_client_options(client)
            .build()
            .map_err(|e| format!("s3://{}: {}", o.bucket, chain(&e)))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("snapfs-s3")
            .enable_all()
            .build()
            .map_err(|e| format!("starting the S3 client's runtime: {e}"))?;
        let mut desc = format!("s3://{}", o.bucket);
        if let Some(p) = &o.prefix {
            desc.push('/');
            desc.push_str(p);
        }
        match endpoint {
            Some(ep) => desc.push_str(&format!(" ({ep})")),
            None => desc.push_str(&format!(" (region {region})")),
        }
        Ok(S3Backend {
            store,
            runtime,
            prefix: o.prefix.clone(),
            desc,
        })
    }

    /// The key of an object name (already checked).
    fn key(&self, name: &str) -> Result<Path, BackendError> {
        let full = match &self.prefix {
            Some(p) => format!("{p}/{name}"),
            None => name.to_string(),
        };
        Path::parse(&full).map_err(|e| BackendError::Permanent(format!("{}: {e}", self.desc)))
    }

    fn err(&self, e: object_store::Error) -> BackendError {
        map_err(&self.desc, e)
    }
}

impl Backend for S3Backend {
    fn describe(&self) -> String {
        self.desc.clone()
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<(), BackendError> {
        check_name(name)?;
        let key = self.key(name)?;
        let payload = object_store::PutPayload::from(data.to_vec());
        self.runtime
            .block_on(self.store.put(&key, payload))
            .map(|_| ())
            .map_err(|e| self.err(e))
    }

    fn get(&self, name: &str) -> Result<Vec<u8>, BackendError> {
        check_name(name)?;
        let key = self.key(name)?;
        self.runtime.block_on(async {
            let r = self.store.get(&key).await.map_err(|e| self.err(e))?;
            let bytes = r.bytes().await.map_err(|e| self.err(e))?;
            Ok(bytes.to_vec())
        })
    }

    fn exists(&self, name: &str) -> Result<bool, BackendError> {
        check_name(name)?;
        let key = self.key(name)?;
        match self.runtime.block_on(self.store.head(&key)) {
            Ok(_) => Ok(true),
            Err(e) => match self.err(e) {
                BackendError::NotFound => Ok(false),
                other => Err(other),
            },
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        let (dir, _) = split_prefix(prefix)?;
        // object_store lists by whole path segments: list the prefix's directory part and
        // keep the names that start with the whole prefix.
        let base = match (&self.prefix, dir.is_empty()) {
            (Some(p), true) => Some(p.clone()),
            (Some(p), false) => Some(format!("{p}/{dir}")),
            (None, true) => None,
            (None, false) => Some(dir.to_string()),
        };
        let base = base
            .map(Path::parse)
            .transpose()
            .map_err(|e| BackendError::Permanent(format!("{}: {e}", self.desc)))?;
        let strip = self.prefix.as_ref().map(|p| format!("{p}/"));
        self.runtime.block_on(async {
            let mut stream = self.store.list(base.as_ref());
            let mut out = Vec::new();
            while let Some(item) = stream.next().await {
                let meta = item.map_err(|e| self.err(e))?;
                let key = meta.location.as_ref();
                let name = match &strip {
                    Some(s) => match key.strip_prefix(s.as_str()) {
                        Some(n) => n,
                        None => {
                            log::warn!("{}: skipping key {key:?} outside the prefix", self.desc);
                            continue;
                        }
                    },
                    None => key,
                };
                if keep_listed(&self.desc, name, prefix) {
                    out.push(name.to_string());
                }
            }
            Ok(out)
        })
    }

    fn delete(&self, name: &str) -> Result<(), BackendError> {
        check_name(name)?;
        let key = self.key(name)?;
        match self.runtime.block_on(self.store.delete(&key)) {
            Ok(()) => Ok(()),
            Err(e) => match self.err(e) {
                BackendError::NotFound => Ok(()),
                other => Err(other),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials {
            access_key_id: "GKtest".into(),
            secret_access_key: "secret".into(),
            session_token: None,
        }
    }

    #[test]
    fn describe_and_endpoint_checks() {
        let mut o = S3Options::new("bucket", Some("pre/fix"), creds());
        o.endpoint = Some("http://127.0.0.1:1/".into());
        let b = S3Backend::new(&o).unwrap();
        assert_eq!(b.describe(), "s3://bucket/pre/fix (http://127.0.0.1:1)");
        assert_eq!(b.key("a/b").unwrap().as_ref(), "pre/fix/a/b");
        o.endpoint = Some("127.0.0.1:3900".into());
        assert!(S3Backend::new(&o).err().unwrap().contains("http://"));
        let o = S3Options::new("bucket", None, creds());
        let b = S3Backend::new(&o).unwrap();
        assert_eq!(b.describe(), "s3://bucket (region us-east-1)");
        // Names are checked before anything is sent (no endpoint is contacted here).
        assert!(matches!(
            b.put("../x", b""),
            Err(BackendError::Permanent(_))
        ));
        assert!(matches!(b.list("a//"), Err(BackendError::Permanent(_))));
    }

    #[test]
    fn error_mapping() {
        let nf = |msg: &str| object_store::Error::NotFound {
            path: "p".into(),
            source: msg.to_string().into(),
        };
        assert_eq!(
            map_err("d", nf("404 Not Found: <Code>NoSuchKey</Code>")),
            BackendError::NotFound
        );
        assert!(matches!(
            map_err("d", nf("404 Not Found: <Code>NoSuchBucket</Code>")),
            BackendError::Permanent(_)
        ));
        let denied = object_store::Error::PermissionDenied {
            path: "p".into(),
            source: "403".to_string().into(),
        };
        assert!(matches!(map_err("d", denied), BackendError::Permanent(_)));
        let generic = |msg: &str| object_store::Error::Generic {
            store: "S3",
            source: msg.to_string().into(),
        };
        assert!(map_err("d", generic("500 Internal Server Error")).is_transient());
        assert!(matches!(
            map_err(
                "d",
                generic("list: Server returned non-2xx status code: 403 Forbidden")
            ),
            BackendError::Permanent(_)
        ));
        assert!(map_err("d", generic("error sending request: connection refused")).is_transient());
        assert!(matches!(
            map_err(
                "d",
                generic("400: <Code>AuthorizationHeaderMalformed</Code>")
            ),
            BackendError::Permanent(_)
        ));
    }
}
