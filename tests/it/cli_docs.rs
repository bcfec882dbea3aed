//! `crm-connect completions` and `crm-connect man`: the tab-completion
//! scripts and manual pages the Debian package ships, generated from the
//! clap definitions. The bash script is run in bash; the manual pages are
//! rendered by groff (Debian's `groff-base`, which `man` uses).

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::path::Path;
use std::process::Command;

use clap::CommandFactory;
use crm_connect::cli::Cli;

use crate::support::crm_connect;

/// The subcommands a user can type, as the binary under test defines them.
fn subcommands() -> Vec<String> {
    Cli::command().get_subcommands().filter(|c| !c.is_hide_set()).map(|c| c.get_name().to_owned()).collect()
}

/// What bash offers for the words of `line` (the last one being completed),
/// once the script `crm-connect completions bash` printed is sourced.
fn bash_completes(script: &Path, line: &[&str]) -> BTreeSet<String> {
    let words: Vec<String> = line.iter().map(|w| format!("'{w}'")).collect();
    let program = format!(
        r#"source "$1" || exit 3
function=$(complete -p crm-connect | sed -n 's/.* -F \([^ ]*\) .*/\1/p')
[ -n "$function" ] || exit 4
COMP_WORDS=({words})
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
"$function" crm-connect "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\n' "${{COMPREPLY[@]}}""#,
        words = words.join(" "),
    );
    let output =
        Command::new("bash").args(["--norc", "--noprofile", "-c", &program, "bash"]).arg(script).output().unwrap();
    assert!(output.status.success(), "bash: {}\n{}", output.status, String::from_utf8_lossy(&output.stderr));
    String::from_utf8_lossy(&output.stdout).lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

#[tokio::test]
async fn bash_completes_every_subcommand_and_the_options_after_one() {
    let run = crm_connect(&["completions", "bash"], &[]).await;
    assert_eq!(run.code, 0, "{run:?}");
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("crm-connect");
    std::fs::write(&script, &run.stdout).unwrap();

    let first = bash_completes(&script, &["crm-connect", ""]);
    for subcommand in subcommands() {
        assert!(first.contains(&subcommand), "`crm-connect <TAB>` does not offer {subcommand}: {first:?}");
    }
    assert!(first.contains("--config"), "{first:?}");

    // Past a subcommand: its own options, and the values of an enum.
    let sync = bash_completes(&script, &["crm-connect", "sync", "--t"]);
    assert_eq!(sync, BTreeSet::from(["--tenant".to_owned(), "--timeout".to_owned()]));
    let shells = bash_completes(&script, &["crm-connect", "completions", ""]);
    for shell in ["bash", "zsh", "fish"] {
        assert!(shells.contains(shell), "{shells:?}");
    }
    let formats = bash_completes(&script, &["crm-connect", "status", "--log-format", ""]);
    assert_eq!(formats, BTreeSet::from(["json".to_owned(), "text".to_owned()]));
}

#[tokio::test]
async fn the_zsh_and_fish_completions_name_every_subcommand() {
    let zsh = crm_connect(&["completions", "zsh"], &[]).await;
    assert_eq!(zsh.code, 0, "{zsh:?}");
    // zsh autoloads files from vendor-completions by this first line.
    assert_eq!(zsh.stdout.lines().next(), Some("#compdef crm-connect"));
    let fish = crm_connect(&["completions", "fish"], &[]).await;
    assert_eq!(fish.code, 0, "{fish:?}");
    for subcommand in subcommands() {
        assert!(zsh.stdout.contains(&format!("\n'{subcommand}:")), "zsh: no {subcommand}");
        assert!(
            fish.stdout.contains(&format!("__fish_crm_connect_needs_command\" -f -a \"{subcommand}\"")),
            "fish: no {subcommand}"
        );
    }

    let unknown = crm_connect(&["completions", "tcsh"], &[]).await;
    assert_eq!(unknown.code, 2, "{unknown:?}");
    assert!(unknown.stderr.contains("possible values: bash, elvish, fish, powershell, zsh"), "{unknown:?}");
}

#[test]
fn a_completion_script_written_to_a_closed_pipe_is_an_error_not_a_panic() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output =
        Command::new(env!("CARGO_BIN_EXE_crm-connect")).args(["completions", "bash"]).stdout(writer).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("crm-connect: cannot write the completion script: Broken pipe"), "{stderr}");
}

#[tokio::test]
async fn the_manual_pages_cover_every_subcommand_and_render_without_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let pages = dir.path().join("man1");
    let run = crm_connect(&["man", pages.to_str().unwrap()], &[]).await;
    assert_eq!(run.code, 0, "{run:?}");

    let written: BTreeSet<String> =
        std::fs::read_dir(&pages).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    let mut expected: BTreeSet<String> = subcommands().iter().map(|s| format!("crm-connect-{s}.1")).collect();
    expected.insert("crm-connect.1".to_owned());
    assert_eq!(written, expected);

    let main = render(&pages.join("crm-connect.1"));
    let listed = main.split_once("\nSUBCOMMANDS\n").map(|(_, rest)| rest).unwrap_or_else(|| panic!("{main}"));
    for subcommand in subcommands() {
        assert!(listed.contains(&format!("crm-connect-{subcommand}(1)")), "not in SUBCOMMANDS: {subcommand}\n{main}");
        let page = render(&pages.join(format!("crm-connect-{subcommand}.1")));
        let synopsis = page.split_once("\nSYNOPSIS\n").map(|(_, rest)| rest).unwrap_or_else(|| panic!("{page}"));
        // Justified: words are apart by one space or more.
        let words: Vec<&str> = synopsis.split_whitespace().take(2).collect();
        assert_eq!(words, ["crm-connect", subcommand.as_str()], "{page}");
    }
    assert!(main.contains("CRM_CONNECT_DATABASE_URL_TEMPLATE"), "the environment variables are documented");
    let sync = render(&pages.join("crm-connect-sync.1"));
    assert!(sync.contains("--dry-run"), "{sync}");
}

#[tokio::test]
async fn manual_pages_into_a_path_that_is_a_file_fail_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("taken");
    std::fs::write(&file, "").unwrap();
    let run = crm_connect(&["man", file.to_str().unwrap()], &[]).await;
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.starts_with(&format!("crm-connect: cannot write the manual pages into {}: ", file.display())));
}

/// The page as `man` shows it (plain text), failing on any groff warning.
fn render(page: &Path) -> String {
    // -k: the page's UTF-8 through preconv, as man does; -ww: every warning.
    let output = match Command::new("groff").args(["-k", "-man", "-Tutf8", "-ww", "-P", "-cbou"]).arg(page).output() {
        Ok(output) => output,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("groff is not installed: install the package `groff-base` (apt-get install groff-base)")
        }
        Err(e) => panic!("cannot run groff: {e}"),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && stderr.is_empty(), "groff on {}: {}\n{stderr}", page.display(), output.status);
    String::from_utf8_lossy(&output.stdout).into_owned()
}
