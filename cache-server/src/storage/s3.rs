//! The S3 backend (`s3://bucket?endpoint=…&region=…`): AWS S3, R2, Garage, MinIO.
//!
//! Small objects are sent with one PUT once complete; larger ones as a multipart upload
//! whose parts stream as they fill, completed only on commit, so an interrupted or rejected
//! upload never becomes visible (and is aborted, so no parts linger).

use std::io;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt as _;

use super::{ByteRange, DELETE_BATCH, Failure, Key, Listed, Object, Storage, StorageError, Upload};

/// Size of each multipart part, and the size above which an upload becomes multipart.
/// S3's minimum part size is 5 MiB; 8 MiB keeps memory per upload small.
pub const PART_SIZE: usize = 8 * 1024 * 1024;

/// How to reach a bucket.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// Bucket name.
    pub bucket: String,
    /// Endpoint URL for non-AWS services (`http://127.0.0.1:3900`); path-style addressing is
    /// used whenever it is set.
    pub endpoint: Option<String>,
    /// Region (`garage` for Garage, `auto` for R2, the bucket's region on AWS).
    pub region: String,
    /// Access key id and secret; when `None`, from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`.
    pub credentials: Option<(String, String)>,
    /// Send and check checksums only when the operation requires them. Needed for Garage, R2
    /// and older MinIO, which refuse the SDK's default streamed checksum trailers.
    pub checksums_when_required: bool,
    /// How long a request may wait for the first byte of the service's answer (each of the
    /// SDK's three attempts), so a service that accepts connections and then stalls gives an
    /// error rather than a request that never ends. Requests that send more than
    /// [`super::SMALL_OBJECT`] (NAR uploads) wait without limit: on a slow link the upload
    /// itself takes that long. `None`: no limit.
    pub timeout: Option<Duration>,
}

/// The SDK's own connect timeout, kept when a read timeout is set.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(3100);

/// For a request that sends a large body: no limit on the wait for the answer's first byte.
fn sending_long() -> aws_sdk_s3::config::Builder {
    aws_sdk_s3::config::Builder::default()
        .timeout_config(TimeoutConfig::builder().disable_read_timeout().build())
}

/// Why S3 could not be set up.
#[derive(Debug, thiserror::Error)]
#[error(
    "S3 credentials missing: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or name a file with both in s3-credentials-file"
)]
pub struct MissingCredentials;

/// A cache in an S3 bucket.
pub struct S3Storage {
    client: Client,
    /// The client presigned URLs are made with, when machines reach the bucket elsewhere.
    presigner: Option<Client>,
    bucket: String,
}

impl S3Storage {
    /// A client for the bucket. Does not contact the service.
    pub fn new(opts: &S3Options) -> Result<Self, MissingCredentials> {
        let (id, secret) = match &opts.credentials {
            Some(c) => c.clone(),
            None => match (std::env::var("AWS_ACCESS_KEY_ID"), std::env::var("AWS_SECRET_ACCESS_KEY")) {
                (Ok(id), Ok(secret)) if !id.is_empty() && !secret.is_empty() => (id, secret),
                _ => return Err(MissingCredentials),
            },
        };
        let session = std::env::var("AWS_SESSION_TOKEN").ok();
        let mut conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(opts.region.clone()))
            .credentials_provider(Credentials::new(id, secret, session, None, "fleetcache"));
        if let Some(endpoint) = &opts.endpoint {
            conf = conf.endpoint_url(endpoint).force_path_style(true);
        }
        if let Some(t) = opts.timeout {
            conf = conf.timeout_config(
                TimeoutConfig::builder().connect_timeout(CONNECT_TIMEOUT).read_timeout(t).build(),
            );
        }
        if opts.checksums_when_required {
            conf = conf
                .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
                .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        }
        Ok(S3Storage {
            client: Client::from_conf(conf.build()),
            presigner: None,
            bucket: opts.bucket.clone(),
        })
    }

    /// Makes presigned URLs for `endpoint` (path-style) instead of the store's endpoint.
    pub fn presigning_for(mut self, endpoint: &str) -> Self {
        let conf = self.client.config().to_builder().endpoint_url(endpoint).force_path_style(true).build();
        self.presigner = Some(Client::from_conf(conf));
        self
    }
}

/// A failed request as a [`StorageError`]; `key` is empty for a request about the whole
/// bucket (a listing).
fn s3_err<'a, E: std::error::Error + ProvideErrorMetadata + 'static>(
    op: &'static str,
    key: &'a (impl std::fmt::Display + ?Sized),
) -> impl Fn(SdkError<E>) -> StorageError + 'a {
    move |e| StorageError::S3 { op, key: key.to_string(), message: describe(&e), failure: failure_of(&e) }
}

/// What S3's answer means: see [`classify`].
fn failure_of<E: std::error::Error + ProvideErrorMetadata + 'static>(e: &SdkError<E>) -> Failure {
    let Some(service) = e.as_service_error() else { return Failure::Unavailable };
    let status = e.raw_response().map(|r| r.status().as_u16());
    classify(service.code().unwrap_or_default(), service.message().unwrap_or_default(), status)
}

/// An S3 error code, message and HTTP status as a [`Failure`]. Full: HTTP 507, MinIO's
/// `XMinioStorageFull` and quota codes, and Garage's quota refusal (an `AccessDenied` whose
/// message says "quota is reached"). Refused: the other `AccessDenied`s and 403s, unknown or
/// wrong keys, a bucket that does not exist. Anything else is worth retrying.
fn classify(code: &str, message: &str, status: Option<u16>) -> Failure {
    const FULL: [&str; 3] = ["XMinioStorageFull", "XMinioAdminBucketQuotaExceeded", "QuotaExceeded"];
    const REFUSED: [&str; 5] =
        ["AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled", "NoSuchBucket"];
    let quota = code == "AccessDenied" && message.to_ascii_lowercase().contains("quota");
    if status == Some(507) || FULL.contains(&code) || quota {
        Failure::Full
    } else if status == Some(403) || REFUSED.contains(&code) {
        Failure::Refused
    } else {
        Failure::Unavailable
    }
}

/// What S3 answered, in a line: its error code, message and HTTP status for a refusal; the
/// whole chain (connection refused, timed out, …) when no answer came.
fn describe<E: std::error::Error + ProvideErrorMetadata + 'static>(e: &SdkError<E>) -> String {
    let Some(service) = e.as_service_error() else { return DisplayErrorContext(e).to_string() };
    let status = e.raw_response().map(|r| format!(" (HTTP {})", r.status().as_u16())).unwrap_or_default();
    match (service.code(), service.message()) {
        (Some(code), Some(message)) => format!("{code}: {message}{status}"),
        (Some(code), None) => format!("{code}{status}"),
        _ => format!("{}{status}", DisplayErrorContext(e)),
    }
}

#[async_trait]
impl Storage for S3Storage {
    async fn get(&self, key: &Key, range: Option<ByteRange>) -> Result<Option<Object>, StorageError> {
        let mut req = self.client.get_object().bucket(&self.bucket).key(key.as_str());
        if let Some(r) = range {
            req = req.range(format!("bytes={}-{}", r.start, r.end));
        }
        let out = match req.send().await {
            Ok(out) => out,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(s3_err("GetObject", key)(e)),
        };
        let size = match (range, out.content_range()) {
            // `bytes 0-99/1234`: the total is after the slash.
            (Some(_), Some(cr)) => cr.rsplit('/').next().and_then(|t| t.parse().ok()).unwrap_or(0),
            _ => out.content_length().unwrap_or(0).max(0) as u64,
        };
        // The SDK's chunks as they arrive, without copying them into buffers of our own.
        let body = futures_util::stream::unfold(out.body, |mut body| async move {
            let chunk = body.next().await?;
            Some((chunk.map_err(io::Error::other), body))
        })
        .boxed();
        Ok(Some(Object { size, body }))
    }

    async fn head(&self, key: &Key) -> Result<Option<u64>, StorageError> {
        match self.client.head_object().bucket(&self.bucket).key(key.as_str()).send().await {
            Ok(out) => Ok(Some(out.content_length().unwrap_or(0).max(0) as u64)),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(None),
            Err(e) => Err(s3_err("HeadObject", key)(e)),
        }
    }

    async fn begin_put(&self, key: &Key) -> Result<Box<dyn Upload>, StorageError> {
        Ok(Box::new(S3Upload {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.clone(),
            buf: BytesMut::new(),
            multipart: None,
            size: 0,
        }))
    }

    async fn delete(&self, key: &Key) -> Result<(), StorageError> {
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(key.as_str())
            .send()
            .await
            .map_err(s3_err("DeleteObject", key))?;
        Ok(())
    }

    async fn delete_many(&self, keys: &[Key]) -> Result<(), StorageError> {
        assert!(keys.len() <= DELETE_BATCH, "at most {DELETE_BATCH} keys per DeleteObjects");
        let Some(first) = keys.first() else { return Ok(()) };
        let objects = keys
            .iter()
            .map(|k| ObjectIdentifier::builder().key(k.as_str()).build().expect("a key is set"))
            .collect();
        let delete =
            Delete::builder().set_objects(Some(objects)).quiet(true).build().expect("objects are set");
        let out = self
            .client
            .delete_objects()
            .bucket(&self.bucket)
            .delete(delete)
            .send()
            .await
            .map_err(s3_err("DeleteObjects", first))?;
        // Quiet mode: only the keys that could not be deleted are answered.
        if let Some(e) = out.errors().first() {
            return Err(StorageError::S3 {
                op: "DeleteObjects",
                key: e.key().unwrap_or_default().to_owned(),
                message: format!(
                    "{}: {} ({} of {} keys not deleted)",
                    e.code().unwrap_or("error"),
                    e.message().unwrap_or_default(),
                    out.errors().len(),
                    keys.len()
                ),
                failure: classify(e.code().unwrap_or_default(), e.message().unwrap_or_default(), None),
            });
        }
        Ok(())
    }

    fn list(&self) -> futures_util::stream::BoxStream<'static, Result<Listed, StorageError>> {
        let pages = self.client.list_objects_v2().bucket(&self.bucket).into_paginator().send();
        futures_util::stream::unfold(pages, |mut pages| async move {
            let page = pages.next().await?;
            let items: Vec<Result<Listed, StorageError>> = match page {
                Err(e) => vec![Err(s3_err("ListObjectsV2", "")(e))],
                Ok(out) => out
                    .contents()
                    .iter()
                    .filter_map(|o| {
                        let key = Key::parse(o.key()?).ok()?;
                        let modified =
                            o.last_modified().and_then(|t| std::time::SystemTime::try_from(*t).ok())?;
                        Some(Ok(Listed { key, size: o.size().unwrap_or(0).max(0) as u64, modified }))
                    })
                    .collect(),
            };
            Some((futures_util::stream::iter(items), pages))
        })
        .flatten()
        .boxed()
    }

    async fn presigned_get(&self, key: &Key, valid_for: Duration) -> Result<Option<String>, StorageError> {
        let config = PresigningConfig::expires_in(valid_for).map_err(|e| StorageError::S3 {
            op: "presign GetObject",
            key: key.to_string(),
            message: e.to_string(),
            failure: Failure::Refused,
        })?;
        let client = self.presigner.as_ref().unwrap_or(&self.client);
        let req = client.get_object().bucket(&self.bucket).key(key.as_str()).presigned(config).await;
        Ok(Some(req.map_err(s3_err("presign GetObject", key))?.uri().to_owned()))
    }

    async fn drop_abandoned(&self, before: std::time::SystemTime) -> Result<u64, StorageError> {
        let mut dropped = 0;
        let (mut key_marker, mut upload_id_marker) = (None::<String>, None::<String>);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(upload_id_marker.take())
                .send()
                .await
                .map_err(s3_err("ListMultipartUploads", ""))?;
            for upload in page.uploads() {
                let (Some(name), Some(id)) = (upload.key(), upload.upload_id()) else { continue };
                let begun = upload.initiated().and_then(|t| std::time::SystemTime::try_from(*t).ok());
                // Only the cache layout's keys: the bucket may hold other things.
                let Ok(key) = Key::parse(name) else { continue };
                if begun.is_none_or(|t| t >= before) {
                    continue;
                }
                let aborted = self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(name)
                    .upload_id(id)
                    .send()
                    .await;
                match aborted {
                    Ok(_) => dropped += 1,
                    // Completed or aborted since it was listed.
                    Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_upload()) => {}
                    Err(e) => return Err(s3_err("AbortMultipartUpload", &key)(e)),
                }
            }
            if !page.is_truncated().unwrap_or(false) {
                return Ok(dropped);
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            upload_id_marker = page.next_upload_id_marker().map(str::to_owned);
            if key_marker.is_none() && upload_id_marker.is_none() {
                return Ok(dropped);
            }
        }
    }

    fn describe(&self) -> String {
        format!("s3://{}", self.bucket)
    }
}

struct Multipart {
    upload_id: String,
    parts: Vec<CompletedPart>,
}

struct S3Upload {
    client: Client,
    bucket: String,
    key: Key,
    buf: BytesMut,
    multipart: Option<Multipart>,
    size: u64,
}

/// Whether S3 refused a conditional write because the object exists (412).
fn precondition_failed<E>(e: &SdkError<E>) -> bool {
    e.raw_response().is_some_and(|r| r.status().as_u16() == 412)
}

impl S3Upload {
    /// Completes the upload; with `only_new`, on the condition that no object exists yet,
    /// `None` when one does. The condition is sent as `If-None-Match: *` (AWS, R2 and MinIO
    /// hold it even against a concurrent writer); S3 servers that ignore it (Garage) are asked
    /// first, which holds against every earlier write.
    async fn finish(mut self: Box<Self>, only_new: bool) -> Result<Option<u64>, StorageError> {
        let key = self.key.clone();
        let condition = only_new.then_some("*");
        if only_new {
            let there = self.client.head_object().bucket(&self.bucket).key(key.as_str()).send().await;
            match there {
                Ok(_) => return Ok(None),
                Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => {}
                Err(e) => return Err(s3_err("HeadObject", &key)(e)),
            }
        }
        if self.multipart.is_none() {
            let body = self.buf.split().freeze();
            let long = body.len() as u64 > super::SMALL_OBJECT;
            let put = self
                .client
                .put_object()
                .bucket(&self.bucket)
                .key(key.as_str())
                .set_if_none_match(condition.map(str::to_owned))
                .body(ByteStream::from(body))
                .customize();
            let sent = if long { put.config_override(sending_long()).send().await } else { put.send().await };
            return match sent {
                Ok(_) => Ok(Some(self.size)),
                Err(e) if only_new && precondition_failed(&e) => Ok(None),
                Err(e) => Err(s3_err("PutObject", &key)(e)),
            };
        }
        if !self.buf.is_empty() {
            self.flush_part().await?;
        }
        let mp = self.multipart.take().expect("multipart");
        let done = CompletedMultipartUpload::builder().set_parts(Some(mp.parts)).build();
        let result = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key.as_str())
            .upload_id(&mp.upload_id)
            .set_if_none_match(condition.map(str::to_owned))
            .multipart_upload(done)
            .send()
            .await;
        match result {
            Ok(_) => Ok(Some(self.size)),
            Err(e) => {
                // Aborted by Drop, in the background.
                self.multipart = Some(Multipart { upload_id: mp.upload_id, parts: Vec::new() });
                if only_new && precondition_failed(&e) {
                    Ok(None)
                } else {
                    Err(s3_err("CompleteMultipartUpload", &key)(e))
                }
            }
        }
    }

    async fn flush_part(&mut self) -> Result<(), StorageError> {
        let key = self.key.clone();
        if self.multipart.is_none() {
            let out = self
                .client
                .create_multipart_upload()
                .bucket(&self.bucket)
                .key(key.as_str())
                .send()
                .await
                .map_err(s3_err("CreateMultipartUpload", &key))?;
            let upload_id = out.upload_id().unwrap_or_default().to_owned();
            self.multipart = Some(Multipart { upload_id, parts: Vec::new() });
        }
        let mp = self.multipart.as_mut().expect("just created");
        let part_number = mp.parts.len() as i32 + 1;
        let body = self.buf.split().freeze();
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(key.as_str())
            .upload_id(&mp.upload_id)
            .part_number(part_number)
            .body(ByteStream::from(body))
            .customize()
            .config_override(sending_long())
            .send()
            .await
            .map_err(s3_err("UploadPart", &key))?;
        mp.parts.push(CompletedPart::builder().part_number(part_number).set_e_tag(out.e_tag).build());
        Ok(())
    }
}

#[async_trait]
impl Upload for S3Upload {
    async fn write(&mut self, chunk: Bytes) -> Result<(), StorageError> {
        self.size += chunk.len() as u64;
        self.buf.extend_from_slice(&chunk);
        while self.buf.len() >= PART_SIZE {
            let rest = self.buf.split_off(PART_SIZE);
            self.flush_part().await?;
            self.buf = rest;
        }
        Ok(())
    }

    async fn commit(self: Box<Self>) -> Result<u64, StorageError> {
        Ok(self.finish(false).await?.expect("an unconditional write happens"))
    }

    async fn commit_new(self: Box<Self>) -> Result<Option<u64>, StorageError> {
        self.finish(true).await
    }

    async fn abort(mut self: Box<Self>) -> Result<(), StorageError> {
        if let Some(mp) = self.multipart.take() {
            let key = self.key.clone();
            self.client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key.as_str())
                .upload_id(mp.upload_id)
                .send()
                .await
                .map_err(s3_err("AbortMultipartUpload", &key))?;
        }
        Ok(())
    }
}

impl Drop for S3Upload {
    fn drop(&mut self) {
        // Dropped mid-way (client went away, verification failed): abort in the background so
        // the parts do not linger. A bucket lifecycle rule catches what a crash leaves.
        if let Some(mp) = self.multipart.take() {
            let req = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(self.key.as_str())
                .upload_id(mp.upload_id);
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = req.send().await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_say_whether_the_bucket_is_full_or_refuses_us() {
        // Garage 2.5's answer past a bucket quota, as scripts/test's Garage gives it.
        let garage = "Forbidden: Bucket size quota is reached, maximum total size of objects for this bucket: \
                      2097152. The bucket is already 51 bytes, and this object would add 11014198 bytes.";
        assert_eq!(classify("AccessDenied", garage, Some(403)), Failure::Full);
        assert_eq!(
            classify(
                "XMinioStorageFull",
                "Storage backend has reached its minimum free drive threshold.",
                Some(507)
            ),
            Failure::Full
        );
        assert_eq!(
            classify("XMinioAdminBucketQuotaExceeded", "Bucket quota exceeded", Some(400)),
            Failure::Full
        );
        assert_eq!(classify("", "", Some(507)), Failure::Full);
        assert_eq!(
            classify("AccessDenied", "Forbidden: Operation is not allowed for this key.", Some(403)),
            Failure::Refused
        );
        assert_eq!(classify("InvalidAccessKeyId", "", Some(403)), Failure::Refused);
        assert_eq!(classify("NoSuchBucket", "Bucket not found: cache", Some(404)), Failure::Refused);
        assert_eq!(classify("SlowDown", "Please reduce your request rate.", Some(503)), Failure::Unavailable);
        assert_eq!(classify("InternalError", "", Some(500)), Failure::Unavailable);
        assert_eq!(classify("", "", None), Failure::Unavailable);
    }
}
