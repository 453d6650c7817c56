//! The CLI's side of encrypted backends: where a passphrase or key file comes from, creating
//! a backend's key (`--encrypt`), unlocking it for `--from`, and `backend rekey`.

use std::io::IsTerminal;
use std::path::Path;

use snapfs::replica::backend::config::{self, BackendConfig, Secret32};
use snapfs::replica::backend::crypt::key::{self, Secret, KEY_NAME};
use snapfs::replica::backend::BackendError;

use super::replica::SpecOpts;

fn read_passphrase_file(p: &Path) -> Result<Vec<u8>, String> {
    let text = std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))?;
    let line = text.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Ok(line.to_vec())
}

/// The secret that unlocks (or, with `confirm`, will protect) a backend's key: a key file,
/// a passphrase file, the environment variable `env`, or a prompt on the terminal.
pub fn secret(
    key_file: Option<&Path>,
    passphrase_file: Option<&Path>,
    env: &str,
    confirm: bool,
) -> Result<Secret, String> {
    if let Some(p) = key_file {
        let b =
            std::fs::read(p).map_err(|e| format!("cannot read key file {}: {e}", p.display()))?;
        if b.len() < 16 {
            return Err(format!(
                "key file {} holds fewer than 16 bytes",
                p.display()
            ));
        }
        return Ok(Secret::KeyFile(b));
    }
    let pw = if let Some(p) = passphrase_file {
        read_passphrase_file(p)?
    } else if let Some(v) = std::env::var_os(env).filter(|v| !v.is_empty()) {
        std::os::unix::ffi::OsStrExt::as_bytes(v.as_os_str()).to_vec()
    } else if std::io::stdin().is_terminal() {
        let a = snapfs::sys::read_secret("Passphrase for the encrypted backend: ")
            .map_err(|e| format!("cannot read a passphrase from the terminal: {e}"))?;
        if confirm {
            let b = snapfs::sys::read_secret("The same passphrase again: ")
                .map_err(|e| format!("cannot read a passphrase from the terminal: {e}"))?;
            if a != b {
                return Err("the two passphrases differ".into());
            }
        }
        a.into_bytes()
    } else {
        return Err(format!(
            "an encrypted backend needs its passphrase: set {env}, or give --passphrase-file FILE or --key-file FILE"
        ));
    };
    if pw.is_empty() {
        return Err("the passphrase is empty".into());
    }
    Ok(Secret::Passphrase(pw))
}

fn opts_secret(o: &SpecOpts, confirm: bool) -> Result<Secret, String> {
    secret(
        o.key_file.as_deref(),
        o.passphrase_file.as_deref(),
        "SNAPFS_PASSPHRASE",
        confirm,
    )
}

/// Makes `cfg` able to read and write its backend's encryption: for `--from` (`adding`
/// false), unlocks the key if the backend has one; for `backend add` and `mount
/// --replicate`, with `--encrypt`, creates a key on an empty backend or unlocks the one there.
pub fn prepare(cfg: &mut BackendConfig, o: &SpecOpts, adding: bool) -> Result<(), String> {
    if o.encrypt && !adding {
        return Err("--encrypt is for backend add and mount --replicate; reading an encrypted backend needs only its passphrase or key file".into());
    }
    if adding {
        // backend add makes missing dir: directories anyway; the key is looked for in them.
        snapfs::replica::create_dir_members(&cfg.spec)?;
    }
    let raw = config::open_unencrypted(cfg, &config::process_env)?;
    let what = format!("backend {}", cfg.spec);
    match raw.get(KEY_NAME) {
        Ok(obj) => {
            if adding && !o.encrypt {
                return Err(format!(
                    "{what} is encrypted (it holds {KEY_NAME}): add it with --encrypt and its passphrase or key file"
                ));
            }
            let master = key::unwrap(&obj, &opts_secret(o, false)?)?;
            cfg.encryption_key = Some(Secret32::new(&master));
            Ok(())
        }
        Err(BackendError::NotFound) => {
            if !(adding && o.encrypt) {
                return Ok(());
            }
            let objects = raw
                .list("")
                .map_err(|e| format!("{what} does not answer: {e}"))?;
            if !objects.is_empty() {
                return Err(format!(
                    "{what} already holds {} unencrypted objects: --encrypt needs an empty backend",
                    objects.len()
                ));
            }
            let master: [u8; 32] = key::random()?;
            let secret = opts_secret(o, true)?;
            let obj = key::wrap(&master, &secret)?;
            raw.put(KEY_NAME, &obj)
                .map_err(|e| format!("cannot store the key on {what}: {e}"))?;
            let back = raw
                .get(KEY_NAME)
                .map_err(|e| format!("cannot read the key back from {what}: {e}"))?;
            if key::unwrap(&back, &secret)? != master {
                return Err(format!("the key read back from {what} differs"));
            }
            cfg.encryption_key = Some(Secret32::new(&master));
            Ok(())
        }
        Err(e) if !adding && e.is_transient() => {
            // A redundant backend with members down may be unable to tell. Its objects say it
            // soon enough: an encrypted one fails to open as a plain object, clearly.
            eprintln!(
                "snapfs: warning: cannot tell whether {what} is encrypted ({KEY_NAME}: {e}); reading it as unencrypted"
            );
            Ok(())
        }
        Err(e) => Err(format!("{what} does not answer: {e}")),
    }
}

/// `backend rekey --from SPEC`: the key object rewrapped under a new passphrase or key file.
pub fn rekey(
    cfg: &BackendConfig,
    o: &SpecOpts,
    new_key_file: Option<&Path>,
    new_passphrase_file: Option<&Path>,
) -> Result<String, String> {
    let raw = config::open_unencrypted(cfg, &config::process_env)?;
    let obj = match raw.get(KEY_NAME) {
        Ok(o) => o,
        Err(BackendError::NotFound) => {
            return Err(format!(
                "backend {} is not encrypted (no {KEY_NAME})",
                cfg.spec
            ))
        }
        Err(e) => return Err(format!("backend {} does not answer: {e}", cfg.spec)),
    };
    let master = key::unwrap(&obj, &opts_secret(o, false)?)?;
    let new = secret(
        new_key_file,
        new_passphrase_file,
        "SNAPFS_NEW_PASSPHRASE",
        true,
    )?;
    let wrapped = key::wrap(&master, &new)?;
    raw.put(KEY_NAME, &wrapped)
        .map_err(|e| format!("cannot store the new key object: {e}"))?;
    let back = raw.get(KEY_NAME).map_err(|e| e.to_string())?;
    if key::unwrap(&back, &new)? != master {
        return Err("the key object read back does not open with the new secret".into());
    }
    Ok(format!(
        "rewrapped the key of {}: the old passphrase or key file no longer opens it (no object was re-encrypted)",
        cfg.spec
    ))
}
