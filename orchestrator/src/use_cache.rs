//! `orchestrator use URL`: adds a fleetcache cache to a machine's Nix outside NixOS (a laptop, a
//! CI runner) — `extra-substituters`, `extra-trusted-public-keys`, a `connect-timeout` when
//! nix.conf sets none and, for a private cache, a netrc entry with `netrc-file` — without
//! touching what is there, and only what is missing: run twice, the second run changes nothing.

use std::fs;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Why the cache could not be added.
#[derive(Debug, Error)]
pub enum UseError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The nix.conf belongs to NixOS (a link into the store).
    #[error(
        "{} is NixOS's (a link into the Nix store): set services.fleetcache.client (or nix.settings) in the machine's configuration instead",
        .0.display()
    )]
    ManagedByNixos(PathBuf),
    /// The URL is not an http(s) URL with a host.
    #[error("{0:?} is not an http:// or https:// URL with a host")]
    Url(String),
    /// A key does not parse.
    #[error("public key {key:?}: {why}")]
    Key {
        /// The key.
        key: String,
        /// What is wrong.
        why: String,
    },
    /// The cache could not tell its keys.
    #[error("asking {url} for its public keys: {why} (pass --public-key)")]
    Keys {
        /// The cache.
        url: String,
        /// What happened.
        why: String,
    },
}

/// What to add.
pub struct Request<'a> {
    /// The cache's URL.
    pub url: &'a str,
    /// Its public keys.
    pub public_keys: &'a [String],
    /// A read token, for a private cache.
    pub token: Option<&'a str>,
    /// `connect-timeout` to set when nix.conf sets none; 0 sets nothing.
    pub connect_timeout: u64,
}

/// A nix.conf and a netrc file, as they are and as they would be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The new nix.conf text.
    pub nix_conf: String,
    /// The netrc file and its new text, when it changes.
    pub netrc: Option<(PathBuf, String)>,
    /// What changes, one line each; empty when nothing does.
    pub changes: Vec<String>,
}

/// The values of `name` in a nix.conf text (every line setting it, in order).
fn values<'t>(text: &'t str, names: &[&str]) -> Vec<&'t str> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let Some((key, value)) = line.split_once('=') else { continue };
        if names.contains(&key.trim()) {
            out.extend(value.split_whitespace());
        }
    }
    out
}

/// The host of an http(s) URL.
pub fn host_of(url: &str) -> Result<String, UseError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| UseError::Url(url.to_owned()))?;
    match (parsed.scheme(), parsed.host_str()) {
        ("http" | "https", Some(host)) => Ok(host.to_owned()),
        _ => Err(UseError::Url(url.to_owned())),
    }
}

/// What adding `req` to the nix.conf `conf` (at `conf_path`; `netrc_text` is the netrc file the
/// plan would write to, if it exists) changes.
pub fn plan(
    conf: &str,
    conf_path: &Path,
    netrc_text: impl Fn(&Path) -> Option<String>,
    req: &Request,
) -> Result<Plan, UseError> {
    for key in req.public_keys {
        nix_formats::PublicKey::parse(key)
            .map_err(|e| UseError::Key { key: key.clone(), why: e.to_string() })?;
    }
    let url = req.url.trim_end_matches('/');
    let host = host_of(url)?;
    let mut text = conf.to_owned();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    let mut changes = Vec::new();
    let substituters = values(conf, &["substituters", "extra-substituters"]);
    if !substituters.iter().any(|s| s.trim_end_matches('/') == url) {
        text.push_str(&format!("extra-substituters = {url}\n"));
        changes.push(format!("added {url} to extra-substituters"));
    }
    let trusted = values(conf, &["trusted-public-keys", "extra-trusted-public-keys"]);
    let new_keys: Vec<&str> =
        req.public_keys.iter().map(String::as_str).filter(|k| !trusted.contains(k)).collect();
    if !new_keys.is_empty() {
        text.push_str(&format!("extra-trusted-public-keys = {}\n", new_keys.join(" ")));
        changes.push(format!("added {} to extra-trusted-public-keys", new_keys.join(" ")));
    }
    if req.connect_timeout > 0 && values(conf, &["connect-timeout"]).is_empty() {
        text.push_str(&format!("connect-timeout = {}\n", req.connect_timeout));
        changes.push(format!(
            "set connect-timeout = {} (when the cache cannot be reached, Nix gives up connecting after \
             that many seconds, not curl's 300)",
            req.connect_timeout
        ));
    }
    let mut netrc = None;
    if let Some(token) = req.token {
        let named = values(conf, &["netrc-file"]).last().map(PathBuf::from);
        let file = named.clone().unwrap_or_else(|| conf_path.with_file_name("netrc"));
        if named.is_none() {
            text.push_str(&format!("netrc-file = {}\n", file.display()));
            changes.push(format!("set netrc-file = {}", file.display()));
        }
        let entry = format!("machine {host} login fleetcache password {token}");
        let old = netrc_text(&file).unwrap_or_default();
        let mut lines: Vec<String> = Vec::new();
        let mut found = false;
        for line in old.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.len() >= 2 && words[0] == "machine" && words[1] == host {
                if !found {
                    lines.push(entry.clone());
                }
                found = true;
            } else {
                lines.push(line.to_owned());
            }
        }
        if !found {
            lines.push(entry.clone());
        }
        let new = lines.join("\n") + "\n";
        if new != old {
            changes.push(format!(
                "{} the token for {host} in {}",
                if found { "replaced" } else { "added" },
                file.display()
            ));
            netrc = Some((file, new));
        }
    }
    Ok(Plan { nix_conf: text, netrc, changes })
}

/// Which nix.conf: `--nix-conf`, `--system` (`$NIX_CONF_DIR/nix.conf`, else
/// `/etc/nix/nix.conf`), `--user` (`$XDG_CONFIG_HOME/nix/nix.conf`, else
/// `~/.config/nix/nix.conf`); by default the system's for root, the user's for anyone else.
/// Also says whether it is the system's.
pub fn target(explicit: Option<PathBuf>, system: bool, user: bool) -> (PathBuf, bool) {
    if let Some(p) = explicit {
        return (p, false);
    }
    if system || (!user && rustix::process::geteuid().is_root()) {
        let dir = std::env::var_os("NIX_CONF_DIR").map_or_else(|| PathBuf::from("/etc/nix"), PathBuf::from);
        return (dir.join("nix.conf"), true);
    }
    let config = std::env::var_os("XDG_CONFIG_HOME").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/".into())).join(".config")
    });
    (config.join("nix/nix.conf"), false)
}

/// Asks the cache for its public keys.
pub async fn fetch_keys(url: &str, token: Option<&str>) -> Result<Vec<String>, UseError> {
    let err = |why: String| UseError::Keys { url: url.to_owned(), why };
    let http = builder::http::client_builder()
        .map_err(|e| err(e.to_string()))?
        .timeout(std::time::Duration::from_secs(30))
        .build()
        .map_err(|e| err(builder::http::describe(&e)))?;
    let mut request = http.get(format!("{}{}", url.trim_end_matches('/'), cache_protocol::KEYS));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.map_err(|e| err(builder::http::describe(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(err(format!("it answered {status} (a fleetcache cache-server answers with its keys)")));
    }
    // A few keys of ~100 bytes each.
    let keys: cache_protocol::CacheKeys = builder::http::read_json(response, 64 << 10).await.map_err(err)?;
    if keys.public_keys.is_empty() {
        return Err(err("it has no signing key".to_owned()));
    }
    Ok(keys.public_keys)
}

/// Writes the plan (the netrc first, mode 0600, so nix.conf never names a file without the
/// token).
pub fn apply(conf_path: &Path, plan: &Plan) -> Result<(), UseError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| UseError::File { path, source }
    };
    if let Some((file, text)) = &plan.netrc {
        if let Some(dir) = file.parent() {
            fs::create_dir_all(dir).map_err(io(dir))?;
        }
        write_private(file, text).map_err(io(file))?;
    }
    if let Some(dir) = conf_path.parent() {
        fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let temp = conf_path.with_extension("conf.fleetcache-new");
    fs::write(&temp, &plan.nix_conf).map_err(io(&temp))?;
    if let Ok(old) = fs::metadata(conf_path) {
        fs::set_permissions(&temp, old.permissions()).map_err(io(&temp))?;
    }
    fs::rename(&temp, conf_path).map_err(io(conf_path))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let temp = path.with_extension("fleetcache-new");
    let mut f = fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&temp)?;
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    fs::rename(&temp, path)
}

/// Reads the nix.conf (absent is empty), refusing NixOS's.
pub fn read_conf(path: &Path) -> Result<String, UseError> {
    if fs::read_link(path)
        .is_ok_and(|target| target.starts_with("/nix/store") || target.starts_with("/etc/static"))
    {
        return Err(UseError::ManagedByNixos(path.to_owned()));
    }
    match fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(source) => Err(UseError::File { path: path.to_owned(), source }),
    }
}

/// The command's settings.
pub struct Args {
    /// The cache.
    pub url: String,
    /// Its keys; none means ask the cache.
    pub public_keys: Vec<String>,
    /// A read token.
    pub token: Option<String>,
    /// The nix.conf to change.
    pub nix_conf: PathBuf,
    /// Whether that is the system's.
    pub system: bool,
    /// Print, write nothing.
    pub dry_run: bool,
    /// `connect-timeout` to set when nix.conf sets none; 0 sets nothing.
    pub connect_timeout: u64,
}

/// `orchestrator use`: plans, says what changes, writes it (unless a dry run) and says what the
/// user must still do.
pub fn run(args: Args) -> Result<(), UseError> {
    let public_keys = if args.public_keys.is_empty() {
        let rt = tokio::runtime::Runtime::new()
            .map_err(|e| UseError::Keys { url: args.url.clone(), why: e.to_string() })?;
        let keys = rt.block_on(fetch_keys(&args.url, args.token.as_deref()))?;
        eprintln!(
            "trusting the key{} {} announces: {} (check it, or pass --public-key)",
            if keys.len() == 1 { "" } else { "s" },
            args.url,
            keys.join(" ")
        );
        keys
    } else {
        args.public_keys
    };
    let conf = read_conf(&args.nix_conf)?;
    let req = Request {
        url: &args.url,
        public_keys: &public_keys,
        token: args.token.as_deref(),
        connect_timeout: args.connect_timeout,
    };
    let plan = plan(&conf, &args.nix_conf, |p| fs::read_to_string(p).ok(), &req)?;
    if plan.changes.is_empty() {
        eprintln!("{} already uses {}: nothing to change", args.nix_conf.display(), args.url);
        return Ok(());
    }
    let verb = if args.dry_run { "would change" } else { "changing" };
    eprintln!("{verb} {}:", args.nix_conf.display());
    for change in &plan.changes {
        eprintln!("  {change}");
    }
    if args.dry_run {
        print!("{}", plan.nix_conf);
        return Ok(());
    }
    apply(&args.nix_conf, &plan)?;
    eprintln!("{}", advice(&args.nix_conf, args.system));
    Ok(())
}

/// What the user must still do for the change to take effect.
pub fn advice(conf_path: &Path, system: bool) -> String {
    if system {
        if Path::new("/nix/var/nix/daemon-socket/socket").exists() {
            return "restart the Nix daemon to use it: sudo systemctl restart nix-daemon".to_owned();
        }
        return "Nix reads it at its next start".to_owned();
    }
    format!(
        "single-user Nix uses {} at once; with a Nix daemon, a user's extra substituters count only if the \
         user is in the daemon's trusted-users (or the URL is in its trusted-substituters and the key in its \
         trusted-public-keys)",
        conf_path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "cache.example.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";

    fn req<'a>(keys: &'a [String], token: Option<&'a str>) -> Request<'a> {
        Request { url: "https://cache.example.org/", public_keys: keys, token, connect_timeout: 5 }
    }

    #[test]
    fn adds_what_is_missing_and_keeps_the_rest() {
        let keys = vec![KEY.to_owned()];
        let conf = "# mine\nsubstituters = https://cache.nixos.org/\nmax-jobs = 4";
        let p = plan(conf, Path::new("/etc/nix/nix.conf"), |_| None, &req(&keys, None)).unwrap();
        assert_eq!(
            p.nix_conf,
            format!(
                "# mine\nsubstituters = https://cache.nixos.org/\nmax-jobs = 4\n\
                 extra-substituters = https://cache.example.org\nextra-trusted-public-keys = {KEY}\n\
                 connect-timeout = 5\n"
            )
        );
        assert_eq!(p.changes.len(), 3);
        assert!(p.netrc.is_none());
        let again = plan(&p.nix_conf, Path::new("/etc/nix/nix.conf"), |_| None, &req(&keys, None)).unwrap();
        assert_eq!((again.nix_conf, again.changes), (p.nix_conf, Vec::<String>::new()));
    }

    #[test]
    fn a_connect_timeout_is_set_only_where_none_is() {
        let keys = vec![KEY.to_owned()];
        let path = Path::new("/etc/nix/nix.conf");
        let conf = "connect-timeout = 30 # a slow link\n";
        let p = plan(conf, path, |_| None, &req(&keys, None)).unwrap();
        assert!(
            p.nix_conf.starts_with(conf) && p.nix_conf.matches("connect-timeout").count() == 1,
            "{}",
            p.nix_conf
        );
        let none = Request { connect_timeout: 0, ..req(&keys, None) };
        let p = plan("", path, |_| None, &none).unwrap();
        assert!(!p.nix_conf.contains("connect-timeout"), "{}", p.nix_conf);
    }

    #[test]
    fn a_token_goes_to_the_netrc_nix_conf_names() {
        let keys = vec![KEY.to_owned()];
        let conf_path = Path::new("/home/u/.config/nix/nix.conf");
        let p = plan("", conf_path, |_| None, &req(&keys, Some("s3cret"))).unwrap();
        assert!(p.nix_conf.contains("netrc-file = /home/u/.config/nix/netrc\n"), "{}", p.nix_conf);
        let (file, text) = p.netrc.clone().unwrap();
        assert_eq!(file, Path::new("/home/u/.config/nix/netrc"));
        assert_eq!(text, "machine cache.example.org login fleetcache password s3cret\n");
        // An existing netrc keeps its other entries; the host's entry is replaced.
        let conf = "netrc-file = /etc/nix/netrc\n";
        let old =
            "machine git.example.org login me password x\nmachine cache.example.org login a password old\n";
        let p = plan(conf, conf_path, |_| Some(old.to_owned()), &req(&keys, Some("new"))).unwrap();
        let (file, text) = p.netrc.unwrap();
        assert_eq!(file, Path::new("/etc/nix/netrc"));
        assert_eq!(
            text,
            "machine git.example.org login me password x\nmachine cache.example.org login fleetcache password new\n"
        );
        assert!(!p.nix_conf.contains("netrc-file = /home"), "the named netrc file is kept");
    }

    #[test]
    fn bad_input_is_named() {
        let bad = vec!["nope".to_owned()];
        assert!(matches!(plan("", Path::new("/x"), |_| None, &req(&bad, None)), Err(UseError::Key { .. })));
        let keys = vec![KEY.to_owned()];
        let r = Request { url: "cache.example.org", public_keys: &keys, token: None, connect_timeout: 5 };
        assert!(matches!(plan("", Path::new("/x"), |_| None, &r), Err(UseError::Url(_))));
    }
}
