//! QUICK_START.md as a newcomer runs it: every `curl` command it shows for the embedded
//! default (in its shell blocks and in the text, up to "## The full stack"), run as written
//! through bash against the two services on their embedded defaults, in order. The ids the
//! page leaves as `txn_…`, `we_…` and `dpl_…` are those the commands before returned. A command
//! must get an answer from a route that exists, never a 5xx, and the status its comment names.

use std::process::Command;

use serde_json::Value;
use tai_blackbox::Proc;

/// One command of the page with what its comment promises.
#[derive(Debug)]
struct Step {
    command: String,
    comment: String,
}

fn steps(page: &str) -> Vec<Step> {
    let embedded = &page[..page.find("## The full stack").unwrap_or(page.len())];
    let mut steps: Vec<Step> = Vec::new();
    let mut in_block = false;
    let mut pending = String::new();
    for line in embedded.lines() {
        if line.starts_with("```") {
            in_block = !in_block && line.trim() == "```sh";
            continue;
        }
        if !in_block {
            // commands in the text: `curl …` spans
            for span in line.split('`').skip(1).step_by(2) {
                // (those for the two services; `make run` starts no standalone gateway)
                if span.starts_with("curl ")
                    && (span.contains("localhost:3001") || span.contains("localhost:3002"))
                {
                    steps.push(Step {
                        command: span.to_owned(),
                        comment: String::new(),
                    });
                }
            }
            continue;
        }
        let trimmed = line.trim();
        if trimmed.starts_with('#') {
            // a comment line under a command says what it answers
            if let Some(last) = steps.last_mut().filter(|_| pending.is_empty()) {
                last.comment.push_str(trimmed);
            }
            continue;
        }
        pending.push_str(line.trim_end_matches('\\'));
        if line.ends_with('\\') {
            continue;
        }
        let full = std::mem::take(&mut pending);
        let (command, comment) = match full.find("  #") {
            Some(at) => (full[..at].trim().to_owned(), full[at..].trim().to_owned()),
            None => (full.trim().to_owned(), String::new()),
        };
        if command.starts_with("curl ") {
            steps.push(Step { command, comment });
        }
    }
    steps
}

fn run(command: &str) -> (u16, String) {
    // the status, on a line of its own after the output of the whole pipeline's curl
    let script = format!("set -o pipefail; {command} -w '\\n%{{http_code}}'");
    let script = match command.find(" | ") {
        Some(at) => format!(
            "set -o pipefail; out=$({} -w '\\n%{{http_code}}'); code=${{out##*$'\\n'}}; printf '%s' \"${{out%$'\\n'*}}\" | {}; echo; echo \"$code\"",
            &command[..at],
            &command[at + 3..]
        ),
        None => script,
    };
    let out = Command::new("bash")
        .args(["-c", &script])
        .output()
        .expect("bash");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`{command}` failed: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, code) = text
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", text.trim()));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[tokio::test]
async fn every_quick_start_command_for_the_embedded_default_works_as_written() {
    let page = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../QUICK_START.md"),
    )
    .expect("QUICK_START.md");
    let steps = steps(&page);
    assert!(steps.len() >= 20, "{steps:#?}");
    let pay = Proc::start("payment-system", &[]).await.expect("payment");
    let dep = Proc::start("deployment-system", &[])
        .await
        .expect("deployment");
    let mut ids: Vec<(&str, String)> = Vec::new();
    let mut last_payment_command = String::new();
    for step in &steps {
        let mut command = step
            .command
            .replace("localhost:3001", &pay.addr())
            .replace("localhost:3002", &dep.addr());
        // "(another one)": the same kind of payment again, for the step that needs a fresh one;
        // the steps after it go on with the payment before it
        let another = step.comment.contains("(another one)");
        if another {
            let (_, body) = run(&last_payment_command);
            let v: Value = serde_json::from_str(&body).expect("payment JSON");
            ids.push((
                "txn_…",
                v["transaction_id"].as_str().expect("id").to_owned(),
            ));
        }
        for (placeholder, id) in ids.iter().rev() {
            if command.contains(placeholder) {
                command = command.replace(placeholder, id);
            }
        }
        assert!(!command.contains('…'), "no id for {}", step.command);
        let (status, body) = run(&command);
        assert!(
            (200..500).contains(&status) && status != 404,
            "`{}` answered {status}: {body}",
            step.command
        );
        let promised = step
            .comment
            .split(|c: char| !c.is_ascii_digit())
            .find(|w| w.len() == 3 && w.starts_with(['2', '4']));
        if let Some(promised) = promised {
            assert_eq!(status.to_string(), promised, "`{}`: {body}", step.command);
        } else if step.comment.contains("\"code\":\"invalid_json\"") {
            assert_eq!(status, 400, "{body}");
            assert!(body.contains("invalid_json"), "{body}");
        } else {
            // a command whose comment promises nothing else must succeed
            assert!(
                (200..300).contains(&status),
                "`{}` answered {status}: {body}",
                step.command
            );
        }
        if another {
            ids.pop();
            continue;
        }
        // remember the ids this answer names, for the steps that follow
        if let Ok(v) = serde_json::from_str::<Value>(&body) {
            for (field, placeholder) in [
                ("transaction_id", "txn_…"),
                ("deployment_id", "dpl_…"),
                ("id", "we_…"),
            ] {
                if let Some(id) = v[field].as_str()
                    && id.starts_with(&placeholder[..placeholder.len() - "…".len()])
                {
                    ids.push((placeholder, id.to_owned()));
                    if field == "transaction_id" && command.contains("/payment -H") {
                        last_payment_command = command.clone();
                    }
                }
            }
        }
    }
}
