//! Test support shared by the integration tests: a real `freshet serve` child process
//! on an ephemeral port, and a runner for the `freshet` tools with a deadline.

#![allow(dead_code)] // each test file uses a different subset

use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long the broker may take to print its listening line.
const BROKER_START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one tool invocation may run before the test fails.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline for any "wait until the cluster shows X" loop in the tests.
pub const CONDITION_TIMEOUT: Duration = Duration::from_secs(30);

pub fn freshet_exe() -> &'static str {
    env!("CARGO_BIN_EXE_freshet")
}

/// A running `freshet serve`; killed (and its data directory removed) on drop.
pub struct Broker {
    child: Child,
    /// `HOST:PORT` the broker announced.
    pub address: String,
    log_path: PathBuf,
    // Dropped after the child is killed (fields drop after `Drop::drop`).
    _data_dir: tempfile::TempDir,
}

impl Broker {
    pub fn start() -> Broker {
        Broker::start_with_env(&[])
    }

    /// Starts the broker with extra environment variables, e.g. `FRESHET_<KEY>`
    /// settings that have no flag.
    pub fn start_with_env(env: &[(&str, &str)]) -> Broker {
        let data_dir = tempfile::tempdir().expect("create a temporary data directory");
        let log_path = data_dir.path().with_extension("broker.log");
        let log = std::fs::File::create(&log_path).expect("create the broker log file");
        let broker_data = data_dir.path().join("data");
        let mut child = Command::new(freshet_exe())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&broker_data)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .env("FRESHET_HTTP_LISTEN", "off")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn freshet serve");

        // Read the announcement on a thread so a silent broker cannot hang the test,
        // and keep draining stdout afterwards so the broker never blocks on a full pipe.
        let stdout = child.stdout.take().expect("stdout is piped");
        let (lines_tx, lines_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut first = String::new();
            let read = reader.read_line(&mut first);
            let _ = lines_tx.send(read.map(|_| first));
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let line = match lines_rx.recv_timeout(BROKER_START_TIMEOUT) {
            Ok(Ok(line)) => line,
            Ok(Err(err)) => panic!("reading the broker's stdout failed: {err}"),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "broker printed no listening line within {BROKER_START_TIMEOUT:?}; log:\n{}",
                    read_log(&log_path)
                );
            }
        };
        let address = match parse_listening_line(&line) {
            Some(address) => address,
            None => {
                let _ = child.kill();
                let status = child.wait();
                panic!(
                    "unexpected first stdout line from the broker: {line:?} (exit: {status:?}); log:\n{}",
                    read_log(&log_path)
                );
            }
        };
        Broker {
            child,
            address,
            log_path,
            _data_dir: data_dir,
        }
    }

    /// The broker's stderr so far, for failure messages.
    pub fn log(&self) -> String {
        read_log(&self.log_path)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- broker log ({}) ---\n{}",
                self.log_path.display(),
                self.log()
            );
        }
        let _ = std::fs::remove_file(&self.log_path);
    }
}

fn read_log(path: &PathBuf) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|err| format!("(cannot read {}: {err})", path.display()))
}

/// `freshet listening on 127.0.0.1:PORT, data in /abs/path` -> `127.0.0.1:PORT`.
pub fn parse_listening_line(line: &str) -> Option<String> {
    let rest = line.trim_end().strip_prefix("freshet listening on ")?;
    let (address, data) = rest.split_once(", data in ")?;
    if data.is_empty() || !address.contains(':') {
        return None;
    }
    let port: u16 = address.rsplit_once(':')?.1.parse().ok()?;
    (port != 0).then(|| address.to_owned())
}

/// What a finished tool run produced.
#[derive(Debug)]
pub struct ToolOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl ToolOutput {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Panics with everything the tool said unless it exited 0.
    pub fn assert_success(&self, what: &str) -> &Self {
        assert!(
            self.status.success(),
            "{what} failed with {}\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout_text(),
            self.stderr
        );
        self
    }

    /// Panics unless the tool failed and said why on exactly one line of stderr, as
    /// every tool reports an error; returns that line.
    pub fn assert_one_error_line(&self, what: &str) -> &str {
        assert!(!self.status.success(), "{what} must fail: {self:?}");
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one error line: {:?}", self.stderr);
        lines[0]
    }
}

/// `freshet ARGS --brokers ADDR` with `stdin` as its standard input.
pub fn tool(broker: &Broker, args: &[&str], stdin: &[u8]) -> ToolOutput {
    let mut full: Vec<&str> = args.to_vec();
    full.extend(["--brokers", broker.address.as_str()]);
    run_tool(&full, stdin)
}

/// `freshet topic create TOPIC --partitions N`; fails the test unless it succeeds.
pub fn create_topic(broker: &Broker, topic: &str, partitions: u32) {
    let partitions = partitions.to_string();
    tool(
        broker,
        &["topic", "create", topic, "--partitions", &partitions],
        b"",
    )
    .assert_success(&format!("topic create {topic}"));
}

/// Runs `freshet ARGS` with `stdin` as its standard input; fails the test if it runs
/// longer than [`TOOL_TIMEOUT`].
pub fn run_tool(args: &[&str], stdin: &[u8]) -> ToolOutput {
    let mut child = Command::new(freshet_exe())
        .args(args)
        .env_remove("FRESHET_BROKERS")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the freshet tool");
    let mut child_stdin = child.stdin.take().expect("stdin is piped");
    let input = stdin.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = child_stdin.write_all(&input);
        // Dropping child_stdin closes the pipe: the tool sees end of input.
    });
    let stdout = spawn_reader(child.stdout.take().expect("stdout is piped"));
    let stderr = spawn_reader(child.stderr.take().expect("stderr is piped"));

    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the tool") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "freshet {args:?} still running after {TOOL_TIMEOUT:?}; stderr:\n{}",
                String::from_utf8_lossy(&stderr.join().unwrap_or_default())
            );
        }
        // Polling the exit status; std has no wait-with-timeout.
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = writer.join();
    ToolOutput {
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: String::from_utf8_lossy(&stderr.join().expect("stderr reader")).into_owned(),
    }
}

fn spawn_reader(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

/// Polls `condition` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut condition: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = condition() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
