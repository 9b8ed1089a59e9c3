//! The cost of a policy decision per connection (`cargo xtask bench policy`): a service
//! policy of the size the docs show (2 deny rules, 3 allow rules with cgroup and
//! executable globs, a schedule, per-caller and per-service rate limits), decided for
//! 1,000 distinct callers in turn, plus a revocation list of 100 entries checked first,
//! as the daemon does. Prints nanoseconds per decision; the target is under 5 us.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use broker::policy::{
    Engine, IdSpec, Identity, Rate, RateSpec, Revocations, RuleSpec, Selector, Spec, Timestamp,
    Window,
};

fn rule(name: &str) -> RuleSpec {
    RuleSpec {
        name: name.into(),
        at: name.into(),
        ..RuleSpec::default()
    }
}

fn main() {
    let iterations: u32 = std::env::var("BENCH_ITERATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
        .clamp(1000, 100_000_000);
    let spec = Spec {
        deny: vec![
            RuleSpec {
                cgroup: vec!["/kubepods.slice/**".into()],
                ..rule("no-pods")
            },
            RuleSpec {
                uid: vec![IdSpec::Id(65534)],
                ..rule("no-nobody")
            },
        ],
        allow: Some(vec![
            RuleSpec {
                uid: vec![IdSpec::Id(0)],
                exe: vec!["/usr/lib/postgresql/*/bin/psql".into()],
                ..rule("root-psql")
            },
            RuleSpec {
                cgroup: vec!["/system.slice/agent-*.service".into()],
                exe: vec!["/usr/bin/python3*".into(), "/opt/agents/**".into()],
                ..rule("agents")
            },
            RuleSpec {
                unit: vec!["app.service".into()],
                comm: vec!["java".into(), "node".into()],
                when: vec![Window::parse("* 00:00-24:00 UTC").expect("window")],
                ..rule("app")
            },
        ]),
        schedule: vec![Window::parse("* 00:00-24:00 Europe/Paris").expect("window")],
        rate: RateSpec {
            per_caller: Some(Rate {
                count: 1_000_000,
                per: Duration::from_secs(1),
            }),
            per_service: Some(Rate {
                count: 1_000_000,
                per: Duration::from_secs(1),
            }),
        },
    };
    let engine = Engine::build(&spec).expect("policy").expect("non-empty");
    let revocations = Revocations::default();
    for i in 0..100 {
        revocations
            .add(
                Some("other".into()),
                Selector {
                    uid: Some(10_000 + i),
                    ..Selector::default()
                },
                false,
            )
            .expect("revocation");
    }
    let cgroups: Vec<String> = (0..1000)
        .map(|i| format!("/system.slice/agent-{i}.service"))
        .collect();
    let exe = PathBuf::from("/usr/bin/python3.11");
    let mut allowed = 0u64;
    let started = Instant::now();
    for n in 0..iterations {
        let i = (n % 1000) as usize;
        let who = Identity {
            pid: Some(1000 + n),
            uid: Some(1000),
            gid: Some(1000),
            cgroup: Some(&cgroups[i]),
            exe: Some(Path::new(&exe)),
            comm: Some("python3"),
        };
        if revocations.find("db", &who).is_none()
            && matches!(
                engine.decide(&who, Timestamp::now()),
                broker::policy::Outcome::Allowed { .. }
            )
        {
            allowed += 1;
        }
    }
    let took = started.elapsed();
    let per = took.as_nanos() as f64 / f64::from(iterations);
    assert_eq!(
        allowed,
        u64::from(iterations),
        "every caller is allowed by `agents`"
    );
    println!("| measure | value |\n|---|---|");
    println!("| decisions | {iterations} |");
    println!("| ns per decision (revocations + policy) | {per:.0} |");
    println!("| target | < 5000 ns |");
    println!(
        "| within target | {} |",
        if per < 5000.0 { "yes" } else { "NO" }
    );
}
