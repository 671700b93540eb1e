#!/usr/bin/env python3
"""Writes docs/CONFIGURATION.md from every binary's --help (run after `cargo build --bins`).

`make test` checks the page against the binaries, so run this when a setting changes:
    cargo build --workspace --bins && python3 scripts/config-reference.py
"""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.environ.get("BIN_DIR", os.path.join(ROOT, "target", "debug"))
BINS = [
    ("payment-system", "The payment service (`make run` starts it on 127.0.0.1:3001)."),
    ("deployment-system", "The deployment service (`make run` starts it on 127.0.0.1:3002)."),
    ("sandbox-gateway", "The standalone sandbox card network. payment-system has one inside "
     "(with the same `SANDBOX_*` settings) and uses it while `GATEWAY_URL` is unset."),
    ("stress-payment", "`make stress-payment`: load against a running payment service."),
    ("stress-deployment", "`make stress-deployment`: many deployments at once against a running "
     "deployment service, each followed to its end."),
    ("demo-service", "The small HTTP service the `proc` platform starts per version and region "
     "(`make demo-deploy` and the tests)."),
    ("demo-deploy", "`make demo-deploy`: a rollout moving real traffic through HAProxy."),
    ("signal-service", "examples/signal-service, the framework's proof: TAI's reference "
     "Signal -> Policy -> Action service on tai-core (127.0.0.1:3003)."),
]
SERVICES = ("payment-system", "deployment-system", "signal-service")


def settings(binary):
    text = subprocess.run([os.path.join(BIN, binary), "--help"], capture_output=True,
                          text=True, check=True).stdout
    blocks = []
    for line in text.splitlines():
        t = line.lstrip()
        if t.startswith("--") or re.match(r"-\w, ", t):
            blocks.append(t)
        elif blocks:
            blocks[-1] += " " + t
    rows = []
    for block in blocks:
        env = re.search(r"\[env: ([A-Z0-9_]+)", block)
        if not env:
            continue
        flag = re.match(r"(?:-\w, )?--([a-z0-9-]+)", block).group(1)
        default = re.search(r"\[default: ([^\]]*)\]", block)
        what = re.sub(r"\s*\[(env|default|possible values): [^\]]*\]", "", block)
        what = re.sub(r"^(?:-\w, )?--[a-z0-9-]+(?: <[A-Z_]+>)?\s*", "", what).strip()
        shown = default.group(1).strip('"') if default else ""
        rows.append((env.group(1), flag, shown, what))
    return rows


def table(rows):
    out = ["| Setting | Flag | Default | What it does |", "|---|---|---|---|"]
    for env, flag, default, what in rows:
        shown = f"`{default}`" if default else "(unset)"
        what = what.replace("|", "\\|")
        out.append(f"| `{env}` | `--{flag}` | {shown} | {what} |")
    return out + [""]


def main():
    per = {b: settings(b) for b, _ in BINS}
    dep = {r[0]: r for r in per["deployment-system"]}
    # the runtime's settings: in both services, LISTEN_ADDR's default aside
    common = [r for r in per["payment-system"] if r[0] in dep and r[0] != "LISTEN_ADDR"]
    names = {r[0] for r in common}
    out = [
        "# Configuration reference",
        "",
        "Every binary answers `--help` and `--version`. Each setting is both a flag and an environment",
        "variable: `--gateway-timeout-ms 250` is `GATEWAY_TIMEOUT_MS=250`. A flag wins over the",
        "environment; for the two services the environment wins over the TOML file named by",
        "`TAI_CONFIG`, which may set the same names in lower case (`gateway_timeout_ms = 250`). The",
        "effective configuration is logged at start with secrets masked.",
        "",
        "A default in words (`the built-in fleet`) means the setting is unset by default and says",
        "what happens then. `make test` checks this page against every binary's `--help`",
        "(`operator::the_configuration_reference_names_every_setting_of_every_binary`); after",
        "changing a setting, `cargo build --workspace --bins && python3 scripts/config-reference.py`",
        "writes it again.",
        "",
        "## Common settings (both services)",
        "",
        "The runtime (tai-core) reads these for every service built on it.",
        "",
    ] + table(common)
    for binary, about in BINS:
        rows = per[binary]
        out += [f"## {binary}", "", about, ""]
        if binary in SERVICES:
            out += ["Its own settings, besides the [common settings](#common-settings-both-services):", ""]
            rows = [r for r in rows if r[0] not in names]
        out += table(rows) if rows else ["No settings of its own: it starts what it needs on free ports.", ""]
    path = os.path.join(ROOT, "docs", "CONFIGURATION.md")
    with open(path, "w") as f:
        f.write("\n".join(out).rstrip() + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
