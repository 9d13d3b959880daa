#!/bin/sh
# First start: initdb with a password-protected superuser (POSTGRES_USER / POSTGRES_PASSWORD) and a
# database (POSTGRES_DB); then run the server in the foreground, listening on every address.
set -eu
bin=/usr/lib/postgresql/15/bin
data=/var/lib/postgresql/data
user="${POSTGRES_USER:-modret}"
if [ ! -s "$data/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD}"
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    "$bin/initdb" -D "$data" -U "$user" --pwfile="$pwfile" -A scram-sha-256
    rm -f "$pwfile"
    echo "host all all 0.0.0.0/0 scram-sha-256" >> "$data/pg_hba.conf"
    "$bin/pg_ctl" -D "$data" -o "-c listen_addresses=127.0.0.1" -w start
    PGPASSWORD="$POSTGRES_PASSWORD" psql -h 127.0.0.1 -U "$user" -d postgres \
        -c "CREATE DATABASE \"${POSTGRES_DB:-modret}\""
    "$bin/pg_ctl" -D "$data" -m fast -w stop
fi
exec "$bin/postgres" -D "$data" -c listen_addresses='*'
