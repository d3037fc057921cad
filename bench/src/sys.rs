//! What the benchmark reads from the operating system: process memory and CPU from /proc,
//! TCP socket states, file descriptor limits, free loopback ports.

use std::net::{SocketAddr, TcpListener};

use anyhow::{Context, bail};

/// Resident memory and CPU time of one process.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    pub rss_kib: u64,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
}

pub fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no memory effects; a non-positive answer falls back to the usual 100.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// VmRSS and utime+stime of `pid` (`self` for this process).
pub fn sample(pid: &str) -> anyhow::Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // Fields after the command name (which may contain spaces) start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("unexpected /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("unexpected /proc/{pid}/stat field {}", i + 3))
    };
    Ok(ProcSample {
        rss_kib,
        cpu_ticks: field(11)? + field(12)?,
    })
}

/// CPU use between two samples as a percentage of one core.
pub fn cpu_pct(before: ProcSample, after: ProcSample, seconds: f64) -> f64 {
    let ticks = after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64;
    if seconds <= 0.0 {
        0.0
    } else {
        100.0 * ticks / clock_ticks_per_second() / seconds
    }
}

pub fn cpu_seconds(before: ProcSample, after: ProcSample) -> f64 {
    after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / clock_ticks_per_second()
}

/// Raises the soft open-files limit to the hard one and checks it fits `needed`.
pub fn raise_nofile(needed: u64) -> anyhow::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit write/read only the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        bail!(
            "cannot read the open-files limit: {}",
            std::io::Error::last_os_error()
        );
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    if lim.rlim_cur < needed {
        bail!(
            "the open-files limit is {} (hard {}), but this run needs about {needed} descriptors in \
             the benchmark process and as many in the plane (one socket per agent each, plus files): \
             raise the hard limit (as root: `ulimit -Hn {}`) or run fewer agents",
            lim.rlim_cur,
            lim.rlim_max,
            needed.max(65536)
        );
    }
    Ok(lim.rlim_cur)
}

/// A loopback port free right now (the kernel picks it; the plane binds it right after).
pub fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
    Ok(l.local_addr()?.port())
}

pub fn free_udp_port() -> anyhow::Result<u16> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").context("finding a free loopback UDP port")?;
    Ok(s.local_addr()?.port())
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// TCP client sockets towards `port` on loopback: (connecting = SYN_SENT, established).
pub fn tcp_clients_to(port: u16) -> (usize, usize) {
    let Ok(text) = std::fs::read_to_string("/proc/net/tcp") else {
        return (0, 0);
    };
    let want = format!(":{port:04X}");
    let (mut connecting, mut established) = (0, 0);
    for line in text.lines().skip(1) {
        let mut cols = line.split_whitespace();
        let (Some(_sl), Some(_local), Some(remote), Some(state)) =
            (cols.next(), cols.next(), cols.next(), cols.next())
        else {
            continue;
        };
        if !remote.ends_with(&want) {
            continue;
        }
        match state {
            "01" => established += 1,
            "02" => connecting += 1,
            _ => {}
        }
    }
    (connecting, established)
}

pub fn memory_total_gib() -> f64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kib| kib / 1024.0 / 1024.0)
        .unwrap_or(0.0)
}

pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// CPU ticks the whole machine spent busy (everything but idle and iowait), from /proc/stat.
pub fn machine_busy_ticks() -> u64 {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            let line = s.lines().next()?.strip_prefix("cpu ")?.to_string();
            let v: Vec<u64> = line
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal ...
            Some(v.iter().take(8).sum::<u64>() - v.get(3)? - v.get(4)?)
        })
        .unwrap_or(0)
}

/// CPU used by processes other than the plane and this one during a window: other engineers'
/// builds on a shared machine skew every figure, so each report says how much there was.
pub struct OtherCpu {
    machine: u64,
    plane: ProcSample,
    fleet: ProcSample,
    start: std::time::Instant,
}

impl OtherCpu {
    pub fn start(plane: ProcSample) -> anyhow::Result<Self> {
        Ok(Self {
            machine: machine_busy_ticks(),
            plane,
            fleet: sample("self")?,
            start: std::time::Instant::now(),
        })
    }

    /// % of one core used by everything else since `start`.
    pub fn pct(&self, plane_now: ProcSample) -> f64 {
        let fleet_now = sample("self")
            .map(|s| s.cpu_ticks)
            .unwrap_or(self.fleet.cpu_ticks);
        let ours = plane_now.cpu_ticks.saturating_sub(self.plane.cpu_ticks)
            + fleet_now.saturating_sub(self.fleet.cpu_ticks);
        let other = machine_busy_ticks()
            .saturating_sub(self.machine)
            .saturating_sub(ours);
        let secs = self.start.elapsed().as_secs_f64();
        if secs <= 0.0 {
            0.0
        } else {
            100.0 * other as f64 / clock_ticks_per_second() / secs
        }
    }
}
