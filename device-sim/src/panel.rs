//! The simulated panel of one device (`device-sim device`): commands typed on standard input
//! (`help` lists them) run against the agent, and the agent's events go to the log.

use schemas::data::{DeviceState, DeviceStatus, OwnerCheckReason, OwnerClaim};
use schemas::print::HeldJobSummary;
use schemas::{JobId, OwnerId, Secret, UserId};
use tokio::sync::broadcast::error::RecvError;

use crate::consumables::Consumables;
use crate::{AgentEvent, AgentHandle, PrintSession};

/// Runs the panel until Ctrl-C or until the agent stops: each line read is a command, each
/// event of the agent is logged. Standard input ending closes the panel, not the device.
pub async fn run(agent: &AgentHandle, consumables: &Consumables) {
    let mut events = agent.subscribe();
    let mut lines = stdin_lines();
    let mut open = true;
    let mut login: Option<PrintSession> = None;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            line = lines.recv(), if open => match line {
                Some(line) => command(agent, consumables, &mut login, &line).await,
                None => open = false,
            },
            event = events.recv() => match event {
                Ok(event) => log_event(&event),
                Err(RecvError::Lagged(n)) => tracing::warn!(skipped = n, "event log fell behind"),
                Err(RecvError::Closed) => break,
            },
        }
    }
}

/// The lines of standard input, read on a thread of its own: a read waiting on the terminal
/// must not keep the process alive after Ctrl-C (a runtime waits for its blocking tasks before
/// it ends), and a device started in the background of a terminal (`device-sim device … &`)
/// must not be stopped by the terminal for reading it (SIGTTIN, "Stopped (tty input)"): while
/// the terminal belongs to another process group, the panel waits without reading, and starts
/// when the device is brought to the foreground (`fg`).
fn stdin_lines() -> tokio::sync::mpsc::Receiver<String> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let terminal = std::io::IsTerminal::is_terminal(&stdin);
        let mut told = false;
        loop {
            if terminal && !in_foreground(&stdin) {
                if !told {
                    tracing::info!(
                        "running in the background: the panel reads commands once in the foreground (fg)"
                    );
                    told = true;
                }
                // Polls the terminal's owner: there is no event for becoming the foreground.
                std::thread::sleep(std::time::Duration::from_millis(500));
                continue;
            }
            let mut line = String::new();
            match stdin.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    if tx.blocking_send(line).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// Whether this process's group owns the terminal on `stdin`.
fn in_foreground(stdin: &std::io::Stdin) -> bool {
    rustix::termios::tcgetpgrp(stdin).is_ok_and(|owner| owner == rustix::process::getpgrp())
}

/// The held jobs as the panel lists them, numbered from 1.
fn held_list(held: &[HeldJobSummary]) -> String {
    if held.is_empty() {
        return "no held jobs".into();
    }
    held.iter()
        .enumerate()
        .map(|(i, h)| format!("{:>2}. {} {}", i + 1, h.job_id, h.title))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One command typed at the simulated panel.
pub async fn command(
    agent: &AgentHandle,
    consumables: &Consumables,
    login: &mut Option<PrintSession>,
    line: &str,
) {
    let words: Vec<&str> = line.split_whitespace().collect();
    let result = match words.as_slice() {
        [] => return,
        ["login", user, pin] => match UserId::parse(user) {
            Ok(user) => agent.login(user, Secret::new(*pin)).await.map(|s| {
                let list = held_list(&s.held);
                *login = Some(s);
                format!("logged in\n{list}")
            }),
            Err(e) => Ok(e.to_string()),
        },
        ["held"] => match login.as_ref() {
            Some(s) => agent.held_jobs(s).await.map(|h| held_list(&h)),
            None => Ok("log in first: login <user id> <pin>".into()),
        },
        ["release", which @ ..] if !which.is_empty() => match login.as_ref() {
            Some(s) => match agent.held_jobs(s).await {
                Ok(held) => {
                    // `all`, numbers from `held`, or job ids.
                    let chosen: Vec<JobId> = if which == ["all"] {
                        held.iter().map(|h| h.job_id.clone()).collect()
                    } else {
                        which
                            .iter()
                            .filter_map(|w| match w.parse::<usize>() {
                                Ok(n) => held.get(n.wrapping_sub(1)).map(|h| h.job_id.clone()),
                                Err(_) => JobId::parse(w).ok(),
                            })
                            .collect()
                    };
                    if chosen.is_empty() {
                        Ok("nothing to release".into())
                    } else {
                        agent.release(s, chosen).await.map(|(released, refused)| {
                            let mut out = format!("released {}", released.len());
                            for (job, error) in refused {
                                out.push_str(&format!("\n{job}: {error}"));
                            }
                            out
                        })
                    }
                }
                Err(e) => Err(e),
            },
            None => Ok("log in first: login <user id> <pin>".into()),
        },
        ["logout"] => match login.take() {
            Some(s) => agent.logout(&s).await.map(|()| "logged out".into()),
            None => Ok("not logged in".into()),
        },
        ["consent"] => agent.consent().await.map(|c| match c {
            Some(c) => format!(
                "consent {} since {} (unix ms)",
                if c.granted { "on" } else { "off" },
                c.changed_at.0
            ),
            None => "consent not set".into(),
        }),
        ["consent", value] => match parse_on_off(value) {
            Ok(granted) => agent
                .set_consent(granted)
                .await
                .map(|c| format!("consent {}", if c.granted { "on" } else { "off" })),
            Err(e) => Ok(e),
        },
        ["status", state, detail @ ..] => {
            let state = match *state {
                "idle" => DeviceState::Idle,
                "busy" => DeviceState::Busy,
                "error" => DeviceState::Error,
                "sleeping" => DeviceState::Sleeping,
                other => {
                    println!("unknown state {other:?}: idle, busy, error or sleeping");
                    return;
                }
            };
            let status = DeviceStatus {
                state,
                detail: detail.join(" "),
                observed_at: schemas::UnixMillis::now(),
            };
            agent.report_status(status).await.map(|s| format!("{s:?}"))
        }
        ["request", action, params @ ..] => {
            let params = params
                .iter()
                .map(|p| match p.split_once('=') {
                    Some((k, v)) => (k.to_owned(), v.to_owned()),
                    None => (p.to_string(), String::new()),
                })
                .collect();
            agent
                .panel_request(*action, params)
                .await
                .map(|s| format!("{s:?}"))
        }
        ["poll"] => agent.poll_now().await.map(|()| "polling".into()),
        ["counters"] => agent.report_counters().await.map(|s| format!("{s:?}")),
        ["cartridges"] => Ok(consumables
            .cartridges()
            .iter()
            .map(|c| format!("{} {} {}%", c.colour, c.cartridge_type, c.level))
            .collect::<Vec<_>>()
            .join("\n")),
        ["replace", colour] => {
            consumables.replace(colour);
            Ok(format!("{colour} replaced"))
        }
        ["support", service, value] => match parse_on_off(value) {
            Ok(on) => agent
                .set_support_service(*service, on)
                .await
                .map(|()| format!("{service} {}", if on { "enabled" } else { "disabled" })),
            Err(e) => Ok(e),
        },
        ["settings"] => agent.settings_in_use().await.map(|s| {
            let or_none = |e: Option<String>| e.unwrap_or_else(|| "not connected".into());
            format!(
                "settings revision {} (0: factory)\n  data channel: {} (in use: {})\n  \
                 notification: {} (in use: {})",
                s.revision,
                s.endpoints.data.join(", "),
                or_none(s.data_in_use),
                s.endpoints.mqtt.join(", "),
                or_none(s.mqtt_in_use),
            )
        }),
        ["reset"] => agent
            .owner_check_required(OwnerCheckReason::FactoryReset)
            .await
            .map(|()| "reset: the owner must confirm (`owner <owner id> <pin>`)".into()),
        ["timezone", tz] => agent
            .owner_check_required(OwnerCheckReason::TimeZoneChanged {
                time_zone: tz.to_string(),
            })
            .await
            .map(|()| "time zone changed: the owner must confirm".into()),
        ["network", name] => agent
            .owner_check_required(OwnerCheckReason::NetworkChanged {
                network: name.to_string(),
            })
            .await
            .map(|()| "network changed: the owner must confirm".into()),
        ["owner", id, pin] => match OwnerId::parse(id) {
            Ok(owner_id) => agent
                .confirm_owner(OwnerClaim {
                    owner_id,
                    pin: Secret::new(*pin),
                })
                .await
                .map(|()| "owner confirmed".into()),
            Err(e) => Ok(e.to_string()),
        },
        _ => Ok(
            "commands: consent [on|off] | status idle|busy|error|sleeping [detail] | \
                 request <action> [key=value ...] | poll | counters | settings | cartridges | \
                 login <user id> <pin> | held | release all|<n>... | logout | \
                 replace <colour> | support <service> on|off | reset | timezone <tz> | \
                 network <name> | owner <owner id> <pin>"
                .into(),
        ),
    };
    match result {
        Ok(answer) => println!("{answer}"),
        Err(e) => println!("error: {e}"),
    }
}

pub fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        other => Err(format!("{other:?}: expected on or off")),
    }
}

pub fn log_event(event: &AgentEvent) {
    match event {
        AgentEvent::Registered(id) => tracing::info!(device = %id, "registered"),
        AgentEvent::MqttUp { endpoint } => tracing::info!(%endpoint, "notification channel up"),
        AgentEvent::MqttDown(reason) => {
            tracing::warn!(%reason, "notification channel down; long-polling the data channel")
        }
        AgentEvent::MqttRefused(reason) => {
            tracing::error!(%reason, "notification channel refused; using the data channel only")
        }
        AgentEvent::DataUp { endpoint } => tracing::info!(%endpoint, "data channel up"),
        AgentEvent::SettingsApplied { revision } => {
            tracing::info!(revision, "server settings applied; reconnecting with them")
        }
        AgentEvent::SettingsReported { revision } => {
            tracing::info!(revision, "settings in use reported to the cloud")
        }
        AgentEvent::DataDown(reason) => tracing::info!(%reason, "data channel closed"),
        AgentEvent::HintReceived { kind, seq } => tracing::info!(?kind, %seq, "hint received"),
        AgentEvent::Synced { cursor } => tracing::info!(%cursor, "feed synced"),
        AgentEvent::JobFetched { job_id, attempt } => {
            tracing::info!(%job_id, attempt, "job fetched")
        }
        AgentEvent::JobStarted { job_id, attempt } => {
            tracing::info!(%job_id, attempt, "job started")
        }
        AgentEvent::JobFinished {
            job_id, outcome, ..
        } => tracing::info!(%job_id, ?outcome, "job finished"),
        AgentEvent::JobReported { job_id } => tracing::info!(%job_id, "outcome reported"),
        AgentEvent::JobCanceled { job_id } => tracing::warn!(%job_id, "job canceled while running"),
        AgentEvent::OwnerCheckStarted { deadline: Some(d) } => tracing::warn!(
            deadline = d.0,
            "owner must confirm at the panel (`owner <owner id> <pin>`)"
        ),
        AgentEvent::OwnerCheckStarted { deadline: None } => {
            tracing::info!("no owner bound; nothing to confirm")
        }
        AgentEvent::OwnerConfirmed => tracing::info!("owner confirmed"),
        AgentEvent::Invalidated { reason } => {
            tracing::error!(%reason, "device id invalidated; registering again")
        }
        AgentEvent::RequestDelivered { no, kind } => tracing::info!(%no, kind, "request delivered"),
        AgentEvent::RequestRefused { no, error } => tracing::warn!(%no, %error, "request refused"),
        AgentEvent::InstructionTaken {
            instruction_id,
            kind,
        } => tracing::info!(%instruction_id, kind, "instruction taken"),
        AgentEvent::InstructionSkipped {
            instruction_id,
            error,
        } => tracing::warn!(%instruction_id, %error, "instruction skipped"),
        AgentEvent::CustomInstruction { name, params, .. } => {
            tracing::info!(name, ?params, "instruction for the device")
        }
        AgentEvent::ServiceRegistered { service_id } => {
            tracing::info!(service_id, "registered for service")
        }
        AgentEvent::NudgeAccepted { nudge_id, delay_ms } => {
            tracing::info!(nudge_id, delay_ms, "poll-now nudge accepted and passed on")
        }
        AgentEvent::NudgeRefused { reason } => tracing::warn!(%reason, "nudge refused"),
        AgentEvent::HeldJobsChanged { user_id } => {
            tracing::info!(%user_id, "new held jobs for the user logged in (`held`)")
        }
        AgentEvent::SupportActivated {
            service_id,
            data_types,
        } => tracing::info!(service_id, ?data_types, "support service active"),
        AgentEvent::SupportDeactivated { service_id } => {
            tracing::info!(service_id, "support service no longer active")
        }
        AgentEvent::TelemetryQueued {
            service_id,
            data_types,
        } => tracing::info!(service_id, ?data_types, "telemetry queued"),
        AgentEvent::ServiceRefused { service_id, error } => {
            tracing::warn!(service_id, %error, "service registration refused")
        }
    }
}
