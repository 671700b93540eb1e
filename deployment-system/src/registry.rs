//! Image registries: where the safety check asks whether an image exists.
//!
//! The fixture registry answers from the simulated fleet's image list; [`OciRegistry`] asks a
//! real registry with the OCI distribution API (`HEAD /v2/<name>/manifests/<tag>`), as Docker
//! Hub, Harbor, ECR or Debian's `docker-registry` serve it.

use std::sync::Arc;
use std::time::Duration;

use tai_core::backend::{BackendError, BoxFuture};
use tai_core::clock::SharedClock;
use tai_core::jidoka::layer::{BreakerError, CircuitBreakerLayer};
use tai_core::jidoka::{BreakerConfig, CircuitBreaker, Outcome};
use tower::ServiceExt;

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

/// The registry's HTTP client as a tower service, behind its breaker.
type Send_ = tower::util::BoxCloneSyncService<
    reqwest::Request,
    reqwest::Response,
    BreakerError<reqwest::Error>,
>;

/// What a registry answer means for its breaker: no answer or a 5xx is a failure; any other
/// status (found, not found, refused) is the registry working.
fn registry_outcome(r: &Result<reqwest::Response, reqwest::Error>) -> Outcome {
    match r {
        Ok(r) if !r.status().is_server_error() => Outcome::Success,
        _ => Outcome::Failure,
    }
}

/// A registry speaking the OCI distribution API, behind a circuit breaker (`registry` on
/// `/status`): after three lookups in a row get no answer (or a 5xx), admission stops waiting
/// on it for ten seconds and answers 503 at once.
#[derive(Debug, Clone)]
pub struct OciRegistry {
    base: String,
    client: reqwest::Client,
    send: Send_,
    breaker: CircuitBreaker,
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
    pub fn new(base: &str, timeout: Duration, clock: SharedClock) -> Result<Self, String> {
        let client = crate::analysis::http_client(timeout)?;
        let breaker = CircuitBreaker::new(
            "registry",
            BreakerConfig {
                consecutive_failures: 3,
                // the client's own timeout bounds a call
                slow_call: None,
                open_for: Duration::from_secs(10),
                half_open_trials: 1,
                ..BreakerConfig::default()
            },
            clock,
        );
        let sender = client.clone();
        let send = tower::ServiceBuilder::new()
            .layer(CircuitBreakerLayer::new(breaker.clone(), registry_outcome))
            .service_fn(move |request: reqwest::Request| {
                let sender = sender.clone();
                async move { sender.execute(request).await }
            });
        let send = tower::util::BoxCloneSyncService::new(send);
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            client,
            send,
            breaker,
        })
    }

    /// The breaker in front of the registry, for `/status`.
    pub fn breaker(&self) -> CircuitBreaker {
        self.breaker.clone()
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
            let request = self
                .client
                .head(&url)
                .header("Accept", MANIFEST_TYPES)
                .header("traceparent", tai_core::runtime::trace::outbound())
                .build()
                .map_err(|e| BackendError::Protocol {
                    backend: "registry",
                    message: format!("HEAD {url}: {e}"),
                })?;
            let r = self
                .send
                .clone()
                .oneshot(request)
                .await
                .map_err(|e| BackendError::Unavailable {
                    backend: "registry",
                    message: match e {
                        BreakerError::Open(rejected) => format!(
                            "its breaker is open after lookups that got no answer; trying again in {} s",
                            rejected.retry_after.as_secs().max(1)
                        ),
                        BreakerError::Inner(e) => e.to_string(),
                    },
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

    /// A registry that does not answer opens the breaker after three lookups, and the next
    /// lookup is refused at once, naming it (real connections to a closed port).
    #[tokio::test]
    async fn a_registry_that_does_not_answer_opens_its_breaker() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr").port()
        };
        let clock = tai_core::clock::ManualClock::new();
        let oci = OciRegistry::new(
            &format!("http://127.0.0.1:{port}"),
            Duration::from_secs(2),
            clock.shared(),
        )
        .expect("client");
        for _ in 0..3 {
            let e = oci
                .exists("api", "v1", "api:v1")
                .await
                .expect_err("no registry");
            assert!(!e.to_string().contains("breaker"), "{e}");
        }
        assert_eq!(oci.breaker().state(), tai_core::jidoka::BreakerState::Open);
        let e = oci.exists("api", "v1", "api:v1").await.expect_err("open");
        assert!(e.to_string().contains("breaker is open"), "{e}");
        assert!(matches!(
            e,
            BackendError::Unavailable {
                backend: "registry",
                ..
            }
        ));
        // after open_for, one trial goes through (and fails again here)
        clock.advance(Duration::from_secs(11));
        let e = oci.exists("api", "v1", "api:v1").await.expect_err("trial");
        assert!(!e.to_string().contains("breaker"), "{e}");
    }
}
