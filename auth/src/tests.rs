//! Tests of the [`Authority`]: login rules, ACL delegation, reload.

use std::fs;

use super::*;

struct Files {
    _dir: tempfile::TempDir,
    passwd: PathBuf,
    acl: PathBuf,
}

fn files() -> Result<Files, AuthError> {
    let dir = tempfile::tempdir().map_err(|e| AuthError::io("tempdir", e))?;
    let passwd = dir.path().join("passwd");
    let acl = dir.path().join("acl");
    set_user(&passwd, "alice", b"alice-pw")?;
    fs::write(
        &acl,
        "topic read public/#\nuser alice\ntopic alice/#\namqp .* .* .*\n",
    )
    .map_err(|e| AuthError::io(&acl, e))?;
    Ok(Files {
        _dir: dir,
        passwd,
        acl,
    })
}

fn settings(f: &Files, allow_anonymous: bool) -> AuthSettings {
    AuthSettings {
        password_file: Some(f.passwd.clone()),
        acl_file: Some(f.acl.clone()),
        allow_anonymous,
    }
}

#[test]
fn login_with_a_password_file() -> Result<(), AuthError> {
    let f = files()?;
    let auth = Authority::load(settings(&f, false))?;
    assert!(auth.has_password_file());
    let alice = auth.login(Some("alice"), Some(b"alice-pw"));
    assert_eq!(alice.as_ref().map(Principal::user), Ok(Some("alice")));
    assert_eq!(
        auth.login(Some("alice"), Some(b"wrong")),
        Err(LoginError::BadCredentials)
    );
    assert_eq!(
        auth.login(Some("alice"), None),
        Err(LoginError::BadCredentials)
    );
    assert_eq!(
        auth.login(Some("bob"), Some(b"alice-pw")),
        Err(LoginError::BadCredentials)
    );
    assert_eq!(auth.login(None, None), Err(LoginError::NotAuthorized));
    assert_eq!(
        auth.login(None, Some(b"alice-pw")),
        Err(LoginError::BadCredentials)
    );

    let open = Authority::load(settings(&f, true))?;
    assert_eq!(open.login(None, None), Ok(Principal::anonymous()));
    assert_eq!(
        open.login(Some("alice"), Some(b"wrong")),
        Err(LoginError::BadCredentials),
        "anonymous access does not make a wrong password right"
    );
    Ok(())
}

#[test]
fn login_without_a_password_file() -> Result<(), AuthError> {
    let closed = Authority::load(AuthSettings::default())?;
    assert!(!closed.has_password_file());
    assert_eq!(
        closed.login(Some("x"), Some(b"y")),
        Err(LoginError::NotAuthorized)
    );
    assert_eq!(closed.login(None, None), Err(LoginError::NotAuthorized));
    let open = Authority::load(AuthSettings {
        allow_anonymous: true,
        ..AuthSettings::default()
    })?;
    // Without a password file a user name proves nothing: anonymous.
    assert_eq!(open.login(Some("x"), Some(b"y")).map(|p| p.user), Ok(None));
    assert_eq!(open.login(None, None), Ok(Principal::anonymous()));
    // No ACL file: everything is allowed.
    let anyone = Principal::anonymous();
    assert!(open.can_publish(&anyone, "c", "a/b"));
    assert!(open.can_subscribe(&anyone, "c", "#"));
    assert!(open.amqp_allows(&anyone, AmqpPermission::Configure, "q"));
    Ok(())
}

#[test]
fn acl_is_applied_to_principals() -> Result<(), AuthError> {
    let f = files()?;
    let auth = Authority::load(settings(&f, true))?;
    let alice = auth.login_certificate("alice");
    let anon = Principal::anonymous();
    assert!(auth.can_publish(&alice, "c", "alice/x"));
    assert!(!auth.can_publish(&anon, "c", "alice/x"));
    assert!(auth.can_subscribe(&anon, "c", "public/+"));
    assert!(!auth.can_subscribe(&alice, "c", "public/+"));
    assert!(auth.amqp_allows(&alice, AmqpPermission::Read, "q"));
    assert!(!auth.amqp_allows(&anon, AmqpPermission::Read, "q"));
    Ok(())
}

#[test]
fn reload_swaps_files_and_keeps_them_on_error() -> Result<(), AuthError> {
    let f = files()?;
    let auth = Authority::load(settings(&f, false))?;
    set_user(&f.passwd, "bob", b"bob-pw")?;
    fs::write(&f.acl, "user bob\ntopic bob/#\n").map_err(|e| AuthError::io(&f.acl, e))?;
    let bob = Principal {
        user: Some(Arc::from("bob")),
    };
    assert!(
        auth.login(Some("bob"), Some(b"bob-pw")).is_err(),
        "not reloaded yet"
    );
    auth.reload()?;
    assert_eq!(auth.login(Some("bob"), Some(b"bob-pw")), Ok(bob.clone()));
    assert!(auth.can_publish(&bob, "c", "bob/1"));

    fs::write(&f.acl, "nonsense\n").map_err(|e| AuthError::io(&f.acl, e))?;
    set_user(&f.passwd, "carol", b"carol-pw")?;
    let err = auth.reload().expect_err("the ACL is broken");
    assert!(matches!(err, AuthError::Parse { line: 1, .. }), "{err}");
    assert!(auth.can_publish(&bob, "c", "bob/1"), "old ACL kept");
    assert!(
        auth.login(Some("carol"), Some(b"carol-pw")).is_err(),
        "old passwords kept"
    );
    Ok(())
}

#[test]
fn load_fails_on_a_missing_file() {
    let err = Authority::load(AuthSettings {
        acl_file: Some(PathBuf::from("/nonexistent/acl")),
        ..AuthSettings::default()
    })
    .expect_err("missing ACL file");
    assert!(matches!(err, AuthError::Io { .. }), "{err}");
}
