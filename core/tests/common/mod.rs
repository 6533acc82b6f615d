//! Runs a real `wharf serve` process on 127.0.0.1 with a temporary data directory.

#![allow(dead_code)]

pub mod good_client;
pub mod wire;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Readiness polls (every 50 ms) before a start is declared failed.
const READY_POLLS_MAX: usize = 400;
/// Polls (every 50 ms) for a process to exit after a signal.
const EXIT_POLLS_MAX: usize = 400;

/// A free port below the kernel's ephemeral range, so the brokers' own ephemeral ports (shard
/// listeners, client sockets) of tests running in parallel never take it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let seed = (std::process::id() % 4000) as u16 * 3;
    for _ in 0..12_000 {
        let port = 20_000 + (seed + NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
        {
            return port;
        }
    }
    panic!("no free port in 20000..32000");
}

pub struct Broker {
    pub dir: PathBuf,
    pub port: u16,
    pub admin_port: u16,
    /// The internal listener's port (used when the config names `cluster.internal_listen`).
    pub internal_port: u16,
    pub shards: usize,
    extra_config: String,
    /// Environment variables set for the broker process (failpoints).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    starts: usize,
}

impl Broker {
    /// Starts a broker with `shards` shards; `extra_config` is appended to its TOML config.
    pub fn start(dir: &Path, shards: usize, extra_config: &str) -> Broker {
        let mut broker = Broker::prepare(dir, shards, extra_config);
        broker.launch();
        broker
    }

    /// A broker with its ports chosen but not started (a cluster's config lists every port).
    pub fn prepare(dir: &Path, shards: usize, extra_config: &str) -> Broker {
        Broker {
            dir: dir.to_path_buf(),
            port: free_port(),
            admin_port: free_port(),
            internal_port: free_port(),
            shards,
            extra_config: extra_config.to_string(),
            env: Vec::new(),
            child: None,
            starts: 0,
        }
    }

    pub fn set_extra_config(&mut self, extra_config: String) {
        self.extra_config = extra_config;
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Starts again on the same data directory and the same ports (cluster members: the
    /// others' configs name them).
    pub fn restart_same_ports(&mut self) {
        assert!(self.child.is_none(), "stop or kill first");
        self.launch();
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("broker-{}.log", self.starts))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn launch(&mut self) {
        self.spawn();
        self.wait_ready();
    }

    /// Starts the process without waiting for readiness (brokers of a controller quorum are
    /// ready only once a quorum runs: start them all, then `wait_ready` each).
    pub fn spawn(&mut self) {
        self.starts += 1;
        let config_path = self.dir.join("wharf.toml");
        let config = format!(
            "data_dir = {:?}\nlisten = \"127.0.0.1:{}\"\nadmin_listen = \"127.0.0.1:{}\"\nshards = {}\n{}\n[log]\nformat = \"text\"\nlevel = \"info,wharf::server::partition=debug\"\n\n[topic_defaults]\nsegment_bytes = 4194304\npreallocate = false\n",
            self.dir.join("data").display().to_string(),
            self.port,
            self.admin_port,
            self.shards,
            self.extra_config,
        );
        std::fs::write(&config_path, config).expect("write config");
        let log = std::fs::File::create(self.log_path()).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_wharf"))
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::from(log.try_clone().expect("clone log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn wharf serve");
        self.child = Some(child);
    }

    /// Waits (bounded) until `/readyz` answers 200; panics with the log otherwise.
    pub fn wait_ready(&mut self) {
        for _ in 0..READY_POLLS_MAX {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("wharf exited during start ({status}):\n{}", self.log());
            }
            if self
                .http_get("/readyz")
                .is_some_and(|(code, _)| code == 200)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("wharf did not become ready:\n{}", self.log());
    }

    /// GET `path` on the admin endpoint: (status, body).
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.admin_port, path)
    }

    pub fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: sending a signal to our own child process.
            unsafe { libc::kill(child.id() as i32, signal) };
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn stop(&mut self) -> i32 {
        self.stop_with(libc::SIGTERM)
    }

    /// Sends `signal` and waits; returns the exit code.
    pub fn stop_with(&mut self, signal: i32) -> i32 {
        self.signal(signal);
        let mut child = self.child.take().expect("running");
        for _ in 0..EXIT_POLLS_MAX {
            if let Some(status) = child.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        panic!("wharf did not stop after SIGTERM:\n{}", self.log());
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits (bounded) for the process to exit on its own; its exit code (-1 for a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            let child = self.child.as_mut()?;
            if let Some(status) = child.try_wait().expect("wait") {
                self.child = None;
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Every log this broker wrote (all starts).
    pub fn all_logs(&self) -> String {
        (1..=self.starts)
            .map(|n| {
                std::fs::read_to_string(self.dir.join(format!("broker-{n}.log")))
                    .unwrap_or_default()
            })
            .collect()
    }

    /// Resident memory of the broker process, from /proc.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()?)).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }

    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts again on the same data directory (on fresh ports: another test may have taken
    /// the old ones meanwhile).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill first");
        self.port = free_port();
        self.admin_port = free_port();
        self.launch();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs client code on a glommio executor on this thread.
/// GET `path` from a broker's admin endpoint: status and body.
pub fn http_get(admin_port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", admin_port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n")?.1.to_string();
    Some((status, body))
}

pub fn run<T>(future: impl std::future::Future<Output = T>) -> T {
    wharf::runtime::run_local("test-client", future).expect("glommio executor (io_uring)")
}

/// Writes a cluster secret file (mode 600) in `dir` and returns its path.
pub fn write_secret(dir: &Path, secret: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("cluster.secret");
    std::fs::write(&path, secret).expect("write secret");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

/// A static cluster of three real brokers on 127.0.0.1 (ids 1, 2, 3), each with an internal
/// listener and the same cluster secret.
pub struct Cluster {
    pub brokers: Vec<Broker>,
    pub secret_path: PathBuf,
    pub dir: tempfile::TempDir,
}

impl Cluster {
    pub fn start(replica_lag_max_ms: u64) -> Cluster {
        Cluster::start_with(replica_lag_max_ms, "")
    }

    /// `extra_config` goes before the `[cluster]` section of every broker's config.
    pub fn start_with(replica_lag_max_ms: u64, extra_config: &str) -> Cluster {
        Cluster::start_full(replica_lag_max_ms, extra_config, "")
    }

    /// A cluster whose three brokers run the Raft controller (`controller_voters = [1, 2, 3]`),
    /// with `cluster_config` added to the `[cluster]` section.
    pub fn start_controlled(replica_lag_max_ms: u64, cluster_config: &str) -> Cluster {
        Cluster::start_full(
            replica_lag_max_ms,
            "",
            &format!("controller_voters = [1, 2, 3]\n{cluster_config}"),
        )
    }

    /// A controller cluster whose brokers run with the environment `env` (failpoints).
    pub fn start_controlled_env(replica_lag_max_ms: u64, env: &[(&str, &str)]) -> Cluster {
        Cluster::start_env(
            replica_lag_max_ms,
            "",
            "controller_voters = [1, 2, 3]\n",
            env,
        )
    }

    /// A controller cluster with `extra_config` before the `[cluster]` section.
    pub fn start_controlled_with(replica_lag_max_ms: u64, extra_config: &str) -> Cluster {
        Cluster::start_full(
            replica_lag_max_ms,
            extra_config,
            "controller_voters = [1, 2, 3]\n",
        )
    }

    /// A controller cluster with `extra_config` before the `[cluster]` section,
    /// `cluster_config` in it, and broker `i + 1` in rack `racks[i]` (none when `racks` is
    /// empty).
    pub fn start_controlled_racks(
        replica_lag_max_ms: u64,
        extra_config: &str,
        cluster_config: &str,
        racks: &[&str],
    ) -> Cluster {
        Cluster::start_env_racks(
            replica_lag_max_ms,
            extra_config,
            &format!("controller_voters = [1, 2, 3]\n{cluster_config}"),
            &[],
            racks,
        )
    }

    fn start_full(replica_lag_max_ms: u64, extra_config: &str, cluster_config: &str) -> Cluster {
        Cluster::start_env(replica_lag_max_ms, extra_config, cluster_config, &[])
    }

    fn start_env(
        replica_lag_max_ms: u64,
        extra_config: &str,
        cluster_config: &str,
        env: &[(&str, &str)],
    ) -> Cluster {
        Cluster::start_env_racks(replica_lag_max_ms, extra_config, cluster_config, env, &[])
    }

    fn start_env_racks(
        replica_lag_max_ms: u64,
        extra_config: &str,
        cluster_config: &str,
        env: &[(&str, &str)],
        racks: &[&str],
    ) -> Cluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret_path = write_secret(dir.path(), "the test cluster's shared secret\n");
        let mut brokers: Vec<Broker> = (1..=3)
            .map(|id| {
                let path = dir.path().join(format!("broker-{id}"));
                std::fs::create_dir_all(&path).expect("broker dir");
                Broker::prepare(&path, 1, "")
            })
            .collect();
        let list: String = brokers
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let rack = racks
                    .get(i)
                    .map(|rack| format!("rack = {rack:?}\n"))
                    .unwrap_or_default();
                format!(
                    "[[cluster.brokers]]\nid = {}\naddress = \"127.0.0.1:{}\"\ninternal_address = \"127.0.0.1:{}\"\n{rack}",
                    i + 1,
                    b.port,
                    b.internal_port
                )
            })
            .collect();
        // The tests' short long poll, unless `cluster_config` sets its own.
        let fetch_wait = if cluster_config.contains("replica_fetch_wait_ms") {
            ""
        } else {
            "replica_fetch_wait_ms = 200\n"
        };
        for (i, broker) in brokers.iter_mut().enumerate() {
            let internal_port = broker.internal_port;
            broker.set_extra_config(format!(
                "broker_id = {}\ncpu_set = \"unbound\"\n{extra_config}\n[cluster]\nreplica_lag_max_ms = {replica_lag_max_ms}\n{fetch_wait}replica_fetch_backoff_ms = 50\ninternal_listen = \"127.0.0.1:{internal_port}\"\nsecret_file = {:?}\n{cluster_config}\n{list}",
                i + 1,
                secret_path.display().to_string(),
            ));
        }
        for broker in &mut brokers {
            broker.env = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            broker.spawn();
        }
        for broker in &mut brokers {
            broker.wait_ready();
        }
        Cluster {
            brokers,
            secret_path,
            dir,
        }
    }

    pub fn broker(&mut self, id: u32) -> &mut Broker {
        &mut self.brokers[(id - 1) as usize]
    }

    pub fn bootstrap(&self, id: u32) -> String {
        self.brokers[(id - 1) as usize].bootstrap()
    }

    /// Every broker's client address, comma-separated: a client survives any one's death.
    pub fn bootstraps(&self) -> String {
        (1..=3)
            .map(|id| self.bootstrap(id))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn internal(&self, id: u32) -> String {
        format!(
            "127.0.0.1:{}",
            self.brokers[(id - 1) as usize].internal_port
        )
    }
}

impl Drop for Cluster {
    /// A failing test shows the end of every broker's logs (they go with the temporary dir).
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (i, broker) in self.brokers.iter().enumerate() {
            let logs = broker.all_logs();
            let tail: Vec<&str> = logs.lines().rev().take(60).collect();
            eprintln!("---- broker {} (last {} lines)", i + 1, tail.len());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Polls (every 100 ms) while waiting for a partition to reach a state.
pub const STATE_POLLS_MAX: usize = 300;

/// Partition 0 of `topic` as `bootstrap` describes it (the client merges the leaders' views).
pub fn describe_partition(
    bootstrap: &str,
    topic: &str,
) -> Option<wharf::protocol::PartitionDescription> {
    run(async {
        let mut config = wharf::client::ClientConfig::new(bootstrap);
        config.request_timeout_ms = 10_000;
        let client = wharf::client::Client::connect(config).await.ok()?;
        let described = client.describe_topic(topic).await.ok()?;
        described.partitions.into_iter().next()
    })
}

/// Polls `describe_partition` until `done` holds; panics (bounded) naming `what` otherwise.
pub fn wait_for_partition(
    bootstrap: &str,
    topic: &str,
    what: &str,
    done: impl Fn(&wharf::protocol::PartitionDescription) -> bool,
) -> wharf::protocol::PartitionDescription {
    let mut last = None;
    for _ in 0..STATE_POLLS_MAX {
        if let Some(description) = describe_partition(bootstrap, topic) {
            if done(&description) {
                return description;
            }
            last = Some(description);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("cluster never reached: {what}; last describe {last:?}");
}

/// Runs `wharf ARGS --bootstrap BOOTSTRAP` with `stdin`: exit code, stdout, stderr.
pub fn cli(bootstrap: &str, args: &[&str], stdin: &str) -> (Option<i32>, String, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_wharf"))
        .args(args)
        .args(["--bootstrap", bootstrap])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn cli");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let output = child.wait_with_output().expect("cli output");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The value of the first `/metrics` line of `broker` that starts with `series` (a metric name
/// with its labels), if any.
pub fn metric(broker: &Broker, series: &str) -> Option<u64> {
    let (_, metrics) = broker.http_get("/metrics")?;
    metrics
        .lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A client of the test clusters: requests time out after 5 s (a failover takes well under).
pub fn client_config(bootstrap: &str) -> wharf::client::ClientConfig {
    let mut config = wharf::client::ClientConfig::new(bootstrap);
    config.request_timeout_ms = 5_000;
    config
}

/// Produces `count` records `PREFIX-i` to `topic` (acks=all, round robin) and returns each
/// value with its acknowledged offset.
pub fn produce_to(bootstrap: &str, topic: &str, prefix: &str, count: usize) -> Vec<(String, u64)> {
    use std::rc::Rc;
    use wharf::client::producer::{Partitioner, Producer, ProducerConfig};
    use wharf::client::Client;
    use wharf::protocol::Acks;
    run(async {
        let client = Client::connect(client_config(bootstrap))
            .await
            .expect("connect");
        let producer = Producer::new(
            Rc::clone(&client),
            ProducerConfig {
                acks: Acks::All,
                linger_ms: 1,
                batch_bytes: 4 * 1024,
                partitioner: Partitioner::RoundRobin,
                delivery_timeout_ms: 20_000,
                request_timeout_ms: 5_000,
                ..ProducerConfig::default()
            },
        );
        let mut deliveries = Vec::new();
        for i in 0..count {
            let value = format!("{prefix}-{i}");
            let delivery = producer
                .send(topic, None, value.as_bytes())
                .await
                .expect("queued");
            deliveries.push((value, delivery));
        }
        producer.flush().await;
        let mut acked = Vec::new();
        for (value, delivery) in deliveries {
            let metadata = delivery
                .await
                .unwrap_or_else(|e| panic!("{value} was not acknowledged: {e}"));
            acked.push((value, metadata.offset.expect("acks=all returns the offset")));
        }
        producer.close().await;
        acked
    })
}
