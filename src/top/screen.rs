//! `contact-ctl top`'s terminal: the full-screen session (raw mode and the
//! alternate screen, given back on every way out: `q`, Ctrl-C, a signal,
//! an error or a panic; it ends when the terminal hangs up), the keys, and
//! the drawing of a [`View`] with ratatui. Polls run on a thread of their
//! own, so a slow or unreachable server never keeps the keys from answering.

use super::{Poll, Top, View, AGENT_COLUMNS, JOB_COLUMNS};
use crate::ctl::Ctl;
use crate::error::Error;
use crossbeam_channel::Receiver;
use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::{cursor, execute, terminal};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table};
use ratatui::{Frame, Terminal};
use std::io::{IsTerminal, Stdout};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How often the screen is redrawn and the keys looked at, between polls
/// ("last seen" ages as it goes).
const TICK: Duration = Duration::from_millis(100);

/// Runs `top` against `ctl`'s server until `q`, Ctrl-C, a signal (SIGINT,
/// SIGTERM, SIGHUP) or the terminal's hang-up; polls every `interval`.
pub fn run(ctl: Ctl, server: &str, interval: Duration) -> Result<(), Error> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(Error::Usage(
            "contact-ctl top draws on a terminal and reads its keys there, and its output or input is not one: use `contact-ctl clients --json` in scripts".into(),
        ));
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(Error::Thread)?;
    }
    let polls = spawn_poller(ctl, interval)?;
    let mut screen = Screen::enter()?;
    let mut top = Top::new(server, interval);
    let io = |e: std::io::Error| Error::Remote(format!("cannot draw on the terminal: {e}"));
    'session: while !stop.load(Ordering::Relaxed) {
        let view = top.view(SystemTime::now(), Instant::now());
        if let Err(e) = screen.terminal.draw(|f| draw(f, &view)) {
            if matches!(read_keys(Duration::ZERO), Ok(Input::HungUp)) {
                break; // Nobody to tell.
            }
            return Err(io(e));
        }
        match read_keys(TICK).map_err(io)? {
            // The operator is gone (an SSH session dropped): nobody to tell.
            Input::HungUp => break,
            Input::Keys(keys) => {
                for key in keys {
                    match key {
                        Key::Quit => break 'session,
                        Key::Sort => top.cycle_sort(),
                    }
                }
            }
        }
        for outcome in polls.try_iter() {
            top.record(outcome, Instant::now());
        }
    }
    Ok(())
}

/// What the terminal gave within a tick.
enum Input {
    Keys(Vec<Key>),
    HungUp,
}

#[derive(Debug, PartialEq, Eq)]
enum Key {
    Quit,
    Sort,
}

/// Waits up to `timeout` for keys on the terminal (stdin, in raw mode).
///
/// Read here with poll(2) and read(2), not with crossterm's event reader:
/// once the terminal hangs up, crossterm 0.29's reader re-reads the dead
/// terminal in a loop forever, at 100% of a core, and its poll never returns
/// (crossterm-rs/crossterm#793; seen here with tmux's server killed).
fn read_keys(timeout: Duration) -> std::io::Result<Input> {
    let mut stdin = libc::pollfd {
        fd: libc::STDIN_FILENO,
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = timeout.as_millis().min(i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd, and its count.
    let ready = unsafe { libc::poll(&mut stdin, 1, millis) };
    if ready < 0 {
        let e = std::io::Error::last_os_error();
        return match e.kind() {
            std::io::ErrorKind::Interrupted => Ok(Input::Keys(vec![])),
            _ => Err(e),
        };
    }
    if ready == 0 {
        return Ok(Input::Keys(vec![]));
    }
    if stdin.revents & libc::POLLIN == 0 {
        // POLLHUP, POLLERR or POLLNVAL alone: the terminal is gone.
        return Ok(Input::HungUp);
    }
    let mut bytes = [0u8; 64];
    // SAFETY: reads at most the buffer's length into it.
    let n = unsafe { libc::read(libc::STDIN_FILENO, bytes.as_mut_ptr().cast(), bytes.len()) };
    match n {
        0 => Ok(Input::HungUp),
        n if n > 0 => Ok(Input::Keys(keys(&bytes[..n as usize]))),
        _ => {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock => {
                    Ok(Input::Keys(vec![]))
                }
                // EIO: a terminal hung up.
                _ => Ok(Input::HungUp),
            }
        }
    }
}

/// The keys of top in what the terminal sent: `q`, Esc or Ctrl-C quit, `s`
/// sorts; anything else, escape sequences (arrows, function keys) included,
/// is ignored.
fn keys(bytes: &[u8]) -> Vec<Key> {
    // An Esc key comes alone; an escape sequence is Esc and more.
    if bytes == [0x1b] {
        return vec![Key::Quit];
    }
    let plain = match bytes.iter().position(|&b| b == 0x1b) {
        Some(esc) => &bytes[..esc],
        None => bytes,
    };
    plain
        .iter()
        .filter_map(|b| match b {
            b'q' | 0x03 => Some(Key::Quit),
            b's' => Some(Key::Sort),
            _ => None,
        })
        .collect()
}

/// A thread that polls the server every `interval` (from the start of one
/// poll to the next) and sends each outcome; it ends when the receiver is
/// dropped.
fn spawn_poller(ctl: Ctl, interval: Duration) -> Result<Receiver<Result<Poll, Error>>, Error> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::Builder::new()
        .name("top-poll".into())
        .spawn(move || loop {
            let started = Instant::now();
            if tx.send(super::poll(&ctl)).is_err() {
                return; // The screen is gone.
            }
            std::thread::sleep(interval.saturating_sub(started.elapsed()));
        })
        .map_err(Error::Thread)?;
    Ok(rx)
}

/// The terminal in raw mode on the alternate screen, until dropped.
struct Screen {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

impl Screen {
    fn enter() -> Result<Screen, Error> {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            hook(info);
        }));
        let io = |e: std::io::Error| Error::Remote(format!("cannot take over the terminal: {e}"));
        terminal::enable_raw_mode().map_err(io)?;
        // From here on, dropping the screen gives the terminal back.
        let terminal = Terminal::new(CrosstermBackend::new(std::io::stdout()));
        let screen = Screen {
            terminal: terminal.map_err(io)?,
        };
        execute!(
            std::io::stdout(),
            terminal::EnterAlternateScreen,
            cursor::Hide
        )
        .map_err(io)?;
        Ok(screen)
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        restore();
    }
}

/// Gives the terminal back as it was: cooked mode, the main screen, a cursor.
fn restore() {
    let _ = terminal::disable_raw_mode();
    let _ = execute!(
        std::io::stdout(),
        terminal::LeaveAlternateScreen,
        cursor::Show
    );
}

/// One frame: the status line, the agents, the newest jobs, the keys.
pub fn draw(frame: &mut Frame, view: &View) {
    let jobs_height = view.jobs.len() as u16 + 3;
    let [status, agents, jobs, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(4),
        Constraint::Length(jobs_height),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let status_style = if view.unreachable {
        Style::new()
            .fg(Color::White)
            .bg(Color::Red)
            .add_modifier(Modifier::BOLD)
    } else {
        Style::new().add_modifier(Modifier::BOLD)
    };
    frame.render_widget(
        Paragraph::new(Line::styled(view.status.as_str(), status_style)),
        status,
    );

    let sorted = AGENT_COLUMNS.iter().position(|c| *c == view.sort.title());
    let agent_cells: Vec<[String; 8]> = view.agents.iter().map(|a| a.cells()).collect();
    let agent_rows = agent_cells.iter().zip(&view.agents).map(|(cells, a)| {
        let row = Row::new(cells.iter().map(String::as_str));
        match (a.drained, a.failed) {
            (true, _) => row.style(Style::new().fg(Color::DarkGray)),
            (false, 1..) => row.style(Style::new().fg(Color::Yellow)),
            _ => row,
        }
    });
    frame.render_widget(
        table(&AGENT_COLUMNS, sorted, &agent_cells)
            .rows(agent_rows)
            .block(Block::bordered().title(format!(" agents ({}) ", view.agents.len()))),
        agents,
    );

    let job_cells: Vec<[String; 7]> = view.jobs.iter().map(|j| j.cells()).collect();
    let job_rows = job_cells.iter().zip(&view.jobs).map(|(cells, j)| {
        let row = Row::new(cells.iter().map(String::as_str));
        if j.counts.failed > 0 {
            row.style(Style::new().fg(Color::Red))
        } else {
            row
        }
    });
    frame.render_widget(
        table(&JOB_COLUMNS, None, &job_cells)
            .rows(job_rows)
            .block(Block::bordered().title(" newest jobs ")),
        jobs,
    );
    frame.render_widget(
        Paragraph::new(Line::styled(
            view.help.as_str(),
            Style::new().fg(Color::DarkGray),
        )),
        help,
    );
}

/// A table with these headings (the `sorted` one underlined), each column
/// as wide as its widest cell, the last taking the rest.
fn table<'a, const N: usize>(
    headings: &'a [&'a str; N],
    sorted: Option<usize>,
    cells: &[[String; N]],
) -> Table<'a> {
    let widths = (0..N).map(|i| {
        let widest = cells
            .iter()
            .map(|r| r[i].chars().count())
            .chain([headings[i].len()])
            .max()
            .unwrap_or(0);
        if i + 1 == N {
            Constraint::Fill(1)
        } else {
            Constraint::Length(widest as u16)
        }
    });
    let header = Row::new(headings.iter().enumerate().map(|(i, h)| {
        let style = Style::new().add_modifier(Modifier::BOLD);
        Line::styled(
            *h,
            if Some(i) == sorted {
                style.add_modifier(Modifier::UNDERLINED)
            } else {
                style
            },
        )
    }));
    Table::default()
        .widths(widths)
        .header(header)
        .column_spacing(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_q_esc_ctrl_c_and_s_and_sequences_are_ignored() {
        assert_eq!(keys(b"q"), [Key::Quit]);
        assert_eq!(keys(b"\x03"), [Key::Quit]);
        assert_eq!(keys(b"\x1b"), [Key::Quit]);
        assert_eq!(keys(b"ss"), [Key::Sort, Key::Sort]);
        // Arrow up, F1: not Esc.
        assert_eq!(keys(b"\x1b[A"), []);
        assert_eq!(keys(b"s\x1bOP"), [Key::Sort]);
        assert_eq!(keys(b"xyz"), []);
    }
    use crate::proto::admin::ClientInfo;
    use ratatui::backend::TestBackend;

    /// The text of every line of a frame drawn on a `width`×`height` screen.
    fn drawn(view: &View, width: u16, height: u16) -> Vec<String> {
        let mut t = Terminal::new(TestBackend::new(width, height)).unwrap();
        t.draw(|f| draw(f, view)).unwrap();
        let buf = t.backend().buffer();
        (0..height)
            .map(|y| {
                (0..width)
                    .map(|x| buf[(x, y)].symbol())
                    .collect::<String>()
                    .trim_end()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn a_frame_has_the_status_the_agents_and_the_keys() {
        let t0 = Instant::now();
        let mut top = Top::new("127.0.0.1:50051", Duration::from_secs(1));
        let client = |done| ClientInfo {
            id: "web-1".into(),
            done,
            last_seen: 100.0,
            ..Default::default()
        };
        let poll = |at, done| Poll {
            taken_at: at,
            clients: vec![client(done)],
            jobs: vec![],
        };
        top.record(Ok(poll(t0, 1)), t0);
        let t1 = t0 + Duration::from_secs(1);
        top.record(Ok(poll(t1, 4)), t1);
        let lines = drawn(
            &top.view(SystemTime::UNIX_EPOCH + Duration::from_secs(101), t1),
            120,
            16,
        );
        assert_eq!(
            lines[0],
            "127.0.0.1:50051: 1 agent, 3.0 results/s, 0.0 failures/s (every 1s)"
        );
        let heading = lines
            .iter()
            .position(|l| l.starts_with("│ID "))
            .unwrap_or_else(|| panic!("no headings: {lines:#?}"));
        assert!(
            lines[heading].contains("RESULTS/S  LAST SEEN"),
            "{lines:#?}"
        );
        let row = &lines[heading + 1];
        assert!(row.starts_with("│web-1  active"), "{lines:#?}");
        assert!(row.contains("3.0        1s ago"), "{lines:#?}");
        assert!(
            lines.iter().any(|l| l.contains("newest jobs")),
            "{lines:#?}"
        );
        assert!(lines[15].starts_with("q quit"), "{lines:#?}");
    }
}
