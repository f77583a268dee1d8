#!/usr/bin/env bash
# How long a rebuild takes, and how long its swap holds the database's write lock: the real
# daemon, caught up on an inline feed of EVENTS bank events (examples/bank_feed on port 3000),
# rebuilds each shipped projection in turn through its control socket.
#
#   benches/rebuild.sh [EVENTS]      (default 300000)
set -euo pipefail

events=${1:-300000}
root=$(cd "$(dirname "$0")/.." && pwd)
cargo build --release --quiet --manifest-path "$root/Cargo.toml" --bin projector --example bank_feed
projector="$root/target/release/projector"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

mkdir -p "$work/projections"
cp "$root/projections/account_balances.toml" "$work/projections/"
sed 's#^url = .*#url = "http://127.0.0.1:3000/inline"#; s#^format = .*#format = "inline"#' \
    "$root/consumer.toml" > "$work/consumer.toml"
cd "$work"
"$root/target/release/examples/bank_feed" --events "$events" > feed.log 2>&1 &
until curl -sf -o /dev/null "http://127.0.0.1:3000/inline?offset=0&limit=1"; do sleep 0.1; done
"$projector" run > run.log 2>&1 &
until "$projector" projections --json 2>/dev/null | grep -q "\"checkpoint\": $events,"; do
    sleep 0.2
done
# Both caught up (the ledger comes second in the listing).
until [ "$("$projector" projections --json | grep -c "\"checkpoint\": $events,")" = 2 ]; do
    sleep 0.2
done
echo "caught up on $events events; database $(du -h projector.db | cut -f1)"
for projection in account_balances account_ledger; do
    start=$(date +%s.%N)
    "$projector" rebuild "$projection" > /dev/null
    until grep -q "rebuilt.*projection=$projection" run.log; do sleep 0.02; done
    end=$(date +%s.%N)
    swap=$(grep "rebuilt.*projection=$projection" run.log | sed 's/.*swap=\([^ ]*\).*/\1/')
    rows=$("$projector" query "SELECT (SELECT count(*) FROM account_balances) + 0 AS b, (SELECT count(*) FROM account_ledger_entries) AS l" --format csv | tail -1)
    printf '%-17s rebuilt in %.2f s, the swap held the write lock %s (rows: balances,ledger = %s)\n' \
        "$projection" "$(echo "$end - $start" | bc)" "$swap" "$rows"
done
"$projector" ctl stop > /dev/null
