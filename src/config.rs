//! `ConfigFile`: settings read from a TOML file (`--config FILE`), each
//! named as the long flag it stands for — `token-file = "/etc/contact/ops.token"`
//! is `--token-file /etc/contact/ops.token`, `label = ["role=web", "zone=eu"]`
//! is `--label role=web --label zone=eu`, `json = true` is `--json` — so a
//! file says exactly what the command line can, and clap checks both the
//! same way. The file's settings go before the command line's arguments,
//! and a flag the command line gives replaces the file's setting of it
//! (flags win). A key that is no flag, a table, or a value of the wrong
//! kind is an error naming the file, the line and the key; a value clap
//! rejects is reported by clap, with a note saying which line set it.
//! A server reads its file again when told to reload (`reparse`), and
//! `changed_flags` says which settings the new reading changes.

use clap::error::{ContextKind, ContextValue};
use clap::{Command, CommandFactory, FromArgMatches};
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};

/// The flag that names the file.
const CONFIG_FLAG: &str = "config";

/// One setting: the flag it stands for, the line it is on, its values
/// (none for a switch that is on).
#[derive(Debug, Clone, PartialEq)]
struct Setting {
    flag: String,
    line: usize,
    values: Vec<String>,
}

/// A config file's settings, checked against the flags of one command.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigFile {
    path: PathBuf,
    settings: Vec<Setting>,
}

impl ConfigFile {
    /// Reads and checks `path` against `command`'s flags.
    pub fn read(path: &Path, command: &Command) -> Result<ConfigFile, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read the config file {}: {e}", path.display()))?;
        ConfigFile::parse(path, &text, command)
    }

    /// Checks `text` (the contents of `path`) against `command`'s flags.
    pub fn parse(path: &Path, text: &str, command: &Command) -> Result<ConfigFile, String> {
        let at = |line: usize| format!("{}, line {line}", path.display());
        let doc =
            toml_edit::Document::parse(text).map_err(|e| format!("{}: {e}", path.display()))?;
        let line_of = |span: Option<std::ops::Range<usize>>| {
            span.map_or(0, |s| text[..s.start].matches('\n').count() + 1)
        };
        let mut settings = vec![];
        for (key, item) in doc.as_table().iter() {
            let (k, _) = doc.as_table().get_key_value(key).expect("listed");
            let line = line_of(k.span());
            let flag = key.replace('_', "-");
            let arg = command
                .get_arguments()
                .find(|a| a.get_long() == Some(flag.as_str()))
                .filter(|_| !["config", "help", "version"].contains(&flag.as_str()))
                .ok_or_else(|| {
                    format!(
                        "{}: unknown setting `{key}`; a setting is a long flag of {} without its dashes (see --help)",
                        at(line),
                        command.get_name()
                    )
                })?;
            let switch = !arg.get_action().takes_values();
            let scalar = |v: &toml_edit::Value| -> Result<String, String> {
                match v {
                    toml_edit::Value::String(s) => Ok(s.value().clone()),
                    toml_edit::Value::Integer(i) => Ok(i.value().to_string()),
                    toml_edit::Value::Float(f) => Ok(f.value().to_string()),
                    _ => Err(format!(
                        "{}: `{key}` takes a string or a number, not {}",
                        at(line),
                        v.type_name()
                    )),
                }
            };
            let value = item.as_value().ok_or_else(|| {
                format!(
                    "{}: `{key}` is a table; settings are `key = value` lines at the top of the file",
                    at(line)
                )
            })?;
            let values = match (switch, value) {
                (true, toml_edit::Value::Boolean(b)) if *b.value() => vec![],
                (true, toml_edit::Value::Boolean(_)) => continue,
                (true, v) => {
                    return Err(format!(
                        "{}: `{key}` is a switch: true or false, not {}",
                        at(line),
                        v.type_name()
                    ))
                }
                (false, toml_edit::Value::Array(a)) => {
                    a.iter().map(scalar).collect::<Result<Vec<_>, _>>()?
                }
                (false, v) => vec![scalar(v)?],
            };
            settings.push(Setting { flag, line, values });
        }
        Ok(ConfigFile {
            path: path.to_path_buf(),
            settings,
        })
    }

    /// `args` (program name first) with the file's settings put before the
    /// command line's arguments, except those the command line sets itself.
    pub fn apply(&self, args: &[OsString]) -> Vec<OsString> {
        let mut out: Vec<OsString> = args.iter().take(1).cloned().collect();
        for s in self.settings.iter().filter(|s| !given_on(args, &s.flag)) {
            if s.values.is_empty() {
                out.push(format!("--{}", s.flag).into());
            }
            for v in &s.values {
                out.push(format!("--{}={v}", s.flag).into());
            }
        }
        out.extend(args.iter().skip(1).cloned());
        out
    }

    /// The file the settings were read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The flags whose settings differ between this reading of the file and
    /// `newer` (set in one only, or to other values), leaving out those the
    /// command line `args` gives, which win over either file.
    pub fn changed_flags(&self, newer: &ConfigFile, args: &[OsString]) -> Vec<String> {
        let values = |c: &ConfigFile, flag: &str| {
            c.settings
                .iter()
                .find(|s| s.flag == flag)
                .map(|s| s.values.clone())
        };
        let mut flags: Vec<String> = self
            .settings
            .iter()
            .chain(&newer.settings)
            .map(|s| s.flag.clone())
            .filter(|f| !given_on(args, f) && values(self, f) != values(newer, f))
            .collect();
        flags.sort();
        flags.dedup();
        flags
    }

    /// "set by FILE, line N" for a flag this file sets, to go with clap's
    /// complaint about its value.
    fn origin(&self, flag: &str) -> Option<String> {
        let s = self.settings.iter().find(|s| s.flag == flag)?;
        Some(format!(
            "--{flag} was set by the config file {}, line {}",
            self.path.display(),
            s.line
        ))
    }
}

/// Whether the command line `args` (program name first) gives `--FLAG`.
fn given_on(args: &[OsString], flag: &str) -> bool {
    let long = format!("--{flag}");
    args.iter().skip(1).any(|a| {
        let a = a.to_string_lossy();
        a == long || a.starts_with(&format!("{long}="))
    })
}

/// The file a command line names with `--config FILE` (or `--config=FILE`).
fn named_config(args: &[OsString]) -> Option<PathBuf> {
    let mut it = args.iter().skip(1).take_while(|a| *a != OsStr::new("--"));
    let long = format!("--{CONFIG_FLAG}");
    while let Some(a) = it.next() {
        let text = a.to_string_lossy();
        if text == long {
            return it.next().map(PathBuf::from);
        }
        if let Some(path) = text.strip_prefix(&format!("{long}=")) {
            return Some(PathBuf::from(path));
        }
    }
    None
}

/// Whether the command line runs a subcommand whose arguments may not mix
/// with the command's own (then a config file's settings do not apply).
fn runs_separate_subcommand(command: &Command, args: &[OsString]) -> bool {
    command.is_args_conflicts_with_subcommands_set()
        && args.get(1).is_some_and(|a| {
            command
                .get_subcommands()
                .any(|s| OsStr::new(s.get_name()) == a)
        })
}

/// Parses this process's command line as `F`, with the settings of the
/// config file it names with `--config FILE` — or of `default`, if given
/// and present. A mistake in the file, or in a value it set, exits with
/// status 2 (usage), as clap does for the command line.
pub fn parse_args<F: CommandFactory + FromArgMatches>(default: Option<PathBuf>) -> F {
    parse_args_and_file(default).0
}

/// [`parse_args`], also returning the config file read (none when the
/// command line names none, or runs a subcommand whose arguments may not
/// mix with the command's), to compare with a later reading of it.
pub fn parse_args_and_file<F: CommandFactory + FromArgMatches>(
    default: Option<PathBuf>,
) -> (F, Option<ConfigFile>) {
    let args: Vec<OsString> = std::env::args_os().collect();
    let command = F::command();
    let name = command.get_name().to_string();
    let path = named_config(&args).or_else(|| default.filter(|p| p.exists()));
    let config = match path {
        Some(path) if !runs_separate_subcommand(&command, &args) => {
            match ConfigFile::read(&path, &command) {
                Ok(c) => Some(c),
                Err(e) => {
                    eprintln!("{name}: {e}");
                    std::process::exit(crate::cli::EXIT_USAGE);
                }
            }
        }
        _ => None,
    };
    match parse_with(command, &args, config.as_ref()) {
        Ok(flags) => (flags, config),
        Err((e, note)) => {
            let _ = e.print();
            if let Some(note) = note {
                eprintln!("note: {note}");
            }
            std::process::exit(e.exit_code());
        }
    }
}

/// Reads the config file at `path` again and parses `args` (this process's
/// command line) with it, as at start: what a server does when told to
/// reload (SIGHUP). A mistake is returned, worded as at start, to be logged.
pub fn reparse<F: CommandFactory + FromArgMatches>(
    args: &[OsString],
    path: &Path,
) -> Result<(F, ConfigFile), String> {
    let command = F::command();
    let config = ConfigFile::read(path, &command)?;
    match parse_with(command, args, Some(&config)) {
        Ok(flags) => Ok((flags, config)),
        Err((e, note)) => {
            let why = e.render().to_string();
            let why = why.trim_start_matches("error: ").trim_end();
            Err(match note {
                Some(note) => format!("{why} ({note})"),
                None => format!("{}: {why}", path.display()),
            })
        }
    }
}

/// `args` parsed as `F` with `config`'s settings; an error comes with a
/// note naming the file's line that set the value refused.
fn parse_with<F: FromArgMatches>(
    command: Command,
    args: &[OsString],
    config: Option<&ConfigFile>,
) -> Result<F, (clap::Error, Option<String>)> {
    let full = config.map_or_else(|| args.to_vec(), |c| c.apply(args));
    command
        .try_get_matches_from(full)
        .and_then(|mut m| F::from_arg_matches_mut(&mut m))
        .map_err(|e| {
            let note = config.and_then(|c| {
                let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
                    return None;
                };
                let flag = arg.trim_start_matches('-').split([' ', '=']).next()?;
                c.origin(flag)
            });
            (e, note)
        })
}

/// `$XDG_CONFIG_HOME/contact/NAME` (or `~/.config/contact/NAME`).
pub fn user_config(name: &str) -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("contact").join(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{Arg, ArgAction};

    fn command() -> Command {
        Command::new("demo")
            .arg(Arg::new("server").long("server"))
            .arg(Arg::new("token_file").long("token-file"))
            .arg(Arg::new("every").long("every"))
            .arg(Arg::new("json").long("json").action(ArgAction::SetTrue))
            .arg(Arg::new("label").long("label").action(ArgAction::Append))
            .arg(Arg::new("config").long("config"))
    }

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    fn parse(text: &str) -> Result<ConfigFile, String> {
        ConfigFile::parse(Path::new("demo.toml"), text, &command())
    }

    #[test]
    fn settings_become_flags_before_the_command_line_which_wins() {
        let c = parse(
            "# the fleet's server\nserver = \"10.0.0.1:50051\"\ntoken_file = \"/etc/t\"\n\
             every = 0.5\njson = true\nlabel = [\"role=web\", \"zone=eu\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.apply(&os(&["demo", "--server", "h:1", "push"])),
            os(&[
                "demo",
                "--token-file=/etc/t",
                "--every=0.5",
                "--json",
                "--label=role=web",
                "--label=zone=eu",
                "--server",
                "h:1",
                "push",
            ])
        );
        // A list given on the command line replaces the file's.
        let applied = c.apply(&os(&["demo", "--label=role=db"]));
        assert_eq!(
            applied
                .iter()
                .filter(|a| a.to_string_lossy().contains("label"))
                .count(),
            1
        );
        let m = command()
            .try_get_matches_from(c.apply(&os(&["demo"])))
            .unwrap();
        assert_eq!(m.get_one::<String>("every").unwrap(), "0.5");
        assert!(m.get_flag("json"));
        assert_eq!(
            c.origin("every").unwrap(),
            "--every was set by the config file demo.toml, line 4"
        );
    }

    #[test]
    fn changed_settings_are_named_unless_the_command_line_sets_them() {
        let old = parse("server = \"a\"\nevery = 1\nlabel = [\"x=1\"]\njson = true\n").unwrap();
        let new =
            parse("every = 2\nserver = \"a\"\nlabel = [\"x=1\", \"y=2\"]\ntoken_file = \"t\"\n")
                .unwrap();
        assert_eq!(
            old.changed_flags(&new, &os(&["demo"])),
            ["every", "json", "label", "token-file"]
        );
        assert_eq!(
            old.changed_flags(&new, &os(&["demo", "--every=3", "--json"])),
            ["label", "token-file"]
        );
        assert!(old.changed_flags(&old, &os(&["demo"])).is_empty());
    }

    #[test]
    fn a_switch_set_false_is_left_out() {
        assert_eq!(
            parse("json = false").unwrap().apply(&os(&["demo"])),
            os(&["demo"])
        );
    }

    #[test]
    fn mistakes_name_the_file_line_and_key() {
        let e = parse("server = \"a\"\n\nsevrer = \"b\"\n").unwrap_err();
        assert!(
            e.starts_with("demo.toml, line 3: unknown setting `sevrer`"),
            "{e}"
        );
        let e = parse("json = \"yes\"").unwrap_err();
        assert!(
            e.contains("line 1: `json` is a switch: true or false, not string"),
            "{e}"
        );
        let e = parse("server = true").unwrap_err();
        assert!(
            e.contains("`server` takes a string or a number, not boolean"),
            "{e}"
        );
        let e = parse("[server]\nhost = \"a\"").unwrap_err();
        assert!(e.contains("line 1: `server` is a table"), "{e}");
        let e = parse("config = \"other.toml\"").unwrap_err();
        assert!(e.contains("unknown setting `config`"), "{e}");
        let e = parse("server = \"unterminated").unwrap_err();
        assert!(
            e.starts_with("demo.toml: TOML parse error at line 1"),
            "{e}"
        );
    }

    #[test]
    fn the_config_flag_is_found_in_either_form() {
        assert_eq!(
            named_config(&os(&["demo", "--json", "--config", "a.toml"])),
            Some(PathBuf::from("a.toml"))
        );
        assert_eq!(
            named_config(&os(&["demo", "--config=b.toml"])),
            Some(PathBuf::from("b.toml"))
        );
        assert_eq!(named_config(&os(&["demo", "--", "--config", "c"])), None);
    }
}
