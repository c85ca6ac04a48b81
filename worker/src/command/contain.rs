//! Containment: every process a run starts ends with the run, whatever it did to escape (a new
//! session, a new process group, a double fork). Two mechanisms, chosen once at start
//! ([`init`], `--containment`, logged):
//!
//! - **cgroup**: where this process may create cgroup v2 groups below its own (root, or a
//!   delegated subtree) and the kernel has `cgroup.kill`, each run gets a group of its own,
//!   which the worker moves the program into as it starts; ending the run kills the group, and
//!   what the program started in the moment before the move is found as the subreaper finds it.
//! - **subreaper**: otherwise. The worker is a child subreaper (`PR_SET_CHILD_SUBREAPER`), so
//!   what a run orphans is re-parented to it rather than to init; a run's processes are found by
//!   their ancestry and by the run's id in their environment, stopped, then killed.
//!
//! Either way the worker reaps what it inherits. A run's [`Limits`] (memory, processes) are its
//! group's `memory.max` and `pids.max`: only under cgroup, with those controllers delegated.

use std::collections::HashSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How a worker contains its runs.
#[derive(Debug)]
pub enum Mechanism {
    /// Each run in a cgroup v2 group under this folder (the worker's own group's child).
    Cgroup(PathBuf),
    /// Each run found by ancestry and environment, the worker their subreaper.
    Subreaper,
}

static MECHANISM: OnceLock<Mechanism> = OnceLock::new();

/// The variable that carries a run's id into its processes' environments (found there again
/// when the subreaper looks for what the run left).
pub const RUN_ID_VAR: &str = "SEEDSWEEP_RUN_ID";

/// Which mechanism a worker asks for (`--containment`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// cgroup v2 where the host allows it, else subreaper.
    Auto,
    /// cgroup v2, or the worker does not start.
    Cgroup,
    /// subreaper, even where cgroup v2 would do.
    Subreaper,
}

/// Makes this process a subreaper and chooses the mechanism, once (a later call returns the
/// first choice's mechanism); an error when `Cgroup` was asked for and the host has none.
pub fn init(choice: Choice) -> Result<&'static Mechanism, String> {
    if let Some(m) = MECHANISM.get() {
        return Ok(m);
    }
    // SAFETY: prctl with an integer argument; no memory is involved.
    let subreaper = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } == 0;
    if !subreaper {
        tracing::warn!(
            "cannot become a child subreaper: processes a program orphans escape to init"
        );
    }
    let mechanism = match choice {
        Choice::Subreaper => Mechanism::Subreaper,
        Choice::Auto => cgroup_base().map_or_else(
            |why| {
                tracing::debug!(%why, "no cgroup v2 group for runs");
                Mechanism::Subreaper
            },
            Mechanism::Cgroup,
        ),
        Choice::Cgroup => {
            Mechanism::Cgroup(cgroup_base().map_err(|why| format!("--containment cgroup: {why}"))?)
        }
    };
    Ok(MECHANISM.get_or_init(|| mechanism))
}

fn mechanism() -> &'static Mechanism {
    init(Choice::Auto).unwrap_or(&Mechanism::Subreaper)
}

impl std::fmt::Display for Mechanism {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mechanism::Cgroup(dir) => write!(f, "cgroup v2 ({})", dir.display()),
            Mechanism::Subreaper => write!(f, "subreaper"),
        }
    }
}

/// A folder for this worker's run groups below its own cgroup v2 group, made now, if the host
/// lets this process make one and the kernel can kill a group.
fn cgroup_base() -> Result<PathBuf, String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    let mount = mounts
        .lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split(' ').next() == Some("cgroup2")).then(|| left.split(' ').nth(4))?
        })
        .ok_or("no cgroup2 file system is mounted")?;
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let own = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process is in no cgroup v2 group")?;
    let group = Path::new(mount).join(own.trim_start_matches('/'));
    let base = group.join(format!("seedsweep-worker-{}", std::process::id()));
    std::fs::create_dir(&base).map_err(|e| format!("cannot create {}: {e}", base.display()))?;
    // The controllers that enforce run limits, for the run groups, where the host has them: a
    // run that asks for a limit without them is refused (`prepare`), so a failure here is left
    // to that.
    for dir in [group.as_path(), base.as_path()] {
        for controller in ["+memory", "+pids"] {
            let _ = std::fs::write(dir.join("cgroup.subtree_control"), controller);
        }
    }
    // The root group has no cgroup.kill of its own: the group made below it tells.
    if !base.join("cgroup.kill").exists() {
        let _ = std::fs::remove_dir(&base);
        return Err(format!(
            "{} has no cgroup.kill (Linux 5.14 or later)",
            base.display()
        ));
    }
    Ok(base)
}

/// Removes the worker's run groups and their folder (at exit; empty by then).
pub fn finish() {
    if let Some(Mechanism::Cgroup(base)) = MECHANISM.get() {
        for dir in free_groups().drain(..) {
            let _ = std::fs::remove_dir(dir);
        }
        let _ = std::fs::remove_dir(base);
    }
}

/// The main processes of the runs going now: the reaper leaves them to their `Child`.
static MAINS: Mutex<Vec<i32>> = Mutex::new(Vec::new());

fn mains() -> std::sync::MutexGuard<'static, Vec<i32>> {
    MAINS.lock().unwrap_or_else(|p| p.into_inner())
}

/// One run's processes.
pub struct Contained {
    id: String,
    main: i32,
    group: Option<PathBuf>,
    /// Processes seen in the run's tree (pid and start time, so a reused pid is not taken).
    seen: HashSet<(i32, u64)>,
    /// Every process of the run is gone.
    ended: bool,
    /// The group's limit events before the run (a reused group's counters go on counting).
    events_before: [u64; 2],
}

/// What a run may use at most (`[command] memory_limit_mb`, `pids_limit`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: Option<u64>,
    pub pids: Option<u64>,
}

impl Limits {
    /// Each limit with its cgroup file and its value there ("max": none).
    fn files(self) -> [(&'static str, &'static str, Option<u64>); 2] {
        [
            ("memory.max", "memory_limit_mb", self.memory_bytes),
            ("pids.max", "pids_limit", self.pids),
        ]
    }
}

/// Prepares `cmd` to start contained: its own process group, the run's id in its environment
/// and, under cgroup, a group of its own (made, or an emptied one reused) with `limits`, that
/// [`Prepared::spawn`] moves it into. The error says why the run cannot be contained as asked
/// (a limit this host cannot enforce is this host's problem, not the run's).
pub fn prepare(cmd: &mut std::process::Command, limits: Limits) -> Result<Prepared, String> {
    let id = format!("{:032x}", rand::random::<u128>());
    cmd.env(RUN_ID_VAR, &id).process_group(0);
    let group = match mechanism() {
        Mechanism::Cgroup(base) => {
            let reused = free_groups().pop();
            let dir = match reused {
                Some(dir) => dir,
                None => {
                    let dir = base.join(format!("run-{id}"));
                    std::fs::create_dir(&dir)
                        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                    dir
                }
            };
            if let Err(e) = set_limits(&dir, limits) {
                free_groups().push(dir);
                return Err(e);
            }
            Some(dir)
        }
        Mechanism::Subreaper => match limits.files().iter().find(|f| f.2.is_some()) {
            Some((_, key, _)) => {
                return Err(format!(
                    "`command.{key}` needs cgroup containment, and this worker runs programs under the subreaper (--containment; README, \"How a run is supervised\")"
                ));
            }
            None => None,
        },
    };
    let events_before = group.as_deref().map_or([0; 2], limit_events);
    Ok(Prepared {
        id,
        group,
        events_before,
    })
}

/// The limit events a group has counted: the memory limit's kills, the process limit's refused
/// forks.
const LIMIT_EVENTS: [(&str, &str, &str); 2] = [
    (
        "memory.events",
        "oom_kill",
        "the kernel killed it for going past its memory limit (`command.memory_limit_mb`)",
    ),
    (
        "pids.events",
        "max",
        "it tried to start more processes than its limit allows (`command.pids_limit`)",
    ),
];

fn limit_events(dir: &Path) -> [u64; 2] {
    LIMIT_EVENTS.map(|(file, key, _)| {
        let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
            .unwrap_or(0)
    })
}

/// Writes a run group's limits (a reused group's earlier ones are replaced, "max" for none).
fn set_limits(dir: &Path, limits: Limits) -> Result<(), String> {
    for (file, key, value) in limits.files() {
        let path = dir.join(file);
        let text = value.map_or("max".to_string(), |v| v.to_string());
        match std::fs::write(&path, text) {
            Ok(()) => {}
            // Without the controller there is no file: fine while no limit is asked for.
            Err(_) if value.is_none() && !path.exists() => {}
            Err(e) => {
                let controllers =
                    std::fs::read_to_string(dir.join("../cgroup.controllers")).unwrap_or_default();
                return Err(format!(
                    "`command.{key}`: cannot write {}: {e} (this worker's cgroup v2 group delegates the controllers `{}`; the limit needs `{}`)",
                    path.display(),
                    controllers.trim(),
                    file.split('.').next().unwrap_or(file)
                ));
            }
        }
    }
    Ok(())
}

/// A run ready to start.
pub struct Prepared {
    id: String,
    group: Option<PathBuf>,
    events_before: [u64; 2],
}

impl Prepared {
    /// Starts `cmd` (prepared by [`prepare`]) as the run's main process. The reaper does not
    /// see it until it is known as one: it stays its `Child`'s to wait for.
    pub fn spawn(
        self,
        cmd: &mut std::process::Command,
    ) -> std::io::Result<(std::process::Child, Contained)> {
        let mut mains = mains();
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(e) => {
                drop(mains);
                if let Some(dir) = self.group {
                    let _ = std::fs::remove_dir(dir);
                }
                return Err(e);
            }
        };
        let main = child.id() as i32;
        // Moved into its group at once, by the worker: a hook run in the child before exec
        // would make the start a fork of the whole worker (30 ms a run here) rather than a
        // vfork. What it starts in the moment before is found as the subreaper finds it.
        if let Some(dir) = &self.group
            && let Err(e) = std::fs::write(dir.join("cgroup.procs"), main.to_string())
        {
            drop(mains);
            signal_pid(main, libc::SIGKILL);
            let mut child = child;
            let _ = child.wait();
            let _ = std::fs::remove_dir(dir);
            return Err(e);
        }
        mains.push(main);
        let seen = ProcTable::read().tree(&[main]).into_iter().collect();
        let contained = Contained {
            id: self.id,
            main,
            group: self.group,
            seen,
            ended: false,
            events_before: self.events_before,
        };
        Ok((child, contained))
    }
}

impl Contained {
    /// Notes the run's processes now, so that what the main process orphans later is still
    /// known as the run's (under cgroup too: what it started before it was moved into its
    /// group). Cheap enough to call every half second.
    pub fn watch(&mut self) {
        self.found();
    }

    /// Sends `signal` to every process of the run.
    pub fn signal_all(&mut self, signal: i32) {
        for pid in self.members() {
            signal_pid(pid, signal);
        }
        // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
        unsafe {
            libc::kill(-self.main, signal);
        }
    }

    /// The run's processes now, its main process included while it lives: those in its group,
    /// and those found as the subreaper finds them.
    fn members(&mut self) -> Vec<i32> {
        let mut found = self.found();
        if let Some(dir) = &self.group {
            let grouped = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            found.extend(grouped.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        found
    }

    /// The run's processes found by ancestry, by the run's id in their environment, and (while
    /// no other run goes on) as the worker's orphans.
    fn found(&mut self) -> Vec<i32> {
        let table = ProcTable::read();
        // Only processes seen before and still the same (pid and start time): a pid the system
        // gave to another process since is not the run's.
        let roots: Vec<i32> = (self.seen.iter())
            .filter(|s| table.alive(**s))
            .map(|(p, _)| *p)
            .collect();
        let mut found = table.tree(&roots);
        found.extend(table.marked(&self.id));
        if mains().len() <= 1 {
            found.extend(table.orphans());
        }
        self.seen.extend(found.iter().copied());
        found
            .into_iter()
            .filter(|p| table.alive(*p))
            .map(|(p, _)| p)
            .collect()
    }

    /// Which of its limits the run met, said for its failure's cause; None when it met none.
    pub fn limit_met(&self) -> Option<&'static str> {
        let now = limit_events(self.group.as_deref()?);
        let met = (0..2).find(|&i| now[i] > self.events_before[i])?;
        Some(LIMIT_EVENTS[met].2)
    }

    /// Ends every process of the run (the main one included) and reaps what the worker
    /// inherited; at most a few seconds, whatever the processes do.
    pub fn kill_all(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        // The common end: the program left nothing behind.
        if self.emptied() {
            self.ended = true;
            reap_orphans();
            return;
        }
        if let Some(dir) = &self.group {
            let _ = std::fs::write(dir.join("cgroup.kill"), "1");
        }
        // Stopped first, so that none forks a new one between the look and the kill.
        while Instant::now() < deadline {
            let before = self.seen.len();
            self.signal_all(libc::SIGSTOP);
            if self.seen.len() == before {
                break;
            }
        }
        self.signal_all(libc::SIGKILL);
        let mut pause = Duration::from_millis(1);
        while Instant::now() < deadline {
            reap_orphans();
            if self.emptied() {
                self.ended = true;
                break;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Whether no process of the run lives on (its main one aside, which its `Child` waits for).
    fn emptied(&mut self) -> bool {
        let grouped = self.group.as_ref().is_some_and(|dir| {
            std::fs::read_to_string(dir.join("cgroup.events"))
                .is_ok_and(|events| events.lines().any(|l| l == "populated 1"))
        });
        !grouped && self.found().iter().all(|p| *p == self.main)
    }
}

impl Drop for Contained {
    fn drop(&mut self) {
        if !self.ended {
            self.kill_all();
        }
        mains().retain(|p| *p != self.main);
        if let Some(dir) = self.group.take() {
            // An emptied group serves the next run (making and removing one costs more than
            // the rest of containment).
            if self.ended {
                free_groups().push(dir);
            } else {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

/// Run groups emptied by their runs, ready for the next.
static FREE_GROUPS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn free_groups() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    FREE_GROUPS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Every run's processes (a second signal: the worker exits now): each group killed whole,
/// and, under either mechanism, the runs' trees and the worker's orphans.
pub fn kill_every_run() {
    if let Some(Mechanism::Cgroup(base)) = MECHANISM.get() {
        for entry in std::fs::read_dir(base).into_iter().flatten().flatten() {
            let _ = std::fs::write(entry.path().join("cgroup.kill"), "1");
        }
    }
    let table = ProcTable::read();
    let roots = mains().clone();
    for (pid, _) in table.tree(&roots).into_iter().chain(table.orphans()) {
        signal_pid(pid, libc::SIGKILL);
    }
}

fn signal_pid(pid: i32, signal: i32) {
    if pid > 1 {
        // SAFETY: kill(2) on one process; no memory is involved.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// Waits for the worker's children that have ended and are no run's main process: the
/// processes a run orphaned, inherited by the subreaper.
fn reap_orphans() {
    let me = std::process::id() as i32;
    let mains = mains().clone();
    for p in ProcTable::read().procs {
        if p.ppid == me && p.zombie && !mains.contains(&p.pid) {
            // SAFETY: waitpid(2) on one ended child, without blocking.
            unsafe {
                libc::waitpid(p.pid, std::ptr::null_mut(), libc::WNOHANG);
            }
        }
    }
}

/// One process of `/proc`.
struct Proc {
    pid: i32,
    ppid: i32,
    start: u64,
    zombie: bool,
}

/// A look at every process of the host.
struct ProcTable {
    procs: Vec<Proc>,
}

impl ProcTable {
    fn read() -> ProcTable {
        let procs = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter_map(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                parse_stat(pid, &stat)
            })
            .collect();
        ProcTable { procs }
    }

    /// `roots`' living descendants, and the roots themselves while they live.
    fn tree(&self, roots: &[i32]) -> Vec<(i32, u64)> {
        let mut found: Vec<(i32, u64)> = Vec::new();
        let mut frontier: Vec<i32> = roots.to_vec();
        let mut known: HashSet<i32> = HashSet::new();
        while let Some(parent) = frontier.pop() {
            if !known.insert(parent) {
                continue;
            }
            for p in &self.procs {
                if p.pid == parent && !p.zombie {
                    found.push((p.pid, p.start));
                }
                if p.ppid == parent {
                    frontier.push(p.pid);
                }
            }
        }
        found
    }

    /// Living processes whose environment carries the run's id.
    fn marked(&self, id: &str) -> Vec<(i32, u64)> {
        let needle = format!("{RUN_ID_VAR}={id}");
        self.procs
            .iter()
            .filter(|p| !p.zombie)
            .filter(|p| {
                std::fs::read(format!("/proc/{}/environ", p.pid))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|var| var == needle.as_bytes()))
            })
            .map(|p| (p.pid, p.start))
            .collect()
    }

    /// Living children of the worker that are no run's main process.
    fn orphans(&self) -> Vec<(i32, u64)> {
        let me = std::process::id() as i32;
        let mains = mains().clone();
        self.procs
            .iter()
            .filter(|p| p.ppid == me && !p.zombie && !mains.contains(&p.pid))
            .map(|p| (p.pid, p.start))
            .collect()
    }

    fn alive(&self, (pid, start): (i32, u64)) -> bool {
        self.procs
            .iter()
            .any(|p| p.pid == pid && p.start == start && !p.zombie)
    }
}

/// `/proc/PID/stat`: the parent, the start time and whether the process has ended. The command
/// name (field 2) may hold spaces and parentheses: the fields after it follow its last `)`.
fn parse_stat(pid: i32, stat: &str) -> Option<Proc> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    Some(Proc {
        pid,
        zombie: matches!(fields.first()?.chars().next()?, 'Z' | 'X'),
        ppid: fields.get(1)?.parse().ok()?,
        start: fields.get(19)?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_stat_line_whose_name_holds_parentheses() {
        let line =
            "4242 (a) b (c)) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        let p = parse_stat(4242, line).unwrap();
        assert_eq!(
            (p.pid, p.ppid, p.start, p.zombie),
            (4242, 17, 987654, false)
        );
        let z = parse_stat(7, "7 (x) Z 1 7 7 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0").unwrap();
        assert!(z.zombie);
    }
}
