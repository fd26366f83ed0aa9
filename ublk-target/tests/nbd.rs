//! `canopy-ublk add --no-device --export-nbd`: the daemon as a process on a
//! temporary origin file, driven by real NBD clients (nbdinfo, nbdcopy,
//! nbdfuse under a loop device with ext4 on it) and by a raw client that
//! speaks the protocol byte by byte, well and badly.
//!
//! The tools come from Debian's `libnbd-bin` (`scripts/install-deps`). A
//! test whose tool is missing fails under CI (the `CI` variable set) and is
//! skipped elsewhere with the reason printed. The ext4 test also needs
//! root (losetup, mount), and the same rule applies.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use canopy_ublk::nbd::wire::{self, Request};

/// A running `canopy-ublk add --no-device` daemon.
struct Daemon {
    child: Child,
    uri: String,
    socket: Option<PathBuf>,
    stderr: PathBuf,
}

impl Daemon {
    /// Start serving `origin` (created with `size` if given) on `export`,
    /// with extra `add` flags, and wait for the URI it prints when ready.
    fn start(
        dir: &Path,
        origin: &Path,
        size: Option<&str>,
        export: &str,
        extra: &[&str],
    ) -> Daemon {
        let stderr = dir.join(format!("daemon-{}.log", std::process::id()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_canopy-ublk"));
        cmd.args(["add", "--no-device", "--origin"])
            .arg(origin)
            .args(["--export-nbd", export])
            .args(extra);
        if let Some(s) = size {
            cmd.args(["--size", s]);
        }
        let mut child = cmd
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).expect("daemon log"))
            .spawn()
            .expect("start canopy-ublk");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("piped stdout");
        // Blocks until the daemon prints its URI, or exits (end of file).
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the daemon's stdout");
        let uri = line.trim().to_string();
        if uri.is_empty() {
            let _ = child.wait();
            panic!(
                "daemon exited before serving: {}",
                std::fs::read_to_string(&stderr).unwrap_or_default()
            );
        }
        let socket = uri.strip_prefix("nbd+unix:///?socket=").map(PathBuf::from);
        Daemon {
            child,
            uri,
            socket,
            stderr,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn assert_alive(&mut self) {
        assert!(
            self.child.try_wait().expect("try_wait").is_none(),
            "the daemon died: {}",
            self.log()
        );
    }

    /// Peak resident memory of the daemon, in KiB.
    fn peak_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM")
    }

    /// SIGTERM, and the clean exit that must follow.
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let status = self.child.wait().expect("wait for the daemon");
        assert!(status.success(), "daemon exit {status}: {}", self.log());
        if let Some(s) = &self.socket {
            assert!(!s.exists(), "the socket outlived the daemon");
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // After a failed assertion: never leave a daemon behind.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The path of `tool`, or `None` (test skipped) when it is missing outside
/// CI. Under CI a missing tool fails the test.
fn tool(tool: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        missing(&format!("{tool} is not installed (scripts/install-deps)"));
    }
    found
}

fn missing(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{why}");
    }
    // Straight to the descriptor: libtest captures eprintln!, and a skip
    // should be seen without --nocapture.
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

/// Deterministic pseudo-random bytes (xorshift), so a failure reproduces.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn nbdinfo_sees_the_size_and_flags() {
    let Some(nbdinfo) = tool("nbdinfo") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = format!("unix:{}", dir.path().join("v.sock").display());
    // Both kinds of address; TCP port 0 picks a free port, printed back.
    for export in [sock.as_str(), "tcp:127.0.0.1:0"] {
        let origin = dir.path().join("vol");
        let _ = std::fs::remove_file(&origin);
        let d = Daemon::start(
            dir.path(),
            &origin,
            Some("48M"),
            export,
            &["--chunk-size", "128K"],
        );
        let json = run(Command::new(&nbdinfo).arg("--json").arg(&d.uri));
        let v: serde_json::Value = serde_json::from_str(&json).expect("nbdinfo --json");
        let e = &v["exports"][0];
        assert_eq!(e["export-size"], 48 << 20, "{json}");
        for flag in [
            "can_flush",
            "can_fua",
            "can_trim",
            "can_zero",
            "can_multi_conn",
        ] {
            assert_eq!(e[flag], true, "{flag}: {json}");
        }
        assert_eq!(e["is_read_only"], false, "{json}");
        assert_eq!(e["block_size_minimum"], 512, "{json}");
        assert_eq!(e["block_size_preferred"], 128 << 10, "{json}");
        assert_eq!(e["block_size_maximum"], 32 << 20, "{json}");
        d.stop();
    }
}

#[test]
fn nbdcopy_round_trips_and_the_origin_has_the_data() {
    let Some(nbdcopy) = tool("nbdcopy") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let input = dir.path().join("in");
    let data = pattern(24 << 20, 0x5eed);
    std::fs::write(&input, &data).expect("write input");
    for (i, mode) in ["writethrough", "writeback"].into_iter().enumerate() {
        let origin = dir.path().join(format!("vol-{mode}"));
        let sock = format!("unix:{}", dir.path().join(format!("{mode}.sock")).display());
        // A memory tier smaller than the volume, so chunks are evicted (and
        // in writeback mode written back) while the copy runs. The
        // writeback run commits its tier at start: that must change
        // nothing a client sees.
        let mut flags = vec!["--cache-mode", mode, "--cache-mem", "4M"];
        if mode == "writeback" {
            flags.push("--cache-prefault");
        }
        let d = Daemon::start(dir.path(), &origin, Some("24M"), &sock, &flags);
        // nbdcopy uses several connections (the export allows multi-conn)
        // and many requests in flight on each.
        run(Command::new(&nbdcopy).arg(&input).arg(&d.uri));
        let output = dir.path().join(format!("out-{i}"));
        run(Command::new(&nbdcopy).arg(&d.uri).arg(&output));
        assert!(
            std::fs::read(&output).expect("read output") == data,
            "{mode}: copied out differs from copied in"
        );
        d.stop();
        // After a clean stop every write is on the origin.
        assert!(
            std::fs::read(&origin).expect("read origin") == data,
            "{mode}: origin differs after the stop"
        );
    }
}

/// A tree leaf exported over NBD: the data goes through the leaf's node to
/// an in-process root, and is on the root's origin once the leaf stops.
#[test]
fn a_tree_leaf_exports_over_nbd() {
    let Some(nbdcopy) = tool("nbdcopy") else {
        return;
    };
    use canopy_peerd::config::{PeerConfig, PeerRole, Size};
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let root_origin = dir.path().join("root.img");
    let mut c = PeerConfig::new(PeerRole::Root, "vol");
    c.listen = Some("127.0.0.1:0".into());
    c.origin = Some(root_origin.clone());
    c.size = Some(Size(16 << 20));
    c.chunk_size = Some(Size(64 << 10));
    c.validate("test").expect("root config");
    let root = rt.block_on(async {
        let root = canopy_peerd::start_peer(&c).await.expect("root starts");
        root.ready().await.expect("root ready");
        root
    });
    let parent = root.local_addr().expect("root listens").to_string();
    let sock = format!("unix:{}", dir.path().join("leaf.sock").display());
    // The leaf has no --origin: it gets size and chunks from the root.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_canopy-ublk"));
    let log = dir.path().join("leaf.log");
    cmd.args([
        "add",
        "--parent",
        &parent,
        "--volume",
        "vol",
        "--no-device",
        "--export-nbd",
        &sock,
    ])
    .env("RUST_LOG", "info")
    .stdout(Stdio::piped())
    .stderr(std::fs::File::create(&log).expect("log"));
    let mut child = cmd.spawn().expect("start the leaf");
    let mut uri = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut uri)
        .expect("read the leaf's stdout");
    let d = Daemon {
        child,
        uri: uri.trim().to_string(),
        socket: Some(dir.path().join("leaf.sock")),
        stderr: log,
    };
    assert!(!d.uri.is_empty(), "leaf did not start: {}", d.log());

    let input = dir.path().join("in");
    let data = pattern(16 << 20, 77);
    std::fs::write(&input, &data).expect("write input");
    run(Command::new(&nbdcopy).arg(&input).arg(&d.uri));
    let output = dir.path().join("out");
    run(Command::new(&nbdcopy).arg(&d.uri).arg(&output));
    assert!(
        std::fs::read(&output).expect("read") == data,
        "copied out differs"
    );
    d.stop();
    rt.block_on(root.shutdown());
    assert!(
        std::fs::read(&root_origin).expect("root origin") == data,
        "the root's origin lacks the leaf's writes"
    );
}

/// Undoes the ext4 test's mounts and devices, also after a failed
/// assertion, in reverse order.
#[derive(Default)]
struct Mounts {
    fs: Option<PathBuf>,
    loopdev: Option<String>,
    fuse: Option<PathBuf>,
    nbdfuse: Option<Child>,
}

impl Drop for Mounts {
    fn drop(&mut self) {
        if let Some(fs) = self.fs.take() {
            let _ = Command::new("umount").arg(&fs).status();
        }
        if let Some(dev) = self.loopdev.take() {
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
        if let Some(m) = self.fuse.take() {
            let _ = Command::new("umount").arg(&m).status();
        }
        if let Some(mut c) = self.nbdfuse.take() {
            if let Ok(None) = c.try_wait() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

#[test]
fn ext4_on_nbdfuse_and_a_loop_device() {
    let tools = [
        "nbdfuse",
        "losetup",
        "mkfs.ext4",
        "fsck.ext4",
        "mount",
        "umount",
    ];
    let paths: Vec<_> = tools.iter().map(|t| tool(t)).collect();
    if paths.iter().any(Option::is_none) {
        return;
    }
    if !nix::unistd::geteuid().is_root() {
        missing("losetup and mount need root");
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        missing("/dev/fuse is missing");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = dir.path().join("vol");
    let sock = format!("unix:{}", dir.path().join("v.sock").display());
    // Writeback, so the origin is right only if FLUSH and the final
    // write-back on stop work.
    let d = Daemon::start(
        dir.path(),
        &origin,
        Some("64M"),
        &sock,
        &["--cache-mode", "writeback", "--cache-mem", "8M"],
    );
    let fuse_dir = dir.path().join("fuse");
    let fs_dir = dir.path().join("fs");
    std::fs::create_dir(&fuse_dir).expect("mkdir");
    std::fs::create_dir(&fs_dir).expect("mkdir");
    let mut m = Mounts::default();

    // nbdfuse writes its pid file once the FUSE file is there.
    let pidfile = dir.path().join("nbdfuse.pid");
    let fuse_log = dir.path().join("nbdfuse.log");
    m.nbdfuse = Some(
        Command::new("nbdfuse")
            .arg("-P")
            .arg(&pidfile)
            .arg(&fuse_dir)
            .arg(&d.uri)
            .stderr(std::fs::File::create(&fuse_log).expect("log"))
            .spawn()
            .expect("start nbdfuse"),
    );
    m.fuse = Some(fuse_dir.clone());
    // Bounded: 600 polls of 100 ms. Not a timing assertion, a hang guard.
    for _ in 0..600 {
        if pidfile.exists() {
            break;
        }
        if let Some(Ok(Some(status))) = m.nbdfuse.as_mut().map(Child::try_wait) {
            panic!(
                "nbdfuse exited ({status}): {}",
                std::fs::read_to_string(&fuse_log).unwrap_or_default()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let image = fuse_dir.join("nbd");
    assert!(image.exists(), "nbdfuse did not make {}", image.display());

    let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(&image))
        .trim()
        .to_string();
    m.loopdev = Some(dev.clone());
    run(Command::new("mkfs.ext4").args(["-q", &dev]));
    run(Command::new("mount").arg(&dev).arg(&fs_dir));
    m.fs = Some(fs_dir.clone());
    let mut files = Vec::new();
    std::fs::create_dir(fs_dir.join("d")).expect("mkdir in ext4");
    for i in 0..40u64 {
        let name = fs_dir.join("d").join(format!("f{i}"));
        // From a few bytes to 1.5 MiB: small files, and extents that span
        // several 64 KiB chunks.
        let data = pattern(((i * 37_000) % 1_500_000 + 3) as usize, i + 1);
        std::fs::write(&name, &data).expect("write into ext4");
        files.push((name, data));
    }
    run(&mut Command::new("sync"));
    run(Command::new("umount").arg(&fs_dir));
    m.fs = None;
    run(Command::new("fsck.ext4").args(["-f", "-n", &dev]));
    run(Command::new("mount").arg(&dev).arg(&fs_dir));
    m.fs = Some(fs_dir.clone());
    for (name, data) in &files {
        assert!(
            &std::fs::read(name).expect("read back") == data,
            "{} differs after remount",
            name.display()
        );
    }
    run(Command::new("umount").arg(&fs_dir));
    m.fs = None;
    run(Command::new("losetup").args(["-d", &dev]));
    m.loopdev = None;
    run(Command::new("umount").arg(&fuse_dir));
    m.fuse = None;
    if let Some(mut c) = m.nbdfuse.take() {
        c.wait().expect("nbdfuse exits once unmounted");
    }
    d.stop();
    // The origin alone holds a clean filesystem after the daemon stopped.
    run(Command::new("fsck.ext4").args(["-f", "-n"]).arg(&origin));
}

/// A client speaking NBD byte by byte.
struct Raw(UnixStream);

impl Raw {
    fn connect(path: &Path) -> Raw {
        Raw(UnixStream::connect(path).expect("connect"))
    }

    /// Read the greeting and send the client flags.
    fn hello(path: &Path, flags: u32) -> Raw {
        let mut c = Raw::connect(path);
        let mut g = [0u8; wire::GREETING_LEN];
        c.0.read_exact(&mut g).expect("greeting");
        assert_eq!(g, wire::greeting());
        c.send(&flags.to_be_bytes());
        c
    }

    /// A full handshake with NBD_OPT_GO.
    fn go(path: &Path) -> Raw {
        let mut c = Raw::hello(path, wire::FLAG_C_FIXED_NEWSTYLE | wire::FLAG_C_NO_ZEROES);
        let data = wire::encode_info_data(b"", &[wire::INFO_BLOCK_SIZE]).expect("info data");
        c.option(wire::OPT_GO, &data);
        loop {
            let (h, _) = c.option_reply();
            if h.reply == wire::REP_ACK {
                return c;
            }
            assert_eq!(h.reply, wire::REP_INFO);
        }
    }

    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).expect("send");
    }

    /// Send what the server may stop reading at any point (it hangs up on
    /// a violation), so a failed send is expected.
    fn send_lossy(&mut self, b: &[u8]) {
        let _ = self.0.write_all(b);
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        self.send(&wire::encode_option_header(option, data.len() as u32));
        self.send(data);
    }

    fn option_reply(&mut self) -> (wire::OptionReplyHeader, Vec<u8>) {
        let mut h = [0u8; 20];
        self.0.read_exact(&mut h).expect("option reply");
        let h = wire::parse_option_reply_header(&h).expect("option reply magic");
        assert!(h.len < 4096, "option reply of {} bytes", h.len);
        let mut data = vec![0u8; h.len as usize];
        self.0.read_exact(&mut data).expect("option reply data");
        (h, data)
    }

    fn request(&mut self, command: u16, flags: u16, handle: u64, offset: u64, len: u32) {
        let r = Request {
            flags,
            command,
            handle,
            offset,
            len,
        };
        self.send(&wire::encode_request(&r));
    }

    fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; wire::SIMPLE_REPLY_LEN];
        self.0.read_exact(&mut h).expect("reply");
        wire::parse_simple_reply(&h).expect("reply magic")
    }

    fn data(&mut self, n: usize) -> Vec<u8> {
        let mut d = vec![0u8; n];
        self.0.read_exact(&mut d).expect("read data");
        d
    }

    fn read(&mut self, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        self.request(wire::CMD_READ, 0, handle, offset, len);
        assert_eq!(self.reply(), (0, handle));
        self.data(len as usize)
    }

    /// Half-close, then expect the server to close too (end of file, or a
    /// reset), whatever it had to say before.
    fn expect_closed(mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Write);
        let mut sink = Vec::new();
        let _ = self.0.read_to_end(&mut sink);
        assert!(
            sink.len() < 1 << 20,
            "server answered garbage with {} bytes",
            sink.len()
        );
    }
}

#[test]
fn commands_answer_as_specified_and_requests_pipeline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = dir.path().join("vol");
    let path = dir.path().join("v.sock");
    let d = Daemon::start(
        dir.path(),
        &origin,
        Some("8M"),
        &format!("unix:{}", path.display()),
        &["--cache-mem", "1M", "--cache-mode", "writeback"],
    );
    let mut c = Raw::go(&path);

    // 64 writes in flight at once, then 64 reads, replies in any order.
    let n = 64u64;
    let block = 64 << 10;
    for h in 0..n {
        c.request(wire::CMD_WRITE, 0, h, h * block as u64, block);
        c.send(&pattern(block as usize, h + 100));
    }
    let mut seen = HashMap::new();
    for _ in 0..n {
        let (err, h) = c.reply();
        assert_eq!(err, 0);
        assert!(seen.insert(h, ()).is_none(), "handle {h} answered twice");
    }
    for h in 0..n {
        c.request(wire::CMD_READ, 0, 1000 + h, h * block as u64, block);
    }
    for _ in 0..n {
        let (err, h) = c.reply();
        assert_eq!(err, 0);
        let got = c.data(block as usize);
        assert!(
            got == pattern(block as usize, h - 1000 + 100),
            "read {h} differs"
        );
    }

    // FLUSH and FUA.
    c.request(wire::CMD_FLUSH, 0, 1, 0, 0);
    assert_eq!(c.reply(), (0, 1));
    c.request(wire::CMD_WRITE, wire::CMD_FLAG_FUA, 2, 0, 512);
    c.send(&[7u8; 512]);
    assert_eq!(c.reply(), (0, 2));
    assert_eq!(c.read(3, 0, 512), vec![7u8; 512]);

    // TRIM and WRITE_ZEROES (with and without NO_HOLE, with FUA): zeros,
    // partial chunks included.
    c.request(wire::CMD_TRIM, 0, 4, 65536 + 512, 2 * 65536);
    assert_eq!(c.reply(), (0, 4));
    assert_eq!(c.read(5, 65536 + 512, 2 * 65536), vec![0u8; 2 * 65536]);
    assert_ne!(c.read(6, 65536, 512), vec![0u8; 512], "trim went too far");
    let nh = wire::CMD_FLAG_NO_HOLE | wire::CMD_FLAG_FUA;
    c.request(wire::CMD_WRITE_ZEROES, nh, 7, 10 * 65536, 3 * 65536 + 1024);
    assert_eq!(c.reply(), (0, 7));
    assert_eq!(
        c.read(8, 10 * 65536, 3 * 65536 + 1024),
        vec![0u8; 3 * 65536 + 1024]
    );
    c.request(wire::CMD_WRITE_ZEROES, 0, 9, 20 * 65536, 65536);
    assert_eq!(c.reply(), (0, 9));
    assert_eq!(c.read(10, 20 * 65536, 65536), vec![0u8; 65536]);

    // Errors: and the stream stays in step after each (a read follows).
    let size = 8u64 << 20;
    let cases: [(u16, u16, u64, u32, u32); 9] = [
        (wire::CMD_READ, 0, size, 512, wire::EINVAL),
        (wire::CMD_READ, 0, size - 512, 1024, wire::EINVAL),
        (wire::CMD_TRIM, 0, size, 512, wire::EINVAL),
        (wire::CMD_WRITE_ZEROES, 0, size, 512, wire::ENOSPC),
        (wire::CMD_READ, 0, 100, 512, wire::EINVAL),
        (wire::CMD_READ, 0, 0, 100, wire::EINVAL),
        (wire::CMD_READ, 0, 0, 64 << 20, wire::EINVAL),
        (wire::CMD_READ, wire::CMD_FLAG_NO_HOLE, 0, 512, wire::EINVAL),
        (42, 0, 0, 512, wire::EINVAL),
    ];
    for (i, (cmd, flags, offset, len, want)) in cases.into_iter().enumerate() {
        let h = 500 + i as u64;
        c.request(cmd, flags, h, offset, len);
        assert_eq!(c.reply(), (want, h), "case {i}");
    }
    // A refused WRITE's payload is consumed, not taken for requests.
    c.request(wire::CMD_WRITE, 0, 600, size, 4096);
    c.send(&pattern(4096, 3));
    assert_eq!(c.reply(), (wire::ENOSPC, 600));
    c.request(wire::CMD_WRITE, 0, 601, 3, 512);
    c.send(&[0xff; 512]);
    assert_eq!(c.reply(), (wire::EINVAL, 601));
    assert_eq!(c.read(602, 0, 512), vec![7u8; 512]);

    // A second connection sees the first one's writes (multi-conn).
    let mut c2 = Raw::go(&path);
    assert_eq!(c2.read(1, 0, 512), vec![7u8; 512]);
    c2.request(wire::CMD_DISC, 0, 0, 0, 0);
    c2.expect_closed();

    c.request(wire::CMD_DISC, 0, 0, 0, 0);
    c.expect_closed();
    d.stop();
    let on_disk = std::fs::read(&origin).expect("origin");
    assert_eq!(&on_disk[..512], &[7u8; 512]);
    assert_eq!(
        &on_disk[65536 + 512..3 * 65536 + 512],
        &vec![0u8; 2 * 65536][..]
    );
}

#[test]
fn hostile_clients_do_not_hurt_the_daemon() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = dir.path().join("vol");
    let path = dir.path().join("v.sock");
    let mut d = Daemon::start(
        dir.path(),
        &origin,
        Some("8M"),
        &format!("unix:{}", path.display()),
        &["--cache-mem", "1M"],
    );
    let fixed = wire::FLAG_C_FIXED_NEWSTYLE;

    // Garbage instead of client flags.
    let mut c = Raw::connect(&path);
    c.send_lossy(&pattern(5000, 9));
    c.expect_closed();
    // An unknown client flag.
    Raw::hello(&path, 0x8000_0000).expect_closed();
    // A bad option magic.
    let mut c = Raw::hello(&path, fixed);
    c.send_lossy(&[0x55; 16]);
    c.expect_closed();
    // An option claiming 4 GiB of data: dropped, not allocated or read.
    let mut c = Raw::hello(&path, fixed);
    c.send(&wire::encode_option_header(wire::OPT_GO, u32::MAX));
    c.expect_closed();
    // An export name of 4 GiB likewise.
    let mut c = Raw::hello(&path, fixed);
    c.send(&wire::encode_option_header(wire::OPT_EXPORT_NAME, u32::MAX));
    c.expect_closed();
    // A non-fixed client may only ask for an export name.
    let mut c = Raw::hello(&path, 0);
    c.option(wire::OPT_LIST, &[]);
    c.expect_closed();

    // Refused options leave the handshake going.
    let mut c = Raw::hello(&path, fixed);
    c.option(wire::OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.option_reply().0.reply, wire::REP_ERR_UNSUP);
    c.option(wire::OPT_STARTTLS, &[]);
    assert_eq!(c.option_reply().0.reply, wire::REP_ERR_UNSUP);
    c.option(0xdead, &[1, 2, 3]);
    assert_eq!(c.option_reply().0.reply, wire::REP_ERR_UNSUP);
    c.option(wire::OPT_GO, &[0, 0, 0, 200, 1]);
    assert_eq!(c.option_reply().0.reply, wire::REP_ERR_INVALID);
    c.option(wire::OPT_LIST, &[1]);
    assert_eq!(c.option_reply().0.reply, wire::REP_ERR_INVALID);
    c.option(0xbeef, &vec![0u8; 100 << 10]);
    assert_eq!(c.option_reply().0.reply, wire::REP_ERR_TOO_BIG);
    c.option(wire::OPT_LIST, &[]);
    let (h, data) = c.option_reply();
    assert_eq!((h.reply, data), (wire::REP_SERVER, vec![0, 0, 0, 0]));
    assert_eq!(c.option_reply().0.reply, wire::REP_ACK);
    c.option(wire::OPT_ABORT, &[]);
    assert_eq!(c.option_reply().0.reply, wire::REP_ACK);
    c.expect_closed();

    // Options without end.
    let mut c = Raw::hello(&path, fixed);
    for _ in 0..300 {
        c.send_lossy(&wire::encode_option_header(0xdead, 0));
    }
    c.expect_closed();

    // In transmission: a bad request magic, then a WRITE of 4 GiB (too
    // large to even skip), then garbage after a valid request.
    let mut c = Raw::go(&path);
    c.send_lossy(&[0x42; wire::REQUEST_LEN]);
    c.expect_closed();
    let mut c = Raw::go(&path);
    c.request(wire::CMD_WRITE, 0, 1, 0, u32::MAX);
    c.expect_closed();
    let mut c = Raw::go(&path);
    assert_eq!(c.read(1, 0, 512).len(), 512);
    c.send_lossy(&pattern(100_000, 4));
    c.expect_closed();
    // A client that hangs up with requests in flight.
    let mut c = Raw::go(&path);
    for h in 0..32 {
        c.request(wire::CMD_READ, 0, h, 0, 1 << 20);
    }
    drop(c);

    // Still serving, in full.
    d.assert_alive();
    let mut c = Raw::go(&path);
    c.request(wire::CMD_WRITE, 0, 1, 4096, 512);
    c.send(&[9u8; 512]);
    assert_eq!(c.reply(), (0, 1));
    assert_eq!(c.read(2, 4096, 512), vec![9u8; 512]);
    c.request(wire::CMD_DISC, 0, 0, 0, 0);
    c.expect_closed();
    // Nothing a client claimed was allocated: far below the 4 GiB asked.
    let peak = d.peak_rss_kib();
    assert!(peak < 256 << 10, "daemon peaked at {peak} KiB");
    d.assert_alive();
    let log_path = d.stderr.clone();
    d.stop();
    // Each violation ended its own connection for the stated reason (read
    // after the stop, when every line is written).
    let log = std::fs::read_to_string(log_path).expect("daemon log");
    for reason in [
        "include flags the server did not offer",
        "is not IHAVEOPT",
        "option 7 with 4294967295 bytes",
        "option 1 with 4294967295 bytes",
        "did not negotiate fixed newstyle",
        "more than 256 options",
        "request magic 0x42424242",
        "WRITE of 4294967295 bytes",
    ] {
        assert!(log.contains(reason), "no {reason:?} in the log: {log}");
    }
}

/// SIGTERM stops the daemon even when its socket file was removed under it
/// (a stop must not depend on reaching the listener by name).
#[test]
fn stops_when_its_socket_file_is_gone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("v.sock");
    let d = Daemon::start(
        dir.path(),
        &dir.path().join("vol"),
        Some("1M"),
        &format!("unix:{}", path.display()),
        &[],
    );
    std::fs::remove_file(&path).expect("remove the socket");
    d.stop();
}

/// Misuse of the flags is refused in one line, before anything is served.
#[test]
fn bad_export_flags_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let origin = dir.path().join("vol");
    let o = origin.to_str().expect("utf-8");
    let refused = |args: &[&str], needle: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_canopy-ublk"))
            .args(args)
            .env("RUST_LOG", "off")
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            stderr.contains(needle),
            "{args:?}: expected {needle:?} in {stderr}"
        );
    };
    refused(
        &[
            "add",
            "--origin",
            o,
            "--size",
            "1M",
            "--no-device",
            "--export-nbd",
            "nbd:x",
        ],
        "unix:PATH or tcp:HOST:PORT",
    );
    refused(
        &["add", "--origin", o, "--size", "1M", "--no-device"],
        "--export-nbd",
    );
    // A path that is not a stale socket is never replaced.
    std::fs::write(dir.path().join("taken"), b"x").expect("write");
    let taken = format!("unix:{}", dir.path().join("taken").display());
    refused(
        &[
            "add",
            "--origin",
            o,
            "--size",
            "1M",
            "--no-device",
            "--export-nbd",
            &taken,
        ],
        "not a socket",
    );
    assert_eq!(std::fs::read(dir.path().join("taken")).expect("read"), b"x");
}
