#!/usr/bin/env bash
# The manual Bitrix24 runbook that crm-connect replaces, step by step, as a
# script: the baseline `cargo run --release --example bench` times against
# `crm-connect sync` on the same portal and database server.
#
# Usage:
#   WEBHOOK_URL=https://PORTAL/rest/USER_ID/CODE/ \
#   DATABASE_URL=postgresql://USER@HOST:PORT/DATABASE \
#   QUALIFIED="C1:PREPARATION" SUCCESS="WON C1:WON" FAIL="LOSE C1:LOSE" \
#   scripts/runbook.sh
#
# QUALIFIED, SUCCESS and FAIL are space-separated STATUS_IDs (any may be
# empty): the runbook asks the operator which stages set each flag.
#
# The runbook's steps, in its order:
#   3. one psql UPDATE of the config row: portal, webhook code, entity type,
#      connected_at;
#   4. curl crm.dealcategory.list, then curl crm.dealcategory.stage.list?id=N
#      for each category, and one psql INSERT ... ON CONFLICT DO NOTHING per
#      stage;
#   5. the flag UPDATEs, in one psql call.
#
# Kept as the runbook has it, since that is what is measured:
#   - crm.dealcategory.list does not list the default pipeline (category 0),
#     so its stages are never loaded;
#   - stage semantics (success / failure) are not stored, and nothing marks
#     a stage that is no longer in Bitrix24.
# Not kept: the runbook wrote the webhook URL without its user id
# (https://PORTAL/rest/CODE/METHOD), which the portal refuses; the URL is
# used whole here, otherwise not a single step would work.
#
# Needs bash, curl, psql, and jq (or python3 when jq is missing). The tables
# must exist already: crm-connect's migrations (or the older seed) create
# them. Prints one summary line on success.
set -euo pipefail

: "${WEBHOOK_URL:?set WEBHOOK_URL to https://PORTAL/rest/USER_ID/CODE/}"
: "${DATABASE_URL:?set DATABASE_URL to the tenant database}"
QUALIFIED="${QUALIFIED:-}"
SUCCESS="${SUCCESS:-}"
FAIL="${FAIL:-}"

base="${WEBHOOK_URL%/}/"
# https://PORTAL/rest/USER_ID/CODE/ -> PORTAL, CODE
rest="${base#*://}"
domain="${rest%%/*}"
path="${rest#*/}"            # rest/USER_ID/CODE/
code="${path%/}"
code="${code##*/}"
if [[ "$path" != rest/*/*/ || -z "$domain" || -z "$code" ]]; then
    echo "runbook.sh: WEBHOOK_URL must look like https://PORTAL/rest/USER_ID/CODE/" >&2
    exit 2
fi

requests=0
psql_calls=0

# One psql process per call, as the runbook runs them; the statement comes
# on stdin so that psql variables quote the values.
sql() {
    psql_calls=$((psql_calls + 1))
    psql "$DATABASE_URL" -X -q -v ON_ERROR_STOP=1 "$@" >/dev/null
}

call() {
    requests=$((requests + 1))
    curl -fsS --max-time 30 "${base}$1"
}

# Tab-separated fields of each `result` row, with jq or python3.
rows() {
    if command -v jq >/dev/null 2>&1; then
        jq -r --arg fields "$1" '.result[] | [($fields | split(",")[]) as $f | .[$f] | tostring] | @tsv'
    else
        python3 -c '
import json, sys
fields = sys.argv[1].split(",")
for row in json.load(sys.stdin)["result"]:
    print("\t".join(str(row.get(f, "")) for f in fields))
' "$1"
    fi
}

quote() {
    local value=$1
    printf "'%s'" "${value//\'/\'\'}"
}

# Step 3: the config row.
sql -v domain="$domain" -v token="$code" <<'SQL'
UPDATE config SET
    bitrix24_domain = :'domain',
    bitrix24_access_token = :'token',
    bitrix24_entity_type = 'deal',
    bitrix24_connected_at = NOW()
WHERE id = 1;
SQL

# Step 4: the pipelines, then each one's stages, one INSERT per stage.
categories=$(call "crm.dealcategory.list" | rows "ID,NAME")
category_count=0
stage_count=0
while IFS=$'\t' read -r category_id category_name; do
    [[ -n "$category_id" ]] || continue
    [[ "$category_id" =~ ^[0-9]+$ ]] || { echo "runbook.sh: unexpected category id $category_id" >&2; exit 1; }
    category_count=$((category_count + 1))
    stages=$(call "crm.dealcategory.stage.list?id=${category_id}" | rows "STATUS_ID,NAME,SORT")
    while IFS=$'\t' read -r status_id status_name sort; do
        [[ -n "$status_id" ]] || continue
        [[ "$sort" =~ ^-?[0-9]+$ ]] || sort=0
        stage_count=$((stage_count + 1))
        sql -v category_id="$category_id" -v category_name="$category_name" \
            -v status_id="$status_id" -v status_name="$status_name" -v sort="$sort" <<'SQL'
INSERT INTO bitrix24_pipeline_stages (category_id, category_name, status_id, status_name, status_sort, entity_type)
VALUES (:category_id, :'category_name', :'status_id', :'status_name', :sort, 'deal')
ON CONFLICT DO NOTHING;
SQL
    done <<<"$stages"
done <<<"$categories"

# Step 5: the flags, every UPDATE in one psql call.
updates=""
for flag in qualified success fail; do
    case $flag in
        qualified) ids=$QUALIFIED ;;
        success) ids=$SUCCESS ;;
        fail) ids=$FAIL ;;
    esac
    for status_id in $ids; do
        updates+="UPDATE bitrix24_pipeline_stages SET is_${flag}_stage = true WHERE status_id = $(quote "$status_id");"$'\n'
    done
done
if [[ -n "$updates" ]]; then
    sql <<<"$updates"
fi

echo "runbook: categories=$category_count stages=$stage_count requests=$requests psql_calls=$psql_calls"
