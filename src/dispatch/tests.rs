use super::*;
use std::collections::BTreeSet;

fn tasks(texts: &[&str]) -> Vec<(Option<String>, String)> {
    texts.iter().map(|t| (None, t.to_string())).collect()
}

fn drain(feed: &TaskFeed) -> Vec<TaskId> {
    std::iter::from_fn(|| feed.try_next())
        .map(|d| d.task.id)
        .collect()
}

fn drain_attempts(feed: &TaskFeed) -> Vec<(TaskId, u32)> {
    std::iter::from_fn(|| feed.try_next())
        .map(|d| (d.task.id, d.attempt))
        .collect()
}

fn ok(task_id: TaskId, attempt: u32) -> Answer {
    Answer {
        task_id,
        attempt,
        ok: true,
        retry: false,
        output: "done".into(),
        incarnation: String::new(),
    }
}

/// A refusal asking for another try (exit 75).
fn refusal(task_id: TaskId, attempt: u32) -> Answer {
    Answer {
        ok: false,
        retry: true,
        ..ok(task_id, attempt)
    }
}

fn queue(k: usize) -> Dispatcher {
    Dispatcher::new(DispatchConfig {
        mode: Mode::Queue,
        max_in_flight: k,
        max_attempts: 3,
        retry_backoff: backoff(1, 1),
        ..Default::default()
    })
}

fn backoff(min_ms: u64, max_ms: u64) -> RetryBackoff {
    RetryBackoff {
        min: Duration::from_millis(min_ms),
        max: Duration::from_millis(max_ms),
    }
}

/// Lets refusals' backoff (of at most `ms`) run out, and the clock tick.
fn after_backoff(d: &Dispatcher, ms: u64) {
    std::thread::sleep(Duration::from_millis(ms + 1));
    d.expire();
}

#[test]
fn credit_limits_deliveries_and_results_release_more() {
    let d = Dispatcher::new(DispatchConfig {
        max_in_flight: 2,
        ..Default::default()
    });
    let (_, feed) = d.attach("a", "p", false, "").unwrap();
    d.publish(tasks(&["1", "2", "3", "4"]));
    assert_eq!(drain(&feed), vec![1, 2]);
    let r = d.complete("a", ok(2, 1)).unwrap();
    assert_eq!(
        (r.task_id, r.stale, r.accepted, r.task.as_deref()),
        (Some(2), false, true, Some("2"))
    );
    assert_eq!(drain(&feed), vec![3]);
    assert_eq!(d.clients()[0].in_flight, 2);
    let c = d.counters();
    assert_eq!((c.produced, c.sent, c.results), (4, 3, 1));
}

#[test]
fn late_clients_get_history_unless_they_start_at_new() {
    let d = Dispatcher::new(DispatchConfig::default());
    d.publish(tasks(&["1", "2"]));
    let (_, old) = d.attach("old", "p1", false, "").unwrap();
    assert_eq!(drain(&old), vec![1, 2]);

    let d = Dispatcher::new(DispatchConfig {
        start_at: StartAt::New,
        ..Default::default()
    });
    d.publish(tasks(&["1", "2"]));
    let (_, new) = d.attach("new", "p2", false, "").unwrap();
    assert!(drain(&new).is_empty());
    d.publish(tasks(&["3"]));
    assert_eq!(drain(&new), vec![3]);
}

#[test]
fn seed_results_answer_the_oldest_delivery_and_count_as_ok() {
    let d = Dispatcher::new(DispatchConfig::default());
    let (session, feed) = d
        .attach("ipv4:1.2.3.4:5", "ipv4:1.2.3.4:5", true, "")
        .unwrap();
    d.publish(tasks(&["a", "b"]));
    assert_eq!(drain(&feed), vec![1, 2]);
    let seed = Answer {
        task_id: 0,
        attempt: 0,
        ok: false,
        retry: false,
        output: "x".into(),
        incarnation: String::new(),
    };
    let r1 = d.complete("ipv4:1.2.3.4:5", seed.clone()).unwrap();
    // The task stream ends before the last result arrives: it still matches.
    d.detach("ipv4:1.2.3.4:5", session);
    assert!(d.clients().is_empty());
    let r2 = d.complete("ipv4:1.2.3.4:5", seed.clone()).unwrap();
    let r3 = d.complete("ipv4:1.2.3.4:5", seed).unwrap();
    assert_eq!(
        (r1.task_id, r1.ok, r2.task_id, r2.stale),
        (Some(1), true, Some(2), false)
    );
    assert!(r3.stale && r3.task_id.is_none());
    assert!(
        d.lock().clients.is_empty(),
        "a seed client is forgotten once answered and gone"
    );
}

#[test]
fn unknown_results_are_stale_and_exact_resends_are_recorded_once() {
    let d = Dispatcher::new(DispatchConfig::default());
    let (_, feed) = d.attach("a", "p", false, "").unwrap();
    d.publish(tasks(&["1"]));
    drain(&feed);
    assert!(d.complete("a", ok(1, 1)).unwrap().accepted);
    assert_eq!(
        d.complete("a", ok(1, 1)),
        None,
        "a resend after a lost acknowledgement"
    );
    let other_attempt = d.complete("a", ok(1, 7)).unwrap();
    assert!(other_attempt.stale && other_attempt.task.as_deref() == Some("1"));
    assert!(d.complete("a", ok(99, 1)).unwrap().stale);
    assert!(d.complete("nobody", ok(1, 1)).unwrap().stale);
}

#[test]
fn targeted_tasks_reach_only_their_client() {
    let d = Dispatcher::new(DispatchConfig::default());
    let (_, a) = d.attach("a", "p1", false, "").unwrap();
    let (_, b) = d.attach("b", "p2", false, "").unwrap();
    d.publish(vec![
        (Some("b".to_string()), "for b".to_string()),
        (None, "all".to_string()),
    ]);
    assert_eq!(drain(&a), vec![2]);
    assert_eq!(drain(&b), vec![1, 2]);
}

#[test]
fn a_replaced_stream_ends_and_its_detach_is_ignored() {
    let d = Dispatcher::new(DispatchConfig::default());
    let (first, mut old) = d.attach("a", "p1", false, "i1").unwrap();
    let (_, _new) = d.attach("a", "p2", false, "i1").unwrap();
    assert!(futures::executor::block_on(futures::StreamExt::next(&mut old)).is_none());
    d.detach("a", first);
    assert_eq!(d.clients().len(), 1);
    assert_eq!(d.clients()[0].peer, "p2");
}

#[test]
fn a_client_behind_retention_skips_ahead() {
    let d = Dispatcher::new(DispatchConfig {
        retain: 2,
        max_in_flight: 1,
        ..Default::default()
    });
    let (_, feed) = d.attach("a", "p", false, "").unwrap();
    d.publish(tasks(&["1"]));
    d.publish(tasks(&["2", "3", "4"]));
    assert_eq!(drain(&feed), vec![1]);
    d.complete("a", ok(1, 1));
    assert_eq!(drain(&feed), vec![3]);
}

#[test]
fn broadcast_resume_delivers_only_what_was_not_answered() {
    let d = Dispatcher::new(DispatchConfig::default());
    d.publish(tasks(&["1", "2", "3"]));
    let (s, feed) = d.attach("a", "p", false, "").unwrap();
    assert_eq!(drain(&feed), vec![1, 2, 3]);
    d.complete("a", ok(1, 1));
    d.complete("a", ok(3, 1));
    d.detach("a", s);
    d.publish(tasks(&["4"]));
    let (_, feed) = d.attach("a", "p", false, "").unwrap();
    assert_eq!(drain_attempts(&feed), vec![(2, 2), (4, 1)]);
    // The old attempt's answer, resent after the reconnect, counts (the task
    // went to nobody else); the answer to the redelivery is then a resend.
    let late = d.complete("a", ok(2, 1)).unwrap();
    assert!(late.accepted && late.attempt == 1);
    assert_eq!(d.complete("a", ok(2, 2)), None);
    assert_eq!(d.in_flight(), 1, "only task 4 is still out");
}

#[test]
fn queue_an_earlier_attempts_answer_from_the_holder_counts_once() {
    let d = queue(10);
    let (s, a) = d.attach("a", "p", false, "").unwrap();
    d.publish(tasks(&["1"]));
    drain(&a);
    d.detach("a", s);
    let (_, a) = d.attach("a", "p", false, "").unwrap();
    assert_eq!(drain_attempts(&a), vec![(1, 2)]);
    assert!(d.complete("a", ok(1, 1)).unwrap().accepted);
    assert_eq!(d.complete("a", ok(1, 2)), None);
    assert_eq!(d.unfinished(), 0);
}

#[test]
fn results_for_another_incarnation_are_stale() {
    let d = Dispatcher::new(DispatchConfig::default());
    let (_, feed) = d.attach("a", "p", false, "").unwrap();
    d.publish(tasks(&["1"]));
    drain(&feed);
    let other = Answer {
        incarnation: "0000000000000bad".into(),
        ..ok(1, 1)
    };
    let r = d.complete("a", other).unwrap();
    assert!(r.stale && r.task_id.is_none());
    let mine = Answer {
        incarnation: d.incarnation(),
        ..ok(1, 1)
    };
    assert!(d.complete("a", mine).unwrap().accepted);
}

#[test]
fn broadcast_answer_to_a_taken_back_delivery_counts_before_it_is_resent() {
    let d = Dispatcher::new(DispatchConfig::default());
    d.publish(tasks(&["1"]));
    let (s, feed) = d.attach("a", "p", false, "").unwrap();
    drain(&feed);
    d.detach("a", s);
    let (_, feed2) = d.attach("a", "p", false, "").unwrap();
    // The new stream got attempt 2; an answer to attempt 1 arriving now is accepted only if
    // attempt 2 was not sent. It was, so it is stale; this checks the other order:
    assert_eq!(drain_attempts(&feed2), vec![(1, 2)]);
    let d2 = Dispatcher::new(DispatchConfig {
        max_in_flight: 1,
        ..Default::default()
    });
    d2.publish(tasks(&["1", "2"]));
    let (s, f) = d2.attach("a", "p", false, "").unwrap();
    assert_eq!(drain(&f), vec![1]);
    d2.detach("a", s);
    {
        // Taken back into the redelivery queue without a stream to send it on.
        let mut st = d2.lock();
        d2.take_back_all(&mut st, "a", "test");
    }
    assert!(d2.complete("a", ok(1, 1)).unwrap().accepted);
    let (_, f) = d2.attach("a", "p", false, "").unwrap();
    assert_eq!(drain(&f), vec![2], "task 1 is not delivered again");
}

#[test]
fn queue_gives_each_task_to_one_client_with_the_fewest_in_flight() {
    let d = queue(10);
    let (_, a) = d.attach("a", "p1", false, "").unwrap();
    let (_, b) = d.attach("b", "p2", false, "").unwrap();
    d.publish(tasks(&["1", "2", "3", "4"]));
    let (ga, gb) = (drain(&a), drain(&b));
    assert_eq!(ga.len() + gb.len(), 4);
    assert_eq!((ga.len(), gb.len()), (2, 2));
    for id in ga {
        assert!(d.complete("a", ok(id, 1)).unwrap().accepted);
    }
    assert_eq!(d.unfinished(), 2);
}

#[test]
fn queue_credit_is_never_exceeded() {
    let d = queue(2);
    let (_, a) = d.attach("a", "p", false, "").unwrap();
    d.publish(tasks(&["1", "2", "3"]));
    assert_eq!(drain(&a), vec![1, 2]);
    d.complete("a", ok(1, 1));
    assert_eq!(drain(&a), vec![3]);
}

#[test]
fn queue_disconnect_moves_tasks_and_fences_the_old_holder() {
    let d = queue(10);
    let (sa, a) = d.attach("a", "p1", false, "").unwrap();
    d.publish(tasks(&["1", "2"]));
    assert_eq!(drain(&a), vec![1, 2]);
    d.detach("a", sa);
    let (_, b) = d.attach("b", "p2", false, "").unwrap();
    assert_eq!(drain_attempts(&b), vec![(1, 2), (2, 2)]);
    let late = d.complete("a", ok(1, 1)).unwrap();
    assert!(late.stale && !late.accepted);
    assert!(d.complete("b", ok(1, 2)).unwrap().accepted);
    assert!(d.complete("b", ok(1, 2)).is_none(), "resend");
    assert!(d.complete("a", ok(2, 1)).unwrap().stale);
    assert!(d.complete("b", ok(2, 2)).unwrap().accepted);
    assert_eq!(d.unfinished(), 0);
}

#[test]
fn queue_answer_after_disconnect_counts_while_nobody_else_has_it() {
    let d = queue(10);
    let (sa, a) = d.attach("a", "p1", false, "").unwrap();
    d.publish(tasks(&["1"]));
    drain(&a);
    d.detach("a", sa);
    assert!(d.complete("a", ok(1, 1)).unwrap().accepted);
    let (_, b) = d.attach("b", "p2", false, "").unwrap();
    assert!(drain(&b).is_empty());
}

#[test]
fn ack_timeout_redelivers_then_dead_letters_after_max_attempts() {
    let d = Dispatcher::new(DispatchConfig {
        mode: Mode::Queue,
        ack_timeout: Duration::from_millis(1),
        max_attempts: 2,
        client_timeout: None,
        ..Default::default()
    });
    let (_, a) = d.attach("a", "p", false, "").unwrap();
    d.publish(tasks(&["1"]));
    assert_eq!(drain_attempts(&a), vec![(1, 1)]);
    std::thread::sleep(Duration::from_millis(5));
    d.expire();
    assert_eq!(drain_attempts(&a), vec![(1, 2)]);
    std::thread::sleep(Duration::from_millis(5));
    d.expire();
    assert!(drain(&a).is_empty());
    let dead = d.take_dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].task_id, dead[0].attempts), (1, 2));
    assert!(dead[0].reason.contains("ack timeout"), "{}", dead[0].reason);
    assert_eq!(d.unfinished(), 0);
    assert!(
        d.complete("a", ok(1, 2)).unwrap().stale,
        "a dead task takes no result"
    );
}

#[test]
fn a_refusal_with_retry_goes_to_another_attempt_then_the_dead_letters() {
    let d = queue(10);
    let (_, a) = d.attach("a", "p", false, "").unwrap();
    d.publish(tasks(&["1"]));
    let refuse = |attempt| Answer {
        task_id: 1,
        attempt,
        ok: false,
        retry: true,
        output: "busy".into(),
        incarnation: String::new(),
    };
    for attempt in 1..=3 {
        assert_eq!(drain_attempts(&a), vec![(1, attempt)]);
        let r = d.complete("a", refuse(attempt)).unwrap();
        assert!(r.retry && !r.accepted && !r.stale);
        after_backoff(&d, 1);
    }
    assert!(drain(&a).is_empty());
    let dead = d.take_dead_letters();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].reason.contains("refused: busy"));
}

#[test]
fn a_failure_without_retry_is_the_tasks_answer() {
    let d = queue(10);
    let (_, a) = d.attach("a", "p", false, "").unwrap();
    d.publish(tasks(&["1"]));
    drain(&a);
    let r = d
        .complete(
            "a",
            Answer {
                task_id: 1,
                attempt: 1,
                ok: false,
                retry: false,
                output: "no".into(),
                incarnation: String::new(),
            },
        )
        .unwrap();
    assert!(r.accepted && !r.ok);
    assert_eq!(d.unfinished(), 0);
}

#[test]
fn queue_targeted_tasks_wait_for_their_client() {
    let d = queue(10);
    let (_, a) = d.attach("a", "p1", false, "").unwrap();
    d.publish(vec![(Some("b".to_string()), "for b".to_string())]);
    assert!(drain(&a).is_empty());
    let (_, b) = d.attach("b", "p2", false, "").unwrap();
    assert_eq!(drain(&b), vec![1]);
}

#[test]
fn a_silent_client_is_declared_gone_and_its_tasks_move_on() {
    let d = Dispatcher::new(DispatchConfig {
        mode: Mode::Queue,
        client_timeout: Some(Duration::from_millis(20)),
        ..Default::default()
    });
    let (_, mut a) = d.attach("a", "p1", false, "").unwrap();
    d.publish(tasks(&["1"]));
    assert_eq!(drain(&a), vec![1]);
    let (_, b) = d.attach("b", "p2", false, "").unwrap();
    std::thread::sleep(Duration::from_millis(10));
    d.touch("b");
    std::thread::sleep(Duration::from_millis(15));
    d.touch("b");
    d.expire();
    assert_eq!(drain_attempts(&b), vec![(1, 2)]);
    assert!(
        futures::executor::block_on(futures::StreamExt::next(&mut a)).is_none(),
        "its stream ends"
    );
    assert_eq!(d.clients().len(), 1);
}

#[test]
fn a_targeted_task_waits_for_a_client_that_starts_at_new() {
    let d = Dispatcher::new(DispatchConfig {
        start_at: StartAt::New,
        ..Default::default()
    });
    d.publish(vec![
        (Some("later".to_string()), "for later".to_string()),
        (None, "for all".to_string()),
    ]);
    let (_, feed) = d.attach("later", "p", false, "").unwrap();
    assert_eq!(drain(&feed), vec![1], "its own task, not the history");
}

#[test]
fn shutdown_waits_only_for_clients_connected_when_it_began() {
    let d = Dispatcher::new(DispatchConfig::default());
    d.publish(tasks(&["1"]));
    let (s, gone) = d.attach("gone", "p1", false, "").unwrap();
    let (_, here) = d.attach("here", "p2", false, "").unwrap();
    drain(&gone);
    drain(&here);
    d.detach("gone", s);
    d.close_all();
    assert_eq!(
        d.in_flight(),
        1,
        "only the connected client's task is awaited"
    );
    d.complete("here", ok(1, 1));
    assert_eq!(d.in_flight(), 0);
}

#[test]
fn a_refused_task_goes_to_another_client_when_there_is_one() {
    let d = queue(10);
    let (_, a) = d.attach("a", "p1", false, "").unwrap();
    d.publish(tasks(&["1"]));
    assert_eq!(drain(&a), vec![1]);
    let (_, b) = d.attach("b", "p2", false, "").unwrap();
    let refuse = refusal(1, 1);
    assert!(d.complete("a", refuse).unwrap().retry);
    after_backoff(&d, 1);
    assert!(
        drain(&a).is_empty(),
        "not straight back to the client that refused it"
    );
    assert_eq!(drain_attempts(&b), vec![(1, 2)]);
}

#[test]
fn a_second_owner_of_a_live_id_is_refused_until_the_first_leaves() {
    let d = Dispatcher::new(DispatchConfig::default());
    let (first, _feed) = d.attach("a", "p1", false, "i1").unwrap();
    assert_eq!(
        d.attach("a", "p2", false, "i2").err().unwrap(),
        AttachRefused::InUse { peer: "p1".into() }
    );
    // No instance at all never matches.
    assert!(d.attach("a", "p3", false, "").is_err());
    assert_eq!(d.clients()[0].peer, "p1");
    d.detach("a", first);
    assert!(d.attach("a", "p2", false, "i2").is_ok());
    d.close_all();
    assert_eq!(
        d.attach("b", "p", false, "").err(),
        Some(AttachRefused::Closed)
    );
}

#[test]
fn known_clients_are_capped_forgetting_the_longest_gone_first() {
    let d = Dispatcher::new(DispatchConfig {
        max_known_clients: 2,
        ..Default::default()
    });
    let (s1, _f1) = d.attach("old", "p", false, "").unwrap();
    d.detach("old", s1);
    let (s2, _f2) = d.attach("mid", "p", false, "").unwrap();
    d.detach("mid", s2);
    let (_s3, _f3) = d.attach("live", "p", false, "").unwrap();
    let st = d.lock();
    let mut known: Vec<&str> = st.clients.keys().map(|k| &**k).collect();
    known.sort();
    assert_eq!(known, vec!["live", "mid"]);
}

#[test]
fn exact_answers_are_required_of_named_clients() {
    let d = queue(10);
    let (_, a) = d.attach("a", "p", false, "").unwrap();
    d.publish(tasks(&["1"]));
    assert_eq!(drain(&a), vec![1]);
    let inc = d.incarnation();
    // Wildcards (attempt 0, no incarnation) match nothing.
    let wild = Answer {
        attempt: 0,
        incarnation: inc.clone(),
        ..ok(1, 1)
    };
    assert!(d.complete_exact("a", wild).unwrap().stale);
    assert!(d.complete_exact("a", ok(1, 1)).unwrap().stale);
    assert_eq!(d.unfinished(), 1);
    let exact = Answer {
        incarnation: inc,
        ..ok(1, 1)
    };
    let r = d.complete_exact("a", exact).unwrap();
    assert!(r.accepted && !r.stale);
    assert_eq!(d.unfinished(), 0);
}

#[test]
fn a_refused_task_waits_out_a_growing_backoff_in_both_modes() {
    for mode in [Mode::Queue, Mode::Broadcast] {
        let d = Dispatcher::new(DispatchConfig {
            mode,
            max_attempts: 5,
            retry_backoff: backoff(200, 400),
            ..Default::default()
        });
        let (_, a) = d.attach("a", "p", false, "").unwrap();
        d.publish(tasks(&["1"]));
        assert_eq!(drain_attempts(&a), vec![(1, 1)]);
        // The k-th refusal waits 200 ms·2^(k-1), capped at 400 ms, less up to half.
        for (attempt, at_least_ms) in [(1, 100), (2, 200), (3, 200)] {
            let refused = refusal(1, attempt);
            assert!(d.complete("a", refused).unwrap().retry);
            let refused = Instant::now();
            d.expire();
            let mut again = drain_attempts(&a);
            assert!(again.is_empty(), "{mode:?}: redelivered at once");
            while again.is_empty() {
                assert!(refused.elapsed() < PATIENCE, "{mode:?}: never redelivered");
                std::thread::sleep(Duration::from_millis(5));
                d.expire();
                again = drain_attempts(&a);
            }
            let waited = refused.elapsed();
            assert!(
                waited >= Duration::from_millis(at_least_ms),
                "{mode:?}: attempt {} after {waited:?}",
                attempt + 1
            );
            assert_eq!(again, vec![(1, attempt + 1)], "{mode:?}");
        }
        assert_eq!(d.counters().redelivered, 3, "{mode:?}");
    }
}

const PATIENCE: Duration = Duration::from_secs(10);

#[test]
fn a_full_feed_is_not_a_dead_client() {
    // The stream is not read (its client is slow, or the network is): the
    // deliveries taken back at the ack timeout are still in the feed.
    let d = Dispatcher::new(DispatchConfig {
        mode: Mode::Queue,
        max_in_flight: 2,
        ack_timeout: Duration::from_millis(1),
        client_timeout: None,
        ..Default::default()
    });
    let (_, a) = d.attach("a", "p", false, "").unwrap();
    d.publish(tasks(&["1", "2", "3"]));
    std::thread::sleep(Duration::from_millis(5));
    d.expire();
    assert_eq!(d.clients().len(), 1, "the client's session was ended");
    // Its stream goes on: what is in the feed arrives, then more.
    assert_eq!(drain_attempts(&a), vec![(1, 1), (2, 1)]);
    // No attempt was spent while the feed was full.
    d.expire();
    assert_eq!(drain_attempts(&a), vec![(1, 2), (2, 2)]);
    assert_eq!(d.clients().len(), 1);
}

#[test]
fn a_task_taken_back_goes_to_another_client_with_room_in_its_order() {
    let d = Dispatcher::new(DispatchConfig {
        mode: Mode::Queue,
        max_in_flight: 4,
        ack_timeout: Duration::from_millis(1),
        client_timeout: None,
        ..Default::default()
    });
    let (_, a) = d.attach("a", "p1", false, "").unwrap();
    d.publish(tasks(&["1", "2", "3", "4"]));
    assert_eq!(drain(&a), vec![1, 2, 3, 4]);
    let (_, b) = d.attach("b", "p2", false, "").unwrap();
    std::thread::sleep(Duration::from_millis(5));
    d.expire();
    assert_eq!(
        drain_attempts(&b),
        vec![(1, 2), (2, 2), (3, 2), (4, 2)],
        "to the idle client, in their order"
    );
    assert!(drain(&a).is_empty(), "not back to the busy client");
}

fn leased(ack_ms: u64, max_lease_ms: u64) -> (Dispatcher, TaskFeed) {
    let d = Dispatcher::new(DispatchConfig {
        mode: Mode::Queue,
        max_in_flight: 4,
        ack_timeout: Duration::from_millis(ack_ms),
        max_lease: Duration::from_millis(max_lease_ms),
        client_timeout: None,
        ..Default::default()
    });
    let holder = Holder {
        peer: "p",
        instance: "i",
        ephemeral: false,
        leases: true,
        labels: Default::default(),
    };
    let (_, feed) = d.attach_as("a", holder).unwrap();
    (d, feed)
}

#[test]
fn a_leaseholder_keeps_running_and_waiting_tasks_while_it_makes_progress() {
    // Reports every 30 ms against an ack timeout of 300 ms: a margin for a loaded machine.
    let (d, a) = leased(300, 60_000);
    let inc = d.incarnation();
    let report = |task| d.renew("a", &[(task, 1, inc.clone())]);
    d.publish(tasks(&["1", "2"]));
    assert_eq!(drain(&a), vec![1, 2]);
    // Task 1 runs for 3 ack timeouts; task 2 waits its turn.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(900) {
        report(1);
        std::thread::sleep(Duration::from_millis(30));
        d.expire();
        assert_eq!(
            d.in_flight(),
            2,
            "a task was taken back while its client worked"
        );
    }
    assert!(d.complete("a", ok(1, 1)).unwrap().accepted);
    // Then task 2 runs as long.
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(900) {
        report(2);
        std::thread::sleep(Duration::from_millis(30));
        d.expire();
        assert_eq!(d.in_flight(), 1, "task 2 was taken back while reported");
    }
    // A report naming another incarnation or attempt renews nothing: task 2
    // goes an ack timeout after the last good report (the client hung).
    d.renew("a", &[(2, 1, "other".into()), (2, 7, inc.clone())]);
    std::thread::sleep(Duration::from_millis(400));
    d.expire();
    assert_eq!(
        drain_attempts(&a),
        vec![(2, 2)],
        "again, to the only client"
    );
    assert_eq!(d.counters().redelivered, 1);
}

#[test]
fn a_leaseholder_that_makes_no_progress_loses_the_tasks_waiting_at_it() {
    let (d, a) = leased(100, 60_000);
    d.publish(tasks(&["1", "2", "3"]));
    assert_eq!(drain(&a), vec![1, 2, 3]);
    // It reports nothing and answers nothing (stuck, though connected).
    let sent = Instant::now();
    while d.counters().redelivered == 0 {
        assert!(sent.elapsed() < PATIENCE, "never taken back");
        std::thread::sleep(Duration::from_millis(10));
        d.expire();
    }
    assert!(sent.elapsed() >= Duration::from_millis(100));
    assert_eq!(drain_attempts(&a), vec![(1, 2), (2, 2), (3, 2)]);
}

#[test]
fn a_lease_ends_at_max_lease_however_often_it_is_renewed() {
    let (d, a) = leased(300, 600);
    let inc = d.incarnation();
    d.publish(tasks(&["1"]));
    assert_eq!(drain(&a), vec![1]);
    let sent = Instant::now();
    while d.counters().redelivered == 0 {
        assert!(sent.elapsed() < PATIENCE, "never taken back");
        d.renew("a", &[(1, 1, inc.clone())]);
        std::thread::sleep(Duration::from_millis(20));
        d.expire();
    }
    assert!(sent.elapsed() >= Duration::from_millis(600));
    assert_eq!(
        drain_attempts(&a),
        vec![(1, 2)],
        "redelivered (to the only client)"
    );
}

#[test]
fn a_seed_style_client_has_its_ack_timeout_from_dispatch() {
    let d = Dispatcher::new(DispatchConfig {
        mode: Mode::Queue,
        ack_timeout: Duration::from_millis(50),
        client_timeout: None,
        ..Default::default()
    });
    let (_, a) = d.attach("a", "p", false, "").unwrap();
    d.publish(tasks(&["1"]));
    assert_eq!(drain(&a), vec![1]);
    // Its reports are ignored: it did not say on attaching that it sends them.
    let inc = d.incarnation();
    std::thread::sleep(Duration::from_millis(30));
    d.renew("a", &[(1, 1, inc)]);
    std::thread::sleep(Duration::from_millis(30));
    d.expire();
    assert_eq!(drain_attempts(&a), vec![(1, 2)]);
}

#[test]
fn a_resent_refusal_is_acknowledged_not_counted_again() {
    for mode in [Mode::Queue, Mode::Broadcast] {
        let d = Dispatcher::new(DispatchConfig {
            mode,
            retry_backoff: backoff(1, 1),
            ..Default::default()
        });
        let (_, a) = d.attach("a", "p", false, "").unwrap();
        d.publish(tasks(&["1"]));
        assert_eq!(drain_attempts(&a), vec![(1, 1)]);
        let refused = refusal(1, 1);
        assert!(d.complete("a", refused.clone()).unwrap().retry);
        after_backoff(&d, 1);
        assert_eq!(drain_attempts(&a), vec![(1, 2)], "{mode:?}");
        // Its acknowledgement was lost: the client sends the refusal again.
        assert_eq!(d.complete("a", refused), None, "{mode:?}: counted twice");
        after_backoff(&d, 1);
        assert!(drain(&a).is_empty(), "{mode:?}: a third attempt");
        assert_eq!(d.counters().redelivered, 1, "{mode:?}");
        assert!(d.complete("a", ok(1, 2)).unwrap().accepted, "{mode:?}");
    }
}

#[test]
fn a_refusal_of_an_attempt_superseded_at_the_same_client_leaves_the_newer_one_alone() {
    for mode in [Mode::Queue, Mode::Broadcast] {
        let d = Dispatcher::new(DispatchConfig {
            mode,
            retry_backoff: backoff(1, 1),
            ..Default::default()
        });
        let (_, a) = d.attach("a", "p", false, "i1").unwrap();
        d.publish(tasks(&["1"]));
        assert_eq!(drain_attempts(&a), vec![(1, 1)]);
        // The connection broke; the same process is back and gets the task again.
        let (_, a) = d.attach("a", "p", false, "i1").unwrap();
        assert_eq!(drain_attempts(&a), vec![(1, 2)], "{mode:?}");
        // Its old session's worker refused attempt 1; the refusal arrives now.
        let refused = refusal(1, 1);
        assert!(d.complete("a", refused).unwrap().stale, "{mode:?}");
        after_backoff(&d, 1);
        assert!(drain(&a).is_empty(), "{mode:?}: attempt 3");
        let answer = d.complete("a", ok(1, 2));
        assert!(
            answer.is_some_and(|r| r.accepted),
            "{mode:?}: the answer to attempt 2 was dropped"
        );
        assert_eq!(d.in_flight(), 0, "{mode:?}");
    }
}

impl Dispatcher {
    /// Checks every index against the state it summarises, panicking at the
    /// first stale entry, and that no client that can take a task was left
    /// without one that waits for it (a missed wake-up).
    fn check_indexes(&self) {
        let st = self.lock();
        let k = self.config.max_in_flight;
        let queue = self.config.mode == Mode::Queue;
        let mut ready = BTreeSet::new();
        let mut gone = 0;
        let deadlines = st.deadlines.entries();
        let armed = |due, name: &ClientId, token| deadlines.contains(&(due, name.clone(), token));
        for (name, c) in &st.clients {
            assert_eq!(&c.name, name);
            let held = c.in_flight.len();
            assert!(held <= k, "{name} holds {held}, over its credit");
            assert!(held < k || !c.filling, "{name}: credit open while full");
            assert!(held != 0 || c.filling, "{name}: credit closed while empty");
            let open = !st.closed && c.session.is_some();
            if queue && open && !c.blocked && c.filling {
                ready.insert((held, name.clone()));
            }
            assert_eq!(
                c.ready_key.is_some(),
                ready.contains(&(held, name.clone())),
                "{name}: ready key"
            );
            if let Some(key) = c.ready_key {
                assert_eq!(key, held, "{name}: filed under a stale count");
            }
            let disconnected = c.session.is_none() && !c.draining;
            assert_eq!(c.gone_key.is_some(), disconnected, "{name}: gone key");
            if let Some(key) = c.gone_key {
                gone += 1;
                assert!(st.gone[c.ephemeral as usize].contains(&(key, name.clone())));
                assert!(
                    key <= c.last_seen,
                    "{name}: filed as gone after it was last seen"
                );
            }
            assert_eq!(c.blocked, st.blocked.contains(name), "{name}: blocked");
            if c.session.is_some() && !c.ephemeral && !c.in_flight.is_empty() {
                let token = c
                    .ack_timer
                    .unwrap_or_else(|| panic!("{name}: ack deadline not armed"));
                assert!(armed(Due::Ack, name, token), "{name}: ack deadline lost");
            }
            if let Some(((due, _), _)) = c.delayed.first_key_value() {
                let (token, at) = c
                    .retry_timer
                    .unwrap_or_else(|| panic!("{name}: retry not armed"));
                assert!(at <= *due, "{name}: retry armed too late");
                assert!(armed(Due::Retry, name, token), "{name}: retry lost");
            }
            if let (Some((session, _)), Some(_), false) =
                (&c.session, self.config.client_timeout, c.ephemeral)
            {
                assert!(
                    armed(Due::Silence, name, *session),
                    "{name}: silence deadline lost"
                );
            }
            let deliverable = !c.redeliver.is_empty()
                || st
                    .log
                    .next_for(name, c.cursor.max(st.log.first_id()))
                    .is_some();
            if st.caught_up.contains(name) {
                assert!(open && !deliverable, "{name}: caught up, but not");
            }
            if !queue && open && !c.blocked && c.filling && held < k {
                assert!(
                    !deliverable,
                    "{name} could take a task but was not given it"
                );
                assert!(
                    st.caught_up.contains(name),
                    "{name}: a new task would not wake it"
                );
            }
            if queue && c.ready_key.is_some() {
                assert!(
                    !st.queue.has_waiting_for(name),
                    "{name}: its targeted task waits"
                );
            }
        }
        assert_eq!(st.ready, ready, "the ready index");
        assert_eq!(
            st.gone[NAMED].len() + st.gone[EPHEMERAL].len(),
            gone,
            "the gone index"
        );
        for name in st.caught_up.iter().chain(&st.blocked) {
            assert!(
                st.clients.contains_key(name),
                "{name}: indexed but forgotten"
            );
        }
        if queue && !st.ready.is_empty() {
            assert!(
                st.queue.next_ready().is_none(),
                "a task waits while {:?} takes tasks",
                st.ready.first()
            );
        }
    }

    /// Clients and deadlines looked at so far.
    fn visits(&self) -> u64 {
        self.lock().visits
    }
}

/// Random operations by a few clients, named and seed, with short timeouts,
/// in both modes: every index is checked after each.
#[test]
fn the_indexes_never_go_stale() {
    for mode in [Mode::Queue, Mode::Broadcast] {
        for seed in 0..6 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let d = Dispatcher::new(DispatchConfig {
                mode,
                max_in_flight: 1 + seed as usize % 5,
                retain: 20,
                ack_timeout: Duration::from_millis(3),
                max_attempts: 4,
                retry_backoff: backoff(1, 2),
                client_timeout: Some(Duration::from_millis(6)),
                forget_after: Duration::from_millis(10),
                max_known_clients: 5,
                ..Default::default()
            });
            let names = ["a", "b", "c", "d", "e", "f", "ipv4:1.2.3.4:5"];
            let mut feeds: HashMap<&str, (SessionId, TaskFeed)> = HashMap::new();
            for step in 0..600 {
                let who = names[rng.usize(..names.len())];
                let seedy = who.starts_with("ipv4:");
                match rng.u8(..10) {
                    0 => {
                        let target = rng.bool().then(|| names[rng.usize(..6)].to_string());
                        d.publish(vec![(target, format!("t{step}"))]);
                    }
                    1 => {
                        let holder = Holder {
                            peer: who,
                            instance: "i",
                            ephemeral: seedy,
                            leases: rng.bool(),
                            labels: Default::default(),
                        };
                        if let Ok(f) = d.attach_as(who, holder) {
                            feeds.insert(who, f);
                        }
                    }
                    2 => {
                        if let Some((s, _)) = feeds.remove(who) {
                            d.detach(who, s);
                        }
                    }
                    3 | 4 => {
                        // Reads some of its feed and answers: ok, refusal, or a resend.
                        let got: Vec<Delivery> = feeds
                            .get(who)
                            .map(|(_, f)| {
                                std::iter::from_fn(|| f.try_next())
                                    .take(rng.usize(..4))
                                    .collect()
                            })
                            .unwrap_or_default();
                        let answers = got
                            .iter()
                            .map(|g| {
                                let a = if rng.u8(..4) == 0 {
                                    refusal(g.task.id, g.attempt)
                                } else {
                                    ok(g.task.id, g.attempt)
                                };
                                if seedy {
                                    Answer {
                                        task_id: 0,
                                        attempt: 0,
                                        ..a
                                    }
                                } else {
                                    a
                                }
                            })
                            .collect::<Vec<_>>();
                        let again = answers.clone();
                        d.complete_many(who, answers, false);
                        if rng.bool() {
                            d.complete_many(who, again, false);
                        }
                    }
                    5 => {
                        d.complete(who, ok(rng.u64(1..step as u64 + 2), rng.u32(1..4)));
                    }
                    6 => d.touch(who),
                    7 => {
                        let inc = d.incarnation();
                        d.renew(who, &[(rng.u64(1..step as u64 + 2), 1, inc)]);
                    }
                    8 => d.results_ended(who),
                    _ => {
                        if rng.bool() {
                            std::thread::sleep(Duration::from_millis(rng.u64(1..4)));
                        }
                        d.expire();
                    }
                }
                d.check_indexes();
            }
            d.close_all();
            d.check_indexes();
        }
    }
}

/// Attaches `n` named clients (in flight limit 4) and returns their feeds.
fn fleet(d: &Dispatcher, n: usize) -> Vec<(SessionId, TaskFeed)> {
    (0..n)
        .map(|i| d.attach(&format!("agent-{i}"), "p", false, "").unwrap())
        .collect()
}

/// The work an operation did, in clients and deadlines looked at.
fn work(d: &Dispatcher, op: impl FnOnce()) -> u64 {
    let before = d.visits();
    op();
    d.visits() - before
}

#[test]
fn with_ten_thousand_clients_no_operation_but_a_broadcast_task_looks_at_them_all() {
    const N: usize = 10_000;
    for mode in [Mode::Queue, Mode::Broadcast] {
        let d = Dispatcher::new(DispatchConfig {
            mode,
            max_in_flight: 4,
            max_known_clients: 2 * N,
            ..Default::default()
        });
        let mut feeds = fleet(&d, N);
        assert_eq!(work(&d, || d.expire()), 0, "{mode:?}: an idle tick");
        let publish = work(&d, || {
            d.publish(tasks(&["1"]));
        });
        match mode {
            // One task goes to one client; in broadcast it goes to each.
            Mode::Queue => assert!(publish <= 2, "queue publish looked at {publish}"),
            Mode::Broadcast => assert_eq!(publish, N as u64, "broadcast publish"),
        }
        let holder = (0..N).find(|i| feeds[*i].1.try_next().is_some()).unwrap();
        let name = format!("agent-{holder}");
        let complete = work(&d, || {
            assert!(d.complete(&name, ok(1, 1)).unwrap().accepted);
        });
        assert!(complete <= 2, "{mode:?}: a result looked at {complete}");
        let attach = work(&d, || {
            feeds.push(d.attach("newcomer", "p", false, "").unwrap());
        });
        assert!(attach <= 2, "{mode:?}: a connect looked at {attach}");
        let detach = work(&d, || d.detach("agent-7", feeds[7].0));
        assert!(detach <= 2, "{mode:?}: a disconnect looked at {detach}");
        assert_eq!(
            work(&d, || d.expire()),
            0,
            "{mode:?}: a tick with nothing due"
        );
        d.check_indexes();
    }
}

#[test]
fn a_tick_looks_only_at_what_is_due() {
    let d = Dispatcher::new(DispatchConfig {
        mode: Mode::Queue,
        max_in_flight: 1,
        ack_timeout: Duration::from_millis(30),
        max_known_clients: 2_000,
        ..Default::default()
    });
    let feeds = fleet(&d, 1_000);
    d.publish(tasks(&["1", "2", "3"]));
    std::thread::sleep(Duration::from_millis(40));
    // Three ack deadlines are due, of three clients; the other 997 are not looked at.
    let tick = work(&d, || d.expire());
    assert!((3..=18).contains(&tick), "a tick looked at {tick}");
    assert_eq!(d.counters().redelivered, 3);
    drop(feeds);
}

#[test]
fn tasks_are_written_in_batches_when_a_quarter_of_the_credit_is_free() {
    for mode in [Mode::Queue, Mode::Broadcast] {
        let d = Dispatcher::new(DispatchConfig {
            mode,
            max_in_flight: 16,
            ..Default::default()
        });
        let (_, a) = d.attach("a", "p", false, "").unwrap();
        let texts: Vec<String> = (1..=40).map(|i| i.to_string()).collect();
        d.publish(texts.iter().map(|t| (None, t.clone())));
        assert_eq!(drain(&a), (1..=16).collect::<Vec<_>>(), "{mode:?}");
        for id in 1..=3 {
            d.complete("a", ok(id, 1));
            assert!(drain(&a).is_empty(), "{mode:?}: a batch of one after {id}");
        }
        d.complete("a", ok(4, 1));
        assert_eq!(drain(&a), vec![17, 18, 19, 20], "{mode:?}");
        // Answers in one call free their credit together.
        let batch: Vec<Answer> = (5..=12).map(|id| ok(id, 1)).collect();
        d.complete_many("a", batch, false);
        assert_eq!(drain(&a), (21..=28).collect::<Vec<_>>(), "{mode:?}");
        // A client that holds nothing is never left waiting.
        let rest: Vec<Answer> = (13..=28).map(|id| ok(id, 1)).collect();
        d.complete_many("a", rest, false);
        assert_eq!(drain(&a), (29..=40).collect::<Vec<_>>(), "{mode:?}");
        d.complete("a", ok(29, 1));
        d.publish(tasks(&["41"]));
        assert_eq!(
            drain(&a),
            vec![41],
            "{mode:?}: credit stays open until full"
        );
    }
}

#[test]
fn complete_many_judges_in_order_and_records_each() {
    let d = queue(10);
    let (_, a) = d.attach("a", "p", false, "").unwrap();
    d.publish(tasks(&["1", "2"]));
    drain(&a);
    let out = d.complete_many("a", vec![ok(1, 1), ok(1, 1), ok(9, 1), ok(2, 1)], false);
    let judged: Vec<Option<(bool, bool)>> = out
        .iter()
        .map(|r| r.as_ref().map(|r| (r.accepted, r.stale)))
        .collect();
    assert_eq!(
        judged,
        vec![
            Some((true, false)),
            None,
            Some((false, true)),
            Some((true, false))
        ]
    );
    assert_eq!(d.counters().results, 4);
    let inexact = d.complete_many("a", vec![ok(2, 1)], true);
    assert!(inexact[0].as_ref().unwrap().stale, "no incarnation: stale");
}

#[test]
fn a_broadcast_resend_is_known_by_the_cursor_not_a_list() {
    let d = Dispatcher::new(DispatchConfig {
        max_in_flight: 100,
        ..Default::default()
    });
    let (_, a) = d.attach("a", "p", false, "").unwrap();
    let texts: Vec<String> = (1..=50).map(|i| i.to_string()).collect();
    d.publish(texts.iter().map(|t| (None, t.clone())));
    drain(&a);
    for id in 1..=50 {
        assert!(d.complete("a", ok(id, 1)).unwrap().accepted);
    }
    for id in 1..=50 {
        assert_eq!(d.complete("a", ok(id, 1)), None, "resend of {id}");
    }
    // Nothing is kept per answer: the client's state is its cursor.
    let st = d.lock();
    let c = &st.clients["a"];
    assert!(c.in_flight.is_empty() && c.refusing.is_empty() && c.buried.is_empty());
    assert_eq!(c.cursor, 51);
}

#[test]
fn a_late_answer_to_a_task_dead_lettered_at_its_client_is_stale_not_a_resend() {
    let d = Dispatcher::new(DispatchConfig {
        max_attempts: 1,
        retry_backoff: backoff(1, 1),
        ..Default::default()
    });
    let (_, a) = d.attach("a", "p", false, "").unwrap();
    d.publish(tasks(&["1"]));
    drain(&a);
    assert!(d.complete("a", refusal(1, 1)).unwrap().retry);
    assert_eq!(d.take_dead_letters().len(), 1);
    assert!(d.complete("a", ok(1, 1)).unwrap().stale);
}

#[test]
fn a_snapshot_grows_with_clients_plus_tasks_not_their_product() {
    for mode in [Mode::Queue, Mode::Broadcast] {
        let d = Dispatcher::new(DispatchConfig {
            mode,
            max_in_flight: 1000,
            ..Default::default()
        });
        let feeds = fleet(&d, 100);
        let texts: Vec<String> = (1..=100).map(|i| i.to_string()).collect();
        d.publish(texts.iter().map(|t| (None, t.clone())));
        for (i, (_, f)) in feeds.iter().enumerate() {
            for got in std::iter::from_fn(|| f.try_next()) {
                d.complete(&format!("agent-{i}"), ok(got.task.id, got.attempt));
            }
        }
        let records = d.snapshot(&d.lock()).len();
        // Broadcast: 100 × 100 answers; queue: 100 tasks.
        assert!(
            records <= 2 + 100 + 100 + 100,
            "{mode:?}: {records} records"
        );
    }
}

#[test]
fn a_journal_with_per_client_answers_still_restores_and_is_written_anew() {
    let old = |mode| {
        let d = Dispatcher::new(DispatchConfig {
            mode,
            ..Default::default()
        });
        let mut records = vec![Record::Window { first: 1, next: 4 }];
        for id in 1..=3 {
            records.push(Record::Task {
                id,
                text: format!("t{id}"),
                target: None,
                key: None,
                any_of: None,
            });
        }
        records.extend([
            Record::Cursor {
                client: "a".into(),
                next: 4,
            },
            Record::Sent {
                task: 3,
                client: "a".into(),
                attempt: 1,
            },
            Record::Done {
                task: 1,
                client: "a".into(),
                attempt: 1,
            },
            Record::Done {
                task: 2,
                client: "a".into(),
                attempt: 1,
            },
        ]);
        d.restore(records).unwrap();
        d
    };
    let d = old(Mode::Queue);
    assert_eq!(d.unfinished(), 1, "task 3");
    assert_eq!(d.complete("a", ok(1, 1)), None, "a resend");
    assert!(d.complete("b", ok(2, 1)).unwrap().stale);
    let snapshot = d.snapshot(&d.lock());
    assert!(snapshot.contains(&Record::Done {
        task: 1,
        client: "a".into(),
        attempt: 1
    }));
    let d = old(Mode::Broadcast);
    let (_, a) = d.attach("a", "p", false, "").unwrap();
    assert_eq!(drain_attempts(&a), vec![(3, 2)]);
    assert_eq!(d.complete("a", ok(2, 1)), None, "a resend");
    let snapshot = d.snapshot(&d.lock());
    assert!(
        !snapshot.iter().any(|r| matches!(r, Record::Done { .. })),
        "{snapshot:?}"
    );
    // And the new snapshot restores to the same.
    let again = Dispatcher::new(DispatchConfig::default());
    again.restore(snapshot).unwrap();
    let (_, a) = again.attach("a", "p", false, "").unwrap();
    assert_eq!(drain_attempts(&a), vec![(3, 3)]);
    assert_eq!(again.complete("a", ok(1, 1)), None, "a resend");
}

fn keyed(key: Option<&str>, text: &str) -> NewTask {
    NewTask {
        key: key.map(String::from),
        ..NewTask::new(None, text.to_string())
    }
}

/// What `publish_new` made of each task: `Ok(id)` published, `Err(id)` a duplicate of it.
fn outcome(published: Vec<Published>) -> Vec<Result<TaskId, TaskId>> {
    published
        .into_iter()
        .map(|p| match p {
            Published::New(t) => Ok(t.id),
            Published::Duplicate { of } => Err(of),
        })
        .collect()
}

#[test]
fn a_key_seen_in_the_same_call_or_an_earlier_one_is_published_once() {
    for mode in [Mode::Broadcast, Mode::Queue] {
        let d = Dispatcher::new(DispatchConfig {
            mode,
            ..Default::default()
        });
        let (_, feed) = d.attach("a", "p", false, "").unwrap();
        let first = d.publish_new(vec![
            keyed(Some("k1"), "one"),
            keyed(None, "two"),
            keyed(Some("k1"), "one, sent twice"),
            keyed(Some("k3"), "three"),
            keyed(None, "two"),
        ]);
        assert_eq!(
            outcome(first.unwrap()),
            vec![Ok(1), Ok(2), Err(1), Ok(3), Ok(4)],
            "{mode:?}"
        );
        let second = d.publish_new(vec![
            keyed(Some("k3"), "three again"),
            keyed(Some("k5"), "five"),
            keyed(Some("k1"), "one again"),
        ]);
        assert_eq!(
            outcome(second.unwrap()),
            vec![Err(3), Ok(5), Err(1)],
            "{mode:?}"
        );
        assert_eq!(d.counters().produced, 5, "{mode:?}");
        let texts: Vec<String> = std::iter::from_fn(|| feed.try_next())
            .map(|d| d.task.text.clone())
            .collect();
        assert_eq!(texts, ["one", "two", "three", "two", "five"], "{mode:?}");
        let again = d.publish_new(vec![keyed(Some("k5"), "x"), keyed(None, "y")]);
        assert_eq!(outcome(again.unwrap()), vec![Err(5), Ok(6)]);
    }
}

#[test]
fn a_key_is_forgotten_with_its_task_when_it_leaves_retention() {
    let d = Dispatcher::new(DispatchConfig {
        retain: 3,
        ..Default::default()
    });
    let keys = |d: &Dispatcher| d.lock().log.keys_known();
    let first = d.publish_new(vec![keyed(Some("k1"), "a"), keyed(Some("k2"), "b")]);
    assert_eq!(outcome(first.unwrap()), vec![Ok(1), Ok(2)]);
    assert_eq!(keys(&d), 2);
    d.publish(tasks(&["c", "d"]));
    // Task 1 is no longer retained: its key is new again; task 2's is not.
    assert_eq!(keys(&d), 1, "the index shrinks as tasks leave retention");
    let again = d.publish_new(vec![keyed(Some("k1"), "a"), keyed(Some("k2"), "b")]);
    assert_eq!(outcome(again.unwrap()), vec![Ok(5), Err(2)]);
    d.publish(tasks(&["e", "f", "g"]));
    assert_eq!(keys(&d), 0, "nothing keyed is retained");
}

/// Runs `f` on a dispatcher that journals to a state directory `dir`, then
/// closes the journal (as a server stopping would).
fn with_journal(dir: &std::path::Path, config: &DispatchConfig, f: impl FnOnce(&Dispatcher)) {
    use crate::journal::Journal;
    use crate::results::{ResultSink, SinkConfig};
    let (j, records) = Journal::open(dir).unwrap();
    let (sink, writer) = ResultSink::start(SinkConfig {
        journal: Some((j, &records)),
        compact_bytes: 1 << 20,
        ..Default::default()
    })
    .unwrap();
    f(&Dispatcher::recording(config.clone(), sink, true));
    writer.finish().unwrap();
}

#[test]
fn keys_survive_a_restart_from_the_journal_and_from_a_snapshot() {
    use crate::journal;
    let dir = tempfile::tempdir().unwrap();
    let config = DispatchConfig {
        mode: Mode::Queue,
        ..Default::default()
    };
    with_journal(dir.path(), &config, |d| {
        let published = d.publish_new(vec![keyed(Some("k1"), "a"), keyed(None, "b")]);
        assert_eq!(outcome(published.unwrap()), vec![Ok(1), Ok(2)]);
    });
    let records = journal::read_records(&dir.path().join("journal")).unwrap();
    let restarted = Dispatcher::new(config.clone());
    restarted.restore(records).unwrap();
    let after_restart = restarted.publish_new(vec![keyed(Some("k1"), "a"), keyed(Some("k3"), "c")]);
    assert_eq!(outcome(after_restart.unwrap()), vec![Err(1), Ok(3)]);

    let snapshot = restarted.snapshot(&restarted.lock());
    let from_snapshot = Dispatcher::new(config);
    from_snapshot.restore(snapshot).unwrap();
    let again = from_snapshot.publish_new(vec![keyed(Some("k3"), "c"), keyed(Some("k1"), "a")]);
    assert_eq!(outcome(again.unwrap()), vec![Err(3), Err(1)]);
    assert_eq!(from_snapshot.lock().log.keys_known(), 2);
}

#[test]
fn a_task_for_any_of_some_clients_and_a_cancellation_survive_a_restart_and_a_snapshot() {
    use crate::journal;
    let dir = tempfile::tempdir().unwrap();
    let config = DispatchConfig {
        mode: Mode::Queue,
        ..Default::default()
    };
    let for_web = || NewTask {
        text: "deploy".into(),
        any_of: Some(vec!["web-1".into(), "web-2".into()]),
        ..Default::default()
    };
    with_journal(dir.path(), &config, |d| {
        d.publish_new(vec![for_web(), for_web()]).unwrap();
        assert_eq!(d.cancel(&[2]), 1);
    });
    let records = journal::read_records(&dir.path().join("journal")).unwrap();
    let restarted = Dispatcher::new(config.clone());
    restarted.restore(records).unwrap();
    let snapshot = restarted.snapshot(&restarted.lock());
    let from_snapshot = Dispatcher::new(config);
    from_snapshot.restore(snapshot).unwrap();
    for d in [&restarted, &from_snapshot] {
        // Not for db-1; web-2 gets task 1 only (task 2 was cancelled).
        let (_, db) = d.attach("db-1", "p", false, "i").unwrap();
        assert_eq!(drain(&db), Vec::<TaskId>::new(), "db-1 got a web task");
        let (_, web) = d.attach("web-2", "p", false, "i").unwrap();
        assert_eq!(drain(&web), vec![1], "task 2 was cancelled");
        assert!(d.is_cancelled(2));
    }
}

/// A shared log that numbers tasks from `next` and knows keys, like
/// CONTACT_TASKS with its duplicate window; what it appends is ingested by
/// the test (as the replica's reader would).
struct FakeLog {
    next: Mutex<TaskId>,
    keys: Mutex<HashMap<String, TaskId>>,
    appended: Mutex<Vec<(TaskId, NewTask)>>,
}

impl FakeLog {
    fn starting_at(next: TaskId) -> Arc<FakeLog> {
        Arc::new(FakeLog {
            next: Mutex::new(next),
            keys: Mutex::new(HashMap::new()),
            appended: Mutex::new(vec![]),
        })
    }
}

impl SharedLog for FakeLog {
    fn append(&self, tasks: &[NewTask]) -> Result<Vec<(TaskId, bool)>, NotJournaled> {
        let mut next = self.next.lock().unwrap();
        let mut keys = self.keys.lock().unwrap();
        Ok(tasks
            .iter()
            .map(|t| {
                if let Some(of) = t.key.as_ref().and_then(|k| keys.get(k)) {
                    return (*of, true);
                }
                let id = *next;
                *next += 1;
                if let Some(k) = &t.key {
                    keys.insert(k.clone(), id);
                }
                self.appended.lock().unwrap().push((id, t.clone()));
                (id, false)
            })
            .collect())
    }

    fn cancel(&self, tasks: &[TaskId]) -> Vec<TaskId> {
        tasks.to_vec()
    }
}

fn untargeted(text: &str) -> NewTask {
    NewTask::new(None, text.into())
}

#[test]
fn a_replica_offers_untargeted_queue_tasks_only_once_claimed_and_targeted_ones_at_once() {
    let d = queue(4);
    let (_, a) = d.attach("a", "p", false, "").unwrap();
    d.ingest(vec![
        (1, untargeted("any")),
        (2, NewTask::new(Some("a".into()), "for a".into())),
    ]);
    assert_eq!(
        drain(&a),
        vec![2],
        "the targeted task waits in every replica"
    );
    assert_eq!(d.claim_room(), 3);
    assert_eq!(d.claim(3, 0, untargeted("later")), Claimed::NotYet);
    // Claimed after a delivery elsewhere: its attempts go on from there.
    assert_eq!(d.claim(1, 1, untargeted("any")), Claimed::Taken);
    assert_eq!(drain_attempts(&a), vec![(1, 2)]);
    assert!(d.complete("a", ok(1, 2)).unwrap().accepted);
    assert_eq!(d.claim(1, 2, untargeted("any")), Claimed::Finished);
}

#[test]
fn an_outcome_from_another_replica_finishes_the_task_here_even_before_it_is_read() {
    let d = queue(4);
    let (_, a) = d.attach("a", "p", false, "").unwrap();
    d.ingest(vec![(1, untargeted("one"))]);
    assert_eq!(d.claim(1, 0, untargeted("one")), Claimed::Taken);
    assert_eq!(drain(&a), vec![1]);
    let elsewhere = Settled::Answered {
        client: "b".into(),
        first: 1,
        last: 1,
    };
    assert!(
        d.settle_shared(1, elsewhere.clone()),
        "held here: its claim is done"
    );
    assert_eq!(d.in_flight(), 0, "the delivery here is taken back");
    assert!(d.complete("a", ok(1, 1)).unwrap().stale);
    // An outcome read before its task: the task never waits here.
    assert!(!d.settle_shared(2, elsewhere));
    d.ingest(vec![(2, NewTask::new(Some("a".into()), "for a".into()))]);
    assert_eq!(drain(&a), Vec::<TaskId>::new());
}

#[test]
fn publishing_through_a_shared_log_uses_its_ids_and_its_duplicate_window() {
    let d = Dispatcher::new(DispatchConfig::default());
    let log = FakeLog::starting_at(7);
    d.share_log(log.clone());
    let keyed = |k: &str| NewTask {
        key: Some(k.into()),
        ..untargeted("t")
    };
    // The reader ingests what was appended while the publisher waits for it.
    let reader = {
        let (d, log) = (Arc::new(d), log.clone());
        let d2 = d.clone();
        let t = std::thread::spawn(move || loop {
            let batch: Vec<_> = std::mem::take(&mut *log.appended.lock().unwrap());
            if !batch.is_empty() {
                let done = batch.iter().any(|(id, _)| *id == 8);
                d2.ingest(batch);
                if done {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        });
        (d, t)
    };
    let (d, t) = reader;
    let first = d.publish_new(vec![keyed("k1"), keyed("k2")]).unwrap();
    assert_eq!(
        first.iter().map(Published::id).collect::<Vec<_>>(),
        vec![7, 8]
    );
    t.join().unwrap();
    assert_eq!(d.next_task_id(), 9, "ingested when publish returns");
    // Known here: not even sent; known to the shared log only: its answer.
    let again = d.publish_new(vec![keyed("k1")]).unwrap();
    assert!(matches!(again[0], Published::Duplicate { of: 7 }));
    log.keys.lock().unwrap().insert("k3".into(), 5);
    let other = d.publish_new(vec![keyed("k3")]).unwrap();
    assert!(matches!(other[0], Published::Duplicate { of: 5 }));
}

#[test]
fn a_broadcast_agent_from_another_replica_continues_after_its_saved_place() {
    let d = Dispatcher::new(DispatchConfig::default());
    d.ingest((1..=5).map(|i| (i, untargeted("t"))).collect());
    d.adopt(
        "a",
        &AgentProgress {
            cursor: 4,
            pending: vec![(2, 1)],
        },
    );
    let (_, feed) = d.attach("a", "p", false, "").unwrap();
    assert_eq!(drain_attempts(&feed), vec![(2, 2), (4, 1), (5, 1)]);
    let p = d.progress("a").unwrap();
    assert_eq!(p.cursor, 6);
    assert_eq!(p.pending, vec![(2, 2), (4, 1), (5, 1)]);
}
