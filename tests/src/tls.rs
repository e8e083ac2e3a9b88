//! TLS for the tests: a throw-away PKI made with the `openssl` command, a TLS
//! terminator (Debian's stunnel) in front of a plain-text server, and a private
//! Tansu broker whose advertised listener is that terminator.
//!
//! noida-db advertises the address it binds, so a terminator cannot sit in front
//! of it; Tansu advertises whatever it is told. Everything lives under one
//! directory and is stopped when dropped.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::servers::free_port;

/// A CA, a server certificate for `localhost` / 127.0.0.1 and a client
/// certificate, all signed by the CA; and a second CA that signed nothing.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub other_ca: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("run openssl (apt-get install openssl)")?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

impl Pki {
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let days = "2";
        for ca in ["ca", "other-ca"] {
            openssl(
                dir,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &format!("{ca}.key"),
                    "-out",
                    &format!("{ca}.pem"),
                    "-days",
                    days,
                    "-subj",
                    &format!("/CN=tally test {ca}"),
                ],
            )?;
        }
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )?;
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
        for (name, cn) in [("server", "localhost"), ("client", "tally")] {
            openssl(
                dir,
                &[
                    "req",
                    "-newkey",
                    "rsa:2048",
                    "-nodes",
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN={cn}"),
                ],
            )?;
            openssl(
                dir,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &format!("{name}.csr"),
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &format!("{name}.pem"),
                    "-days",
                    days,
                    "-extfile",
                    &format!("{name}.ext"),
                ],
            )?;
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client.key"),
            other_ca: dir.join("other-ca.pem"),
        })
    }
}

fn wait_port(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("{what} did not listen on 127.0.0.1:{port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// A child process killed when dropped.
pub struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `stunnel` binary, installed from Debian's packages when missing.
fn stunnel() -> anyhow::Result<&'static str> {
    for bin in ["/usr/bin/stunnel4", "/usr/bin/stunnel"] {
        if Path::new(bin).exists() {
            return Ok(bin);
        }
    }
    let ok = Command::new("apt-get")
        .args(["install", "-y", "-q", "stunnel4"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok && Path::new("/usr/bin/stunnel4").exists() {
        return Ok("/usr/bin/stunnel4");
    }
    bail!("stunnel is not installed and `apt-get install stunnel4` failed")
}

/// stunnel on `accept` (TLS, the PKI's server certificate) forwarding to
/// `connect` (plain text). With `require_client_cert`, only clients with a
/// certificate signed by the PKI's CA get through (mutual TLS).
pub fn tls_front(
    pki: &Pki,
    name: &str,
    accept: u16,
    connect: u16,
    require_client_cert: bool,
) -> anyhow::Result<Guard> {
    let verify = if require_client_cert {
        format!("verifyChain = yes\nCAfile = {}\n", pki.ca.display())
    } else {
        String::new()
    };
    let conf = pki.dir.join(format!("stunnel-{name}.conf"));
    std::fs::write(
        &conf,
        format!(
            "foreground = yes\npid =\noutput = {log}\ndebug = 4\n[{name}]\naccept = 127.0.0.1:{accept}\n\
             connect = 127.0.0.1:{connect}\ncert = {cert}\nkey = {key}\n{verify}",
            log = pki.dir.join(format!("stunnel-{name}.log")).display(),
            cert = pki.server_cert.display(),
            key = pki.server_key.display(),
        ),
    )?;
    let child = Command::new(stunnel()?)
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start stunnel")?;
    let guard = Guard(child);
    wait_port(accept, &format!("stunnel {name}"))?;
    Ok(guard)
}

/// A private Tansu broker (in-memory) behind a TLS terminator: clients reach
/// it, bootstrap and every broker connection, at `127.0.0.1:tls_port` over TLS
/// with a client certificate.
pub struct TlsKafka {
    pub tls_port: u16,
    _broker: Guard,
    _front: Guard,
}

impl TlsKafka {
    pub fn start(pki: &Pki) -> anyhow::Result<Self> {
        let out = Command::new(crate::repo_root().join("deploy/local/broker.sh"))
            .arg("tansu-bin")
            .stderr(Stdio::inherit())
            .output()
            .context("deploy/local/broker.sh tansu-bin")?;
        anyhow::ensure!(out.status.success(), "broker.sh tansu-bin failed");
        let bin = String::from_utf8(out.stdout)?.trim().to_string();
        let (plain, tls_port) = (free_port()?, free_port()?);
        let log = std::fs::File::create(pki.dir.join("tansu.log"))?;
        let broker = Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &format!("tcp://127.0.0.1:{plain}"),
                "--advertised-listener-url",
                &format!("tcp://127.0.0.1:{tls_port}"),
                "--storage-engine",
                "memory://tansu/",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("start tansu")?;
        let broker = Guard(broker);
        wait_port(plain, "tansu")?;
        let front = tls_front(pki, "kafka", tls_port, plain, true)?;
        Ok(Self {
            tls_port,
            _broker: broker,
            _front: front,
        })
    }
}
