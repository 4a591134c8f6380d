//! `edge-gateway passwd`: runs the built binary with --stdin to add,
//! replace and delete users, then reads the file back with edge-auth.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, ensure};
use edge_auth::PasswordFile;

const PASSWORDS: [&str; 3] = ["correct horse", "battery staple", "tr0ub4dor&3"];

/// A fresh directory under the target's test scratch space.
fn scratch(name: &str) -> Result<PathBuf> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("passwd-{name}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).context("clearing the scratch dir")?;
    }
    std::fs::create_dir_all(&dir).context("creating the scratch dir")?;
    Ok(dir)
}

fn passwd(args: &[&str], stdin: &str) -> Result<Output> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_edge-gateway"))
        .arg("passwd")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting edge-gateway")?;
    child
        .stdin
        .take()
        .context("child stdin")?
        .write_all(stdin.as_bytes())
        .context("writing the password")?;
    let output = child
        .wait_with_output()
        .context("waiting for edge-gateway")?;
    for password in PASSWORDS {
        for (name, stream) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
            ensure!(
                !String::from_utf8_lossy(stream).contains(password),
                "the password appears on {name}"
            );
        }
    }
    Ok(output)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn add_replace_and_delete_users() -> Result<()> {
    let dir = scratch("cycle")?;
    let file = dir.join("passwd");
    let path = file.to_str().context("utf-8 path")?;

    let out = passwd(&[path, "alice", "--stdin"], &format!("{}\n", PASSWORDS[0]))?;
    ensure!(out.status.success(), "add alice: {}", stderr(&out));
    ensure!(
        stderr(&out).contains(&format!("updated user alice in {path}")),
        "{}",
        stderr(&out)
    );
    let out = passwd(&[path, "bob", "--stdin"], &format!("{}\r\n", PASSWORDS[1]))?;
    ensure!(out.status.success(), "add bob: {}", stderr(&out));

    let users = PasswordFile::load(&file)?;
    ensure!(users.len() == 2);
    ensure!(users.verify("alice", PASSWORDS[0].as_bytes()));
    ensure!(
        users.verify("bob", PASSWORDS[1].as_bytes()),
        "\\r\\n is stripped"
    );
    ensure!(!users.verify("alice", PASSWORDS[1].as_bytes()));

    let out = passwd(&[path, "alice", "--stdin"], PASSWORDS[2])?;
    ensure!(out.status.success(), "replace alice: {}", stderr(&out));
    let users = PasswordFile::load(&file)?;
    ensure!(users.len() == 2);
    ensure!(!users.verify("alice", PASSWORDS[0].as_bytes()));
    ensure!(users.verify("alice", PASSWORDS[2].as_bytes()));

    let out = passwd(&[path, "bob", "--delete"], "")?;
    ensure!(out.status.success(), "delete bob: {}", stderr(&out));
    ensure!(
        stderr(&out).contains(&format!("removed user bob from {path}")),
        "{}",
        stderr(&out)
    );
    let users = PasswordFile::load(&file)?;
    ensure!(users.len() == 1 && !users.contains("bob"));
    ensure!(!users.verify("bob", PASSWORDS[1].as_bytes()));

    let text = std::fs::read_to_string(&file)?;
    for password in PASSWORDS {
        ensure!(!text.contains(password), "a password is in the file");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "file mode {mode:o}");
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn failures_exit_1_with_a_message() -> Result<()> {
    let dir = scratch("failures")?;
    let file = dir.join("passwd");
    let path = file.to_str().context("utf-8 path")?;

    let out = passwd(&[path, "alice", "--stdin"], "\n")?;
    ensure!(
        out.status.code() == Some(1),
        "empty password: {:?}",
        out.status
    );
    ensure!(stderr(&out).contains("empty password"), "{}", stderr(&out));
    ensure!(!file.exists(), "nothing written");

    let out = passwd(&[path, "al:ice", "--stdin"], "pw\n")?;
    ensure!(out.status.code() == Some(1), "bad name: {:?}", out.status);
    ensure!(stderr(&out).contains("bad user name"), "{}", stderr(&out));

    let out = passwd(&[path, "alice", "--stdin"], &format!("{}\n", PASSWORDS[0]))?;
    ensure!(out.status.success(), "add alice: {}", stderr(&out));
    let out = passwd(&[path, "nobody", "--delete"], "")?;
    ensure!(
        out.status.code() == Some(1),
        "delete unknown: {:?}",
        out.status
    );
    ensure!(
        stderr(&out).contains("user nobody is not in"),
        "{}",
        stderr(&out)
    );
    ensure!(PasswordFile::load(&file)?.len() == 1, "file untouched");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
