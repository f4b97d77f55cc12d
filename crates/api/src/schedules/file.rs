//! `SCHEDULES_FILE`: schedules kept in a TOML file (in git, say), put by each gateway at its
//! start wherever the stored schedule differs. The API may change or pause them meanwhile; a
//! gateway started with the file puts the file's definition back (a pause stays). Taking a
//! schedule out of the file does not delete it: `DELETE /schedules/{name}` does.
//!
//! ```toml
//! [[schedule]]
//! name = "nightly-report"
//! cron = "30 2 * * *"
//! timezone = "Europe/Berlin"
//! missed = "once"
//! task = { kind = "report", payload = { scope = "all" }, expires_in = "1h" }
//! ```

use std::{collections::HashSet, path::Path};

use serde::Deserialize;

use super::spec::{Missed, Schedule, Template};

/// Why the file is unusable; names the entry by position and name.
#[derive(Debug, thiserror::Error)]
#[error("SCHEDULES_FILE {path}: {problem}")]
pub struct FileError {
    path: String,
    problem: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    schedule: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    task: Template,
    #[serde(default)]
    cron: Option<String>,
    #[serde(default)]
    timezone: Option<String>,
    #[serde(default)]
    every: Option<String>,
    #[serde(default)]
    missed: Missed,
}

/// Reads and checks every schedule in the file at `path`.
pub fn read(path: &Path) -> Result<Vec<Schedule>, FileError> {
    let error = |problem: String| FileError {
        path: path.display().to_string(),
        problem,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(format!("cannot read it: {e}")))?;
    parse(&text).map_err(error)
}

fn parse(text: &str) -> Result<Vec<Schedule>, String> {
    let file: File = toml::from_str(text).map_err(|e| format!("not TOML of schedules: {e}"))?;
    let mut names = HashSet::new();
    let mut schedules = Vec::with_capacity(file.schedule.len());
    for (position, entry) in file.schedule.into_iter().enumerate() {
        let schedule = Schedule {
            name: entry.name,
            task: entry.task,
            cron: entry.cron,
            timezone: entry.timezone,
            every: entry.every,
            missed: entry.missed,
        };
        let shown = schedule.name.chars().take(65).collect::<String>();
        if let Err(problem) = schedule.ticks() {
            return Err(format!("schedule {} ('{shown}'): {problem}", position + 1));
        }
        if !names.insert(schedule.name.clone()) {
            return Err(format!(
                "schedule {} ('{shown}') has the name of an earlier one",
                position + 1
            ));
        }
        schedules.push(schedule);
    }
    Ok(schedules)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_reads_as_the_api_takes_schedules_and_says_which_entry_is_wrong() {
        let schedules = parse(
            r#"
            [[schedule]]
            name = "nightly"
            cron = "30 2 * * *"
            timezone = "Europe/Berlin"
            missed = "once"
            task = { kind = "report", payload = { scope = "all" }, expires_in = "1h" }

            [[schedule]]
            name = "often"
            every = "10s"
            task = { kind = "sleep" }
            "#,
        )
        .expect("valid");
        assert_eq!(schedules.len(), 2);
        assert_eq!(schedules[0].missed, Missed::Once);
        assert_eq!(schedules[0].task.payload["scope"], "all");
        assert_eq!(schedules[1].every.as_deref(), Some("10s"));

        let bad = parse(
            "[[schedule]]\nname = \"a\"\nevery = \"1s\"\ntask = { kind = \"sleep\" }\n\
             [[schedule]]\nname = \"b\"\ncron = \"61 * * * *\"\ntask = { kind = \"sleep\" }\n",
        )
        .expect_err("a bad cron");
        assert!(
            bad.contains("schedule 2 ('b')") && bad.contains("cron"),
            "{bad}"
        );
        let twice = parse(
            "[[schedule]]\nname = \"a\"\nevery = \"1s\"\ntask = { kind = \"sleep\" }\n\
             [[schedule]]\nname = \"a\"\nevery = \"2s\"\ntask = { kind = \"sleep\" }\n",
        )
        .expect_err("a name twice");
        assert!(twice.contains("earlier"), "{twice}");
        assert!(parse("[[schedule]]\nname = \"a\"\nwhen = 1\n").is_err());
    }
}
