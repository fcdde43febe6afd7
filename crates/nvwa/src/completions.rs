//! Shell completions.

use std::io::Write;

use clap::CommandFactory;
use clap_complete::Shell;

use crate::cli::Cli;

/// Appended to clap's bash completion: `nvwa update <TAB>` offers the installed kernels
/// (the suffixes of /boot/vmlinuz-*), like the original's completion did.
const BASH_KERNELS: &str = r#"
# nvwa: complete `nvwa update` with the installed kernel versions.
_nvwa_with_kernels() {
    local cur="${COMP_WORDS[COMP_CWORD]}" i sub="" args=0
    for ((i = 1; i < COMP_CWORD; i++)); do
        case "${COMP_WORDS[i]}" in
            --config-dir|--socket) ((i++)) ;;
            -*) ;;
            *) if [[ -z "$sub" ]]; then sub="${COMP_WORDS[i]}"; else ((args++)); fi ;;
        esac
    done
    if [[ "$sub" == update && $args -eq 0 && "$cur" != -* ]]; then
        local f versions=()
        for f in /boot/vmlinuz-*; do
            [[ -e "$f" && "$f" != *rescue* ]] && versions+=("${f#/boot/vmlinuz-}")
        done
        COMPREPLY=($(compgen -W "${versions[*]}" -- "$cur"))
        return 0
    fi
    _nvwa "$@"
}
complete -F _nvwa_with_kernels -o bashdefault -o default nvwa
"#;

pub fn completions(shell: Shell, out: &mut dyn Write) -> std::io::Result<()> {
    let mut cmd = Cli::command();
    clap_complete::generate(shell, &mut cmd, "nvwa", out);
    if shell == Shell::Bash {
        out.write_all(BASH_KERNELS.as_bytes())?;
    }
    out.flush()
}
