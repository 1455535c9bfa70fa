//! The real `wsotel` binary: configuration errors, log formats and SIGTERM.

mod common;

use std::time::Duration;

use common::process::*;
use common::*;
use futures_util::StreamExt;

#[test]
fn bad_values_stop_startup_with_one_line_and_exit_2() {
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: &[Case] = &[
        (&["--ping-interval", "soon"], &[], "soon"),
        (&["--max-message-size", "12 parsecs"], &[], "parsecs"),
        (&["--max-connections", "0"], &[], "max-connections"),
        (&["--listen", "not-an-address"], &[], "not-an-address"),
        (&["--log-format", "xml"], &[], "xml"),
        (&[], &[("WSOTEL_DRAIN_TIMEOUT", "0s")], "greater than zero"),
        (&[], &[("WSOTEL_MAX_CONNECTIONS", "many")], "many"),
        (
            &[],
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "not a url")],
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ),
        (
            &[],
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "smoke-signals"),
            ],
            "OTEL_EXPORTER_OTLP_PROTOCOL",
        ),
        (
            &[],
            &[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "2"),
            ],
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            &[],
            &[("OTEL_METRIC_EXPORT_INTERVAL", "soon")],
            "OTEL_METRIC_EXPORT_INTERVAL",
        ),
    ];
    for (args, env, needle) in cases {
        let mut cmd = wsotel();
        cmd.args(*args).envs(env.iter().copied());
        let (code, stdout, stderr) = run_to_end(&mut cmd);
        assert_eq!(code, 2, "{args:?} {env:?}: stderr {stderr:?}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "one line for {args:?}: {stderr:?}"
        );
        assert!(stderr.contains(needle), "{stderr:?} names {needle}");
        assert!(stdout.is_empty(), "nothing starts: {stdout:?}");
    }
}

#[test]
fn occupied_port_is_one_line_and_exit_2() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, _, stderr) =
        run_to_end(wsotel().args(["--listen", &addr, "--admin-listen", "127.0.0.1:0"]));
    assert_eq!(code, 2);
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr:?}");
    assert!(stderr.contains(&addr), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_with_1001_and_exits_0() {
    let server = start(&[]);
    let startup = server.startup.clone();
    let mut echo = connect(&server.url(ECHO)).await;
    let mut member = connect(&server.url("/ws/rooms/shutdown")).await;
    echoes(&mut echo, "before").await;
    let (status, _) = http_get(server.admin, "/readyz").await;
    assert_eq!(status, 200);

    server.sigterm();
    for ws in [&mut echo, &mut member] {
        assert_eq!(close_code(ws).await, Some(1001));
        while let Some(Ok(_)) = ws.next().await {}
    }
    let (code, rest) = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert_eq!(code, 0, "{rest:#?}");
    let log = rest.join("\n");
    assert!(log.contains("all connections drained"), "{log}");
    assert!(log.contains("wsotel stopped"), "{log}");
    assert!(log.contains("SIGTERM received"), "{log}");
    let startup = startup.join("\n");
    assert!(
        startup.contains("OTLP export off (no OTEL_EXPORTER_OTLP_ENDPOINT)"),
        "one startup line says OTLP is off: {startup}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let server = start(&["--log-format", "json"]);
    let mut ws = connect(&server.url(ECHO)).await;
    ws.close(None).await.unwrap();
    while let Some(Ok(_)) = ws.next().await {}
    // Wait for the closing line, then stop.
    let seen = lines_until(&server.lines, Duration::from_secs(10), |l| {
        l.contains("connection closed")
    });
    let closed = seen
        .iter()
        .find(|l| l.contains("connection closed"))
        .expect("a connection closed line");
    let v: serde_json::Value = serde_json::from_str(closed).unwrap();
    assert_eq!(v["level"], "INFO");
    assert_eq!(v["websocket.close.reason"], "normal");
    assert_eq!(v["websocket.messages.received"], 0);
    assert_eq!(v["http.route"], "/ws/echo");
    assert!(v["connection.id"].is_i64(), "{v}");
    server.sigterm();
    let (code, rest) = tokio::task::spawn_blocking(move || server.wait())
        .await
        .unwrap();
    assert_eq!(code, 0);
    for line in rest.iter().chain(seen.iter()) {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("{line}: {e}"));
    }
}
