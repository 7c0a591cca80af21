//! [`LocalCluster`]: a `udfsql-scheduler` and `udfsql-executor`s started as processes on
//! 127.0.0.1 with free ports, for tests, benchmarks and trying udfsql on Ballista on one machine.

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long [`LocalCluster::start`] waits for a process to listen, and
/// [`Process::terminate`] for one to exit.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// One executor of a [`LocalCluster`].
#[derive(Debug, Clone)]
pub struct ExecutorSpec {
    /// Its `--id` (named in its errors).
    pub id: String,
    /// Its `--plugin-dir`.
    pub plugin_dir: PathBuf,
    /// Its task slots (`--vcores`).
    pub vcores: usize,
}

/// More arguments for the processes of a [`LocalCluster`].
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Added to `udfsql-scheduler`'s arguments (`--plugin-dir DIR`, ...).
    pub scheduler_args: Vec<String>,
    /// Added to every `udfsql-executor`'s arguments (`--isolate`, `--worker-memory MIB`, ...).
    pub executor_args: Vec<String>,
}

/// A scheduler and executors running as child processes; killed when dropped unless
/// [`shutdown`](LocalCluster::shutdown) ended them first.
#[derive(Debug)]
pub struct LocalCluster {
    /// `df://127.0.0.1:PORT`, for [`connect`](crate::connect) and `udfsql --ballista`.
    pub url: String,
    /// The scheduler.
    pub scheduler: Process,
    /// The executors, in the order they were given.
    pub executors: Vec<Process>,
}

impl LocalCluster {
    /// Starts `udfsql-scheduler` (round-robin task distribution) and one `udfsql-executor` per
    /// spec, from the programs in `programs` (a cargo profile directory such as
    /// `target/debug`); logs and the executors' work directories go to `dir`. Returns once every
    /// executor serves its ports (it registers with the scheduler before it does).
    pub fn start(programs: &Path, dir: &Path, executors: &[ExecutorSpec]) -> Result<LocalCluster> {
        Self::start_with(programs, dir, executors, &ClusterOptions::default())
    }

    /// [`start`](LocalCluster::start) with more arguments for the processes.
    pub fn start_with(
        programs: &Path,
        dir: &Path,
        executors: &[ExecutorSpec],
        options: &ClusterOptions,
    ) -> Result<LocalCluster> {
        let scheduler_port = free_port()?;
        let port = scheduler_port.to_string();
        let mut args = vec![
            "--bind-host",
            "127.0.0.1",
            "--external-host",
            "127.0.0.1",
            "--bind-port",
            &port,
            "--task-distribution",
            "round-robin",
        ];
        args.extend(options.scheduler_args.iter().map(String::as_str));
        let mut scheduler =
            Process::start("scheduler", &programs.join("udfsql-scheduler"), &args, dir)?;
        scheduler.wait_for_port(scheduler_port)?;
        let mut started = Vec::new();
        for spec in executors {
            let work = dir.join(format!("{}-work", spec.id));
            std::fs::create_dir_all(&work)
                .with_context(|| format!("cannot create {}", work.display()))?;
            let (flight, grpc) = (free_port()?, free_port()?);
            let (flight_port, grpc_port, vcores) = (
                flight.to_string(),
                grpc.to_string(),
                spec.vcores.to_string(),
            );
            let (work_dir, plugin_dir) = (
                work.display().to_string(),
                spec.plugin_dir.display().to_string(),
            );
            let mut args = vec![
                "--id",
                &spec.id,
                "--bind-host",
                "127.0.0.1",
                "--external-host",
                "127.0.0.1",
                "--bind-port",
                &flight_port,
                "--bind-grpc-port",
                &grpc_port,
                "--scheduler-host",
                "127.0.0.1",
                "--scheduler-port",
                &port,
                "--vcores",
                &vcores,
                "--work-dir",
                &work_dir,
                "--plugin-dir",
                &plugin_dir,
            ];
            args.extend(options.executor_args.iter().map(String::as_str));
            let mut executor =
                Process::start(&spec.id, &programs.join("udfsql-executor"), &args, dir)?;
            executor.wait_for_port(grpc)?;
            executor.wait_for_port(flight)?;
            started.push(executor);
        }
        Ok(LocalCluster {
            url: format!("df://127.0.0.1:{scheduler_port}"),
            scheduler,
            executors: started,
        })
    }

    /// Ends the executors, then the scheduler, each with SIGTERM, and returns each one's name and
    /// exit code (`None`: ended by a signal).
    pub fn shutdown(self) -> Result<Vec<(String, Option<i32>)>> {
        let mut codes = Vec::new();
        for process in self.executors.into_iter().chain([self.scheduler]) {
            let name = process.name.clone();
            codes.push((name, process.terminate()?));
        }
        Ok(codes)
    }
}

/// A child process of a [`LocalCluster`], its stdout and stderr in `<dir>/<name>.log`.
#[derive(Debug)]
pub struct Process {
    /// `scheduler` or the executor's id.
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    fn start(name: &str, program: &Path, args: &[&str], dir: &Path) -> Result<Process> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        Ok(Process {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running (not exited, not killed).
    pub fn is_running(&mut self) -> Result<bool> {
        Ok(self.child.try_wait()?.is_none())
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Waits until `port` on 127.0.0.1 accepts connections; an error if the process exits first
    /// or [`PATIENCE`] runs out.
    fn wait_for_port(&mut self, port: u16) -> Result<()> {
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before listening on {port}:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            if start.elapsed() > PATIENCE {
                bail!(
                    "{} does not listen on {port}:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Sends SIGTERM and waits (at most [`PATIENCE`]) for the process to exit; its exit code.
    pub fn terminate(mut self) -> Result<Option<i32>> {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .context("cannot run kill")?;
        if !status.success() {
            bail!("kill -TERM {} ({}) failed", self.pid(), self.name);
        }
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status.code());
            }
            if start.elapsed() > PATIENCE {
                bail!(
                    "{} did not exit within {PATIENCE:?} of SIGTERM:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}

/// A port on 127.0.0.1 that was free a moment ago, and not handed out by this function before
/// in this process (the program it is for may not have bound it yet: clusters started at once
/// must not be given the same one).
pub fn free_port() -> Result<u16> {
    static GIVEN: std::sync::Mutex<BTreeSet<u16>> = std::sync::Mutex::new(BTreeSet::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..100 {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if given.insert(port) {
            return Ok(port);
        }
    }
    bail!("no port on 127.0.0.1 that was not handed out before, in 100 tries")
}
