#!/usr/bin/env bash
# Entrypoint of the locally built postgres:15 image (deploy/images/build-local-images.sh).
# It follows the documented contract of the public image (hub.docker.com/_/postgres):
#
#   POSTGRES_PASSWORD          required unless POSTGRES_HOST_AUTH_METHOD=trust
#   POSTGRES_USER              superuser name (default postgres)
#   POSTGRES_DB                database created on first start (default = user)
#   POSTGRES_HOST_AUTH_METHOD  auth for remote hosts (default: password_encryption,
#                              i.e. scram-sha-256)
#   POSTGRES_INITDB_ARGS       extra initdb arguments
#   POSTGRES_INITDB_WALDIR     separate WAL directory
#   *_FILE variants            read the value from a file (Docker secrets)
#   /docker-entrypoint-initdb.d/*.sh|*.sql|*.sql.gz  run once after initdb
#
# Log contract (what waiters match on), identical to the public image:
#   first start:  the temporary init-time server is started with `pg_ctl` and
#                 its log goes to STDOUT ("... database system is ready to accept
#                 connections" #1), then "PostgreSQL init process complete; ready
#                 for start up." on stdout, then the real server logs to STDERR
#                 ("... database system is ready to accept connections" #2).
#   later starts: "PostgreSQL Database directory appears to contain a database;
#                 Skipping initialization" on stdout, then the server on stderr.
set -Eeo pipefail

# file_env VAR [DEFAULT]: VAR or VAR_FILE (not both)
file_env() {
    local var="$1" fileVar="${1}_FILE" def="${2:-}" val
    if [ "${!var:-}" ] && [ "${!fileVar:-}" ]; then
        printf >&2 'error: both %s and %s are set (but are exclusive)\n' "$var" "$fileVar"
        exit 1
    fi
    val="$def"
    if [ "${!var:-}" ]; then
        val="${!var}"
    elif [ "${!fileVar:-}" ]; then
        val="$(<"${!fileVar}")"
    fi
    export "$var"="$val"
    unset "$fileVar"
}

# Is this one of postgres' "print something and exit" invocations?
wants_help() {
    local arg
    for arg; do
        case "$arg" in
            -'?'|--help|--describe-config|-V|--version) return 0 ;;
        esac
    done
    return 1
}

setup_env() {
    file_env POSTGRES_PASSWORD
    file_env POSTGRES_USER postgres
    file_env POSTGRES_DB "$POSTGRES_USER"
    file_env POSTGRES_INITDB_ARGS
    : "${POSTGRES_HOST_AUTH_METHOD:=}"
    DATABASE_ALREADY_EXISTS=
    if [ -s "$PGDATA/PG_VERSION" ]; then
        DATABASE_ALREADY_EXISTS=true
    fi
}

create_db_directories() {
    local user
    user="$(id -u)"
    mkdir -p "$PGDATA"
    chmod 00700 "$PGDATA" || :
    mkdir -p /var/run/postgresql || :
    chmod 03775 /var/run/postgresql || :
    if [ -n "${POSTGRES_INITDB_WALDIR:-}" ]; then
        mkdir -p "$POSTGRES_INITDB_WALDIR"
        [ "$user" != 0 ] || find "$POSTGRES_INITDB_WALDIR" \! -user postgres -exec chown postgres '{}' +
        chmod 700 "$POSTGRES_INITDB_WALDIR"
    fi
    if [ "$user" = 0 ]; then
        find "$PGDATA" \! -user postgres -exec chown postgres '{}' +
        find /var/run/postgresql \! -user postgres -exec chown postgres '{}' +
    fi
}

verify_minimum_env() {
    if [ -z "$POSTGRES_PASSWORD" ] && [ "$POSTGRES_HOST_AUTH_METHOD" != trust ]; then
        cat >&2 <<-'EOE'
			Error: Database is uninitialized and superuser password is not specified.
			       You must specify POSTGRES_PASSWORD to a non-empty value for the
			       superuser. For example, "-e POSTGRES_PASSWORD=password" on "docker run".

			       You may also use "POSTGRES_HOST_AUTH_METHOD=trust" to allow all
			       connections without a password. This is *not* recommended.
		EOE
        exit 1
    fi
    if [ "$POSTGRES_HOST_AUTH_METHOD" = trust ]; then
        printf '%s\n' \
            '********************************************************************************' \
            'WARNING: POSTGRES_HOST_AUTH_METHOD has been set to "trust". This will allow' \
            '         anyone with access to the Postgres port to access your database without' \
            '         a password, even if POSTGRES_PASSWORD is set.' \
            '********************************************************************************'
    fi
}

init_database_dir() {
    local args=(--username="$POSTGRES_USER")
    if [ -n "${POSTGRES_INITDB_WALDIR:-}" ]; then
        args+=(--waldir="$POSTGRES_INITDB_WALDIR")
    fi
    # (the <(...) must be on initdb's own command line to stay open)
    # shellcheck disable=SC2086 # POSTGRES_INITDB_ARGS is word-split on purpose
    if [ -n "$POSTGRES_PASSWORD" ]; then
        initdb "${args[@]}" --pwfile=<(printf '%s\n' "$POSTGRES_PASSWORD") $POSTGRES_INITDB_ARGS
    else
        initdb "${args[@]}" $POSTGRES_INITDB_ARGS
    fi
}

setup_hba_conf() {
    local auth="$POSTGRES_HOST_AUTH_METHOD"
    if [ -z "$auth" ]; then
        auth="$(postgres -C password_encryption)"   # scram-sha-256 on 15
    fi
    {
        printf '\n'
        if [ "$auth" = trust ]; then
            printf '# warning trust is enabled for all connections\n'
        fi
        printf 'host all all all %s\n' "$auth"
    } >>"$PGDATA/pg_hba.conf"
}

temp_server_start() {
    # Same server options as the final server (e.g. -c fsync=off), but only the
    # unix socket: nothing outside can connect during initialisation.
    # No -l: pg_ctl sends this server's log to STDOUT (as in the public image).
    if [ "${1:-}" = postgres ]; then
        shift
    fi
    set -- "$@" -c listen_addresses='' -p "${PGPORT:-5432}"
    PGUSER="${PGUSER:-$POSTGRES_USER}" \
        pg_ctl -D "$PGDATA" -o "$(printf '%q ' "$@")" -w start
}

temp_server_stop() {
    PGUSER="${PGUSER:-postgres}" pg_ctl -D "$PGDATA" -m fast -w stop
}

psql_init() {
    PGHOST='' PGHOSTADDR='' psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password \
        --no-psqlrc --dbname "${1:-$POSTGRES_DB}" "${@:2}"
}

setup_db() {
    local exists
    exists="$(psql_init postgres --set db="$POSTGRES_DB" --tuples-only --no-align <<-'EOSQL'
		SELECT 1 FROM pg_database WHERE datname = :'db' ;
	EOSQL
    )"
    if [ -z "$exists" ]; then
        psql_init postgres --set db="$POSTGRES_DB" <<-'EOSQL'
			CREATE DATABASE :"db" ;
		EOSQL
        printf '\n'
    fi
}

process_init_files() {
    local f
    printf '\n'
    for f in /docker-entrypoint-initdb.d/*; do
        [ -e "$f" ] || continue
        case "$f" in
            *.sh)
                if [ -x "$f" ]; then
                    printf '%s: running %s\n' "$0" "$f"
                    "$f"
                else
                    printf '%s: sourcing %s\n' "$0" "$f"
                    # shellcheck disable=SC1090
                    . "$f"
                fi
                ;;
            *.sql)    printf '%s: running %s\n' "$0" "$f"; psql_init "" -f "$f"; printf '\n' ;;
            *.sql.gz) printf '%s: running %s\n' "$0" "$f"; gunzip -c "$f" | psql_init ""; printf '\n' ;;
            *)        printf '%s: ignoring %s\n' "$0" "$f" ;;
        esac
    done
}

main() {
    # `docker run postgres:15 -c fsync=off` == `postgres -c fsync=off`
    if [ "${1:0:1}" = '-' ]; then
        set -- postgres "$@"
    fi

    if [ "$1" = postgres ] && ! wants_help "$@"; then
        setup_env
        create_db_directories
        if [ "$(id -u)" = 0 ]; then
            # Drop root and re-run this script as the postgres user.
            exec setpriv --reuid=postgres --regid=postgres --init-groups "${BASH_SOURCE[0]}" "$@"
        fi

        if [ -z "$DATABASE_ALREADY_EXISTS" ]; then
            verify_minimum_env
            init_database_dir
            setup_hba_conf
            export PGPASSWORD="${PGPASSWORD:-$POSTGRES_PASSWORD}"
            temp_server_start "$@"
            setup_db
            process_init_files
            temp_server_stop
            unset PGPASSWORD
            printf '\nPostgreSQL init process complete; ready for start up.\n\n'
        else
            printf '\nPostgreSQL Database directory appears to contain a database; Skipping initialization\n\n'
        fi
    fi

    exec "$@"
}

main "$@"
