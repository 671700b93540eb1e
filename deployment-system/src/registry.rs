//! Image registries: where the safety check asks whether an image exists.
//!
//! The fixture registry answers from the simulated fleet's image list; [`OciRegistry`] asks a
//! real registry with the OCI distribution API (`HEAD /v2/<name>/manifests/<tag>`), as Docker
//! Hub, Harbor, ECR or Debian's `docker-registry` serve it.

use std::sync::Arc;
use std::time::Duration;

use tai_core::backend::{BackendError, BoxFuture};

use crate::fleet::FleetFixture;

/// Where images are looked up.
pub trait ImageRegistry: Send + Sync + std::fmt::Debug {
    /// `fixture` or `oci`.
    fn kind(&self) -> &'static str;
    /// Whether the image exists.
    fn exists<'a>(
        &'a self,
        service: &'a str,
        version: &'a str,
        image: &'a str,
    ) -> BoxFuture<'a, Result<bool, BackendError>>;
}

/// The fixture's image list.
#[derive(Debug, Clone)]
pub struct FixtureRegistry {
    images: Arc<Vec<String>>,
}

impl FixtureRegistry {
    /// From the fixture.
    pub fn new(fixture: &FleetFixture) -> Self {
        Self {
            images: Arc::new(fixture.images.clone()),
        }
    }
}

impl ImageRegistry for FixtureRegistry {
    fn kind(&self) -> &'static str {
        "fixture"
    }
    fn exists<'a>(
        &'a self,
        service: &'a str,
        version: &'a str,
        _image: &'a str,
    ) -> BoxFuture<'a, Result<bool, BackendError>> {
        let wanted = format!("{service}:{version}");
        Box::pin(std::future::ready(Ok(self.images.contains(&wanted))))
    }
}

/// A registry speaking the OCI distribution API.
#[derive(Debug, Clone)]
pub struct OciRegistry {
    base: String,
    client: reqwest::Client,
}

/// Splits `[host[:port]/]name[:tag]` into repository name and tag (`latest` when absent).
pub fn split_reference(image: &str) -> (String, String) {
    let (path, tag) = match image.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') => (p, t),
        _ => (image, "latest"),
    };
    let mut parts: Vec<&str> = path.split('/').collect();
    // a first component with a dot or a port, or `localhost`, is the registry's host
    if parts.len() > 1
        && (parts[0].contains('.') || parts[0].contains(':') || parts[0] == "localhost")
    {
        parts.remove(0);
    }
    (parts.join("/"), tag.to_owned())
}

impl OciRegistry {
    /// A client of the registry at `base` (e.g. `http://127.0.0.1:5000`).
    pub fn new(base: &str, timeout: Duration) -> Result<Self, String> {
        let client = crate::analysis::http_client(timeout)?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            client,
        })
    }

    /// The registry's `host:port`, as images name it.
    pub fn host(&self) -> String {
        self.base
            .split("://")
            .nth(1)
            .unwrap_or(&self.base)
            .to_owned()
    }
}

const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

impl ImageRegistry for OciRegistry {
    fn kind(&self) -> &'static str {
        "oci"
    }
    fn exists<'a>(
        &'a self,
        _service: &'a str,
        _version: &'a str,
        image: &'a str,
    ) -> BoxFuture<'a, Result<bool, BackendError>> {
        Box::pin(async move {
            let (name, tag) = split_reference(image);
            let url = format!("{}/v2/{name}/manifests/{tag}", self.base);
            let r = self
                .client
                .head(&url)
                .header("Accept", MANIFEST_TYPES)
                .header("traceparent", tai_core::runtime::trace::outbound())
                .send()
                .await
                .map_err(|e| BackendError::Unavailable {
                    backend: "registry",
                    message: e.to_string(),
                })?;
            match r.status().as_u16() {
                200 => Ok(true),
                404 => Ok(false),
                s => Err(BackendError::Protocol {
                    backend: "registry",
                    message: format!("HEAD {url} answered {s}"),
                }),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_split_into_name_and_tag() {
        assert_eq!(
            split_reference("127.0.0.1:5000/api-service:v2.0.0"),
            ("api-service".into(), "v2.0.0".into())
        );
        assert_eq!(
            split_reference("registry.local/team/api:v1"),
            ("team/api".into(), "v1".into())
        );
        assert_eq!(
            split_reference("api-service"),
            ("api-service".into(), "latest".into())
        );
        assert_eq!(
            split_reference("localhost/app:1.0"),
            ("app".into(), "1.0".into())
        );
        assert_eq!(
            split_reference("team/app"),
            ("team/app".into(), "latest".into())
        );
    }
}
