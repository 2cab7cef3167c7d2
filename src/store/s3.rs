//! The S3 store (`s3://bucket/prefix`), through aws-sdk-s3 and aws-config's standard
//! credential chain. Works with AWS and with S3-compatible servers (endpoint URL, path-style
//! addressing).
//!
//! Writes buffer one part at a time: an object that fits in one part goes up as a single
//! PUT; a larger one as a multipart upload with a bounded number of parts in flight, so
//! memory stays at about `part_size * (upload_concurrency + 1)` whatever the object's size.
//! Every request carries a CRC32 the server verifies; create-only writes send
//! `If-None-Match: *`. Transient failures (5xx, throttling, timeouts, dropped connections)
//! are retried by the SDK's standard retry with backoff, bounded by attempts and by an
//! overall deadline per operation.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::Arc;
use std::time::Duration;

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Region, StalledStreamProtectionConfig};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Output;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier, ServerSideEncryption,
    StorageClass,
};
use aws_sdk_s3::Client;
use bytes::Bytes;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::{
    error_chain, Metadata, ObjectKey, ObjectMeta, ObjectReader, ObjectWriter, PutMode, PutOptions, PutOutcome,
    StoreError,
};

/// Settings of an S3 store, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct S3Settings {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing '/'; may be empty.
    pub prefix: String,
    /// Region; aws-config's chain decides when `None`, and `us-east-1` after that.
    pub region: Option<String>,
    /// Endpoint URL for S3-compatible servers.
    pub endpoint: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible servers need.
    pub path_style: bool,
    /// Storage class for new objects (`STANDARD`, `STANDARD_IA`, ...).
    pub storage_class: Option<String>,
    /// Server-side encryption (`AES256` or `aws:kms`).
    pub sse: Option<String>,
    /// KMS key id for `aws:kms`.
    pub sse_kms_key_id: Option<String>,
    /// Bytes per part; objects up to this size go up in one PUT.
    pub part_size: usize,
    /// Parts uploaded at once.
    pub upload_concurrency: usize,
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// Time allowed for one attempt of one request.
    pub request_timeout: Duration,
    /// Time allowed for one request, retries included.
    pub deadline: Duration,
}

/// An S3 bucket and prefix.
pub struct S3Store {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    settings: S3Settings,
    /// The runtime the store was opened on: blocking writers drive their uploads on it
    /// from any thread.
    handle: Handle,
}

impl S3Store {
    /// Builds the client. Loads the region and credential chain, without network I/O for
    /// static credentials.
    pub async fn connect(settings: S3Settings) -> S3Store {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &settings.region {
            loader = loader.region(Region::new(region.clone()));
        }
        let sdk = loader.load().await;
        let mut builder = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(settings.path_style)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(settings.max_attempts.max(1))
                    .with_initial_backoff(Duration::from_millis(100))
                    .with_max_backoff(Duration::from_secs(5)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5).min(settings.request_timeout))
                    .operation_attempt_timeout(settings.request_timeout)
                    .operation_timeout(settings.deadline)
                    .build(),
            )
            // A body that stops flowing for this long counts as a failed attempt, so a
            // stalled connection cannot hang a transfer.
            .stalled_stream_protection(
                StalledStreamProtectionConfig::enabled().grace_period(Duration::from_secs(10)).build(),
            );
        if sdk.region().is_none() {
            builder = builder.region(Region::new("us-east-1"));
        }
        if let Some(endpoint) = &settings.endpoint {
            builder = builder.endpoint_url(endpoint);
        }
        S3Store {
            inner: Arc::new(Inner { client: Client::from_conf(builder.build()), settings, handle: Handle::current() }),
        }
    }

    /// The store's URL.
    pub fn url(&self) -> String {
        self.inner.url()
    }

    pub(super) fn writer(&self, key: &ObjectKey, opts: PutOptions) -> Result<Box<dyn ObjectWriter>, StoreError> {
        let part_size = self.inner.settings.part_size.max(5 << 20);
        Ok(Box::new(S3Writer {
            inner: self.inner.clone(),
            handle: self.inner.handle.clone(),
            key: key.clone(),
            opts,
            // Reserved whole, never grown: untouched pages cost no memory, and a growing
            // vector would copy itself (old and new buffer alive at once) on the way up.
            buf: Vec::with_capacity(part_size),
            part_size,
            upload_id: None,
            in_flight: VecDeque::new(),
            done: Vec::new(),
        }))
    }

    pub(super) async fn get(&self, key: &ObjectKey) -> Result<ObjectReader, StoreError> {
        let full = self.inner.full_key(key);
        let out = self
            .inner
            .client
            .get_object()
            .bucket(&self.inner.settings.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| self.inner.map_err("get", key, e))?;
        let size = out.content_length().unwrap_or(0).max(0) as u64;
        let metadata = to_metadata(out.metadata());
        let body = tokio_util::io::SyncIoBridge::new_with_handle(out.body.into_async_read(), self.inner.handle.clone());
        Ok(ObjectReader { size, metadata, body: Box::new(body) })
    }

    pub(super) async fn get_bytes(&self, key: &ObjectKey) -> Result<Vec<u8>, StoreError> {
        Ok(self.get_small(key, None).await?.0)
    }

    pub(super) async fn get_tail(&self, key: &ObjectKey, len: u64) -> Result<(Vec<u8>, u64), StoreError> {
        let (mut bytes, total) = self.get_small(key, Some(format!("bytes=-{len}"))).await?;
        // A server that ignores Range sends the whole object: its tail is still the tail.
        bytes.drain(..bytes.len().saturating_sub(len as usize));
        Ok((bytes, total))
    }

    /// A whole small object or a range of one, read into memory, and the object's whole size
    /// (from `Content-Range` for a range). The SDK retries a request until its response
    /// headers arrive; a body cut short after that is retried here, within the same attempts
    /// and deadline.
    async fn get_small(&self, key: &ObjectKey, range: Option<String>) -> Result<(Vec<u8>, u64), StoreError> {
        let full = self.inner.full_key(key);
        let deadline = tokio::time::Instant::now() + self.inner.settings.deadline;
        let mut attempt = 1;
        loop {
            let out = self
                .inner
                .client
                .get_object()
                .bucket(&self.inner.settings.bucket)
                .key(&full)
                .set_range(range.clone())
                .send()
                .await
                .map_err(|e| self.inner.map_err("get", key, e))?;
            // "bytes 100-155/156"; no header when the whole object came back.
            let total = out.content_range().and_then(|r| r.rsplit_once('/')).and_then(|(_, t)| t.parse::<u64>().ok());
            match out.body.collect().await {
                Ok(bytes) => {
                    let bytes = bytes.to_vec();
                    let total = total.unwrap_or(bytes.len() as u64);
                    return Ok((bytes, total));
                }
                Err(e) => {
                    let detail = error_chain(&e);
                    let backoff = Duration::from_millis(100 << attempt.min(6));
                    if attempt >= self.inner.settings.max_attempts || tokio::time::Instant::now() + backoff > deadline {
                        return Err(StoreError::Unavailable { op: "get", key: self.inner.describe(key), detail });
                    }
                    tokio::time::sleep(backoff).await;
                    attempt += 1;
                }
            }
        }
    }

    pub(super) async fn head(&self, key: &ObjectKey) -> Result<Option<ObjectMeta>, StoreError> {
        let full = self.inner.full_key(key);
        match self.inner.client.head_object().bucket(&self.inner.settings.bucket).key(&full).send().await {
            Ok(out) => Ok(Some(ObjectMeta {
                key: key.clone(),
                size: out.content_length().unwrap_or(0).max(0) as u64,
                metadata: to_metadata(out.metadata()),
                modified: out.last_modified().and_then(|t| std::time::SystemTime::try_from(*t).ok()),
            })),
            Err(e) => match self.inner.map_err("head", key, e) {
                StoreError::NotFound { .. } => Ok(None),
                other => Err(other),
            },
        }
    }

    pub(super) async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let full_prefix = self.inner.full_prefix(prefix);
        let root = self.inner.full_prefix("");
        let mut out = Vec::new();
        // Page by page by hand rather than with the SDK's paginator, which ends quietly when a
        // page says "truncated" but carries no continuation token: a listing cut short reads
        // as objects missing (WAL that wal-verify reports lost, backups retention does not
        // see). Here that, and a token given before (a listing going round in a circle),
        // fail the listing.
        let mut token: Option<String> = None;
        let mut used: std::collections::HashSet<String> = std::collections::HashSet::new();
        loop {
            let page = self.list_page(&full_prefix, token.clone(), None).await?;
            for obj in page.contents() {
                let Some(k) = obj.key() else { continue };
                // A key outside what was asked for (a server ignoring the prefix) is not ours.
                let Some(Ok(key)) = k.strip_prefix(&root).filter(|_| k.starts_with(&full_prefix)).map(ObjectKey::new)
                else {
                    continue;
                };
                out.push(ObjectMeta {
                    key,
                    size: obj.size().unwrap_or(0).max(0) as u64,
                    metadata: Metadata::new(),
                    modified: obj.last_modified().and_then(|t| std::time::SystemTime::try_from(*t).ok()),
                });
            }
            if page.is_truncated() != Some(true) {
                return Ok(out);
            }
            match page.next_continuation_token() {
                Some(next) if used.insert(next.to_string()) => token = Some(next.to_string()),
                next => {
                    return Err(StoreError::Unavailable {
                        op: "list",
                        key: format!("s3://{}/{full_prefix}", self.inner.settings.bucket),
                        detail: format!(
                            "the store said the listing goes on after {} objects but {}: a listing cut short is refused; check the S3 endpoint",
                            out.len(),
                            if next.is_some() { "gave a continuation token it had given before" } else { "gave no continuation token" }
                        ),
                    })
                }
            }
        }
    }

    /// One page of the listing of `full_prefix` (the prefix as S3 names it): after `token`,
    /// and of at most `max_keys` keys.
    async fn list_page(
        &self,
        full_prefix: &str,
        token: Option<String>,
        max_keys: Option<i32>,
    ) -> Result<ListObjectsV2Output, StoreError> {
        self.inner
            .client
            .list_objects_v2()
            .bucket(&self.inner.settings.bucket)
            .prefix(full_prefix)
            .set_continuation_token(token)
            .set_max_keys(max_keys)
            .send()
            .await
            .map_err(|e| self.inner.map_err_raw("list", full_prefix, e))
    }

    /// See [`super::Store::confirm_absent`]: one listing of at most one key under `key`'s
    /// folder.
    pub(super) async fn confirm_absent(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let folder = key.as_str().rsplit_once('/').map_or("", |(folder, _)| folder);
        let full_prefix = self.inner.full_prefix(&format!("{folder}/"));
        let page = self.list_page(&full_prefix, None, Some(1)).await?;
        if !page.contents().is_empty() {
            return Ok(());
        }
        Err(StoreError::Unavailable {
            op: "get",
            key: self.inner.describe(key),
            detail: format!(
                "s3://{}/{full_prefix} holds no object: nothing was ever archived there; check WALRS_STORE (bucket and prefix) and the endpoint",
                self.inner.settings.bucket
            ),
        })
    }

    pub(super) async fn delete(&self, key: &ObjectKey) -> Result<(), StoreError> {
        let full = self.inner.full_key(key);
        self.inner
            .client
            .delete_object()
            .bucket(&self.inner.settings.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| self.inner.map_err("delete", key, e))?;
        Ok(())
    }

    /// DeleteObjects, 1000 keys per request (S3's limit), quiet mode: the answer lists only
    /// the keys that failed, and any failure fails the call, naming the first.
    pub(super) async fn delete_many(&self, keys: &[ObjectKey]) -> Result<(), StoreError> {
        for batch in keys.chunks(1000) {
            let mut ids = Vec::with_capacity(batch.len());
            for key in batch {
                let id = ObjectIdentifier::builder().key(self.inner.full_key(key)).build().map_err(|e| {
                    StoreError::Other { op: "delete", key: self.inner.describe(key), detail: e.to_string() }
                })?;
                ids.push(id);
            }
            let first = &batch[0];
            let delete = Delete::builder().set_objects(Some(ids)).quiet(true).build().map_err(|e| {
                StoreError::Other { op: "delete", key: self.inner.describe(first), detail: e.to_string() }
            })?;
            let out = self
                .inner
                .client
                .delete_objects()
                .bucket(&self.inner.settings.bucket)
                .delete(delete)
                .checksum_algorithm(ChecksumAlgorithm::Crc32)
                .send()
                .await
                .map_err(|e| self.inner.map_err("delete", first, e))?;
            if let Some(err) = out.errors().first() {
                let key = format!("s3://{}/{}", self.inner.settings.bucket, err.key().unwrap_or("?"));
                let detail = format!(
                    "{}: {} ({} of {} keys in this batch failed)",
                    err.code().unwrap_or("error"),
                    err.message().unwrap_or(""),
                    out.errors().len(),
                    batch.len()
                );
                return Err(match err.code() {
                    Some("AccessDenied") => StoreError::Denied { op: "delete", key, detail },
                    Some("InternalError" | "SlowDown" | "ServiceUnavailable") => {
                        StoreError::Unavailable { op: "delete", key, detail }
                    }
                    _ => StoreError::Other { op: "delete", key, detail },
                });
            }
        }
        Ok(())
    }
}

impl Inner {
    fn url(&self) -> String {
        if self.settings.prefix.is_empty() {
            format!("s3://{}", self.settings.bucket)
        } else {
            format!("s3://{}/{}", self.settings.bucket, self.settings.prefix)
        }
    }

    fn full_prefix(&self, rel: &str) -> String {
        if self.settings.prefix.is_empty() {
            rel.to_string()
        } else {
            format!("{}/{}", self.settings.prefix, rel)
        }
    }

    fn full_key(&self, key: &ObjectKey) -> String {
        self.full_prefix(key.as_str())
    }

    fn describe(&self, key: &ObjectKey) -> String {
        format!("{}/{}", self.url(), key)
    }

    fn map_err<E>(
        &self,
        op: &'static str,
        key: &ObjectKey,
        err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        self.map_err_raw(op, &self.full_key(key), err)
    }

    /// Sorts an SDK error into the store's error kinds. Only the server's error code and
    /// message are kept: never request details, which could hold signatures.
    fn map_err_raw<E>(
        &self,
        op: &'static str,
        full_key: &str,
        err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    ) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let key = format!("s3://{}/{}", self.settings.bucket, full_key);
        match &err {
            SdkError::ServiceError(ctx) => {
                let status = ctx.raw().status().as_u16();
                let code = ctx.err().code().unwrap_or("").to_string();
                let message = ctx.err().message().unwrap_or("").to_string();
                let detail = match (code.is_empty(), message.is_empty()) {
                    (true, _) => format!("HTTP {status}"),
                    (false, true) => format!("{code} (HTTP {status})"),
                    (false, false) => format!("{code}: {message} (HTTP {status})"),
                };
                // Codes first: they say more than the status, which they share with others.
                match (status, code.as_str()) {
                    (_, "NoSuchBucket") => StoreError::StoreMissing { store: self.url() },
                    // A 403, but no credential is at fault: the object is in Glacier or
                    // Deep Archive (s3_storage_class allows those classes).
                    (_, "InvalidObjectState") => StoreError::Other {
                        op,
                        key,
                        detail: format!(
                            "{detail}: the object is in an archive storage class; restore it from Glacier first, and use no archive class for wal-rs objects (s3_storage_class, lifecycle rules)"
                        ),
                    },
                    // Temporary credentials that ran out or were mangled: HTTP 400, yet a
                    // credentials problem.
                    (_, "ExpiredToken" | "InvalidToken" | "TokenRefreshRequired") => {
                        StoreError::Denied { op, key, detail }
                    }
                    (_, "NoSuchKey") => StoreError::NotFound { key },
                    // A HEAD's 404 has no body, so no code: that is how S3 says "no such
                    // object" to a HEAD. A GET or a listing gets S3's NoSuchKey in the body;
                    // a bare 404 there came from something else on the way (a proxy or
                    // gateway routed wrongly), and must not read as "not in the archive".
                    (404, "NotFound" | "") if op == "head" => StoreError::NotFound { key },
                    (404, "NotFound" | "") => StoreError::Unavailable {
                        op,
                        key,
                        detail: format!(
                            "{detail} without S3's NoSuchKey code: something other than the store answered; check the endpoint and any proxy in between"
                        ),
                    },
                    // A conditional write still in progress from an earlier attempt: the
                    // retry finds the object and compares it.
                    (409, "ConditionalRequestConflict" | "OperationAborted") => {
                        StoreError::Unavailable { op, key, detail }
                    }
                    (412, _) | (_, "PreconditionFailed") => StoreError::Other { op: "precondition", key, detail },
                    (401 | 403, _) | (_, "AccessDenied" | "InvalidAccessKeyId" | "SignatureDoesNotMatch") => {
                        StoreError::Denied { op, key, detail }
                    }
                    (408 | 429 | 500..=599, _) | (_, "SlowDown" | "RequestTimeout" | "InternalError") => {
                        StoreError::Unavailable { op, key, detail }
                    }
                    _ => StoreError::Other { op, key, detail },
                }
            }
            // Whether the attempts or the deadline ran out first is a matter of timing; either
            // way the message names the endpoint asked.
            SdkError::TimeoutError(_) => StoreError::Unavailable {
                op,
                key,
                detail: format!(
                    "no success within {} s (retry_deadline_secs), {} attempts at most (retry_attempts): the store{} kept failing or did not answer",
                    self.settings.deadline.as_secs(),
                    self.settings.max_attempts,
                    self.settings.endpoint.as_deref().map(|e| format!(" at {}", crate::config::redact_url(e))).unwrap_or_default()
                ),
            },
            // Credentials are loaded before the request is sent, so a provider's failure
            // arrives as a dispatch failure.
            SdkError::DispatchFailure(f) => {
                let detail = error_chain(&err);
                match credentials_refused(&err) {
                    Some(true) => StoreError::Denied { op, key, detail },
                    Some(false) => StoreError::Unavailable { op, key, detail },
                    None if f.is_user() => StoreError::Denied { op, key, detail },
                    None => StoreError::Unavailable { op, key, detail },
                }
            }
            SdkError::ResponseError(_) => StoreError::Unavailable { op, key, detail: error_chain(&err) },
            _ => {
                let detail = error_chain(&err);
                match credentials_refused(&err) {
                    Some(true) => StoreError::Denied { op, key, detail },
                    Some(false) => StoreError::Unavailable { op, key, detail },
                    None => StoreError::Other { op, key, detail },
                }
            }
        }
    }
}

/// Whether `err` failed to load credentials, and how: `Some(true)` when someone must act
/// (no credentials anywhere in the chain, a malformed profile), `Some(false)` when the
/// provider failed or was slow (instance metadata or STS slow, throttled or erring), which
/// a retry within the deadline may get past; `None` when credentials are not the cause.
fn credentials_refused(err: &(dyn std::error::Error + 'static)) -> Option<bool> {
    let mut current = Some(err);
    while let Some(e) = current {
        if let Some(c) = e.downcast_ref::<CredentialsError>() {
            return Some(matches!(
                c,
                CredentialsError::CredentialsNotLoaded(_) | CredentialsError::InvalidConfiguration(_)
            ));
        }
        current = e.source();
    }
    None
}

/// User metadata as the SDK returns it, as the store's map.
fn to_metadata(m: Option<&std::collections::HashMap<String, String>>) -> Metadata {
    m.map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default()
}

fn is_precondition_failure(err: &StoreError) -> bool {
    matches!(err, StoreError::Other { op: "precondition", .. })
}

struct S3Writer {
    inner: Arc<Inner>,
    handle: Handle,
    key: ObjectKey,
    opts: PutOptions,
    buf: Vec<u8>,
    part_size: usize,
    upload_id: Option<String>,
    in_flight: VecDeque<JoinHandle<Result<CompletedPart, StoreError>>>,
    done: Vec<CompletedPart>,
}

impl S3Writer {
    fn storage_class(&self) -> Option<StorageClass> {
        self.inner.settings.storage_class.as_deref().map(StorageClass::from)
    }

    fn sse(&self) -> Option<ServerSideEncryption> {
        self.inner.settings.sse.as_deref().map(ServerSideEncryption::from)
    }

    /// Starts uploading the buffered bytes as the next part, waiting first if too many
    /// parts are already in flight.
    fn send_part(&mut self) -> Result<(), StoreError> {
        let full = self.inner.full_key(&self.key);
        if self.upload_id.is_none() {
            let create = self
                .inner
                .client
                .create_multipart_upload()
                .bucket(&self.inner.settings.bucket)
                .key(&full)
                .set_metadata(Some(self.opts.metadata.clone().into_iter().collect()))
                .set_storage_class(self.storage_class())
                .set_server_side_encryption(self.sse())
                .set_ssekms_key_id(self.inner.settings.sse_kms_key_id.clone())
                .checksum_algorithm(ChecksumAlgorithm::Crc32)
                .send();
            let out = self.handle.block_on(create).map_err(|e| self.inner.map_err("start upload of", &self.key, e))?;
            self.upload_id = out.upload_id().map(str::to_string);
            if self.upload_id.is_none() {
                return Err(StoreError::Other {
                    op: "start upload of",
                    key: self.inner.describe(&self.key),
                    detail: "no upload id returned".into(),
                });
            }
        }
        while self.in_flight.len() >= self.inner.settings.upload_concurrency.max(1) {
            let oldest = self.in_flight.pop_front().unwrap();
            let part = self.handle.block_on(oldest).map_err(|e| StoreError::Other {
                op: "upload part of",
                key: self.inner.describe(&self.key),
                detail: e.to_string(),
            })??;
            self.done.push(part);
        }
        let number = (self.done.len() + self.in_flight.len() + 1) as i32;
        let body = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(self.part_size)));
        let inner = self.inner.clone();
        let key = self.key.clone();
        let upload_id = self.upload_id.clone().unwrap();
        self.in_flight.push_back(self.handle.spawn(async move {
            let out = inner
                .client
                .upload_part()
                .bucket(&inner.settings.bucket)
                .key(inner.full_key(&key))
                .upload_id(upload_id)
                .part_number(number)
                .checksum_algorithm(ChecksumAlgorithm::Crc32)
                .body(ByteStream::from(body))
                .send()
                .await
                .map_err(|e| inner.map_err("upload part of", &key, e))?;
            // A part the store took is progress for the retry deadline: the writer may wait
            // on parts in flight far longer than it takes to buffer the next one.
            crate::deadline::progress();
            Ok(CompletedPart::builder()
                .part_number(number)
                .set_e_tag(out.e_tag().map(str::to_string))
                .set_checksum_crc32(out.checksum_crc32().map(str::to_string))
                .build())
        }));
        Ok(())
    }

    fn put_single(&mut self) -> Result<PutOutcome, StoreError> {
        let body = Bytes::from(std::mem::take(&mut self.buf));
        let mut req = self
            .inner
            .client
            .put_object()
            .bucket(&self.inner.settings.bucket)
            .key(self.inner.full_key(&self.key))
            .set_metadata(Some(self.opts.metadata.clone().into_iter().collect()))
            .set_storage_class(self.storage_class())
            .set_server_side_encryption(self.sse())
            .set_ssekms_key_id(self.inner.settings.sse_kms_key_id.clone())
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .body(ByteStream::from(body));
        if self.opts.mode == PutMode::Create {
            req = req.if_none_match("*");
        }
        match self.handle.block_on(req.send()) {
            Ok(_) => Ok(PutOutcome::Stored),
            Err(e) => {
                let err = self.inner.map_err("put", &self.key, e);
                if is_precondition_failure(&err) && self.opts.mode == PutMode::Create {
                    Ok(PutOutcome::AlreadyExists)
                } else {
                    Err(err)
                }
            }
        }
    }

    fn complete_multipart(&mut self) -> Result<PutOutcome, StoreError> {
        if !self.buf.is_empty() {
            self.send_part()?;
        }
        while let Some(next) = self.in_flight.pop_front() {
            let part = self.handle.block_on(next).map_err(|e| StoreError::Other {
                op: "upload part of",
                key: self.inner.describe(&self.key),
                detail: e.to_string(),
            })??;
            self.done.push(part);
        }
        self.done.sort_by_key(|p| p.part_number());
        let mut req = self
            .inner
            .client
            .complete_multipart_upload()
            .bucket(&self.inner.settings.bucket)
            .key(self.inner.full_key(&self.key))
            .upload_id(self.upload_id.clone().unwrap())
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(self.done.clone())).build());
        if self.opts.mode == PutMode::Create {
            req = req.if_none_match("*");
        }
        match self.handle.block_on(req.send()) {
            // S3 can answer 200 with an error in the body; the SDK turns that into an
            // error, and a missing ETag is treated as one too (it once lost WAL elsewhere).
            Ok(out) if out.e_tag().is_some() => {
                self.upload_id = None;
                Ok(PutOutcome::Stored)
            }
            Ok(_) => Err(StoreError::Unavailable {
                op: "complete upload of",
                key: self.inner.describe(&self.key),
                detail: "the server confirmed no ETag".into(),
            }),
            Err(e) => {
                let err = self.inner.map_err("complete upload of", &self.key, e);
                if self.opts.mode != PutMode::Create {
                    return Err(err);
                }
                if is_precondition_failure(&err) {
                    return Ok(PutOutcome::AlreadyExists);
                }
                // The completion may have succeeded with its answer lost, and the SDK's retry
                // then fails (the upload is gone). If the object is there now, report it as
                // existing: the caller compares its content before acknowledging anything.
                let head = self
                    .inner
                    .client
                    .head_object()
                    .bucket(&self.inner.settings.bucket)
                    .key(self.inner.full_key(&self.key))
                    .send();
                match self.handle.block_on(head) {
                    Ok(_) => {
                        self.upload_id = None;
                        Ok(PutOutcome::AlreadyExists)
                    }
                    Err(_) => Err(err),
                }
            }
        }
    }
}

impl Write for S3Writer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = self.part_size - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= self.part_size {
            self.send_part().map_err(io::Error::other)?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ObjectWriter for S3Writer {
    fn finish(mut self: Box<Self>) -> Result<PutOutcome, StoreError> {
        if self.upload_id.is_none() {
            self.put_single()
        } else {
            self.complete_multipart()
        }
    }
}

impl Drop for S3Writer {
    fn drop(&mut self) {
        // An unfinished multipart upload holds billed parts: abort it (best effort; the
        // bucket's lifecycle rule for incomplete uploads is the backstop).
        if let Some(upload_id) = self.upload_id.take() {
            for task in self.in_flight.drain(..) {
                task.abort();
            }
            let abort = self
                .inner
                .client
                .abort_multipart_upload()
                .bucket(&self.inner.settings.bucket)
                .key(self.inner.full_key(&self.key))
                .upload_id(upload_id)
                .send();
            let _ = self.handle.block_on(abort);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Error;
    use crate::exit;
    use aws_sdk_s3::config::http::HttpResponse;
    use aws_sdk_s3::error::{ConnectorError, ErrorMetadata};
    use aws_sdk_s3::operation::get_object::GetObjectError;
    use aws_smithy_types::body::SdkBody;

    /// A store that sends nothing: only its error mapping is used. Call inside a runtime.
    fn inner() -> Inner {
        let config =
            aws_sdk_s3::Config::builder().behavior_version(BehaviorVersion::latest()).region(Region::new("us-east-1"));
        let settings = S3Settings {
            bucket: "bucket".into(),
            prefix: "p".into(),
            region: None,
            endpoint: None,
            path_style: false,
            storage_class: None,
            sse: None,
            sse_kms_key_id: None,
            part_size: 5 << 20,
            upload_concurrency: 1,
            max_attempts: 1,
            request_timeout: Duration::from_secs(1),
            deadline: Duration::from_secs(1),
        };
        Inner { client: Client::from_conf(config.build()), settings, handle: Handle::current() }
    }

    /// An HTTP client that answers each request with the next of `pages` (200, XML) and
    /// records the query of each request.
    #[derive(Clone, Debug)]
    struct CannedPages {
        pages: Arc<std::sync::Mutex<std::collections::VecDeque<&'static str>>>,
        queries: Arc<std::sync::Mutex<Vec<String>>>,
    }

    impl aws_smithy_runtime_api::client::http::HttpConnector for CannedPages {
        fn call(
            &self,
            request: aws_sdk_s3::config::http::HttpRequest,
        ) -> aws_smithy_runtime_api::client::http::HttpConnectorFuture {
            self.queries.lock().unwrap().push(request.uri().split_once('?').map_or("", |(_, q)| q).to_string());
            let body = self.pages.lock().unwrap().pop_front().expect("a page for every request");
            let response = HttpResponse::new(200.try_into().unwrap(), SdkBody::from(body));
            aws_smithy_runtime_api::client::http::HttpConnectorFuture::ready(Ok(response))
        }
    }

    impl aws_smithy_runtime_api::client::http::HttpClient for CannedPages {
        fn http_connector(
            &self,
            _: &aws_smithy_runtime_api::client::http::HttpConnectorSettings,
            _: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        ) -> aws_smithy_runtime_api::client::http::SharedHttpConnector {
            aws_smithy_runtime_api::client::http::SharedHttpConnector::new(self.clone())
        }
    }

    /// A store whose requests `pages` answers, in order. Call inside a runtime.
    fn answered_by(pages: &[&'static str]) -> (S3Store, Arc<std::sync::Mutex<Vec<String>>>) {
        let canned = CannedPages {
            pages: Arc::new(std::sync::Mutex::new(pages.iter().copied().collect())),
            queries: Default::default(),
        };
        let queries = canned.queries.clone();
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(aws_sdk_s3::config::Credentials::new("ak", "sk", None, None, "test"))
            .http_client(canned)
            .build();
        let mut inner = inner();
        inner.client = Client::from_conf(config);
        (S3Store { inner: Arc::new(inner) }, queries)
    }

    /// One ListObjectsV2 page: `keys` under prefix `p/`, and the truncation it claims.
    macro_rules! page {
        ($truncated:literal, $token:literal, $($key:literal),*) => {
            concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>bucket</Name><Prefix>p/</Prefix>"#,
                "<IsTruncated>", $truncated, "</IsTruncated>", $token,
                $("<Contents><Key>p/", $key, "</Key><Size>3</Size></Contents>",)*
                "</ListBucketResult>"
            )
        };
    }

    #[test]
    fn a_listing_follows_its_continuation_tokens_and_refuses_one_cut_short() {
        crate::test_support::block_on(async {
            let (store, queries) = answered_by(&[
                page!("true", "<NextContinuationToken>t1</NextContinuationToken>", "a", "b"),
                page!("false", "", "c"),
            ]);
            let keys: Vec<String> = store.list("").await.unwrap().iter().map(|o| o.key.to_string()).collect();
            assert_eq!(keys, ["a", "b", "c"]);
            assert!(queries.lock().unwrap()[1].contains("continuation-token=t1"), "{:?}", queries.lock().unwrap());

            // Keys outside the prefix asked for (a server that ignores it) are not listed.
            let (store, _) = answered_by(&[concat!(
                r#"<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">"#,
                "<IsTruncated>false</IsTruncated><Contents><Key>p</Key></Contents><Contents><Key>q/x</Key></Contents>",
                "<Contents><Key>p/wal_005/y</Key></Contents><Contents><Key>p/basebackups_005/z</Key></Contents></ListBucketResult>"
            )]);
            let keys: Vec<String> = store.list("wal_005/").await.unwrap().iter().map(|o| o.key.to_string()).collect();
            assert_eq!(keys, ["wal_005/y"]);

            // "Truncated" with no token, or with a token given before: refused, not cut short
            // nor followed round in a circle.
            for pages in [
                vec![page!("true", "", "a")],
                vec![
                    page!("true", "<NextContinuationToken>t1</NextContinuationToken>", "a"),
                    page!("true", "<NextContinuationToken>t1</NextContinuationToken>", "b"),
                ],
                vec![
                    page!("true", "<NextContinuationToken>t1</NextContinuationToken>", "a"),
                    page!("true", "<NextContinuationToken>t2</NextContinuationToken>", "b"),
                    page!("true", "<NextContinuationToken>t1</NextContinuationToken>", "c"),
                ],
            ] {
                let (store, _) = answered_by(&pages);
                let err = store.list("").await.unwrap_err();
                assert!(err.is_transient(), "{err}");
                let text = err.to_string();
                assert!(text.contains("s3://bucket/p/") && text.contains("cut short"), "{text}");
            }
        });
    }

    fn service_error(status: u16, code: &str) -> StoreError {
        let err = GetObjectError::generic(ErrorMetadata::builder().code(code).message("the server's words").build());
        let raw = HttpResponse::new(status.try_into().unwrap(), SdkBody::empty());
        inner().map_err_raw("get", "p/k", SdkError::service_error(err, raw))
    }

    /// However the deadline or the attempts ran out, the message names the endpoint asked,
    /// without its user-info.
    #[test]
    fn a_store_that_never_succeeds_is_named_by_its_endpoint() {
        crate::test_support::block_on(async {
            let mut inner = inner();
            inner.settings.endpoint = Some("http://user:secret@127.0.0.1:9".into());
            let err: SdkError<GetObjectError, HttpResponse> = SdkError::timeout_error("attempts ran out");
            let e = inner.map_err_raw("get", "p/k", err);
            assert!(e.is_transient(), "{e}");
            let text = e.to_string();
            assert!(text.contains("at http://<redacted>@127.0.0.1:9") && !text.contains("secret"), "{text}");
        });
    }

    fn dispatch_failure(source: Box<dyn std::error::Error + Send + Sync>) -> StoreError {
        let err: SdkError<GetObjectError, HttpResponse> =
            SdkError::dispatch_failure(ConnectorError::other(source, None));
        inner().map_err_raw("get", "p/k", err)
    }

    fn exit_code(e: StoreError) -> u8 {
        exit::code_of(&Error::Store(e))
    }

    #[test]
    fn expired_or_invalid_session_tokens_are_refused_credentials() {
        crate::test_support::block_on(async {
            for code in ["ExpiredToken", "InvalidToken", "TokenRefreshRequired"] {
                let e = service_error(400, code);
                assert!(matches!(e, StoreError::Denied { .. }), "{code}: {e}");
                assert!(e.to_string().contains("check the credentials"), "{e}");
                assert_eq!(exit_code(e), exit::DENIED);
            }
        });
    }

    #[test]
    fn an_object_in_an_archive_class_is_not_a_credentials_problem() {
        crate::test_support::block_on(async {
            let e = service_error(403, "InvalidObjectState");
            let text = e.to_string();
            assert!(!matches!(e, StoreError::Denied { .. }), "{text}");
            assert!(!text.contains("credentials") && !text.contains('\n'), "{text}");
            assert!(text.contains("s3://bucket/p/k") && text.contains("restore it from Glacier"), "{text}");
            // A plain 403 is still refused credentials.
            assert!(matches!(service_error(403, "AccessDenied"), StoreError::Denied { .. }));
        });
    }

    #[test]
    fn credentials_provider_failures_are_transient_and_missing_credentials_refused() {
        crate::test_support::block_on(async {
            let timed_out = dispatch_failure(Box::new(CredentialsError::provider_timed_out(Duration::from_secs(5))));
            assert!(timed_out.is_transient(), "{timed_out}");
            assert_eq!(exit_code(timed_out), exit::STORAGE);
            for slow in [CredentialsError::provider_error("503 from STS"), CredentialsError::unhandled("?")] {
                let e = dispatch_failure(Box::new(slow));
                assert!(e.is_transient(), "{e}");
            }
            for refused in
                [CredentialsError::not_loaded("no credentials"), CredentialsError::invalid_configuration("?")]
            {
                let e = dispatch_failure(Box::new(refused));
                assert!(matches!(e, StoreError::Denied { .. }), "{e}");
                assert_eq!(exit_code(e), exit::DENIED);
            }

            // Not about credentials: unavailable.
            let refused = io::Error::new(io::ErrorKind::ConnectionRefused, "connection refused");
            assert!(dispatch_failure(Box::new(refused)).is_transient());
        });
    }
}
