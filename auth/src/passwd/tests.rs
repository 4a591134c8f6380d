//! Tests of the password file: parsing, verification, atomic rewrites.

use super::*;

fn hash(password: &str) -> String {
    hash_password(password.as_bytes()).expect("hashing works")
}

#[test]
fn hash_is_argon2id_with_the_chosen_params() {
    let phc = hash("secret");
    assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
    assert_ne!(phc, hash("secret"), "salts are random");
}

#[test]
fn parse_and_verify() {
    let text = format!(
        "# users\n\nalice:{}\n  bob:{}  \n",
        hash("alice-pw"),
        hash("bob-pw")
    );
    let file = PasswordFile::parse(&text).expect("valid file");
    assert_eq!(file.len(), 2);
    assert!(!file.is_empty());
    assert!(file.contains("alice") && file.contains("bob") && !file.contains("carol"));
    assert!(file.verify("alice", b"alice-pw"));
    assert!(!file.verify("alice", b"bob-pw"));
    assert!(file.verify("bob", b"bob-pw"));
    assert!(!file.verify("carol", b"alice-pw"));
    assert!(!file.verify("carol", b""));
}

#[test]
fn debug_prints_no_hash() {
    let phc = hash("pw");
    let file = PasswordFile::parse(&format!("alice:{phc}\n")).expect("valid");
    let debug = format!("{file:?}");
    assert!(!debug.contains("argon2"), "{debug}");
    assert!(!debug.contains("alice"), "{debug}");
    assert!(debug.contains('1'), "{debug}");
}

#[test]
fn errors_name_the_line_but_not_the_hash() {
    let good = hash("pw");
    let cases = [
        (format!("alice:{good}\nno-colon-here\n"), 2),
        (format!("alice:{good}\nbob:$argon2id$garbage-secret\n"), 2),
        (format!("\n\nal ice:{good}\n"), 3),
        (format!(":{good}\n"), 1),
        (format!("alice:{good}\nalice:{good}\n"), 2),
    ];
    for (text, want_line) in cases {
        match PasswordFile::parse(&text) {
            Err(e @ AuthError::Parse { line, .. }) => {
                assert_eq!(line, want_line, "{e}");
                let message = e.to_string();
                assert!(
                    message.starts_with(&format!("<text>:{want_line}: ")),
                    "{message}"
                );
                assert!(!message.contains("garbage-secret"), "{message}");
                assert!(!message.contains(&good), "{message}");
            }
            other => panic!("expected a parse error for {text:?}, got {other:?}"),
        }
    }
}

#[test]
fn user_name_rules() {
    assert!(validate_user_name("a").is_ok());
    assert!(validate_user_name("élodie@example.com").is_ok());
    assert!(validate_user_name(&"x".repeat(128)).is_ok());
    for bad in ["", "a:b", "a b", "a\tb", "a\u{7}b", &"x".repeat(129)] {
        assert!(
            matches!(validate_user_name(bad), Err(AuthError::BadUserName { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn set_replace_and_remove_users() -> Result<(), AuthError> {
    let dir = tempfile::tempdir().map_err(|e| AuthError::io("tempdir", e))?;
    let path = dir.path().join("passwd");
    set_user(&path, "alice", b"one")?;
    set_user(&path, "bob", b"two")?;
    let file = PasswordFile::load(&path)?;
    assert_eq!(file.len(), 2);
    assert!(file.verify("alice", b"one") && file.verify("bob", b"two"));

    set_user(&path, "alice", b"three")?;
    let file = PasswordFile::load(&path)?;
    assert_eq!(file.len(), 2);
    assert!(!file.verify("alice", b"one") && file.verify("alice", b"three"));

    assert!(remove_user(&path, "bob")?);
    assert!(!remove_user(&path, "bob")?);
    let file = PasswordFile::load(&path)?;
    assert_eq!(file.len(), 1);
    assert!(!file.contains("bob"));

    let leftovers: Vec<_> = fs::read_dir(dir.path())
        .map_err(|e| AuthError::io(dir.path(), e))?
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("passwd")]);
    Ok(())
}

#[cfg(unix)]
#[test]
fn rewritten_file_is_private() -> Result<(), AuthError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().map_err(|e| AuthError::io("tempdir", e))?;
    let path = dir.path().join("passwd");
    fs::write(&path, "# kept\n").map_err(|e| AuthError::io(&path, e))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644))
        .map_err(|e| AuthError::io(&path, e))?;
    set_user(&path, "alice", b"pw")?;
    let mode = fs::metadata(&path)
        .map_err(|e| AuthError::io(&path, e))?
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let text = fs::read_to_string(&path).map_err(|e| AuthError::io(&path, e))?;
    assert!(text.starts_with("# kept\nalice:$argon2id$"), "{text}");
    Ok(())
}

#[test]
fn set_user_refuses_bad_names_and_broken_files() -> Result<(), AuthError> {
    let dir = tempfile::tempdir().map_err(|e| AuthError::io("tempdir", e))?;
    let path = dir.path().join("passwd");
    assert!(matches!(
        set_user(&path, "a:b", b"pw"),
        Err(AuthError::BadUserName { .. })
    ));
    assert!(!path.exists());
    fs::write(&path, "garbage\n").map_err(|e| AuthError::io(&path, e))?;
    assert!(matches!(
        set_user(&path, "alice", b"pw"),
        Err(AuthError::Parse { line: 1, .. })
    ));
    let text = fs::read_to_string(&path).map_err(|e| AuthError::io(&path, e))?;
    assert_eq!(text, "garbage\n", "a broken file is left as it was");
    Ok(())
}

#[test]
fn load_of_a_missing_file_names_it() {
    let err = PasswordFile::load(Path::new("/nonexistent/edge-passwd")).expect_err("missing");
    assert!(
        err.to_string().contains("/nonexistent/edge-passwd"),
        "{err}"
    );
}
