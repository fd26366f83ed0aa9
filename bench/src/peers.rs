//! The peers canopy is measured against, and the load generator: nbdkit
//! serving a plugin on a Unix socket or loopback TCP, and fio's `nbd`
//! engine reading from any NBD server (nbdkit, or canopy's own export).
//! Shared by the workloads so that every one starts, waits for and stops
//! them the same way.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::progress::Progress;

/// Where an NBD server listens.
#[derive(Clone, Debug)]
pub enum Endpoint {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A TCP address (loopback in these benchmarks).
    Tcp(SocketAddr),
}

impl Endpoint {
    /// A loopback TCP endpoint on a port that was free a moment ago (the
    /// kernel picks it; a race with another process is possible but rare).
    pub fn free_tcp() -> Result<Endpoint> {
        let l = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
        Ok(Endpoint::Tcp(l.local_addr()?))
    }

    /// The NBD URI of this endpoint (as fio's `nbd` engine and libnbd take
    /// it).
    pub fn uri(&self) -> String {
        match self {
            Endpoint::Unix(p) => format!("nbd+unix:///?socket={}", p.display()),
            Endpoint::Tcp(a) => format!("nbd://{a}"),
        }
    }

    /// canopy's spelling of it (`--export-nbd unix:PATH` / `tcp:ADDR`).
    pub fn canopy_arg(&self) -> String {
        match self {
            Endpoint::Unix(p) => format!("unix:{}", p.display()),
            Endpoint::Tcp(a) => format!("tcp:{a}"),
        }
    }

    /// Wait until something accepts connections here, or `child` exits, or
    /// `limit` passes.
    pub fn wait_ready(&self, child: &mut Child, what: &str, limit: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let up = match self {
                Endpoint::Unix(p) => std::os::unix::net::UnixStream::connect(p).is_ok(),
                Endpoint::Tcp(a) => {
                    std::net::TcpStream::connect_timeout(a, Duration::from_millis(200)).is_ok()
                }
            };
            if up {
                return Ok(());
            }
            if let Some(status) = child.try_wait()? {
                bail!(
                    "{what} exited before it listened on {}: {status}",
                    self.uri()
                );
            }
            if start.elapsed() > limit {
                bail!("{what} did not listen on {} within {limit:?}", self.uri());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Fail with the install command when a tool is missing (bench/run
/// installs them; a bare `canopy-bench` may run without).
pub fn require(tool: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(anyhow!(
            "{tool} is not installed: run `scripts/install-deps nbdkit fio` (bench/run does)"
        ))
    }
}

/// A child process killed (and reaped) when dropped, so that a failed
/// workload leaves no server behind.
pub struct Server {
    child: Child,
    what: String,
}

impl Server {
    /// Spawn `cmd` (stdout and stderr to `log`) and wait until it listens on
    /// `at`.
    pub fn spawn(mut cmd: Command, what: &str, at: &Endpoint, log: &Path) -> Result<Server> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let mut server = Server {
            child,
            what: what.to_string(),
        };
        at.wait_ready(&mut server.child, what, Duration::from_secs(30))
            .with_context(|| format!("see {}", log.display()))?;
        Ok(server)
    }

    /// The process id (for reading its counters from /proc).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SIGTERM first so servers flush and remove their sockets; SIGKILL
        // if that takes too long.
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "canopy-bench: {} did not stop on SIGTERM within 10 s; killed",
            self.what
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// nbdkit serving `plugin` with `args` (for example `memory`,
/// `["size=1G"]`) at `at`, in the foreground, one thread per connection.
pub fn nbdkit(plugin: &str, args: &[String], at: &Endpoint, log: &Path) -> Result<Server> {
    require("nbdkit")?;
    let mut cmd = Command::new("nbdkit");
    cmd.arg("--foreground").arg("--exit-with-parent");
    match at {
        Endpoint::Unix(p) => {
            cmd.arg("--unix").arg(p);
        }
        Endpoint::Tcp(a) => {
            cmd.arg("--ipaddr")
                .arg(a.ip().to_string())
                .arg("--port")
                .arg(a.port().to_string());
        }
    }
    cmd.arg(plugin).args(args);
    Server::spawn(cmd, &format!("nbdkit {plugin}"), at, log)
}

/// One fio job against an NBD server through fio's `nbd` engine.
#[derive(Clone, Debug)]
pub struct FioJob {
    /// fio's `--rw`: `read`, `randread`, `write`, ...
    pub rw: &'static str,
    /// Block size in bytes.
    pub bs: u64,
    /// Requests in flight.
    pub iodepth: u32,
    /// Bytes each job covers (every block once for a read of this size,
    /// unless `runtime` is set).
    pub size: u64,
    /// Run for this long, looping over `size` (time-based), instead of once
    /// through it.
    pub runtime: Option<Duration>,
    /// fio jobs (each its own NBD connection), summed in the result.
    pub numjobs: u32,
}

/// What a fio run measured, summed over its jobs.
#[derive(Clone, Copy, Debug, Default)]
pub struct FioResult {
    /// Read I/Os per second.
    pub iops: f64,
    /// Read bytes per second.
    pub bytes_per_sec: f64,
    /// Bytes read.
    pub bytes: u64,
    /// Wall time of the longest job.
    pub seconds: f64,
}

/// Run `job` against the NBD server at `uri`, with a spinner named `what`.
pub fn fio(uri: &str, job: &FioJob, progress: &Progress, what: &str) -> Result<FioResult> {
    require("fio")?;
    let spinner = progress.spinner(what);
    let mut cmd = Command::new("fio");
    cmd.args([
        "--name=canopy-bench",
        "--ioengine=nbd",
        "--output-format=json",
        "--eta=never",
        "--randrepeat=1",
        "--group_reporting=0",
    ])
    .arg(format!("--uri={uri}"))
    .arg(format!("--rw={}", job.rw))
    .arg(format!("--bs={}", job.bs))
    .arg(format!("--iodepth={}", job.iodepth))
    .arg(format!("--size={}", job.size))
    .arg(format!("--numjobs={}", job.numjobs));
    if let Some(t) = job.runtime {
        cmd.arg("--time_based")
            .arg(format!("--runtime={}ms", t.as_millis()));
    }
    let out = cmd.stdin(Stdio::null()).output().context("running fio")?;
    spinner.finish_and_clear();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "fio against {uri} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            stdout
        );
    }
    parse_fio_json(&stdout).with_context(|| format!("reading fio's report of {uri}"))
}

/// fio's JSON report (the `nbd` engine prints a line before it) summed
/// over jobs.
fn parse_fio_json(text: &str) -> Result<FioResult> {
    let start = text
        .find('{')
        .ok_or_else(|| anyhow!("no JSON in fio's output: {text}"))?;
    let v: serde_json::Value = serde_json::from_str(&text[start..]).context("parsing fio JSON")?;
    let jobs = v["jobs"]
        .as_array()
        .ok_or_else(|| anyhow!("fio JSON has no jobs"))?;
    let mut r = FioResult::default();
    for j in jobs {
        let read = &j["read"];
        r.iops += read["iops"].as_f64().unwrap_or(0.0);
        r.bytes_per_sec += read["bw_bytes"].as_f64().unwrap_or(0.0);
        r.bytes += read["io_bytes"].as_u64().unwrap_or(0);
        let secs = read["runtime"].as_f64().unwrap_or(0.0) / 1000.0;
        r.seconds = r.seconds.max(secs);
    }
    if r.bytes == 0 {
        bail!("fio read nothing");
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_json_after_the_nbd_engines_banner_is_summed_over_jobs() {
        let text = "fio: connected to NBD server\n{\"jobs\":[\
            {\"read\":{\"iops\":10.0,\"bw_bytes\":100.0,\"io_bytes\":1000,\"runtime\":2000}},\
            {\"read\":{\"iops\":5.0,\"bw_bytes\":50.0,\"io_bytes\":500,\"runtime\":3000}}]}";
        let r = parse_fio_json(text).unwrap();
        assert_eq!(r.iops, 15.0);
        assert_eq!(r.bytes_per_sec, 150.0);
        assert_eq!(r.bytes, 1500);
        assert_eq!(r.seconds, 3.0);
        assert!(parse_fio_json("no json").is_err());
        assert!(parse_fio_json("{\"jobs\":[{\"read\":{\"io_bytes\":0}}]}").is_err());
    }

    #[test]
    fn fio_reads_from_nbdkit_on_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let at = Endpoint::Unix(dir.path().join("nbd.sock"));
        let server = nbdkit("memory", &["size=4M".into()], &at, &dir.path().join("log")).unwrap();
        let job = FioJob {
            rw: "read",
            bs: 65536,
            iodepth: 4,
            size: 4 << 20,
            runtime: None,
            numjobs: 2,
        };
        let r = fio(&at.uri(), &job, &Progress::new(), "test").unwrap();
        // Two jobs, each once through the 4 MiB.
        assert_eq!(r.bytes, 8 << 20);
        assert!(r.iops > 0.0 && r.bytes_per_sec > 0.0);
        drop(server);
        assert!(fio(&at.uri(), &job, &Progress::new(), "test").is_err());
    }

    #[test]
    fn endpoints_spell_their_uris() {
        let u = Endpoint::Unix("/tmp/s.sock".into());
        assert_eq!(u.uri(), "nbd+unix:///?socket=/tmp/s.sock");
        assert_eq!(u.canopy_arg(), "unix:/tmp/s.sock");
        let t = Endpoint::Tcp("127.0.0.1:10809".parse().unwrap());
        assert_eq!(t.uri(), "nbd://127.0.0.1:10809");
        assert_eq!(t.canopy_arg(), "tcp:127.0.0.1:10809");
    }
}
