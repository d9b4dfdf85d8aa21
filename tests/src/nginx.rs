//! A real HTTP server (Debian's nginx) inside a backend namespace, for
//! end-to-end tests with large bodies: `GET /big.bin` serves a file, and
//! `POST /upload` reads the whole request body (nginx buffers it before
//! proxying to a local echo location) and answers `received N bytes`.
//!
//! Each instance has its own config, pid file, logs and temp paths under a
//! private directory, runs in the foreground as one process (no daemon, no
//! master), and is killed when its guard drops (also on panic); the
//! directory is removed with it.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::netns::{Background, NetNs};

/// Largest request body the upload location accepts.
pub const MAX_BODY: usize = 4 << 20;

/// One nginx process; stopped and its directory removed on drop.
pub struct Nginx {
    // Dropped first: the process stops before its files go.
    process: Background,
    dir: PathBuf,
}

/// Where nginx is, or why the test cannot run.
pub fn binary() -> Result<PathBuf, String> {
    ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .ok_or_else(|| "nginx is not installed: run `cargo xtask setup` (it installs it)".into())
}

impl Nginx {
    /// Starts nginx in `ns`, listening on `listen`, serving `big` as
    /// `/big.bin`; waits (bounded) until every address accepts.
    pub fn start(ns: &NetNs, tag: &str, listen: &[SocketAddr], big: &Path) -> Self {
        let bin = binary().unwrap_or_else(|e| panic!("{e}"));
        let dir = std::env::temp_dir().join(format!("xlb-nginx-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, config(&dir, listen, big))
            .unwrap_or_else(|e| panic!("writing {}: {e}", conf.display()));
        let process = ns.spawn(&[
            bin.to_str().expect("nginx path"),
            "-c",
            conf.to_str().expect("config path"),
            "-p",
            dir.to_str().expect("prefix path"),
            "-e",
            dir.join("error.log").to_str().expect("log path"),
        ]);
        let mut me = Self { process, dir };
        me.wait_ready(ns, listen);
        me
    }

    fn wait_ready(&mut self, ns: &NetNs, listen: &[SocketAddr]) {
        let t0 = Instant::now();
        loop {
            assert!(
                self.process.is_running(),
                "nginx in {} exited at start; error log:\n{}",
                ns.name(),
                self.error_log()
            );
            let ready = ns.in_netns(|| {
                listen.iter().all(|a| {
                    std::net::TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok()
                })
            });
            if ready {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "nginx in {} did not listen on {listen:?} within 10 s; error log:\n{}",
                ns.name(),
                self.error_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The instance's error log (for failure messages).
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.process.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config(dir: &Path, listen: &[SocketAddr], big: &Path) -> String {
    let d = dir.display();
    let mut listens = String::new();
    for a in listen {
        let _ = writeln!(listens, "        listen {a};");
    }
    // One foreground process as root (no user switch, so it can read the
    // file and write its temp paths); every path inside `dir`.
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
{listens}        location = /big.bin {{
            alias {big};
        }}
        location = /upload {{
            # Buffered in full before the echo answers: the whole body
            # must cross the network first.
            client_max_body_size {MAX_BODY};
            proxy_request_buffering on;
            proxy_pass http://127.0.0.1:18099/echo;
        }}
    }}
    server {{
        listen 127.0.0.1:18099;
        location = /echo {{
            return 200 "received $content_length bytes\n";
        }}
    }}
}}
"#,
        big = big.display()
    )
}
