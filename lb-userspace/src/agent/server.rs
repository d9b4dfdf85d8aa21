//! The agent's event loop: control API on a Unix socket, Prometheus metrics
//! over HTTP, health results, a counter sampler, and the signals (SIGHUP
//! reloads, SIGTERM/SIGINT stop within a bounded time).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{TcpListener, UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
    sync::{Mutex, mpsc},
};

use super::{Agent, AgentError, AgentOptions, metrics, report};
use crate::control::{ErrorKind, Request, Response};

/// Largest request line accepted on the control socket.
const MAX_REQUEST: u64 = 64 * 1024;
/// Time a client gets to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on a clean stop.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

pub(super) type Shared = Arc<Mutex<Agent>>;

/// Runs the agent until SIGTERM/SIGINT. Returns an error only for start-up
/// failures (bad config, data path, sockets).
pub async fn run(opts: AgentOptions) -> Result<(), AgentError> {
    let (tx, mut rx) = mpsc::channel(1024);
    let agent = tokio::task::block_in_place(|| Agent::start(opts, tx))?;
    let socket_path = agent.config().agent.control_socket.clone();
    let metrics_addr = agent.config().agent.metrics_address;
    let agent: Shared = Arc::new(Mutex::new(agent));

    let control = bind_control(&socket_path)?;
    let http = TcpListener::bind(metrics_addr)
        .await
        .map_err(|e| AgentError::io(format!("metrics address {metrics_addr}"), e))?;
    tracing::info!(
        "control socket {}, metrics http://{metrics_addr}/metrics",
        socket_path.display()
    );

    let probes = {
        let agent = agent.clone();
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                agent.lock().await.on_probe(r);
            }
        })
    };
    let sampler = {
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                agent.lock().await.sample();
            }
        })
    };
    let control_task = {
        let agent = agent.clone();
        tokio::spawn(async move {
            loop {
                match control.accept().await {
                    Ok((stream, _)) => {
                        let agent = agent.clone();
                        tokio::spawn(async move { serve_control(stream, agent).await });
                    }
                    Err(e) => {
                        tracing::warn!("control socket accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
    };
    let http_task = {
        let agent = agent.clone();
        tokio::spawn(async move {
            loop {
                if let Ok((stream, _)) = http.accept().await {
                    let agent = agent.clone();
                    tokio::spawn(async move { serve_http(stream, agent).await });
                }
            }
        })
    };

    let watchdog = super::systemd::spawn_watchdog(agent.clone());
    super::systemd::ready(&*agent.lock().await);

    let mut hup = signal(SignalKind::hangup()).map_err(|e| AgentError::io("SIGHUP handler", e))?;
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| AgentError::io("SIGTERM handler", e))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| AgentError::io("SIGINT handler", e))?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let mut a = agent.lock().await;
                super::systemd::reloading();
                match tokio::task::block_in_place(|| a.reload(&super::Origin::new("reload", "SIGHUP", ""), None)) {
                    Ok(r) => tracing::info!("reload: {}", r.summary),
                    Err(e) => tracing::error!("reload rejected, running config unchanged: {e}"),
                }
                super::systemd::ready(&a);
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("stopping");
    super::systemd::stopping();
    for t in [probes, sampler, control_task, http_task]
        .into_iter()
        .chain(watchdog)
    {
        t.abort();
    }
    let _ = std::fs::remove_file(&socket_path);
    if let Ok(mut a) = tokio::time::timeout(SHUTDOWN_TIMEOUT, agent.lock()).await {
        a.shutdown();
    } else {
        tracing::error!("a request is still running; stopping without waiting for it");
    }
    Ok(())
}

/// Binds the control socket: parent directory 0700, socket 0600 (root
/// only), a stale socket of a dead agent replaced, a live one refused.
fn bind_control(path: &Path) -> Result<UnixListener, AgentError> {
    let io = |what: &str, e: std::io::Error| {
        AgentError::io(format!("control socket {}: {what}", path.display()), e)
    };
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(|e| io("creating its directory", e))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("setting directory mode", e))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(AgentError::io(
                format!("control socket {}", path.display()),
                "another lbd is serving it; stop it first",
            ));
        }
        std::fs::remove_file(path).map_err(|e| io("removing the stale socket", e))?;
    }
    let l = UnixListener::bind(path).map_err(|e| io("bind", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io("setting mode 0600", e))?;
    Ok(l)
}

async fn serve_control(stream: UnixStream, agent: Shared) {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let read = tokio::time::timeout(
        REQUEST_TIMEOUT,
        BufReader::new(r.take(MAX_REQUEST)).read_line(&mut line),
    )
    .await;
    let resp = match read {
        Err(_) => Response::error(ErrorKind::InvalidRequest, "no request within 5 s"),
        Ok(Err(e)) => Response::error(ErrorKind::Io, format!("reading the request: {e}")),
        Ok(Ok(_)) if !line.ends_with('\n') => Response::error(
            ErrorKind::InvalidRequest,
            format!("request too long or not ended by a newline (max {MAX_REQUEST} bytes)"),
        ),
        Ok(Ok(_)) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::error(
                ErrorKind::InvalidRequest,
                format!("not a valid request: {e}"),
            ),
            Ok(req) => handle(req, &agent).await,
        },
    };
    let mut out = serde_json::to_string(&resp)
        .unwrap_or_else(|e| format!(r#"{{"ok":false,"error":"encoding the answer failed: {e}"}}"#));
    out.push('\n');
    let _ = w.write_all(out.as_bytes()).await;
}

/// Dispatches one control request.
pub async fn handle(req: Request, agent: &Shared) -> Response {
    let mut a = agent.lock().await;
    tokio::task::block_in_place(|| match req {
        Request::Status => Response::ok(&report::status(&a)),
        Request::Stats => match a.datapath().stats() {
            Ok(now) => Response::ok(&report::stats(&a, &now)),
            Err(e) => Response::error(ErrorKind::Datapath, format!("reading counters: {e}")),
        },
        Request::Reload { force } => match a.reload(
            &super::Origin::new("reload", "lbctl", force.clone().unwrap_or_default()),
            force,
        ) {
            Ok(r) => Response::ok(&r),
            Err(e) => failure(&e),
        },
        Request::Backend {
            vip,
            backend,
            op,
            force,
        } => match a.backend_op(&vip, backend, op, force, "lbctl") {
            Ok(r) => Response::ok(&r),
            Err(e) => failure(&e),
        },
        Request::DatapathDetach => match a.detach() {
            Ok(()) => Response::ok(&"detached"),
            Err(e) => failure(&e),
        },
        Request::Plan {
            source,
            file,
            author,
        } => answer(a.plan_change(source, &file, &author)),
        Request::Approve {
            plan,
            reviewer,
            comment,
        } => answer(a.approve(&plan, &reviewer, &comment)),
        Request::Apply { plan, actor, force } => answer(a.apply_plan(&plan, &actor, force)),
        Request::Rollback {
            generation,
            actor,
            reason,
        } => answer(a.rollback(generation, &actor, &reason)),
        Request::History => answer(a.history()),
    })
}

fn answer<T: serde::Serialize>(r: Result<T, AgentError>) -> Response {
    match r {
        Ok(v) => Response::ok(&v),
        Err(e) => failure(&e),
    }
}

/// An error answer: the message and its kind.
fn failure(e: &AgentError) -> Response {
    Response::error(e.kind(), e.to_string())
}

async fn serve_http(mut stream: tokio::net::TcpStream, agent: Shared) {
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let head = tokio::time::timeout(Duration::from_secs(2), async {
        while len < buf.len() {
            match stream.read(&mut buf[len..]).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => len += n,
            }
            if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                return Some(String::from_utf8_lossy(&buf[..len]).into_owned());
            }
        }
        None
    })
    .await;
    let (status, body) = match head {
        Ok(Some(h)) if h.starts_with("GET /metrics ") || h.starts_with("GET /metrics?") => {
            let a = agent.lock().await;
            let body = tokio::task::block_in_place(|| {
                let status = report::status(&a);
                match a.datapath().stats() {
                    Ok(now) => Ok(metrics::render(&status, &report::stats(&a, &now))),
                    Err(e) => Err(e.to_string()),
                }
            });
            match body {
                Ok(b) => ("200 OK", b),
                Err(e) => (
                    "500 Internal Server Error",
                    format!("reading counters: {e}\n"),
                ),
            }
        }
        Ok(Some(_)) => ("404 Not Found", "only GET /metrics is served\n".into()),
        _ => return,
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes()).await;
}

/// Default config path of `lbd`.
pub fn default_config_path() -> PathBuf {
    PathBuf::from("/etc/lbd/lbd.toml")
}
