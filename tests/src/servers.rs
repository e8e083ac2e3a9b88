//! Private ClickHouse and PostgreSQL servers for tests that must stop a server.
//!
//! The shared servers are never stopped (other tests run against them); a test
//! that needs an outage starts its own instance here, on free ports, with every
//! file under one temporary directory, and kills and restarts that one. Each
//! server is stopped and its directory removed when dropped; directories left
//! by a test process that died are cleaned up by the next start.

use anyhow::{bail, Context};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A TCP port nothing listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// A fresh directory `tally-private-<kind>-<test pid>-<millis>` in the temp dir,
/// after removing those of test processes that no longer run (stopping the
/// server each one recorded in `server.pid`).
fn private_dir(kind: &str) -> anyhow::Result<PathBuf> {
    let tmp = std::env::temp_dir();
    let prefix = format!("tally-private-{kind}-");
    for entry in std::fs::read_dir(&tmp)?.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(&prefix) else {
            continue;
        };
        let owner: Option<u32> = rest.split('-').next().and_then(|p| p.parse().ok());
        if owner.is_some_and(pid_alive) {
            continue;
        }
        if let Ok(pid) = std::fs::read_to_string(entry.path().join("server.pid")) {
            if let Ok(pid) = pid.trim().parse::<u32>() {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let _ = std::fs::remove_dir_all(entry.path());
    }
    let dir = tmp.join(format!(
        "{prefix}{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn wait_until(timeout: Duration, what: &str, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// A private `clickhouse-server` (Debian's 18.16), configured like
/// `deploy/local/clickhouse.sh` but on its own ports and directory.
pub struct PrivateClickHouse {
    pub dir: PathBuf,
    pub http_port: u16,
    pub tcp_port: u16,
    /// With [`PrivateClickHouse::start_tls`]: the HTTPS port.
    pub https_port: Option<u16>,
    child: Option<Child>,
}

/// HTTPS for a private ClickHouse: its certificate and key (PEM), and a user
/// `tally` with this password (the `default` user stays password-less on the
/// plain HTTP port, for the test's own setup queries).
pub struct ClickHouseTls<'a> {
    pub cert: &'a Path,
    pub key: &'a Path,
    pub tally_password: &'a str,
}

impl PrivateClickHouse {
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(None)
    }

    /// A private ClickHouse that also serves HTTPS (18.16's own `https_port`).
    pub fn start_tls(tls: &ClickHouseTls<'_>) -> anyhow::Result<Self> {
        Self::start_with(Some(tls))
    }

    fn start_with(tls: Option<&ClickHouseTls<'_>>) -> anyhow::Result<Self> {
        let dir = private_dir("clickhouse")?;
        for sub in ["etc", "log", "data", "tmp", "user_files", "format_schemas"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let (http_port, tcp_port) = (free_port()?, free_port()?);
        let https_port = match tls {
            Some(_) => Some(free_port()?),
            None => None,
        };
        let https = match (tls, https_port) {
            (Some(t), Some(port)) => format!(
                "<https_port>{port}</https_port>
    <openSSL><server>
        <certificateFile>{}</certificateFile><privateKeyFile>{}</privateKeyFile>
        <verificationMode>none</verificationMode><loadDefaultCAFile>false</loadDefaultCAFile>
        <cacheSessions>true</cacheSessions><disableProtocols>sslv2,sslv3</disableProtocols>
        <preferServerCiphers>true</preferServerCiphers>
    </server></openSSL>",
                t.cert.display(),
                t.key.display()
            ),
            _ => String::new(),
        };
        let tally_user = match tls {
            Some(t) => format!(
                "<tally>
            <password>{}</password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </tally>",
                t.tally_password
            ),
            None => String::new(),
        };
        let d = dir.display();
        std::fs::write(
            dir.join("etc/config.xml"),
            format!(
                r#"<?xml version="1.0"?>
<yandex>
    <logger>
        <level>warning</level>
        <log>{d}/log/clickhouse-server.log</log>
        <errorlog>{d}/log/clickhouse-server.err.log</errorlog>
        <size>10M</size>
        <count>1</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>
    {https}
    <path>{d}/data/</path>
    <tmp_path>{d}/tmp/</tmp_path>
    <user_files_path>{d}/user_files/</user_files_path>
    <format_schema_path>{d}/format_schemas/</format_schema_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
    <max_concurrent_queries>50</max_concurrent_queries>
    <mark_cache_size>67108864</mark_cache_size>
    <uncompressed_cache_size>67108864</uncompressed_cache_size>
</yandex>
"#
            ),
        )?;
        std::fs::write(
            dir.join("etc/users.xml"),
            format!(
                r#"<?xml version="1.0"?>
<yandex>
    <profiles><default><max_memory_usage>2000000000</max_memory_usage></default></profiles>
    <users>
        <default>
            <password></password>
            <networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
        {tally_user}
    </users>
    <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>
        <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time>
    </interval></default></quotas>
</yandex>
"#
            ),
        )?;
        let mut ch = Self {
            dir,
            http_port,
            tcp_port,
            https_port,
            child: None,
        };
        ch.restart()?;
        Ok(ch)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    fn ping(&self) -> bool {
        crate::http_get_once(&format!("127.0.0.1:{}", self.http_port), "/ping")
            .is_ok_and(|(s, b)| s == 200 && b.starts_with("Ok"))
    }

    /// (Re)starts the server on the same directory and ports; waits for /ping.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            return Ok(());
        }
        let out = std::fs::File::create(self.dir.join("log/stdout.log"))?;
        let child = Command::new("/usr/sbin/clickhouse-server")
            .arg(format!(
                "--config-file={}",
                self.dir.join("etc/config.xml").display()
            ))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start /usr/sbin/clickhouse-server (apt-get install clickhouse-server)")?;
        std::fs::write(self.dir.join("server.pid"), child.id().to_string())?;
        self.child = Some(child);
        wait_until(Duration::from_secs(60), "private ClickHouse /ping", || {
            self.ping()
        })
    }

    /// A crash: SIGKILL, no shutdown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }
}

impl Drop for PrivateClickHouse {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private PostgreSQL cluster (initdb + pg_ctl from /usr/lib/postgresql/*/bin),
/// trust authentication, superuser `postgres`. Run as the `postgres` OS user
/// when the tests run as root (initdb refuses root).
pub struct PrivatePostgres {
    pub dir: PathBuf,
    pub port: u16,
    bin: PathBuf,
    as_postgres: bool,
}

impl PrivatePostgres {
    pub fn start() -> anyhow::Result<Self> {
        let bin = postgres_bin_dir()?;
        let dir = private_dir("postgres")?;
        let as_postgres = running_as_root();
        if as_postgres {
            let status = Command::new("chown")
                .args(["postgres:postgres", &dir.display().to_string()])
                .status()?;
            anyhow::ensure!(status.success(), "chown {} to postgres", dir.display());
        }
        let pg = Self {
            port: free_port()?,
            dir,
            bin,
            as_postgres,
        };
        pg.run(
            "initdb",
            &[
                "-D",
                &pg.data().display().to_string(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
        )?;
        pg.start_again()?;
        Ok(pg)
    }

    /// A private cluster that takes TCP connections only over TLS (`hostssl`,
    /// `hostnossl ... reject`) with SCRAM passwords; `postgres` gets
    /// `password`. The Unix socket stays trust-only, for the setup itself.
    pub fn start_tls(cert: &Path, key: &Path, password: &str) -> anyhow::Result<Self> {
        let pg = Self::start()?;
        pg.stop()?;
        let data = pg.data();
        std::fs::copy(cert, data.join("server.crt"))?;
        std::fs::copy(key, data.join("server.key"))?;
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.1/32 scram-sha-256\n\
             hostnossl all all 127.0.0.1/32 reject\n",
        )?;
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))?;
        std::io::Write::write_all(
            &mut conf,
            b"\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\npassword_encryption = 'scram-sha-256'\n",
        )?;
        if pg.as_postgres {
            for f in ["server.crt", "server.key", "pg_hba.conf", "postgresql.conf"] {
                let path = data.join(f).display().to_string();
                let ok = Command::new("chown")
                    .args(["postgres:postgres", &path])
                    .status()?
                    .success();
                anyhow::ensure!(ok, "chown {path}");
            }
        }
        std::fs::set_permissions(
            data.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        pg.start_again()?;
        pg.run(
            "psql",
            &[
                "-h",
                &pg.dir.display().to_string(),
                "-p",
                &pg.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                &format!("ALTER ROLE postgres PASSWORD '{password}'"),
            ],
        )?;
        Ok(pg)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run {}", exe.display()))?;
        if !out.status.success() {
            bail!(
                "{tool} {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Superuser URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Starts the cluster (again) on the same port; waits until it accepts connections.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let opts = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=60",
            self.port,
            self.dir.display()
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-l",
                &self.dir.join("postgres.log").display().to_string(),
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        if let Ok(pid) = std::fs::read_to_string(self.data().join("postmaster.pid")) {
            let pid = pid.lines().next().unwrap_or_default().to_string();
            let _ = std::fs::write(self.dir.join("server.pid"), pid);
        }
        Ok(())
    }

    /// Stops the cluster at once (`-m immediate`: no checkpoint, every
    /// connection cut, as in a crash; the next start recovers).
    pub fn stop(&self) -> anyhow::Result<()> {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data().display().to_string(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        )
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `/usr/lib/postgresql/<newest>/bin`.
fn postgres_bin_dir() -> anyhow::Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql (apt-get install postgresql)")?
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!("no initdb under /usr/lib/postgresql/*/bin"),
    }
}
