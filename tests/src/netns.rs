//! Network-namespace lab primitives for the kernel tests (and the lab / e2e
//! tests built on them).
//!
//! Rules every user follows: everything lives in namespaces the test creates
//! (never an interface or address in the root namespace), addresses only
//! from 198.18.0.0/15 and 2001:db8::/32, and every guard cleans up on drop,
//! also while a test panics.
//!
//! - [`NetNs`]: a uniquely named namespace (`ip netns add`), `lo` up and
//!   IPv6 duplicate address detection off (addresses are usable at once);
//!   deleted on drop. Command helpers: [`NetNs::ip`] (`ip -n NAME ...`),
//!   [`NetNs::run`] / [`NetNs::exec`] (`ip netns exec NAME ...`),
//!   [`NetNs::spawn`] (a background process killed when its guard drops),
//!   and small wrappers ([`NetNs::addr`], [`NetNs::up`], [`NetNs::sysctl`],
//!   [`NetNs::ifindex`], [`NetNs::mac`], ...).
//! - [`veth`]: a veth pair whose ends are created directly in two
//!   namespaces.
//! - [`in_netns`]: runs a closure on a fresh thread that has `setns()`ed
//!   into the namespace, so sockets, `if_nametoindex` and aya's attach act
//!   inside it; [`spawn_in`] does the same for a long-running thread.
//!   Sockets (and BPF objects) made there stay in that namespace and can be
//!   used from any thread afterwards.
//!
//! `ip netns exec` remounts `/sys` and hides `/sys/fs/bpf`; the thread
//! helpers do not (they only switch the network namespace).
//!
//! Two veth facts every XDP lab on this kernel needs (found by
//! `tests/netns_forward.rs`):
//! - XDP_TX on a veth delivers only if the *peer* has an XDP program
//!   (attach an XDP_PASS one, e.g. the object's `bench_pass`). GRO on the
//!   peer is not enough for XDP_TX: the frames are counted as sent
//!   (`rx_queue_0_xdp_tx`, no `xdp_tx_errors`) and never arrive.
//! - A sender's veth leaves TCP/UDP checksums to "hardware"
//!   (CHECKSUM_PARTIAL); XDP_TX/REDIRECT drops that state, so the receiver
//!   sees bad checksums. Turn it off on the traffic source:
//!   `ns.ethtool_feature("eth0", "tx-checksumming", false)`.

use std::{
    fs::File,
    io,
    net::IpAddr,
    os::fd::AsRawFd as _,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread::JoinHandle,
};

/// A MAC address.
pub type Mac = [u8; 6];

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn describe(cmd: &[&str]) -> String {
    cmd.join(" ")
}

fn run_checked(cmd: &[&str]) -> Output {
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", describe(cmd)));
    assert!(
        out.status.success(),
        "`{}` failed ({}): {}{}",
        describe(cmd),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    out
}

/// A network namespace that exists as long as this guard does.
#[derive(Debug)]
pub struct NetNs {
    name: String,
    /// Left in place on drop (the persistent `cargo xtask lab`).
    keep: bool,
}

impl NetNs {
    /// Creates `PREFIX-PID-N` (unique per process and call), brings `lo` up
    /// and turns IPv6 DAD off (`accept_dad = 0` for `all` and `default`, so
    /// interfaces created afterwards get usable addresses at once).
    pub fn new(prefix: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id());
        Self::create(name)
    }

    /// Creates exactly `name` (for the persistent lab; fails if it exists).
    pub fn named(name: &str) -> Self {
        Self::create(name.to_owned())
    }

    fn create(name: String) -> Self {
        run_checked(&["ip", "netns", "add", &name]);
        // From here on the guard deletes the namespace even if setup fails.
        let ns = Self { name, keep: false };
        ns.ip(&["link", "set", "lo", "up"]);
        ns.run(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ]);
        ns
    }

    /// The namespace's name (as `ip netns` knows it).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's file, for `setns()`.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// A command whose process starts inside this namespace (`setns()` in
    /// the child before exec). Unlike `ip netns exec` it keeps the mount
    /// namespace, so `/sys/fs/bpf` stays visible (pinned maps).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        use std::os::unix::process::CommandExt as _;
        let f = std::fs::File::open(self.path())
            .unwrap_or_else(|e| panic!("open {}: {e}", self.path()));
        let mut cmd = Command::new(program);
        // SAFETY: the closure only calls setns (async-signal-safe) on an fd
        // that the parent keeps open (moved into the closure).
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// Runs `ip netns exec NAME cmd...` and returns its output, whatever
    /// the exit status.
    pub fn exec(&self, cmd: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run `ip netns exec {} {}`: {e}",
                    self.name,
                    describe(cmd)
                )
            })
    }

    /// Runs `ip netns exec NAME cmd...`; panics with its stderr when it
    /// fails. Returns stdout.
    pub fn run(&self, cmd: &[&str]) -> String {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(cmd);
        String::from_utf8_lossy(&run_checked(&full).stdout).into_owned()
    }

    /// Runs `ip -n NAME args...`; panics with its stderr when it fails.
    /// Returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        String::from_utf8_lossy(&run_checked(&full).stdout).into_owned()
    }

    /// `ip -n NAME -j args...` parsed as JSON.
    pub fn ip_json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["-j"];
        full.extend_from_slice(args);
        let out = self.ip(&full);
        serde_json::from_str(&out).unwrap_or_else(|e| {
            panic!(
                "ip -n {} -j {}: bad JSON ({e}): {out}",
                self.name,
                describe(args)
            )
        })
    }

    /// Starts `ip netns exec NAME cmd...` in the background (stdin and
    /// stdout null, stderr inherited). The process is killed and reaped when
    /// the returned guard drops.
    pub fn spawn(&self, cmd: &[&str]) -> Background {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `ip netns exec {} {}`: {e}",
                    self.name,
                    describe(cmd)
                )
            });
        Background {
            child: Some(child),
            what: describe(cmd),
        }
    }

    /// Adds `cidr` (e.g. `198.18.0.2/16`, `2001:db8::2/64`) to `ifname`.
    /// IPv6 addresses get `nodad`.
    pub fn addr(&self, ifname: &str, cidr: &str) {
        if cidr.contains(':') {
            self.ip(&["addr", "add", cidr, "dev", ifname, "nodad"]);
        } else {
            self.ip(&["addr", "add", cidr, "dev", ifname]);
        }
    }

    /// Sets `ifname` up.
    pub fn up(&self, ifname: &str) {
        self.ip(&["link", "set", ifname, "up"]);
    }

    /// Sets a sysctl inside the namespace (`sysctl -qw key=value`).
    pub fn sysctl(&self, key: &str, value: &str) {
        self.run(&["sysctl", "-qw", &format!("{key}={value}")]);
    }

    /// Creates a bridge `name` (STP off, multicast snooping off so that
    /// IPv6 neighbour discovery is always flooded) and sets it up.
    pub fn bridge(&self, name: &str) {
        self.ip(&[
            "link",
            "add",
            name,
            "type",
            "bridge",
            "stp_state",
            "0",
            "mcast_snooping",
            "0",
        ]);
        self.up(name);
    }

    /// Enslaves `ifname` to `bridge` and sets it up.
    pub fn enslave(&self, ifname: &str, bridge: &str) {
        self.ip(&["link", "set", ifname, "master", bridge]);
        self.up(ifname);
    }

    /// A permanent neighbour entry `addr → mac` on `ifname`.
    pub fn neigh_permanent(&self, ifname: &str, addr: IpAddr, mac: Mac) {
        self.ip(&[
            "neigh",
            "replace",
            &addr.to_string(),
            "lladdr",
            &fmt_mac(mac),
            "dev",
            ifname,
            "nud",
            "permanent",
        ]);
    }

    /// The MAC address the namespace's neighbour table holds for `addr` on
    /// `ifname`, if any usable entry exists (not FAILED/INCOMPLETE).
    pub fn neigh_mac(&self, ifname: &str, addr: IpAddr) -> Option<Mac> {
        let v = self.ip_json(&["neigh", "show", "to", &addr.to_string(), "dev", ifname]);
        v.as_array()?.iter().find_map(|e| {
            let failed = e["state"].as_array().is_some_and(|s| {
                s.iter().any(|x| {
                    x.as_str()
                        .is_some_and(|x| x == "FAILED" || x == "INCOMPLETE")
                })
            });
            if failed {
                None
            } else {
                e["lladdr"].as_str().map(parse_mac)
            }
        })
    }

    /// Interface index of `ifname` in this namespace.
    pub fn ifindex(&self, ifname: &str) -> u32 {
        let v = self.ip_json(&["link", "show", "dev", ifname]);
        v[0]["ifindex"]
            .as_u64()
            .unwrap_or_else(|| panic!("{}: no ifindex for {ifname} in {v}", self.name))
            as u32
    }

    /// MAC address of `ifname` in this namespace.
    pub fn mac(&self, ifname: &str) -> Mac {
        let v = self.ip_json(&["link", "show", "dev", ifname]);
        let s = v[0]["address"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no address for {ifname} in {v}", self.name));
        parse_mac(s)
    }

    /// Sets `ifname`'s MAC address.
    pub fn set_mac(&self, ifname: &str, mac: Mac) {
        self.ip(&["link", "set", "dev", ifname, "address", &fmt_mac(mac)]);
    }

    /// `ethtool -K ifname feature on|off` (e.g. `gro`: enabling GRO on a
    /// veth gives it NAPI, which XDP_TX/REDIRECT from its peer needs).
    pub fn ethtool_feature(&self, ifname: &str, feature: &str, on: bool) {
        self.run(&[
            "ethtool",
            "-K",
            ifname,
            feature,
            if on { "on" } else { "off" },
        ]);
    }

    /// `ethtool -S ifname` as (name, value) pairs.
    pub fn ethtool_stats(&self, ifname: &str) -> Vec<(String, u64)> {
        self.run(&["ethtool", "-S", ifname])
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((k.trim().to_owned(), v.trim().parse().ok()?))
            })
            .collect()
    }

    /// Runs `f` inside this namespace on a fresh thread; see [`in_netns`].
    pub fn in_netns<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> T {
        in_netns(self, f)
    }
}

impl NetNs {
    /// Leaves the namespace in place when the guard drops.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        // Never panic here: this also runs while a test unwinds.
        match Command::new("ip")
            .args(["netns", "delete", &self.name])
            .stdin(Stdio::null())
            .output()
        {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!(
                "warning: ip netns delete {}: {}",
                self.name,
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => eprintln!("warning: ip netns delete {}: {e}", self.name),
        }
    }
}

/// A background process started by [`NetNs::spawn`]; killed and reaped on
/// drop.
#[derive(Debug)]
pub struct Background {
    child: Option<Child>,
    what: String,
}

impl Background {
    /// The process id (of `ip netns exec`, which execs the command).
    pub fn id(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the process and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            if let Err(e) = c.wait() {
                eprintln!("warning: reaping `{}`: {e}", self.what);
            }
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Creates a veth pair: `a_if` in `a`, `b_if` in `b`, both set up. The
/// ends are created directly in their namespaces (nothing ever appears in
/// the root namespace).
pub fn veth(a: &NetNs, a_if: &str, b: &NetNs, b_if: &str) {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
    a.up(a_if);
    b.up(b_if);
}

/// Moves the *calling thread* into `ns` (`setns(CLONE_NEWNET)`). Only for
/// threads you own and throw away (never the test harness's thread); prefer
/// [`in_netns`] / [`spawn_in`].
pub fn enter(ns: &NetNs) {
    enter_path(&ns.path());
}

fn enter_path(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns on a valid namespace fd; affects only this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert!(
        rc == 0,
        "setns({path}, CLONE_NEWNET): {}",
        io::Error::last_os_error()
    );
}

/// Runs `f` on a fresh thread that first enters `ns`, and returns its
/// result. A panic in `f` is propagated to the caller. `f` may borrow from
/// the caller.
pub fn in_netns<T: Send, F: FnOnce() -> T + Send>(ns: &NetNs, f: F) -> T {
    let path = ns.path();
    std::thread::scope(|s| {
        let h = std::thread::Builder::new()
            .name(format!("in-{}", ns.name()))
            .spawn_scoped(s, move || {
                enter_path(&path);
                f()
            })
            .expect("spawning a thread");
        match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// Starts a long-running thread inside `ns`. The caller owns stopping and
/// joining it (give it a stop flag and a deadline).
pub fn spawn_in<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
    ns: &NetNs,
    name: &str,
    f: F,
) -> JoinHandle<T> {
    let path = ns.path();
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            enter_path(&path);
            f()
        })
        .expect("spawning a thread")
}

/// Parses `aa:bb:cc:dd:ee:ff`; panics on anything else.
pub fn parse_mac(s: &str) -> Mac {
    let mut out = [0u8; 6];
    let parts: Vec<&str> = s.split(':').collect();
    assert_eq!(parts.len(), 6, "bad MAC {s:?}");
    for (o, p) in out.iter_mut().zip(parts) {
        *o = u8::from_str_radix(p, 16).unwrap_or_else(|_| panic!("bad MAC {s:?}"));
    }
    out
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(m: Mac) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// Names of the namespaces that currently exist (`ip netns list`).
pub fn list() -> Vec<String> {
    let out = run_checked(&["ip", "netns", "list"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespace_is_gone_after_drop() {
        let ns = NetNs::new("nstest");
        let name = ns.name().to_owned();
        assert!(list().contains(&name), "{name} should exist");
        drop(ns);
        assert!(!list().contains(&name), "{name} should be gone");
    }

    #[test]
    fn namespace_is_gone_after_a_panic() {
        let name = std::sync::Mutex::new(String::new());
        let r = std::panic::catch_unwind(|| {
            let ns = NetNs::new("nstest");
            *name.lock().unwrap() = ns.name().to_owned();
            panic!("test panic");
        });
        assert!(r.is_err());
        let name = name.into_inner().unwrap();
        assert!(!name.is_empty());
        assert!(
            !list().contains(&name),
            "{name} should be gone after the panic"
        );
    }

    #[test]
    fn veth_thread_and_helpers_work_inside_the_namespace() {
        let a = NetNs::new("nsa");
        let b = NetNs::new("nsb");
        veth(&a, "va", &b, "vb");
        a.addr("va", "198.18.100.1/24");
        b.addr("vb", "198.18.100.2/24");
        let mac = b.mac("vb");
        let idx = b.ifindex("vb");
        // The thread sees the namespace's interfaces, not the root's.
        let idx_thread = in_netns(&b, || {
            let c = std::ffi::CString::new("vb").unwrap();
            // SAFETY: valid C string.
            unsafe { libc::if_nametoindex(c.as_ptr()) }
        });
        assert_eq!(idx, idx_thread);
        let listener = in_netns(&b, || {
            std::net::TcpListener::bind("198.18.100.2:0").unwrap()
        });
        let port = listener.local_addr().unwrap().port();
        let h = std::thread::spawn(move || listener.accept().map(|_| ()));
        in_netns(&a, || {
            std::net::TcpStream::connect_timeout(
                &format!("198.18.100.2:{port}").parse().unwrap(),
                std::time::Duration::from_secs(2),
            )
            .expect("connect across the veth")
        });
        h.join().unwrap().unwrap();
        assert_eq!(
            a.neigh_mac("va", "198.18.100.2".parse().unwrap()),
            Some(mac)
        );
        // Panics propagate from the namespace thread.
        let r = std::panic::catch_unwind(|| in_netns(&a, || panic!("inner")));
        assert!(r.is_err());
        let mut bg = a.spawn(&["sleep", "30"]);
        assert!(bg.is_running());
        bg.kill();
        assert!(!bg.is_running());
    }
}
