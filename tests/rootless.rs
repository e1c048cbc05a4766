//! Rootless podman through the store, as docs/rootless.md sets it up: a real non-root user (made
//! by `.ci/run` with `useradd`, subordinate ids as useradd gives them), podman run by that user
//! (the host's 4.3.1, and 5.4.2 in the Debian 13 chroot), the store started by the user exactly
//! as `config/soci-store-user.service` starts it (it joins podman's user and mount namespaces
//! itself), the user's storage.conf from `config/storage-rootless.conf`, and every soci-store
//! path at its default for a user (XDG). Each test has its own home and runtime directory (so
//! its own podman pause process), removed afterwards.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use common::chroot::Chroot;
use common::podman::LIST_FILES;
use common::servers::{
    auth_file, registry, sha256_digest, whole_blob_gets, Pusher, RegistryOpts, Server,
};
use common::*;

/// The user `.ci/run` makes (`SOCI_ROOTLESS_USER` names another).
fn user() -> String {
    let name = std::env::var("SOCI_ROOTLESS_USER").unwrap_or_else(|_| "soci-rootless".into());
    let out = Command::new("id").arg("-u").arg(&name).output().unwrap();
    assert!(
        out.status.success(),
        "no user {name}: .ci/run makes it (useradd -m {name})"
    );
    name
}

fn id_of(user: &str, flag: &str) -> String {
    let out = Command::new("id").arg(flag).arg(user).output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The podman 5 chroot as a mount namespace whose root it is: a chrooted process may not make
/// user namespaces, one whose root was pivoted may. A `sleep` keeps the namespace; every command
/// enters it with `nsenter`.
struct Pivot {
    holder: Child,
    chroot: Chroot,
}

impl Pivot {
    fn enter() -> Rc<Pivot> {
        let chroot = Chroot::enter();
        // Its own /dev/shm: podman 4 and 5 of one user name their lock segment alike.
        let script = "cd \"$0\" && mkdir -p .oldroot && pivot_root . .oldroot && umount -l /.oldroot \
                      && rmdir /.oldroot && mount -t tmpfs tmpfs /dev/shm && echo ready && exec sleep infinity";
        let mut holder = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", script])
            .arg(&chroot.root)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        use std::io::BufRead;
        std::io::BufReader::new(holder.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "pivoting into {}",
            chroot.root.display()
        );
        Rc::new(Pivot { holder, chroot })
    }
}

impl Drop for Pivot {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// One rootless podman "login": the user with its own home and runtime directory, on the host
/// or in the podman 5 chroot.
struct Session {
    user: String,
    dir: tempfile::TempDir,
    pivot: Option<Rc<Pivot>>,
}

impl Session {
    /// A fresh home (containers.conf for these machines, and `storage` as the user's
    /// storage.conf when given) and runtime directory, owned by the user.
    fn new(storage: Option<&str>) -> Session {
        Self::new_in(None, storage)
    }

    fn new_in(pivot: Option<Rc<Pivot>>, storage: Option<&str>) -> Session {
        let user = user();
        let base = match &pivot {
            Some(p) => p.chroot.root.join("tmp"),
            None => std::env::temp_dir(),
        };
        let dir = tempfile::Builder::new()
            .prefix("soci-rootless-")
            .tempdir_in(base)
            .unwrap();
        let s = Session { user, dir, pivot };
        let conf = s.home().join(".config/containers");
        std::fs::create_dir_all(&conf).unwrap();
        // These machines have a low fd hard limit and no systemd: podman's defaults fail.
        std::fs::write(
            conf.join("containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=1024:4096\", \"nproc=1024:4096\"]\nnetns = \"none\"\n\
             [engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .unwrap();
        if let Some(text) = storage {
            std::fs::write(conf.join("storage.conf"), text).unwrap();
        }
        std::fs::create_dir_all(s.runtime()).unwrap();
        let ok = Command::new("chown")
            .arg("-R")
            .arg(format!("{0}:{0}", s.user))
            .arg(s.dir.path())
            .status()
            .unwrap();
        assert!(ok.success());
        std::fs::set_permissions(s.runtime(), std::fs::Permissions::from_mode(0o700)).unwrap();
        s
    }

    fn home(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    fn runtime(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// `host_path` as the user's commands see it.
    fn inside(&self, host_path: &Path) -> PathBuf {
        match &self.pivot {
            Some(p) => Path::new("/").join(host_path.strip_prefix(&p.chroot.root).unwrap()),
            None => host_path.to_path_buf(),
        }
    }

    /// The soci-store binary, where the user's commands find it.
    fn store_binary(&self) -> PathBuf {
        let built = PathBuf::from(env!("CARGO_BIN_EXE_soci-store"));
        if self.pivot.is_none() {
            return built;
        }
        let copy = self.dir.path().join("soci-store");
        if !copy.exists() {
            std::fs::copy(&built, &copy).unwrap();
        }
        self.inside(&copy)
    }

    /// `program` run by the user, with only this session's environment.
    fn command(&self, program: &str) -> Command {
        let mut c = match &self.pivot {
            None => {
                let mut c = Command::new("runuser");
                c.args(["-u", &self.user, "--"]);
                c
            }
            Some(p) => {
                let mut c = Command::new("nsenter");
                c.arg("-t")
                    .arg(p.holder.id().to_string())
                    .args(["-m", "-r", "-w", "-S"])
                    .arg(id_of(&self.user, "-u"))
                    .arg("-G")
                    .arg(id_of(&self.user, "-g"))
                    .arg("--");
                c
            }
        };
        c.args(["env", "-i"])
            .arg(format!("HOME={}", self.inside(&self.home()).display()))
            .arg("PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .arg(format!(
                "XDG_RUNTIME_DIR={}",
                self.inside(&self.runtime()).display()
            ))
            .arg("PODMAN_IGNORE_CGROUPSV1_WARNING=1")
            .arg(program)
            .current_dir(self.dir.path());
        c
    }

    /// Rootless podman; panics with its output on failure.
    fn podman(&self, args: &[&str]) -> Output {
        let out = self.command("podman").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "rootless podman {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Pulls `image` and lists its files from inside a container (as `Podman::listing`).
    fn listing(&self, image: &str) -> String {
        self.podman(&["pull", "-q", "--tls-verify=false", image]);
        self.run_listing(image)
    }

    fn run_listing(&self, image: &str) -> String {
        let out = self.podman(&[
            "run",
            "--rm",
            "--network",
            "none",
            image,
            "/bin/busybox",
            "sh",
            "-c",
            LIST_FILES,
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The store, started by the user with the shipped user unit's `ExecStart`.
    fn start_store(&self) -> Store {
        let unit = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/soci-store-user.service"),
        )
        .unwrap();
        let exec = unit
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("ExecStart in the user unit");
        let home = self.inside(&self.home());
        let binary = self.store_binary();
        let mut words = exec.split_whitespace().map(|w| {
            w.replace("%h", home.to_str().unwrap())
                .replace("/usr/local/bin/soci-store", binary.to_str().unwrap())
        });
        let program = words.next().unwrap();
        let args: Vec<String> = words.collect();
        let mnt = PathBuf::from(args.last().unwrap());
        let log = self.dir.path().join(format!(
            "store-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let notify_path = log.with_extension("notify");
        let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
        // The store, running as the user, must be able to send to it (systemd's is open too).
        std::fs::set_permissions(&notify_path, std::fs::Permissions::from_mode(0o777)).unwrap();
        notify
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let f = std::fs::File::create(&log).unwrap();
        let mut c = self.command("env");
        c.arg(format!(
            "NOTIFY_SOCKET={}",
            self.inside(&notify_path).display()
        ))
        .arg("SOCI_STORE_LOG=info")
        .arg(&program)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f);
        let mut store = Store {
            child: c.spawn().unwrap(),
            mnt,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut buf = [0u8; 64];
        loop {
            if let Ok(n) = notify.recv(&mut buf) {
                if &buf[..n] == b"READY=1" {
                    return store;
                }
            }
            if let Ok(Some(s)) = store.child.try_wait() {
                panic!("the rootless store exited with {s}: {}", store.log_text());
            }
            assert!(Instant::now() < deadline, "not ready after 60 s");
        }
    }

    /// The pid of this session's podman pause process, if it runs.
    fn pause_pid(&self) -> Option<String> {
        let pid = std::fs::read_to_string(self.runtime().join("libpod/tmp/pause.pid")).ok()?;
        let pid = pid.trim().to_string();
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Containers first (they hold overlay mounts in podman's namespace), then the pause
        // process, with which that namespace and every mount in it go; then the files.
        let _ = self
            .command("podman")
            .args(["--storage-opt", "", "rm", "-af"])
            .output();
        if let Some(pid) = self.pause_pid() {
            let _ = Command::new("kill").args(["-KILL", &pid]).status();
        }
        let _ = Command::new("rm").arg("-rf").arg(self.dir.path()).status();
    }
}

/// A store run by the user; stopped on drop.
struct Store {
    child: Child,
    mnt: PathBuf,
    log: PathBuf,
}

impl Store {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM to the store (runuser's child), then the exit status runuser passes on.
    fn stop(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("pkill")
            .args(["-TERM", "-f", "--"])
            .arg(format!("soci-store serve {}$", self.mnt.display()))
            .status();
        self.child.wait().unwrap()
    }

    /// Waits (bounded) for the store to exit by itself.
    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the store did not exit within {within:?}: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.stop();
        }
    }
}

/// The test image in a registry, converted with `soci-store convert` (by root: converting is a
/// CI job's, not the user's).
struct Image {
    reg: Server,
    _dir: tempfile::TempDir,
    lazy: String,
    layer_digests: Vec<String>,
}

async fn converted(layers: Vec<(Vec<u8>, Vec<u8>)>) -> Image {
    converted_in(registry(RegistryOpts::default()), None, layers).await
}

/// [`converted`] in `reg`, which wants `auth` (user, password) when given.
async fn converted_in(
    reg: Server,
    auth: Option<(&str, &str)>,
    layers: Vec<(Vec<u8>, Vec<u8>)>,
) -> Image {
    let gz: Vec<Vec<u8>> = layers.iter().map(|(_, g)| g.clone()).collect();
    let diff_ids: Vec<String> = layers.iter().map(|(t, _)| sha256_digest(t)).collect();
    let mut pusher = Pusher::new(&reg);
    pusher.auth = auth.map(|(u, p)| (u.to_string(), p.to_string()));
    let (_, layer_digests) = pusher.image("test/app", "v1", &gz, &diff_ids).await;
    let dir = tempfile::tempdir().unwrap();
    let mut auth_files = String::new();
    if let Some((u, p)) = auth {
        let file = dir.path().join("auth.json");
        auth_file(&file, &reg.addr(), u, p);
        auth_files = format!("auth_files = [\"{}\"]\n", file.display());
    }
    let cfg = dir.path().join("convert.toml");
    std::fs::write(
        &cfg,
        format!(
            "artifacts = \"{}/artifacts\"\n[[fetchers]]\ntype = \"registry\"\ninsecure = [\"{}\"]\nregistries_conf = \"/nonexistent\"\n{auth_files}",
            dir.path().display(),
            reg.addr()
        ),
    )
    .unwrap();
    let lazy = format!("{}/test/app:v1-soci", reg.addr());
    soci_store_ok(
        &cfg,
        &[
            "convert",
            "--quiet",
            &format!("{}/test/app:v1", reg.addr()),
            &lazy,
        ],
    );
    Image {
        reg,
        _dir: dir,
        lazy,
        layer_digests,
    }
}

/// A session whose podman uses the store (the shipped per-user storage.conf), and whose store
/// config names only the test registry (everything else at its defaults).
fn lazy_session(img: &Image, pivot: Option<Rc<Pivot>>) -> Session {
    lazy_session_with(img, pivot, "")
}

/// [`lazy_session`] with more store config (`registry` fetcher options).
fn lazy_session_with(img: &Image, pivot: Option<Rc<Pivot>>, fetcher_extra: &str) -> Session {
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/storage-rootless.conf"),
    )
    .unwrap();
    // The home is known only once the session exists: write storage.conf after.
    let s = Session::new_in(pivot, None);
    let storage = shipped.replace("/home/USER", s.inside(&s.home()).to_str().unwrap());
    let conf = s.home().join(".config");
    std::fs::write(conf.join("containers/storage.conf"), storage).unwrap();
    std::fs::create_dir_all(conf.join("soci-store")).unwrap();
    std::fs::write(
        conf.join("soci-store/config.toml"),
        format!(
            "[[fetchers]]\ntype = \"registry\"\ninsecure = [\"{}\"]\n{fetcher_extra}",
            img.reg.addr()
        ),
    )
    .unwrap();
    let ok = Command::new("chown")
        .arg("-R")
        .arg(format!("{0}:{0}", s.user))
        .arg(&conf)
        .status()
        .unwrap();
    assert!(ok.success());
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn rootless_podman_4_runs_lazily_through_a_users_store() {
    runs_lazily_through_a_users_store(None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rootless_podman_5_runs_lazily_through_a_users_store() {
    runs_lazily_through_a_users_store(Some(Pivot::enter())).await;
}

/// A plain rootless pull and a lazy one list the same; the store notices podman's namespaces
/// going, and started again serves the image pulled before.
async fn runs_lazily_through_a_users_store(pivot: Option<Rc<Pivot>>) {
    let img = converted(soci_test_image()).await;
    let plain = Session::new_in(pivot.clone(), None).listing(&img.lazy);

    let s = lazy_session(&img, pivot);
    let mut store = s.start_store();
    let before = img.reg.log_text().len();
    let listing = s.listing(&img.lazy);
    // Same files, modes and owners (as seen in the container) as a plain rootless pull,
    // whiteouts and the opaque directory included.
    assert_eq!(listing, plain);
    let log = img.reg.log_text()[before..].to_string();
    for d in &img.layer_digests[..2] {
        let whole = whole_blob_gets(&log, d);
        assert_eq!(whole, 0, "indexed layer {d} was downloaded whole:\n{log}");
    }
    let slog = store.log_text();
    assert!(
        slog.contains("joined the namespaces of its pause process"),
        "{slog}"
    );
    assert!(slog.contains(" use"), "podman used the store: {slog}");
    // Every path at its XDG default: nothing under /var or /run of the host.
    let artifacts = s.home().join(".local/share/soci-store/artifacts");
    assert!(
        std::fs::read_dir(&artifacts).is_ok_and(|mut d| d.next().is_some()),
        "artifacts in {}",
        artifacts.display()
    );
    assert!(s.runtime().join("soci-store").is_dir());

    // podman's namespaces go (`podman system migrate` stops the pause process): the store
    // notices and exits with an error, as a supervisor restarting it needs.
    s.podman(&["--storage-opt", "", "system", "migrate"]);
    let status = store.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "{}", store.log_text());
    assert!(
        store.log_text().contains("pause process"),
        "{}",
        store.log_text()
    );
    // Started again (Restart=always), it joins podman's new namespaces, and the image pulled
    // lazily runs without a pull.
    let mut store = s.start_store();
    let before = img.reg.log_text().len();
    assert_eq!(s.run_listing(&img.lazy), plain);
    let log = img.reg.log_text()[before..].to_string();
    assert!(
        !log.contains("containers/"),
        "podman did not go to the registry again:\n{log}"
    );

    // The store and its FUSE holder both killed: a dead mount, on which podman fails
    // (docs/rootless.md). Started again, the store replaces it and the image runs.
    for pattern in [
        format!("soci-store serve {}$", store.mnt.display()),
        "soci-store hold-fuse ".to_string() + s.inside(&s.runtime()).to_str().unwrap(),
    ] {
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", "--", &pattern])
            .status();
    }
    let _ = store.wait_exit(Duration::from_secs(30));
    let dead = s
        .command("podman")
        .args([
            "run",
            "--rm",
            "--network",
            "none",
            &img.lazy,
            "/bin/busybox",
            "true",
        ])
        .output()
        .unwrap();
    assert!(!dead.status.success(), "podman on a dead mount");
    let _store = s.start_store();
    assert_eq!(s.run_listing(&img.lazy), plain);
}

/// A layer with a file owned by an id outside the user's subordinate range: a plain rootless
/// pull refuses it, and so does the store (podman then pulls it itself and fails the same way),
/// rather than showing the file as owned by nobody.
#[tokio::test(flavor = "multi_thread")]
async fn rootless_store_refuses_owners_outside_the_users_range() {
    let mut layers = soci_test_image();
    // Big enough (10 MiB, `convert`'s default threshold) to be indexed.
    let data = random_bytes(11 << 20, 70);
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(data.len() as u64);
    h.set_mtime(1_700_000_000);
    h.set_uid(70000);
    h.set_gid(70000);
    let mut t = TarWriter::new();
    t.raw(&mut h, "far-away.bin", &data);
    let (tar, _) = t.finish();
    let gz = gzip(&tar, 6, 1);
    layers.insert(0, (tar, gz));
    let img = converted(layers).await;

    let plain = Session::new(None);
    let out = plain
        .command("podman")
        .args(["pull", "-q", "--tls-verify=false", &img.lazy])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a plain rootless pull refuses it");

    let s = lazy_session(&img, None);
    let store = s.start_store();
    let out = s
        .command("podman")
        .args(["pull", "-q", "--tls-verify=false", &img.lazy])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let slog = store.log_text();
    assert!(
        slog.contains("owned by uid 70000, which this user namespace does not map"),
        "{slog}"
    );
}

/// Rootless podman 5 hands the credentials of a pull (from an auth file given to that pull only)
/// to the user's store through `soci-store-auth-helper`, named in the user's registries.conf.d
/// as `config/registries.conf.d/50-soci-store.conf` names it; the store has none of its own.
#[tokio::test(flavor = "multi_thread")]
async fn rootless_auth_helper_hands_credentials_to_a_users_store() {
    let (user, password) = ("carol", "rootless-pw");
    let reg = registry(RegistryOpts {
        htpasswd: Some((user.into(), password.into())),
        ..Default::default()
    });
    let img = converted_in(reg, Some((user, password)), soci_test_image()).await;
    let pivot = Pivot::enter();
    let s = lazy_session_with(&img, Some(pivot), "auth_files = []\n");
    // The helper where the user's podman runs it, named as the shipped drop-in names it.
    let helper = s.dir.path().join("soci-store-auth-helper");
    std::fs::copy(env!("CARGO_BIN_EXE_soci-store-auth-helper"), &helper).unwrap();
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/registries.conf.d/50-soci-store.conf"),
    )
    .unwrap();
    let dropins = s.home().join(".config/containers/registries.conf.d");
    std::fs::create_dir_all(&dropins).unwrap();
    std::fs::write(
        dropins.join("50-soci-store.conf"),
        shipped.replace(
            "/usr/local/bin/soci-store-auth-helper",
            s.inside(&helper).to_str().unwrap(),
        ),
    )
    .unwrap();
    let authfile = s.dir.path().join("pull-auth.json");
    auth_file(&authfile, &img.reg.addr(), user, password);
    let ok = Command::new("chown")
        .arg("-R")
        .arg(format!("{0}:{0}", s.user))
        .arg(s.home().join(".config"))
        .arg(&authfile)
        .status()
        .unwrap();
    assert!(ok.success());

    let store = s.start_store();
    let before = img.reg.log_text().len();
    s.podman(&[
        "pull",
        "-q",
        "--tls-verify=false",
        "--authfile",
        s.inside(&authfile).to_str().unwrap(),
        &img.lazy,
    ]);
    let log = img.reg.log_text()[before..].to_string();
    for d in &img.layer_digests[..2] {
        let whole = whole_blob_gets(&log, d);
        assert_eq!(
            whole,
            0,
            "{d} was downloaded whole; the store's log:\n{}",
            store.log_text()
        );
    }
    let slog = store.log_text();
    assert!(
        slog.contains(&format!(
            "podman handed over credentials for {}/test/app",
            img.reg.addr()
        )),
        "{slog}"
    );
    let out = s.podman(&[
        "run",
        "--rm",
        "--network",
        "none",
        &img.lazy,
        "/bin/busybox",
        "cat",
        "/etc/hello.txt",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from the base layer\n"
    );
}
