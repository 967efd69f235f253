//! One agent of the fleet: a future on a completion queue that holds a
//! `getTask` stream (and a `sendStatus` stream), answers every task with a
//! `tellResult` call of its own, and reports what happens to the coordinator
//! as [`Event`]s; and how a connection is dialled.

use crate::proto::{ClientMsg, ContactClient, Empty, ResultMsg, ServerMsg};
use crossbeam_channel::Sender;
use futures::channel::mpsc;
use futures::future::{poll_fn, BoxFuture};
use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use grpcio::{CallOption, Metadata, RpcStatusCode, WriteFlags};
use std::task::Poll;
use std::time::Instant;

/// What an agent reports to the coordinator.
#[derive(Debug)]
pub(super) enum Event {
    Dialled {
        conn: usize,
        generation: u32,
        result: Result<(), String>,
    },
    Received {
        agent: usize,
        generation: u32,
        text: String,
        at: Instant,
    },
    Acknowledged {
        agent: usize,
        generation: u32,
        text: String,
        at: Instant,
    },
    /// A result call failed (the server will deliver the task again).
    AnswerFailed { generation: u32, why: String },
    /// The agent's calls ended or failed; it is gone until dialled again.
    Ended {
        agent: usize,
        generation: u32,
        why: String,
        refused: bool,
    },
}

/// What the coordinator tells a running agent (dropping its sender stops it).
#[derive(Debug)]
pub(super) enum Command {
    Status,
}

/// The gRPC target for `server`: an IP address is named as such
/// (`ipv4:`/`ipv6:`), so that thousands of channels do not each resolve it
/// on C-core's blocking resolver threads; a host name is resolved as usual.
pub(super) fn grpc_target(server: &str) -> String {
    match server.parse::<std::net::SocketAddr>() {
        Ok(a @ std::net::SocketAddr::V4(_)) => format!("ipv4:{a}"),
        Ok(a @ std::net::SocketAddr::V6(_)) => format!("ipv6:{a}"),
        Err(_) => server.to_string(),
    }
}

/// One agent: a future on a completion queue.
pub(super) struct Agent {
    pub index: usize,
    pub generation: u32,
    pub metadata: Metadata,
    pub status: bool,
}

/// What woke an agent.
enum Wake {
    Stop,
    Status,
    Task(ServerMsg),
    Answered(String, grpcio::Result<()>),
    Lost(&'static str, grpcio::Error),
    Ended(&'static str),
}

impl Agent {
    fn options(&self) -> CallOption {
        CallOption::default().headers(self.metadata.clone())
    }

    /// Registers, answers every task until told to stop (its calls are then
    /// cancelled) or its calls end, and sends a status message when told to.
    pub(super) async fn run(
        self,
        client: ContactClient,
        mut commands: mpsc::UnboundedReceiver<Command>,
        events: Sender<Event>,
    ) {
        let (agent, generation) = (self.index, self.generation);
        let ended = |why: String, refused: bool| {
            let _ = events.send(Event::Ended {
                agent,
                generation,
                why,
                refused,
            });
        };
        let mut tasks = match client.get_task_opt(&Empty::new(), self.options()) {
            Ok(t) => t,
            Err(e) => return ended(format!("getTask: {}", short_error(&e)), false),
        };
        let mut status = if self.status {
            match client.send_status_opt(self.options()) {
                Ok(s) => Some(s),
                Err(e) => return ended(format!("sendStatus: {}", short_error(&e)), false),
            }
        } else {
            None
        };
        let mut answers: FuturesUnordered<BoxFuture<'static, (String, grpcio::Result<()>)>> =
            FuturesUnordered::new();
        loop {
            let wake = poll_fn(|cx| {
                match commands.poll_next_unpin(cx) {
                    Poll::Ready(Some(Command::Status)) => return Poll::Ready(Wake::Status),
                    Poll::Ready(None) => return Poll::Ready(Wake::Stop),
                    Poll::Pending => {}
                }
                if let Poll::Ready(Some((text, r))) = answers.poll_next_unpin(cx) {
                    return Poll::Ready(Wake::Answered(text, r));
                }
                if let Some((_, replies)) = &mut status {
                    // Replies are read (and dropped) so that they never fill the window.
                    while let Poll::Ready(reply) = replies.poll_next_unpin(cx) {
                        match reply {
                            Some(Ok(_)) => {}
                            Some(Err(e)) => return Poll::Ready(Wake::Lost("status stream", e)),
                            None => return Poll::Ready(Wake::Ended("the status stream ended")),
                        }
                    }
                }
                tasks.poll_next_unpin(cx).map(|t| match t {
                    Some(Ok(t)) => Wake::Task(t),
                    Some(Err(e)) => Wake::Lost("task stream", e),
                    None => Wake::Ended("the server ended the task stream"),
                })
            })
            .await;
            match wake {
                // Returning drops (cancels) every call.
                Wake::Stop => return,
                Wake::Status => {
                    if let Some((tx, _)) = &mut status {
                        let msg = ClientMsg {
                            msg: "alive".into(),
                            ..Default::default()
                        };
                        if let Err(e) = tx.send((msg, WriteFlags::default())).await {
                            return ended(format!("status: {}", short_error(&e)), refused(&e));
                        }
                    }
                }
                Wake::Task(task) => {
                    let _ = events.send(Event::Received {
                        agent,
                        generation,
                        text: task.task.clone(),
                        at: Instant::now(),
                    });
                    answers.push(Box::pin(answer(client.clone(), self.options(), task)));
                }
                Wake::Answered(text, Ok(())) => {
                    let _ = events.send(Event::Acknowledged {
                        agent,
                        generation,
                        text,
                        at: Instant::now(),
                    });
                }
                Wake::Answered(_, Err(e)) => {
                    let _ = events.send(Event::AnswerFailed {
                        generation,
                        why: short_error(&e),
                    });
                }
                Wake::Lost(call, e) => {
                    return ended(format!("{call}: {}", short_error(&e)), refused(&e))
                }
                Wake::Ended(why) => return ended(why.into(), false),
            }
        }
    }
}

/// Reports `task` done on a `tellResult` call of its own; the call's
/// completion is the acknowledgement. Yields the task's text and the outcome.
async fn answer(
    client: ContactClient,
    options: CallOption,
    task: ServerMsg,
) -> (String, grpcio::Result<()>) {
    let result = ResultMsg {
        ret: "done".into(),
        task_id: task.task_id,
        ok: true,
        attempt: task.attempt,
        incarnation: task.incarnation,
        ..Default::default()
    };
    let outcome = async {
        let (mut tx, rx) = client.tell_result_opt(options)?;
        tx.send((result, WriteFlags::default())).await?;
        tx.close().await?;
        rx.await.map(|_| ())
    }
    .await;
    (task.task, outcome)
}

/// Whether the server refused the agent (trying again soon changes nothing).
fn refused(e: &grpcio::Error) -> bool {
    matches!(e, grpcio::Error::RpcFailure(s) | grpcio::Error::RpcFinished(Some(s)) if [
        RpcStatusCode::UNAUTHENTICATED,
        RpcStatusCode::PERMISSION_DENIED,
        RpcStatusCode::ALREADY_EXISTS,
        RpcStatusCode::RESOURCE_EXHAUSTED,
    ].contains(&s.code()))
}

/// An error as a short key for counting failures: the status code and
/// message (without the debug string, which holds a timestamp).
fn short_error(e: &grpcio::Error) -> String {
    match e {
        grpcio::Error::RpcFailure(s) | grpcio::Error::RpcFinished(Some(s)) => {
            format!("{:?}: {}", s.code(), s.message())
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_addresses_are_dialled_without_a_resolver() {
        assert_eq!(grpc_target("127.0.0.1:50051"), "ipv4:127.0.0.1:50051");
        assert_eq!(grpc_target("[::1]:50051"), "ipv6:[::1]:50051");
        assert_eq!(grpc_target("localhost:50051"), "localhost:50051");
    }
}
