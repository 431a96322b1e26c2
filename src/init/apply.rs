//! Applying rules: reading `*-save` output, planning the iptables-restore
//! input against what is installed, choosing the backend, running the tools.
//! Parsing and planning are pure; only [`Tools`] runs processes.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::render::{Family, RuleSet, CHAIN_PREFIX, COMMENT_PREFIX};
use super::InitError;

// ---------------------------------------------------------------- save output

/// One rule as iptables-save printed it: `-A CHAIN REST`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedRule {
    pub chain: String,
    /// The text after `-A CHAIN `, exactly as printed (quotes kept), so that
    /// `-D CHAIN REST` deletes this very rule.
    pub rest: String,
}

impl SavedRule {
    /// The chain this rule jumps or goes to, if any.
    pub fn target(&self) -> Option<String> {
        let words = split_words(&self.rest);
        words
            .iter()
            .position(|w| matches!(w.as_str(), "-j" | "--jump" | "-g" | "--goto"))
            .and_then(|i| words.get(i + 1).cloned())
    }

    fn comment(&self) -> Option<String> {
        let words = split_words(&self.rest);
        words
            .iter()
            .position(|w| w == "--comment")
            .and_then(|i| words.get(i + 1).cloned())
    }

    /// A rule portcullis put into a chain it does not own: a jump to one of
    /// its chains, or anything tagged with its comment.
    fn is_ours(&self) -> bool {
        self.target().is_some_and(|t| t.starts_with(CHAIN_PREFIX))
            || self
                .comment()
                .is_some_and(|c| c.starts_with(COMMENT_PREFIX))
    }
}

/// One table of iptables-save output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SavedTable {
    pub name: String,
    /// Every chain declared (`:NAME POLICY [p:b]`), built-in ones included.
    pub chains: Vec<String>,
    pub rules: Vec<SavedRule>,
}

impl SavedTable {
    fn own_chains(&self) -> Vec<String> {
        self.chains
            .iter()
            .filter(|c| c.starts_with(CHAIN_PREFIX))
            .cloned()
            .collect()
    }
    /// Our rules in chains we do not own (jumps from built-in chains).
    fn foreign_rules(&self) -> impl Iterator<Item = &SavedRule> {
        self.rules
            .iter()
            .filter(|r| !r.chain.starts_with(CHAIN_PREFIX) && r.is_ours())
    }
}

/// Parses iptables-save output (any backend; comments and counters ignored).
pub fn parse_save(text: &str) -> Vec<SavedTable> {
    let mut tables: Vec<SavedTable> = Vec::new();
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(name) = line.strip_prefix('*') {
            tables.push(SavedTable {
                name: name.trim().to_string(),
                ..Default::default()
            });
        } else if let Some(decl) = line.strip_prefix(':') {
            if let (Some(t), Some(name)) = (tables.last_mut(), decl.split_whitespace().next()) {
                t.chains.push(name.to_string());
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            // `iptables-save -c` puts counters first: `[p:b] -A ...` is not
            // produced here (we never pass -c), so a rule starts with -A.
            if let (Some(t), Some((chain, rest))) = (tables.last_mut(), rule.split_once(' ')) {
                t.rules.push(SavedRule {
                    chain: chain.to_string(),
                    rest: rest.trim().to_string(),
                });
            }
        }
    }
    tables
}

/// The number of rules (`-A` lines): how backend detection weighs a backend.
pub fn count_rules(text: &str) -> usize {
    text.lines().filter(|l| l.starts_with("-A ")).count()
}

/// Splits a rule the way iptables-restore does: on blanks, with double
/// quotes grouping words (a backslash inside them escapes the next character).
pub fn split_words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if quoted && chars.peek().is_some() => {
                // `\"` and (nft's save) `\'`: the character itself
                cur.extend(chars.next());
            }
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

// ---------------------------------------------------------------- planning

/// What a plan does, for the summary line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanStats {
    pub chains_written: usize,
    pub jumps_inserted: usize,
    pub jumps_kept: usize,
    pub rules_deleted: usize,
    pub chains_removed: usize,
}

/// An iptables-restore `--noflush` input and what it does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub input: String,
    pub stats: PlanStats,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.input.is_empty()
    }
}

/// The restore input that turns `saved` into `desired` (or, with `desired`
/// = `None`, removes everything portcullis owns):
/// - our chains are declared, which flushes them, then filled;
/// - a wanted jump that exists (same words) stays where it is, others are
///   inserted at the top; duplicate, outdated and stray jumps are deleted;
/// - our chains that are no longer wanted are flushed and removed.
///
/// Running the result twice leaves the rule set of one run.
pub fn plan(desired: Option<&RuleSet>, saved: &[SavedTable]) -> Plan {
    let mut names: Vec<String> = Vec::new();
    if let Some(d) = desired {
        names.extend(d.tables.iter().map(|t| t.name.to_string()));
    }
    for t in saved {
        if (!t.own_chains().is_empty() || t.foreign_rules().next().is_some())
            && !names.contains(&t.name)
        {
            names.push(t.name.clone());
        }
    }

    let mut plan = Plan::default();
    for name in names {
        let want = desired.and_then(|d| d.table(&name));
        let empty = SavedTable::default();
        let have = saved.iter().find(|t| t.name == name).unwrap_or(&empty);
        let want_chains: Vec<&str> = want.map(|t| t.chains.clone()).unwrap_or_default();
        let stale: Vec<String> = have
            .own_chains()
            .into_iter()
            .filter(|c| !want_chains.contains(&c.as_str()))
            .collect();

        let mut out = String::new();
        let _ = writeln!(out, "*{name}");
        for c in &want_chains {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        for c in &stale {
            let _ = writeln!(out, ":{c} - [0:0]");
        }
        let jumps = want.map(|t| t.jumps.as_slice()).unwrap_or(&[]);
        let mut present = vec![false; jumps.len()];
        for r in have.foreign_rules() {
            let words = split_words(&r.rest);
            let same = jumps.iter().enumerate().position(|(i, j)| {
                !present[i] && j.from == r.chain && split_words(&j.spec) == words
            });
            match same {
                Some(i) => {
                    present[i] = true;
                    plan.stats.jumps_kept += 1;
                }
                None => {
                    let _ = writeln!(out, "-D {} {}", r.chain, r.rest);
                    plan.stats.rules_deleted += 1;
                }
            }
        }
        if let Some(t) = want {
            for r in &t.rules {
                let _ = writeln!(out, "-A {} {}", r.chain, r.spec);
            }
            plan.stats.chains_written += t.chains.len();
            for (j, here) in t.jumps.iter().zip(&present) {
                if !here {
                    let _ = writeln!(out, "-I {} 1 {}", j.from, j.spec);
                    plan.stats.jumps_inserted += 1;
                }
            }
        }
        for c in &stale {
            let _ = writeln!(out, "-X {c}");
            plan.stats.chains_removed += 1;
        }
        out.push_str("COMMIT\n");
        plan.input.push_str(&out);
    }
    plan
}

// ---------------------------------------------------------------- backends

/// Which iptables backend to use (`--backend`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    /// The backend that already holds rules (by `-A` lines of both
    /// `*-save`), else nft.
    Auto,
    Nft,
    Legacy,
}

/// A concrete backend. `Plain` is a system whose iptables has no `-nft` /
/// `-legacy` variants: the unsuffixed tools, whatever they are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
    Plain,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
            Backend::Plain => "default",
        }
    }
    /// e.g. `ip6tables-nft-restore`.
    pub fn tool(self, fam: Family, save: bool) -> String {
        let base = match fam {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let variant = match self {
            Backend::Nft => "-nft",
            Backend::Legacy => "-legacy",
            Backend::Plain => "",
        };
        let kind = if save { "save" } else { "restore" };
        format!("{base}{variant}-{kind}")
    }
}

/// Picks a backend from the `-A` counts of the nft and legacy save output
/// (`None`: that backend is missing or unusable): legacy only when it holds
/// more rules, so a fresh namespace gets nft.
pub fn choose_backend(nft: Option<usize>, legacy: Option<usize>) -> Option<Backend> {
    match (nft, legacy) {
        (Some(n), Some(l)) if l > n => Some(Backend::Legacy),
        (Some(_), _) => Some(Backend::Nft),
        (None, Some(_)) => Some(Backend::Legacy),
        (None, None) => None,
    }
}

// ---------------------------------------------------------------- processes

/// Finds and runs the iptables tools, in PATH (or, where PATH is unset or
/// empty, in the usual sbin and bin directories).
pub struct Tools {
    dirs: Vec<PathBuf>,
}

impl Default for Tools {
    fn default() -> Self {
        let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).collect())
            .unwrap_or_default();
        dirs.retain(|d| !d.as_os_str().is_empty());
        if dirs.is_empty() {
            dirs = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"]
                .into_iter()
                .map(PathBuf::from)
                .collect();
        }
        Tools { dirs }
    }
}

impl Tools {
    pub fn find(&self, tool: &str) -> Option<PathBuf> {
        self.dirs
            .iter()
            .map(|d| d.join(tool))
            .find(|p| is_executable(p))
    }

    pub fn has(&self, tool: &str) -> bool {
        self.find(tool).is_some()
    }

    /// Runs `tool args`, feeding `stdin`; returns stdout.
    pub fn run(&self, tool: &str, args: &[&str], stdin: Option<&str>) -> Result<String, InitError> {
        let path = self.find(tool).ok_or_else(|| InitError::ToolMissing {
            tool: tool.to_string(),
        })?;
        let mut child = Command::new(&path)
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| InitError::Spawn {
                tool: tool.to_string(),
                source,
            })?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A tool that dies early closes its stdin: its stderr says why.
            let _ = pipe.write_all(text.as_bytes());
        }
        let out = child
            .wait_with_output()
            .map_err(|source| InitError::Spawn {
                tool: tool.to_string(),
                source,
            })?;
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if !out.status.success() {
            if is_permission_error(&stderr) {
                return Err(InitError::Permission {
                    tool: tool.to_string(),
                });
            }
            return Err(InitError::ToolFailed {
                tool: tool.to_string(),
                status: out.status.code().unwrap_or(-1),
                stderr: one_line(&stderr),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `*-save` output, all tables.
    pub fn save(&self, backend: Backend, fam: Family) -> Result<String, InitError> {
        self.run(&backend.tool(fam, true), &[], None)
    }

    /// `*-restore --noflush --wait`, the input on stdin.
    pub fn restore(&self, backend: Backend, fam: Family, input: &str) -> Result<(), InitError> {
        self.run(
            &backend.tool(fam, false),
            &["--noflush", "--wait"],
            Some(input),
        )
        .map(|_| ())
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn is_permission_error(stderr: &str) -> bool {
    let s = stderr.to_ascii_lowercase();
    s.contains("permission denied")
        || s.contains("must be root")
        || s.contains("operation not permitted")
}

/// iptables prints its usage hint after the error: keep what matters, on one line.
fn one_line(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Try `"))
        .collect();
    if lines.is_empty() {
        "no error message".to_string()
    } else {
        lines.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::init::render::render;

    const SAVED: &str = "# Generated by iptables-nft-save v1.8.9 (nf_tables) on Mon\n*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:PORTCULLIS_OUTPUT - [0:0]\n:PORTCULLIS_OLD - [0:0]\n-A OUTPUT -p tcp -m comment --comment \"portcullis: redirect outbound TCP\" -j PORTCULLIS_OUTPUT\n-A OUTPUT -p tcp -m comment --comment \"portcullis: redirect outbound TCP\" -j PORTCULLIS_OUTPUT\n-A OUTPUT -d 10.0.0.1/32 -j ACCEPT\n-A PREROUTING -j PORTCULLIS_OLD\n-A PORTCULLIS_OUTPUT -j RETURN\nCOMMIT\n# Completed\n";

    #[test]
    fn words() {
        assert_eq!(
            split_words(r#"-m comment --comment "portcullis: a \"b\"" -j X"#),
            vec![
                "-m",
                "comment",
                "--comment",
                "portcullis: a \"b\"",
                "-j",
                "X"
            ]
        );
        assert_eq!(split_words("  -j   RETURN "), vec!["-j", "RETURN"]);
    }

    #[test]
    fn parse_and_target() {
        let t = parse_save(SAVED);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].name, "nat");
        assert_eq!(
            t[0].own_chains(),
            vec!["PORTCULLIS_OUTPUT", "PORTCULLIS_OLD"]
        );
        assert_eq!(t[0].rules[0].target().as_deref(), Some("PORTCULLIS_OUTPUT"));
        assert_eq!(t[0].foreign_rules().count(), 3);
        assert_eq!(count_rules(SAVED), 5);
    }

    #[test]
    fn plan_keeps_one_jump_and_removes_stale() {
        let cfg = Config::parse(
            Path::new("t.toml"),
            "outbound_traffic_policy = \"ALLOW_ANY\"\n",
        )
        .unwrap();
        let rules = render(&cfg, &[]);
        let p = plan(Some(&rules.v4), &parse_save(SAVED));
        // the first identical jump stays, its duplicate and the stray jump go
        assert!(!p.input.contains("-I OUTPUT 1"), "{}", p.input);
        assert!(p.input.contains(
            "-D OUTPUT -p tcp -m comment --comment \"portcullis: redirect outbound TCP\" -j PORTCULLIS_OUTPUT\n"
        ));
        assert!(p.input.contains("-D PREROUTING -j PORTCULLIS_OLD\n"));
        assert!(p.input.contains(":PORTCULLIS_OLD - [0:0]\n"));
        assert!(p.input.ends_with("-X PORTCULLIS_OLD\nCOMMIT\n"));
        assert!(!p.input.contains("10.0.0.1"));
        assert_eq!(p.stats.jumps_kept, 1);
        assert_eq!(p.stats.rules_deleted, 2);
        assert_eq!(p.stats.chains_removed, 1);
    }

    #[test]
    fn fresh_plan_is_the_dry_run() {
        let cfg = Config::parse(Path::new("t.toml"), "").unwrap();
        let rules = render(&cfg, &[]);
        let p = plan(Some(&rules.v6), &[]);
        assert_eq!(p.input, rules.v6.restore_input());
    }

    #[test]
    fn cleanup_plan() {
        let p = plan(None, &parse_save(SAVED));
        assert_eq!(p.stats.chains_removed, 2);
        assert_eq!(p.stats.rules_deleted, 3);
        assert!(p
            .input
            .contains("-X PORTCULLIS_OUTPUT\n-X PORTCULLIS_OLD\n"));
        assert!(plan(None, &parse_save("*nat\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")).is_empty());
    }

    #[test]
    fn backend_choice() {
        assert_eq!(choose_backend(Some(0), Some(0)), Some(Backend::Nft));
        assert_eq!(choose_backend(Some(0), Some(3)), Some(Backend::Legacy));
        assert_eq!(choose_backend(Some(5), Some(3)), Some(Backend::Nft));
        assert_eq!(choose_backend(None, Some(0)), Some(Backend::Legacy));
        assert_eq!(choose_backend(None, None), None);
        assert_eq!(
            Backend::Nft.tool(Family::V6, false),
            "ip6tables-nft-restore"
        );
        assert_eq!(Backend::Plain.tool(Family::V4, true), "iptables-save");
    }

    #[test]
    fn permission_messages() {
        assert!(is_permission_error(
            "iptables-nft-save v1.8.9 (nf_tables): Could not fetch rule set generation id: Permission denied (you must be root)"
        ));
        assert!(!is_permission_error("iptables-restore: line 3 failed"));
        assert_eq!(
            one_line("Bad argument `x'\nError occurred at line: 4\nTry `iptables-restore -h' for more information."),
            "Bad argument `x'; Error occurred at line: 4"
        );
    }
}
