//! Object storage: `s3://`, `gs://`, `az://` and `http(s)://` locations through the
//! `object_store` crate, behind a blocking API (one small tokio runtime serves every call), so
//! the sources and the builder stay plain threads.
//!
//! Credentials and endpoints come from the environment, as each cloud's tools read them:
//! `AWS_*` (`AWS_ENDPOINT_URL` for MinIO, moto or another S3-compatible server; an `http://`
//! endpoint is allowed without `AWS_ALLOW_HTTP`), `GOOGLE_*`, `AZURE_*`. A location is a store
//! and a key prefix: `s3://bucket/photos` is the objects under `photos/`, or the object
//! `photos` itself when one has that name.

use std::io::Read;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use futures::StreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("{url}: {message}")]
    Failed { url: String, message: String },
    #[error("{url}: no such object")]
    NotFound { url: String },
}

type Result<T> = std::result::Result<T, ObjectError>;

/// Schemes this build reads (and, for `s3`, writes).
const SCHEMES: &[&str] = &[
    "s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl", "http", "https",
];

/// Whether `s` names an object-storage location rather than a local path.
pub fn is_url(s: &str) -> bool {
    s.split_once("://")
        .is_some_and(|(scheme, _)| SCHEMES.contains(&scheme.to_ascii_lowercase().as_str()))
}

/// `url` through a client shared with every other location in the same bucket, container or
/// origin (a list of a million URLs opens one client per store, not one per entry).
pub fn locate(url: &str) -> Result<Remote> {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static STORES: OnceLock<Mutex<HashMap<String, Remote>>> = OnceLock::new();
    let (scheme, rest) = url.split_once("://").ok_or_else(|| ObjectError::Failed {
        url: url.to_string(),
        message: "not a URL".into(),
    })?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let root = format!("{scheme}://{authority}");
    let stores = STORES.get_or_init(Default::default);
    let cached = stores
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&root)
        .cloned();
    let store = match cached {
        Some(r) => r,
        None => {
            let r = Remote::open(&root)?;
            stores
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(root, r.clone());
            r
        }
    };
    Ok(store.join(path.trim_end_matches('/')))
}

/// The runtime every blocking call runs on: two threads are plenty, the work is waiting.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("codeclm-objects")
            .enable_all()
            .build()
            .expect("a tokio runtime starts (threads and an I/O driver)")
    })
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    runtime().block_on(f)
}

/// An object listed under a location: its key relative to the location, size and time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub rel: String,
    pub size: u64,
    /// Last modification, ns since the epoch (what a frozen plan checks, with the size).
    pub mtime_ns: i64,
}

/// A store and a key prefix. Cheap to clone (the client is shared).
#[derive(Clone)]
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    /// The location as given, without a trailing `/` (names objects in messages).
    url: String,
    prefix: Key,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote({})", self.url)
    }
}

impl Remote {
    /// Opens `url` with credentials and endpoints from the environment.
    pub fn open(url: &str) -> Result<Remote> {
        let url = url.trim_end_matches('/').to_string();
        let failed = |message: String| ObjectError::Failed {
            url: url.clone(),
            message,
        };
        let parsed = url::Url::parse(&url).map_err(|e| failed(format!("not a URL: {e}")))?;
        let scheme = parsed.scheme().to_ascii_lowercase();
        let path = parsed.path().trim_start_matches('/');
        let store: Arc<dyn ObjectStore> = match scheme.as_str() {
            "s3" | "s3a" => {
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_url(format!("s3://{}", parsed.host_str().unwrap_or_default()));
                let endpoint = ["AWS_ENDPOINT_URL", "AWS_ENDPOINT"]
                    .iter()
                    .find_map(|k| std::env::var(k).ok());
                if endpoint.is_some_and(|e| e.starts_with("http://")) {
                    b = b.with_allow_http(true);
                }
                Arc::new(b.build().map_err(|e| {
                    failed(format!("{e}. Fix: set AWS_REGION (and AWS_ENDPOINT_URL for an S3-compatible server) and credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY)"))
                })?)
            }
            "gs" => Arc::new(
                object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_url(format!("gs://{}", parsed.host_str().unwrap_or_default()))
                    .build()
                    .map_err(|e| {
                        failed(format!("{e}. Fix: set GOOGLE_APPLICATION_CREDENTIALS (or GOOGLE_SERVICE_ACCOUNT)"))
                    })?,
            ),
            "az" | "azure" | "abfs" | "abfss" | "adl" => Arc::new(
                object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_url(&url)
                    .build()
                    .map_err(|e| {
                        failed(format!("{e}. Fix: set AZURE_STORAGE_ACCOUNT_NAME and a key or token (AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_KEY)"))
                    })?,
            ),
            "http" | "https" => {
                let origin = parsed.origin().ascii_serialization();
                Arc::new(
                    object_store::http::HttpBuilder::new()
                        .with_url(origin)
                        .with_client_options(
                            object_store::ClientOptions::new().with_allow_http(scheme == "http"),
                        )
                        .build()
                        .map_err(|e| failed(e.to_string()))?,
                )
            }
            other => {
                return Err(failed(format!(
                    "scheme {other}:// is not supported (s3, gs, az, http, https)"
                )))
            }
        };
        // Every scheme routed to a cloud builder names the bucket or container in the host (or,
        // for abfs[s], in the user part): the URL's path is the key prefix.
        let prefix = Key::parse(path).map_err(|e| failed(format!("not a valid key: {e}")))?;
        Ok(Remote { store, url, prefix })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether this is a whole bucket, container or origin (no key prefix).
    pub fn is_root(&self) -> bool {
        self.prefix.as_ref().is_empty()
    }

    /// The location of `rel` under this one (`""`: this location itself).
    pub fn join(&self, rel: &str) -> Remote {
        Remote {
            store: self.store.clone(),
            url: self.url_of(rel),
            prefix: self.key(rel),
        }
    }

    /// The folder holding this location's object (a list's entries are relative to it).
    pub fn parent(&self) -> Remote {
        let parts: Vec<_> = self.prefix.parts().collect();
        let n = parts.len().saturating_sub(1);
        let prefix: Key = parts.into_iter().take(n).collect();
        let url = match self.url.rsplit_once('/') {
            Some((head, _)) if !self.prefix.as_ref().is_empty() => head.to_string(),
            _ => self.url.clone(),
        };
        Remote {
            store: self.store.clone(),
            url,
            prefix,
        }
    }

    /// The name of this location's last key segment (`photos/a.tar` -> `a.tar`).
    pub fn name(&self) -> String {
        self.prefix.filename().unwrap_or_default().to_string()
    }

    pub fn url_of(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.url.clone()
        } else {
            format!("{}/{rel}", self.url)
        }
    }

    fn key(&self, rel: &str) -> Key {
        if rel.is_empty() {
            return self.prefix.clone();
        }
        let mut key = self.prefix.clone();
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            key = key.clone().join(part);
        }
        key
    }

    fn failed(&self, rel: &str, e: object_store::Error) -> ObjectError {
        match e {
            object_store::Error::NotFound { .. } => ObjectError::NotFound {
                url: self.url_of(rel),
            },
            e => ObjectError::Failed {
                url: self.url_of(rel),
                message: e.to_string(),
            },
        }
    }

    /// Every object under this location, in key order (as the stores list them), lazily:
    /// a prefix of millions of objects is never held.
    pub fn list(&self) -> impl Iterator<Item = Result<Listed>> + Send + 'static {
        // Fused: the iterator may be asked again after the end (a stream may not be).
        let mut stream = self.store.list(Some(&self.prefix)).fuse();
        let this = self.clone();
        let strip = self.prefix.as_ref().len();
        std::iter::from_fn(move || {
            let next = block_on(stream.next())?;
            Some(match next {
                Ok(meta) => {
                    let key = meta.location.as_ref();
                    let rel = key[strip.min(key.len())..].trim_start_matches('/');
                    Ok(Listed {
                        rel: rel.to_string(),
                        size: meta.size,
                        mtime_ns: meta.last_modified.timestamp_nanos_opt().unwrap_or(0),
                    })
                }
                Err(e) => Err(this.failed("", e)),
            })
        })
    }

    /// A HEAD's answer as a listing entry: `None` for a missing object.
    fn listed(
        &self,
        rel: &str,
        head: object_store::Result<object_store::ObjectMeta>,
    ) -> Result<Option<Listed>> {
        match head {
            Ok(meta) => Ok(Some(Listed {
                rel: rel.to_string(),
                size: meta.size,
                mtime_ns: meta.last_modified.timestamp_nanos_opt().unwrap_or(0),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.failed(rel, e)),
        }
    }

    /// Size and time of `rel`, `None` when there is no such object.
    pub fn head(&self, rel: &str) -> Result<Option<Listed>> {
        let head = block_on(self.store.head(&self.key(rel)));
        self.listed(rel, head)
    }

    /// Size and time of many objects at once (64 requests in flight), in order.
    pub fn head_many(&self, rels: &[String]) -> Vec<Result<Option<Listed>>> {
        let this = self.clone();
        block_on(async move {
            futures::stream::iter(rels.iter().map(|rel| {
                let this = this.clone();
                async move {
                    let head = this.store.head(&this.key(rel)).await;
                    this.listed(rel, head)
                }
            }))
            .buffered(64)
            .collect()
            .await
        })
    }

    /// The whole object, or `Err(size)` when it is larger than `cap` (its body is not read).
    pub fn get_capped(&self, rel: &str, cap: u64) -> Result<std::result::Result<Vec<u8>, u64>> {
        block_on(async {
            let got = self
                .store
                .get(&self.key(rel))
                .await
                .map_err(|e| self.failed(rel, e))?;
            if got.meta.size > cap {
                return Ok(Err(got.meta.size));
            }
            let bytes = got.bytes().await.map_err(|e| self.failed(rel, e))?;
            Ok(Ok(bytes.to_vec()))
        })
    }

    pub fn get(&self, rel: &str) -> Result<Vec<u8>> {
        self.get_capped(rel, u64::MAX)
            .map(|r| r.unwrap_or_default())
    }

    pub fn get_range(&self, rel: &str, range: Range<u64>) -> Result<Bytes> {
        block_on(self.store.get_range(&self.key(rel), range)).map_err(|e| self.failed(rel, e))
    }

    /// A streaming reader of the object (tars are read front to back, never held whole).
    pub fn reader(&self, rel: &str) -> Result<ObjectReader> {
        let got = block_on(self.store.get(&self.key(rel))).map_err(|e| self.failed(rel, e))?;
        Ok(ObjectReader {
            stream: got.into_stream(),
            chunk: Bytes::new(),
            url: self.url_of(rel),
        })
    }

    /// Writes `bytes` as `rel` (one PUT: the object appears whole or not at all).
    pub fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        block_on(self.store.put(&self.key(rel), PutPayload::from(bytes)))
            .map(|_| ())
            .map_err(|e| self.failed(rel, e))
    }

    /// Uploads a local file as `rel`: one PUT up to 64 MiB, else a multipart upload of 16 MiB
    /// parts (4 in flight); either way the object appears only when it is complete.
    pub fn put_file(&self, rel: &str, path: &Path) -> Result<()> {
        const SINGLE: u64 = 64 << 20;
        const CHUNK: usize = 16 << 20;
        let io = |e: std::io::Error| ObjectError::Failed {
            url: self.url_of(rel),
            message: format!("cannot read {}: {e}", path.display()),
        };
        let size = std::fs::metadata(path).map_err(io)?.len();
        if size <= SINGLE {
            return self.put(rel, std::fs::read(path).map_err(io)?);
        }
        block_on(async {
            let upload = self
                .store
                .put_multipart(&self.key(rel))
                .await
                .map_err(|e| self.failed(rel, e))?;
            let mut w = object_store::WriteMultipart::new_with_chunk_size(upload, CHUNK);
            let mut buf = vec![0u8; CHUNK];
            let sent: Result<()> = async {
                let mut f = std::fs::File::open(path).map_err(io)?;
                loop {
                    let n = f.read(&mut buf).map_err(io)?;
                    if n == 0 {
                        return Ok(());
                    }
                    w.wait_for_capacity(4)
                        .await
                        .map_err(|e| self.failed(rel, e))?;
                    w.write(&buf[..n]);
                }
            }
            .await;
            match sent {
                // An upload that cannot finish is aborted: S3 keeps (and bills) the parts of
                // an unfinished multipart upload otherwise.
                Err(e) => {
                    let _ = w.abort().await;
                    Err(e)
                }
                Ok(()) => w
                    .finish()
                    .await
                    .map(|_| ())
                    .map_err(|e| self.failed(rel, e)),
            }
        })
    }

    pub fn delete(&self, rel: &str) -> Result<()> {
        match block_on(self.store.delete(&self.key(rel))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.failed(rel, e)),
        }
    }
}

/// A GET's body as `std::io::Read`.
pub struct ObjectReader {
    stream: futures::stream::BoxStream<'static, object_store::Result<Bytes>>,
    chunk: Bytes,
    url: String,
}

impl Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            match block_on(self.stream.next()) {
                None => return Ok(0),
                Some(Ok(b)) => self.chunk = b,
                Some(Err(e)) => {
                    return Err(std::io::Error::other(format!("{}: {e}", self.url)));
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        let _ = self.chunk.split_to(n);
        Ok(n)
    }
}

/// A real S3-compatible server for tests: moto's, started on a free port of 127.0.0.1 with one
/// bucket, and the `AWS_*` variables pointed at it. Stopped when dropped.
#[doc(hidden)]
pub struct S3TestServer {
    child: std::process::Child,
    pub endpoint: String,
}

impl S3TestServer {
    /// Starts `moto_server` (tools/requirements.txt installs it) with `bucket`, and points this
    /// process's `AWS_*` variables at it.
    pub fn start(bucket: &str) -> S3TestServer {
        let server = S3TestServer::spawn(false);
        server.bucket(bucket);
        for (k, v) in server.env() {
            std::env::set_var(k, v);
        }
        server
    }

    /// One server for the whole test process (tests running in parallel each take their own
    /// bucket), stopped when the process exits. Child processes reach it through [`Self::env`];
    /// this process's environment is left alone (other test threads read it).
    pub fn shared() -> &'static S3TestServer {
        static SHARED: OnceLock<S3TestServer> = OnceLock::new();
        SHARED.get_or_init(|| {
            // Spawned from a thread that lives as long as the process: the server is told to
            // die with its parent thread (PR_SET_PDEATHSIG), so no test run leaves one behind.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(S3TestServer::spawn(true));
                loop {
                    std::thread::park();
                }
            });
            rx.recv().expect("the server thread answers")
        })
    }

    fn spawn(die_with_parent: bool) -> S3TestServer {
        use std::os::unix::process::CommandExt;
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            l.local_addr().expect("its address").port()
        };
        let mut cmd = std::process::Command::new("moto_server");
        cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if die_with_parent {
            // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .expect("moto_server is installed (pip install -r tools/requirements.txt)");
        for _ in 0..300 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        S3TestServer {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
        }
    }

    /// Creates a bucket, with a plain PUT (moto checks no signature). Names of 3 or more
    /// characters: moto refuses shorter ones, as S3 does.
    pub fn bucket(&self, name: &str) {
        self.request("PUT", &format!("/{name}"), &[]);
    }

    /// Stores `bytes` as `bucket/key`, with a plain PUT, readable by anyone (so that plain
    /// `http://` GETs of it work, and a later unsigned PUT may replace it).
    pub fn put(&self, bucket: &str, key: &str, bytes: &[u8]) {
        self.request("PUT", &format!("/{bucket}/{key}"), bytes);
    }

    /// Removes `bucket/key`.
    pub fn delete(&self, bucket: &str, key: &str) {
        self.request("DELETE", &format!("/{bucket}/{key}"), &[]);
    }

    /// One HTTP/1.1 request that must succeed (2xx).
    fn request(&self, method: &str, path: &str, body: &[u8]) {
        use std::io::Write;
        let host = self.endpoint.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(host).expect("moto listens");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\nx-amz-acl: public-read\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .expect("a request");
        s.write_all(body).expect("a request body");
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        let reply = String::from_utf8_lossy(&reply);
        assert!(reply.starts_with("HTTP/1.1 2"), "{method} {path}: {reply}");
    }

    /// The variables a child process needs to reach this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

impl Drop for S3TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against moto's S3 server on 127.0.0.1 (tools/requirements.txt installs it).
    #[test]
    fn put_list_get_range_and_stream_against_an_s3_server() {
        let _server = S3TestServer::start("bkt");
        let r = Remote::open("s3://bkt/photos/").unwrap();
        r.put("b/2.jpg", vec![2; 10]).unwrap();
        r.put("a.jpg", vec![1; 5]).unwrap();
        r.put("a-c.jpg", vec![3; 7]).unwrap();
        let listed: Vec<Listed> = r.list().map(|l| l.unwrap()).collect();
        let rels: Vec<&str> = listed.iter().map(|l| l.rel.as_str()).collect();
        assert_eq!(rels, ["a-c.jpg", "a.jpg", "b/2.jpg"]);
        assert_eq!(listed[2].size, 10);
        assert_eq!(r.get("a.jpg").unwrap(), vec![1; 5]);
        assert_eq!(r.get_capped("b/2.jpg", 4).unwrap(), Err(10));
        assert_eq!(&r.get_range("b/2.jpg", 2..5).unwrap()[..], &[2, 2, 2]);
        let mut streamed = Vec::new();
        r.join("a-c.jpg")
            .reader("")
            .unwrap()
            .read_to_end(&mut streamed)
            .unwrap();
        assert_eq!(streamed, vec![3; 7]);
        assert!(r.head("nope.jpg").unwrap().is_none());
        assert!(matches!(
            r.get("nope.jpg"),
            Err(ObjectError::NotFound { .. })
        ));
        let big = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..(70u32 << 20)).map(|i| (i % 251) as u8).collect();
        std::fs::write(big.path(), &data).unwrap();
        r.put_file("big.bin", big.path()).unwrap();
        assert_eq!(r.head("big.bin").unwrap().unwrap().size, data.len() as u64);
        assert_eq!(r.get("big.bin").unwrap(), data);
        assert_eq!(r.join("b/2.jpg").parent().url(), "s3://bkt/photos/b");
        r.delete("a.jpg").unwrap();
        assert!(r.head("a.jpg").unwrap().is_none());
    }
}
