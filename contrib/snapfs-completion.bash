# bash completion for snapfs: verbs, options, domain names and snapshot names.
# Install: cp contrib/snapfs-completion.bash /etc/bash_completion.d/snapfs
_snapfs() {
    local cur prev words cword
    cur=${COMP_WORDS[COMP_CWORD]}
    local -a store=() args=()
    local i verb=
    for ((i = 1; i < COMP_CWORD; i++)); do
        case ${COMP_WORDS[i]} in
            --store) store=(--store "${COMP_WORDS[i + 1]}"); ((i++)) ;;
            --store=*) store=("${COMP_WORDS[i]}") ;;
            -*) ;;
            *) if [[ -z $verb ]]; then verb=${COMP_WORDS[i]}; else args+=("${COMP_WORDS[i]}"); fi ;;
        esac
    done
    local verbs="define undefine list dumpxml mount snapshot-create snapshot-create-as snapshot-list
        snapshot-dumpxml snapshot-info snapshot-current snapshot-parent snapshot-edit create-with-snapshot
        snapshot-revert snapshot-deactivate snapshot-delete snapshot-rename snapshot-compress snapshot-desc"
    if [[ -z $verb ]]; then
        COMPREPLY=($(compgen -W "--store --help --version $verbs" -- "$cur"))
        [[ ${COMP_WORDS[COMP_CWORD - 1]} == --store ]] && COMPREPLY=($(compgen -d -- "$cur"))
        return
    fi
    if [[ ${COMP_WORDS[COMP_CWORD - 1]} == --store ]]; then
        COMPREPLY=($(compgen -d -- "$cur"))
        return
    fi
    if [[ ${COMP_WORDS[COMP_CWORD - 1]} == --from && $verb == snapshot-list && ${#args[@]} -ge 1 ]]; then
        COMPREPLY=($(compgen -W "$(snapfs "${store[@]}" snapshot-list "${args[0]}" --name 2>/dev/null)" -- "$cur"))
        return
    fi
    if [[ $cur == -* ]]; then
        local opts
        opts=$(snapfs "$verb" --help 2>/dev/null | grep -oE -- '--[a-z][a-z-]*' | sort -u)
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
        return
    fi
    local IFS=$'\n'
    case $verb in
        define|mount) COMPREPLY=($(compgen -f -- "$cur")) ;;
        list) ;;
        *)
            if ((${#args[@]} == 0)); then
                COMPREPLY=($(compgen -W "$(snapfs "${store[@]}" list --name 2>/dev/null)" -- "$cur"))
            elif ((${#args[@]} == 1)) && [[ $verb == snapshot-* || $verb == create-with-snapshot ]] \
                && [[ $verb != snapshot-create* && $verb != snapshot-list && $verb != snapshot-current ]]; then
                COMPREPLY=($(compgen -W "$(snapfs "${store[@]}" snapshot-list "${args[0]}" --name 2>/dev/null)" -- "$cur"))
            elif [[ $verb == snapshot-compress ]] && ((${#args[@]} == 2)); then
                COMPREPLY=($(compgen -W $'gzip\nzstd\nnone' -- "$cur"))
            fi
            ;;
    esac
}
complete -o default -F _snapfs snapfs
