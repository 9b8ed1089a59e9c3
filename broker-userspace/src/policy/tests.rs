use std::path::Path;

use super::*;

fn rule(name: &str) -> RuleSpec {
    RuleSpec {
        name: name.to_owned(),
        at: name.to_owned(),
        ..RuleSpec::default()
    }
}

fn who<'a>(uid: u32, cgroup: &'a str, exe: &'a str) -> Identity<'a> {
    Identity {
        pid: Some(100),
        uid: Some(uid),
        gid: Some(uid),
        cgroup: Some(cgroup),
        exe: Some(Path::new(exe)),
        comm: Path::new(exe).file_name().and_then(|n| n.to_str()),
    }
}

fn now() -> Timestamp {
    "2026-12-01T12:00:00Z".parse().unwrap()
}

#[test]
fn the_issue_example_allows_root_and_psql_in_the_app_cgroup_only() {
    let spec = Spec {
        allow: Some(vec![
            RuleSpec {
                uid: vec![IdSpec::Id(0)],
                ..rule("allow[0]")
            },
            RuleSpec {
                exe: vec!["/usr/bin/psql".into()],
                cgroup: vec!["/system.slice/app.service".into()],
                ..rule("app-psql")
            },
        ]),
        ..Spec::default()
    };
    let e = Engine::build(&spec).unwrap().unwrap();
    let app = "/system.slice/app.service";
    assert_eq!(
        e.decide(&who(0, "/user.slice", "/usr/bin/python3"), now()),
        Outcome::Allowed {
            rule: Some("allow[0]".into())
        }
    );
    assert_eq!(
        e.decide(&who(1000, app, "/usr/bin/psql"), now()),
        Outcome::Allowed {
            rule: Some("app-psql".into())
        }
    );
    for (uid, cg, exe) in [
        (1000, app, "/usr/bin/python3"),
        (1000, "/system.slice/other.service", "/usr/bin/psql"),
    ] {
        assert!(
            matches!(e.decide(&who(uid, cg, exe), now()), Outcome::Denied { ref rule, .. } if rule == "no allow rule"),
            "{uid} {cg} {exe}"
        );
    }
    // Unknown identity (a TCP listenOn client): fails closed.
    assert!(matches!(
        e.decide(&Identity::default(), now()),
        Outcome::Denied { .. }
    ));
}

#[test]
fn deny_wins_globs_units_and_unknown_facts_fail_closed() {
    let spec = Spec {
        deny: vec![RuleSpec {
            cgroup: vec!["/kubepods/**".into()],
            ..rule("no-pods")
        }],
        allow: Some(vec![RuleSpec {
            unit: vec!["app.service".into()],
            ..rule("unit")
        }]),
        ..Spec::default()
    };
    let e = Engine::build(&spec).unwrap().unwrap();
    assert!(matches!(
        e.decide(&who(5, "/kubepods/burstable/pod1/app.service", "/x"), now()),
        Outcome::Denied { ref rule, .. } if rule == "no-pods"
    ));
    assert!(matches!(
        e.decide(&who(5, "/system.slice/app.service", "/x"), now()),
        Outcome::Allowed { .. }
    ));
    // `*` stays within one component.
    let star = Engine::build(&Spec {
        deny: vec![RuleSpec {
            cgroup: vec!["/kubepods/*".into()],
            ..rule("star")
        }],
        ..Spec::default()
    })
    .unwrap()
    .unwrap();
    assert!(matches!(
        star.decide(&who(5, "/kubepods/a/b", "/x"), now()),
        Outcome::Allowed { rule: None }
    ));
    assert!(matches!(
        star.decide(&Identity::default(), now()),
        Outcome::Denied { .. }
    ));
}

#[test]
fn windows_in_rules_and_schedules() {
    let spec = Spec {
        schedule: vec![Window::parse("mon-fri 08:00-18:00 UTC").unwrap()],
        ..Spec::default()
    };
    let e = Engine::build(&spec).unwrap().unwrap();
    // 2026-12-01 is a Tuesday.
    assert!(matches!(
        e.decide(&who(1, "/", "/x"), now()),
        Outcome::Allowed { .. }
    ));
    let night: Timestamp = "2026-12-01T20:00:00Z".parse().unwrap();
    assert!(matches!(
        e.decide(&who(1, "/", "/x"), night),
        Outcome::Denied { ref rule, .. } if rule == "schedule"
    ));
}

#[test]
fn rate_limits_deny_the_excess_and_allow_again() {
    let spec = Spec {
        rate: RateSpec {
            per_caller: Some(Rate {
                count: 2,
                per: Duration::from_millis(200),
            }),
            per_service: None,
        },
        ..Spec::default()
    };
    let e = Engine::build(&spec).unwrap().unwrap();
    let a = who(1, "/a", "/x");
    let b = who(2, "/b", "/x");
    assert!(matches!(e.decide(&a, now()), Outcome::Allowed { .. }));
    assert!(matches!(e.decide(&a, now()), Outcome::Allowed { .. }));
    assert!(matches!(e.decide(&a, now()), Outcome::Denied { ref rule, .. } if rule == "rateLimit"));
    assert!(
        matches!(e.decide(&b, now()), Outcome::Allowed { .. }),
        "another caller has its own budget"
    );
    std::thread::sleep(Duration::from_millis(250));
    assert!(matches!(e.decide(&a, now()), Outcome::Allowed { .. }));
}

#[test]
fn names_that_do_not_exist_are_errors_naming_the_rule() {
    let spec = Spec {
        deny: vec![RuleSpec {
            uid: vec![IdSpec::Name("no-such-user-3f9a".into())],
            ..rule("deny[0]")
        }],
        ..Spec::default()
    };
    let e = Engine::build(&spec).unwrap_err();
    assert_eq!((e.at.as_str(), e.key), ("deny[0]", "uid"));
    assert!(Engine::build(&Spec::default()).unwrap().is_none());
}

#[test]
fn revocations_select_callers_and_services() {
    let r = Revocations::default();
    assert!(r.add(None, Selector::default(), false).is_err());
    let one = r
        .add(
            Some("db".into()),
            Selector {
                uid: Some(1000),
                exe: Some("/usr/bin/*".into()),
                ..Selector::default()
            },
            false,
        )
        .unwrap();
    assert_eq!(
        r.find("db", &who(1000, "/a", "/usr/bin/psql")),
        Some(one.id)
    );
    assert_eq!(r.find("other", &who(1000, "/a", "/usr/bin/psql")), None);
    assert_eq!(r.find("db", &who(1001, "/a", "/usr/bin/psql")), None);
    assert_eq!(r.find("db", &who(1000, "/a", "/opt/x")), None);
    assert_eq!(
        r.find("db", &Identity::default()),
        Some(one.id),
        "fails closed"
    );
    assert!(r.lift(one.id));
    assert!(!r.lift(one.id));
    assert_eq!(r.find("db", &who(1000, "/a", "/usr/bin/psql")), None);
}
