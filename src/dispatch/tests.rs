use super::*;

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
    let mut known: Vec<&String> = st.clients.keys().collect();
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
