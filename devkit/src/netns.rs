//! Two sites on one machine: each host (a component, as a pod or a server would be) in its own Linux
//! network namespace with its own IPv4 and IPv6 address; the hosts of a site on one switch (a bridge
//! in the site's namespace); the two switches joined by a WAN link that a userspace [`Pipe`] carries
//! frame by frame through the [`crate::wan`] model (latency, jitter, loss, reordering, duplication, a
//! bandwidth cap, partitions). Every protocol crosses it as it would cross a real WAN: TCP's and
//! QUIC's own congestion control see the loss and the delay.
//!
//! ```text
//!  site A                                                           site B
//!  [agent] [ps-1] [ps-2]                                            [mt] [cs]
//!     \      |      /                                                 \   /
//!      bridge (srK-swa) --w-- srKwa ==Pipe (this process)== srKwb --w-- bridge (srK-swb)
//!           |                                                              |
//!        srKma (10.X.1.254, fd5e:0:K::1:fe)   the test's own unimpaired    srKmb
//!                                             management links (root namespace)
//! ```
//!
//! Addresses: 10.(100+K).S.I/16 and fd5e:0:K::S:I/64 for host I of site S (1 = A, 2 = B), all
//! on one link, so sites differ only in what lies between them. Needs root, `ip` and `ethtool`
//! ([`Topology::available`] says what is missing, for tests to skip with that message).

use crate::wan::{Counters, Impairment, Link};
use anyhow::{bail, Context};
use std::collections::BinaryHeap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Site {
    A,
    B,
}

impl Site {
    fn number(self) -> u8 {
        match self {
            Site::A => 1,
            Site::B => 2,
        }
    }
}

/// A host of the topology: a network namespace with one interface (`eth0`) and loopback.
#[derive(Debug, Clone)]
pub struct Host {
    pub name: String,
    /// Its network namespace (`ip netns exec NS ...`).
    pub ns: String,
    pub site: Site,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Host {
    pub fn ip(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.v4),
            Family::V6 => IpAddr::V6(self.v6),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Runs `ip` (or another admin command) and fails with its message.
fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["ip", "netns", "exec", ns];
    all.extend_from_slice(args);
    run(&all)
}

/// Checksums computed by the sender and frames no larger than the MTU: what a frame copied through a
/// packet socket must be.
fn plain_frames(ns: Option<&str>, dev: &str) -> anyhow::Result<()> {
    let args = ["ethtool", "-K", dev, "tx", "off", "rx", "off", "tso", "off", "gso", "off", "gro", "off"];
    match ns {
        Some(ns) => in_ns(ns, &args),
        None => run(&args),
    }
}

/// The two sites, their hosts and the WAN between them. Dropping it stops the pipe and deletes the
/// namespaces (and with them every interface).
pub struct Topology {
    pub index: u8,
    pub hosts: Vec<Host>,
    pub wan: Pipe,
    namespaces: Vec<String>,
}

impl Topology {
    /// Why topologies cannot be built here, if they cannot: for a test to print when it skips.
    pub fn available() -> Result<(), String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("network namespaces need root; run the tests as root (CI does)".into());
        }
        for tool in ["ip", "ethtool"] {
            let found = Command::new(tool).arg("-V").output().is_ok_and(|o| o.status.success())
                || Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
            if !found {
                return Err(format!("`{tool}` is not installed (scripts/setup.sh installs it)"));
            }
        }
        let probe = format!("sr-probe-{}", std::process::id());
        run(&["ip", "netns", "add", &probe]).map_err(|e| format!("cannot create a network namespace: {e:#}"))?;
        let _ = run(&["ip", "netns", "del", &probe]);
        Ok(())
    }

    /// Builds the sites with `hosts` (name, site) and the WAN with `wan` in both directions, its
    /// random choices from `seed`.
    pub fn create(hosts: &[(&str, Site)], wan: Impairment, seed: u64) -> anyhow::Result<Topology> {
        // Claim an index no other topology on this machine holds: `ip netns add` fails when the name exists.
        // A namespace is torn down by the kernel after `ip netns del` returns: an index whose root
        // interfaces are still there is not free yet.
        let index = (0..150u8)
            .find(|k| {
                let lingering = ["wa", "wb", "ma", "mb"]
                    .iter()
                    .any(|e| std::path::Path::new(&format!("/sys/class/net/sr{k}{e}")).exists());
                !lingering && run(&["ip", "netns", "add", &format!("sr{k}-swa")]).is_ok()
            })
            .context("no free topology index (150 in use?)")?;
        let k = index;
        let mut topo = Topology { index, hosts: Vec::new(), wan: Pipe::idle(), namespaces: vec![format!("sr{k}-swa")] };
        topo.build(hosts, wan, seed)?;
        Ok(topo)
    }

    fn build(&mut self, hosts: &[(&str, Site)], wan: Impairment, seed: u64) -> anyhow::Result<()> {
        let k = self.index;
        let (swa, swb) = (format!("sr{k}-swa"), format!("sr{k}-swb"));
        run(&["ip", "netns", "add", &swb])?;
        self.namespaces.push(swb.clone());
        for (sw, s) in [(&swa, 'a'), (&swb, 'b')] {
            in_ns(sw, &["ip", "link", "add", "br0", "type", "bridge"])?;
            in_ns(sw, &["ip", "link", "set", "br0", "up"])?;
            // The WAN port: one end on the bridge, the other in this namespace for the pipe.
            let (wan_end, mgmt_end) = (format!("sr{k}w{s}"), format!("sr{k}m{s}"));
            for (root_end, site_end) in [(&wan_end, "wan"), (&mgmt_end, "mgmt")] {
                run(&["ip", "link", "add", root_end, "type", "veth", "peer", "name", site_end, "netns", sw])?;
                in_ns(sw, &["ip", "link", "set", "dev", site_end, "master", "br0", "up"])?;
                run(&["ip", "link", "set", "dev", root_end, "up"])?;
            }
            let _ = run(&["sysctl", "-qw", &format!("net.ipv6.conf.{wan_end}.disable_ipv6=1")]);
            plain_frames(None, &wan_end)?;
            plain_frames(Some(sw), "wan")?;
            // Management: this process reaches the site's hosts directly, unimpaired.
            let site = if s == 'a' { 1 } else { 2 };
            run(&["sysctl", "-qw", &format!("net.ipv4.conf.{mgmt_end}.arp_ignore=1")])?;
            run(&["ip", "addr", "add", &format!("10.{}.{site}.254/32", 100 + k as u16), "dev", &mgmt_end])?;
            run(&["ip", "route", "add", &format!("10.{}.{site}.0/24", 100 + k as u16), "dev", &mgmt_end])?;
            run(&["ip", "-6", "addr", "add", &format!("fd5e:0:{k}::{site}:fe/128"), "dev", &mgmt_end, "nodad"])?;
            run(&["ip", "-6", "route", "add", &format!("fd5e:0:{k}::{site}:0/112"), "dev", &mgmt_end])?;
        }
        let mut counts = [0u8; 2];
        for (name, site) in hosts {
            // An interface name (`h-NAME`) has at most 15 bytes.
            if name.is_empty() || name.len() > 13 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
                bail!("host name {name:?}: 1 to 13 letters, digits or dashes");
            }
            let n = &mut counts[site.number() as usize - 1];
            *n += 1;
            let ns = format!("sr{k}-{name}");
            run(&["ip", "netns", "add", &ns])?;
            self.namespaces.push(ns.clone());
            let sw = if *site == Site::A { &swa } else { &swb };
            let port = format!("h-{name}");
            in_ns(sw, &["ip", "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
            in_ns(sw, &["ip", "link", "set", "dev", &port, "master", "br0", "up"])?;
            let v4 = Ipv4Addr::new(10, 100 + k, site.number(), *n);
            let v6: Ipv6Addr = format!("fd5e:0:{k}::{}:{}", site.number(), n).parse().expect("an IPv6 address");
            in_ns(&ns, &["ip", "link", "set", "lo", "up"])?;
            in_ns(&ns, &["ip", "addr", "add", &format!("{v4}/16"), "dev", "eth0"])?;
            in_ns(&ns, &["ip", "-6", "addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"])?;
            in_ns(&ns, &["ip", "link", "set", "eth0", "up"])?;
            plain_frames(Some(&ns), "eth0")?;
            self.hosts.push(Host { name: name.to_string(), ns, site: *site, v4, v6 });
        }
        self.wan = Pipe::start(&format!("sr{k}wa"), &format!("sr{k}wb"), wan, seed)?;
        Ok(())
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).unwrap_or_else(|| panic!("no host {name} in the topology"))
    }

    /// `cmd` run inside `host`'s namespace.
    pub fn command(&self, host: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host(host).ns, program]);
        c
    }

    /// Runs `f` on a thread inside `host`'s namespace: the sockets it opens are that host's.
    pub fn spawn_in<T: Send + 'static>(
        &self,
        host: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<anyhow::Result<T>> {
        let path = format!("/var/run/netns/{}", self.host(host).ns);
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let file = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
            // SAFETY: setns on this thread only, with a descriptor we hold open.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("entering {path}: {}", std::io::Error::last_os_error());
            }
            Ok(f())
        })
    }

    /// Cuts `host` off the network (its link down) or brings it back.
    pub fn set_cut(&self, host: &str, cut: bool) -> anyhow::Result<()> {
        in_ns(&self.host(host).ns, &["ip", "link", "set", "eth0", if cut { "down" } else { "up" }])
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.wan.stop();
        // Deleting one end of a veth pair deletes both at once, unlike a namespace's teardown.
        for e in ["wa", "wb", "ma", "mb"] {
            let _ = run(&["ip", "link", "del", &format!("sr{}{e}", self.index)]);
        }
        for ns in self.namespaces.iter().rev() {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

/// A frame waiting to arrive.
struct Pending {
    at: Instant,
    seq: u64,
    frame: Vec<u8>,
}

impl PartialEq for Pending {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Pending {}
impl PartialOrd for Pending {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Pending {
    // Earliest first in a max-heap.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

struct Direction {
    link: Mutex<Link>,
    queue: Mutex<(BinaryHeap<Pending>, u64)>,
    ready: Condvar,
}

/// The WAN link between the two sites: frames read from one interface with a packet socket and
/// written to the other when the [`Link`] model says they arrive.
pub struct Pipe {
    dirs: Vec<Arc<Direction>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

struct PacketSocket(i32);

impl PacketSocket {
    fn open(dev: &str) -> anyhow::Result<PacketSocket> {
        let name = std::ffi::CString::new(dev)?;
        // SAFETY: plain libc calls with valid arguments; the descriptor is owned by the result.
        unsafe {
            let ifindex = libc::if_nametoindex(name.as_ptr());
            if ifindex == 0 {
                bail!("no interface {dev}");
            }
            let proto = (libc::ETH_P_ALL as u16).to_be();
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto as i32);
            if fd < 0 {
                bail!("packet socket: {}", std::io::Error::last_os_error());
            }
            let s = PacketSocket(fd);
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            addr.sll_ifindex = ifindex as i32;
            let len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            if libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len) < 0 {
                bail!("binding a packet socket to {dev}: {}", std::io::Error::last_os_error());
            }
            let one: i32 = 1;
            // PACKET_IGNORE_OUTGOING: our own writes are not read back.
            libc::setsockopt(fd, libc::SOL_PACKET, 23, &one as *const _ as *const libc::c_void, 4);
            let buf: i32 = 8 << 20;
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, &buf as *const _ as *const libc::c_void, 4);
            libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, &buf as *const _ as *const libc::c_void, 4);
            // Reads wake every 100 ms, so the pipe's threads see their stop flag.
            let tv = libc::timeval { tv_sec: 0, tv_usec: 100_000 };
            let tvlen = std::mem::size_of::<libc::timeval>() as u32;
            if libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv as *const _ as *const libc::c_void, tvlen)
                != 0
            {
                bail!("a read timeout on the packet socket of {dev}: {}", std::io::Error::last_os_error());
            }
            Ok(s)
        }
    }

    /// The next frame that came in (not one this host sent), or None after the read timeout.
    fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: buf and addr are valid for the lengths given.
        unsafe {
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let n = libc::recvfrom(
                self.0,
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
                &mut addr as *mut _ as *mut libc::sockaddr,
                &mut len,
            );
            if n <= 0 || addr.sll_pkttype == libc::PACKET_OUTGOING {
                return None;
            }
            Some(n as usize)
        }
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: frame is valid for its length.
        unsafe { libc::send(self.0, frame.as_ptr() as *const libc::c_void, frame.len(), 0) };
    }
}

impl Drop for PacketSocket {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

impl Pipe {
    fn idle() -> Pipe {
        Pipe { dirs: Vec::new(), stop: Arc::new(AtomicBool::new(true)), threads: Vec::new() }
    }

    /// Carries frames between interfaces `a` and `b` of this namespace.
    pub fn start(a: &str, b: &str, cfg: Impairment, seed: u64) -> anyhow::Result<Pipe> {
        let socks = [Arc::new(PacketSocket::open(a)?), Arc::new(PacketSocket::open(b)?)];
        let stop = Arc::new(AtomicBool::new(false));
        let mut dirs = Vec::new();
        let mut threads = Vec::new();
        for (from, to) in [(0usize, 1usize), (1, 0)] {
            let dir = Arc::new(Direction {
                link: Mutex::new(Link::new(cfg, seed.wrapping_mul(2).wrapping_add(from as u64))),
                queue: Mutex::new((BinaryHeap::new(), 0)),
                ready: Condvar::new(),
            });
            let (rx, d, st) = (socks[from].clone(), dir.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !st.load(Ordering::Relaxed) {
                    let Some(n) = rx.recv(&mut buf) else { continue };
                    let now = Instant::now();
                    let fate = d.link.lock().expect("link lock poisoned").enter(now, n);
                    if fate.arrivals.is_empty() {
                        continue;
                    }
                    let mut q = d.queue.lock().expect("queue lock poisoned");
                    for at in fate.arrivals {
                        q.1 += 1;
                        let seq = q.1;
                        q.0.push(Pending { at, seq, frame: buf[..n].to_vec() });
                    }
                    d.ready.notify_one();
                }
            }));
            let (tx, d, st) = (socks[to].clone(), dir.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut q = d.queue.lock().expect("queue lock poisoned");
                while !st.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    match q.0.peek().map(|p| p.at) {
                        Some(at) if at <= now => {
                            let p = q.0.pop().expect("peeked");
                            drop(q);
                            tx.send(&p.frame);
                            q = d.queue.lock().expect("queue lock poisoned");
                        }
                        Some(at) => q = d.ready.wait_timeout(q, at - now).expect("queue lock poisoned").0,
                        None => q = d.ready.wait_timeout(q, Duration::from_millis(100)).expect("queue lock poisoned").0,
                    }
                }
            }));
            dirs.push(dir);
        }
        Ok(Pipe { dirs, stop, threads })
    }

    /// New settings for both directions (frames already on their way keep their fate).
    pub fn set(&self, cfg: Impairment) {
        for d in &self.dirs {
            d.link.lock().expect("link lock poisoned").cfg = cfg;
        }
    }

    /// Cuts the WAN (both directions) or heals it. Frames already on their way still arrive.
    pub fn set_partitioned(&self, on: bool) {
        for d in &self.dirs {
            d.link.lock().expect("link lock poisoned").set_partitioned(on);
        }
    }

    /// What each direction (A to B, B to A) did so far.
    pub fn counters(&self) -> Vec<Counters> {
        self.dirs.iter().map(|d| d.link.lock().expect("link lock poisoned").counters).collect()
    }

    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for d in &self.dirs {
            d.ready.notify_all();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.stop();
    }
}
