//! The deployment service's own settings (beside tai-core's), as `--help` and
//! docs/CONFIGURATION.md show them. The code reads each by the same name.

use tai_core::runtime::cli::Setting;

/// deployment-system's settings.
pub const SETTINGS: &[Setting] = &[
    Setting::new(
        "PLATFORM",
        "sim",
        "Where rollouts run: sim (a simulated fleet) or proc (real processes behind HAProxy)",
    ),
    Setting::new(
        "PLATFORM_FILE",
        "",
        "PLATFORM=proc: the TOML file describing services, regions and HAProxy",
    ),
    Setting::new(
        "PLATFORM_STOP_ON_EXIT",
        "false",
        "PLATFORM=proc: stop the started processes when the service exits",
    ),
    Setting::new(
        "FLEET_FIXTURE_PATH",
        "the built-in fleet",
        "PLATFORM=sim: the fleet file (TOML)",
    ),
    Setting::new(
        "PROMETHEUS_FILE_SD_DIR",
        "",
        "PLATFORM=proc: write Prometheus file_sd targets for the processes here",
    ),
    Setting::new(
        "PROMETHEUS_URL",
        "",
        "Prometheus to analyse canaries with; the fleet's own health when unset",
    ),
    Setting::new(
        "PROMQL_ERROR_RATE",
        "5xx share of http_requests_total",
        "Error-rate query ({service}, {version}, {region} filled in)",
    ),
    Setting::new(
        "PROMQL_P99_SECONDS",
        "histogram_quantile(0.99, ...)",
        "p99 latency query in seconds",
    ),
    Setting::new(
        "PROMQL_REQUESTS",
        "increase of http_requests_total over 1m",
        "Request-count query (too few requests: inconclusive)",
    ),
    Setting::new(
        "HEALTH_URL_TEMPLATE",
        "",
        "HTTP health check per instance ({service}, {version}, {region}, {instance})",
    ),
    Setting::new(
        "ANALYSIS_TIMEOUT_MS",
        "2000",
        "How long one analysis query or probe may take",
    ),
    Setting::new(
        "IMAGE_REGISTRY_URL",
        "",
        "OCI registry to check images against; a built-in catalogue when unset",
    ),
    Setting::new(
        "IMAGE_REGISTRY",
        "registry.local (the URL's host with IMAGE_REGISTRY_URL)",
        "Registry host an image names",
    ),
    Setting::new(
        "DEFAULT_REGIONS",
        "us-west-2",
        "Regions a deployment naming none rolls out to, comma-separated",
    ),
    Setting::new(
        "AUDIT_STREAM",
        "DEPLOY_EVENTS",
        "JetStream stream of deployment events",
    ),
    Setting::new(
        "AUDIT_SUBJECT_PREFIX",
        "deploy.events",
        "Subject prefix of deployment events",
    ),
    Setting::new(
        "CONTROLLER_LEASE_MS",
        "3000",
        "Lease of the one replica that drives rollouts (taken over after this)",
    ),
];
