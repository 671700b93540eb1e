//! The payment service's own settings (beside tai-core's), as `--help` and
//! docs/CONFIGURATION.md show them. The code reads each by the same name.

use tai_core::runtime::cli::Setting;

/// The in-process sandbox gateway's settings (also the standalone `sandbox-gateway`'s).
pub const SANDBOX_SETTINGS: &[Setting] = &[
    Setting::new(
        "SANDBOX_LATENCY_MS",
        "0",
        "Sandbox: delay before every answer",
    ),
    Setting::new(
        "SANDBOX_FAILURE_RATE",
        "0",
        "Sandbox: share of charges answered as processing errors (0 to 1)",
    ),
    Setting::new(
        "SANDBOX_DECIDE",
        "early",
        "Sandbox: decide at the start (early) or the end (late) of the latency",
    ),
    Setting::new(
        "SANDBOX_CHARGE_THEN_FAIL_RATE",
        "0",
        "Sandbox: share of charges carried out and then answered 500 anyway",
    ),
    Setting::new(
        "SANDBOX_LOOKUP_LAG_MS",
        "0",
        "Sandbox: how long a charge stays invisible to lookups",
    ),
    Setting::new(
        "SANDBOX_REMEMBER",
        "100000",
        "Sandbox: how many decisions it remembers (oldest forgotten first)",
    ),
];

/// payment-system's settings.
pub const SETTINGS: &[Setting] = &[
    Setting::new(
        "GATEWAY_URL",
        "",
        "The payment gateway's base URL; the in-process sandbox when unset (refused in prod)",
    ),
    Setting::new(
        "GATEWAY_TIMEOUT_MS",
        "5000",
        "How long a gateway call may take before its outcome is unknown",
    ),
    Setting::new(
        "GATEWAY_BREAKER_OPEN_SECS",
        "30",
        "How long the gateway breaker stays open before a trial call",
    ),
    Setting::new(
        "FRAUD_RULES_PATH",
        "config/fraud_rules.toml (built in)",
        "The fraud rules file (TOML)",
    ),
    Setting::new(
        "MAX_AMOUNT",
        "1000000",
        "Largest amount of one payment, in major units",
    ),
    Setting::new(
        "MERCHANT_RATE_PER_SEC",
        "200",
        "Payments per second allowed to one merchant (more: 429)",
    ),
    Setting::new(
        "MERCHANT_BURST",
        "MERCHANT_RATE_PER_SEC",
        "Burst above the rate one merchant may send",
    ),
    Setting::new(
        "PAYMENT_MAX_CONCURRENCY",
        "1024",
        "Payments processed at once (more wait, then 503)",
    ),
    Setting::new(
        "IDEMPOTENCY_TTL_SECS",
        "86400",
        "How long an Idempotency-Key's answer is kept",
    ),
    Setting::new(
        "FINGERPRINT_KEY",
        "generated once, kept in the store",
        "Key of the HMAC over request bodies kept with idempotency keys (a secret)",
    ),
    Setting::new(
        "AUTHORIZATION_TTL_SECS",
        "604800",
        "An authorization not captured by then is voided",
    ),
    Setting::new(
        "REVIEW_TTL_SECS",
        "259200",
        "A payment held for review not decided by then is rejected",
    ),
    Setting::new(
        "CONFIRM_QUEUE_CAPACITY",
        "100000",
        "Confirmations waiting at most (Kanban limit)",
    ),
    Setting::new(
        "CONFIRM_REQUEUE_AFTER_MS",
        "60000",
        "A success still unconfirmed after this long is queued again by the reconciler",
    ),
    Setting::new(
        "CONFIRM_STREAM",
        "PAYMENT_CONFIRMATIONS",
        "JetStream stream of the confirmation queue",
    ),
    Setting::new(
        "CONFIRM_SUBJECT",
        "payment.confirmations",
        "JetStream subject of the confirmation queue",
    ),
    Setting::new(
        "EVENTS_STREAM",
        "PAYMENTS_EVENTS",
        "JetStream stream the outbox relay publishes payment events to",
    ),
    Setting::new(
        "EVENTS_SUBJECT_PREFIX",
        "payments.events",
        "Subject prefix of payment events (PREFIX.<type>)",
    ),
    Setting::new(
        "RECONCILE_AFTER_MS",
        "GATEWAY_TIMEOUT_MS + 5000",
        "A PROCESSING payment older than this is asked about at the gateway",
    ),
    Setting::new(
        "RECONCILE_EVERY_MS",
        "1000",
        "How often the reconciler runs",
    ),
    Setting::new(
        "RECONCILER_LEASE_MS",
        "5000",
        "One replica reconciles at a time; another takes over this long after it stops renewing",
    ),
    Setting::new(
        "RECONCILE_NOT_FOUND_GRACE_MS",
        "120000",
        "How long a charge the gateway does not know may still appear",
    ),
    Setting::new(
        "RECONCILE_RECHECK_EVERY_MS",
        "30000",
        "How often an unresolved payment is asked about again",
    ),
    Setting::new(
        "RECONCILE_RECHECK_SECS",
        "86400",
        "How long an unresolved payment keeps being asked about",
    ),
    Setting::new(
        "WEBHOOK_POLL_MS",
        "250",
        "How often the webhook worker looks for due deliveries",
    ),
    Setting::new(
        "WEBHOOK_TIMEOUT_MS",
        "10000",
        "How long one webhook delivery may take",
    ),
    Setting::new(
        "WEBHOOK_RETRY_BASE_MS",
        "60000",
        "First retry delay of a failed delivery (doubles each time)",
    ),
    Setting::new("WEBHOOK_RETRY_MAX_MS", "3600000", "Longest retry delay"),
    Setting::new(
        "WEBHOOK_RETRY_FOR_SECS",
        "259200",
        "How long a delivery is retried before it is given up",
    ),
    Setting::new(
        "WEBHOOK_DISABLE_AFTER_SECS",
        "259200",
        "An endpoint failing every delivery this long is disabled",
    ),
];
